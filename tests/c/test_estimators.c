/* Estimators and learning through the C API: objective, Fenchel-Young loss, JVP,
 * multiplicative perturbation, baselines, antithetic pairs, and their errors. */
#include <stdint.h>
#include <stdlib.h>

#include "harness.h"
#include "solvers.h"

#define EULER_GAMMA 0.57721566490153286
#define PI 3.14159265358979323846

static size_t D3 = 3;
static const int64_t SHAPE3[1] = {3};

static pert_config *config(uint32_t noise, double sigma, uint64_t n, uint64_t seed) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_noise(c, noise);
  pert_config_set_sigma(c, sigma);
  pert_config_set_num_samples(c, n);
  pert_config_set_seed(c, seed);
  if (pert_config_set_device(c, test_device()) != PERT_STATUS_OK) return NULL;
  return c;
}

static bool setters_validate_their_numbers(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_perturbation(c, 2));
  CHECK(last_error_contains("got 2"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_baseline(c, 3));
  CHECK(last_error_contains("got 3"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sense(c, 9));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_perturbation(NULL, 0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_baseline(NULL, 0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_antithetic(NULL, true));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_sense(NULL, 0));
  CHECK_OK(pert_config_set_perturbation(c, PERT_PERTURBATION_MULTIPLICATIVE));
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
  CHECK_OK(pert_config_set_antithetic(c, true));
  CHECK_OK(pert_config_set_sense(c, PERT_SENSE_MINIMIZE));
  pert_config_free(c);
  return true;
}

static bool incompatible_settings_fail_at_op_new(void) {
  pert_op *op = NULL;
  pert_config *c = config(PERT_NOISE_GUMBEL, 0.5, 100, 0);
  CHECK_OK(pert_config_set_perturbation(c, PERT_PERTURBATION_MULTIPLICATIVE));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK(last_error_contains("multiplicative perturbation needs Normal noise"));
  CHECK_OK(pert_config_set_perturbation(c, PERT_PERTURBATION_ADDITIVE));
  CHECK_OK(pert_config_set_antithetic(c, true));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK(last_error_contains("antithetic pairs need symmetric (Normal) noise"));
  CHECK_OK(pert_config_set_noise(c, PERT_NOISE_NORMAL));
  CHECK_OK(pert_config_set_num_samples(c, 101));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK(last_error_contains("even num_samples, got 101"));
  CHECK(op == NULL);
  pert_config_free(c);
  return true;
}

/* F_sigma = sigma logsumexp(theta / sigma) + sigma gamma; loss = F - <theta, y>. */
static bool gumbel_objective_and_loss_closed_forms(void) {
  enum { N = 100000 };
  const double sigma = 0.5;
  const float theta[3] = {0.2f, 1.0f, -0.4f};
  const float y_true[3] = {1.0f, 0.0f, 0.0f};
  pert_config *c = config(PERT_NOISE_GUMBEL, sigma, N, 31);
  pert_op *op = NULL, *twin = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op));
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &twin));
  pert_config_free(c);
  double lse = 0;
  for (int i = 0; i < 3; i++) lse += exp(theta[i] / sigma);
  double f = sigma * log(lse) + sigma * EULER_GAMMA;
  double sd = sigma * PI / sqrt(6.0) / sqrt((double)N); /* s.d. of a Gumbel of scale sigma, / sqrt N */
  float y[3], value, loss, grad[3];
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 1, y, &tape));
  CHECK_OK(pert_tape_objective(tape, &value));
  CHECK_NEAR(value, f, 5 * sd);
  /* the twin's first call draws what op's first call drew: FY gradient = y_sigma - y exactly */
  CHECK_OK(pert_fenchel_young(twin, theta, y_true, 1, &loss, grad));
  CHECK_NEAR(loss, f - theta[0], 5 * sd);
  for (int i = 0; i < 3; i++) CHECK_NEAR(grad[i], y[i] - y_true[i], 1e-6);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_objective(tape, NULL));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_objective(NULL, &value));
  pert_tape_free(tape);
  pert_op_free(op);
  pert_op_free(twin);
  return true;
}

static bool fenchel_young_errors_write_nothing(void) {
  pert_config *c = config(PERT_NOISE_NORMAL, 0.5, 100, 0);
  pert_op *op = NULL, *scalar = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op));
  CHECK_OK(pert_op_new(c, SHAPE3, 1, NULL, 0, solve_or, &D3, &scalar));
  pert_config_free(c);
  const float theta[3] = {0, 1, 2}, y_nan[3] = {0, NAN, 1}, y_ok[3] = {0, 0, 1};
  float loss = -7, grad[3] = {-7, -7, -7};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_fenchel_young(op, theta, y_nan, 1, &loss, grad));
  CHECK(last_error_contains("y_true[0][1] is NaN"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_fenchel_young(op, theta, NULL, 1, &loss, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_fenchel_young(op, theta, y_ok, 1, NULL, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_fenchel_young(NULL, theta, y_ok, 1, &loss, grad));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_fenchel_young(scalar, theta, y_ok, 1, &loss, grad));
  CHECK(last_error_contains("needs output_shape == input_shape"));
  CHECK(loss == -7 && grad[0] == -7 && grad[1] == -7 && grad[2] == -7);
  pert_tape *tape = NULL;
  float y;
  CHECK_OK(pert_forward(scalar, theta, 1, &y, &tape));
  float value = -7;
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_tape_objective(tape, &value));
  CHECK(value == -7);
  pert_tape_free(tape);
  CHECK_OK(pert_fenchel_young(op, theta, y_ok, 1, &loss, NULL)); /* gradient optional */
  CHECK(isfinite(loss));
  CHECK_OK(pert_fenchel_young(op, NULL, NULL, 0, NULL, NULL)); /* batch 0 */
  pert_op_free(op);
  pert_op_free(scalar);
  return true;
}

static bool jvp_is_jacobian_times_tangent(void) {
  pert_config *c = config(PERT_NOISE_NORMAL, 0.4, 2000, 8);
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op));
  pert_config_free(c);
  const float theta[6] = {0.1f, 0.0f, -0.2f, 1.0f, 0.8f, 0.9f};
  const float tangent[6] = {1.0f, -1.0f, 0.5f, 2.0f, 0.0f, -3.0f};
  float y[6], jac[18], jvp[6] = {0};
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 2, y, &tape));
  CHECK_OK(pert_tape_jacobian(tape, jac));
  CHECK_OK(pert_tape_jvp(tape, tangent, jvp));
  for (int b = 0; b < 2; b++)
    for (int i = 0; i < 3; i++) {
      double want = 0;
      for (int j = 0; j < 3; j++) want += jac[(b * 3 + i) * 3 + j] * tangent[b * 3 + j];
      CHECK_NEAR(jvp[b * 3 + i], want, 1e-5 * (1 + fabs(want)));
    }
  const float bad[6] = {0, 0, INFINITY, 0, 0, 0};
  float keep[6] = {-7, -7, -7, -7, -7, -7};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_tape_jvp(tape, bad, keep));
  CHECK(keep[0] == -7);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_jvp(tape, NULL, keep));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_jvp(NULL, tangent, keep));
  pert_tape_free(tape);
  pert_op_free(op);
  return true;
}

/* Multiplicative identity: y = theta (the 1/2 in sigma^2/2 keeps the mean), J = I with a
 * zero entry's gradient exactly 0; antithetic pairs give the same closed forms. */
static bool multiplicative_identity_keeps_theta(void) {
  enum { N = 100000 };
  const double sigma = 0.5;
  const float theta[3] = {2.0f, -1.0f, 0.0f};
  for (int antithetic = 0; antithetic < 2; antithetic++) {
    pert_config *c = config(PERT_NOISE_NORMAL, sigma, N, 13);
    CHECK_OK(pert_config_set_perturbation(c, PERT_PERTURBATION_MULTIPLICATIVE));
    CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_NONE));
    CHECK_OK(pert_config_set_antithetic(c, antithetic));
    pert_op *op = NULL;
    CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_identity, &D3, &op));
    pert_config_free(c);
    float y[3], jac[9];
    pert_tape *tape = NULL;
    CHECK_OK(pert_forward(op, theta, 1, y, &tape));
    CHECK_OK(pert_tape_jacobian(tape, jac));
    double e = sigma * sigma;
    for (int i = 0; i < 3; i++) {
      /* s.d. |theta_i| sqrt(e^{sigma^2} - 1) / sqrt(N) (antithetic pairs only lower it) */
      CHECK_NEAR(y[i], theta[i], 5 * fabs(theta[i]) * sqrt(exp(e) - 1) / sqrt((double)N) + 1e-7);
    }
    /* J_00: s.d. sqrt((1 + 4 s^2) e^{s^2} - s^2) / (sigma sqrt N) */
    CHECK_NEAR(jac[0], 1.0, 5 * sqrt((1 + 4 * e) * exp(e) - e) / (sigma * sqrt((double)N)));
    CHECK(jac[2] == 0.0f && jac[8] == 0.0f); /* theta_2 = 0: gradient 0, no division by zero */
    pert_tape_free(tape);
    pert_op_free(op);
  }
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(setters_validate_their_numbers),
      TEST(incompatible_settings_fail_at_op_new),
      TEST(gumbel_objective_and_loss_closed_forms),
      TEST(fenchel_young_errors_write_nothing),
      TEST(jvp_is_jacobian_times_tangent),
      TEST(multiplicative_identity_keeps_theta),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
