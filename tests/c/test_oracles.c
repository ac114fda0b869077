/* Closed forms of MATH.md: each estimate within 5 standard deviations of the estimator
 * (sized as MATH.md says), with fixed seeds. */
#include <stdlib.h>

#include "harness.h"
#include "solvers.h"

#define N_SAMPLES 100000

static pert_config *config(uint32_t noise, double sigma, uint64_t seed) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_noise(c, noise);
  pert_config_set_sigma(c, sigma);
  pert_config_set_num_samples(c, N_SAMPLES);
  pert_config_set_seed(c, seed);
  if (pert_config_set_device(c, test_device()) != PERT_STATUS_OK) return NULL;
  return c;
}

/* Gumbel + one-hot argmax: y = softmax(theta / sigma), J = (diag p - p p^T) / sigma. */
static bool gumbel_argmax_is_softmax(void) {
  enum { B = 2, D = 5 };
  size_t d = D;
  const double sigma = 0.5;
  const float theta[B * D] = {-0.6f, 1.9f, -0.2f, 1.1f, -1.0f, -0.6f, 1.0f, -0.2f, 1.8f, -1.0f};
  pert_config *c = config(PERT_NOISE_GUMBEL, sigma, 42);
  int64_t shape[1] = {D};
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &d, &op));
  pert_config_free(c);
  float y[B * D], jac[B * D * D];
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, B, y, &tape));
  CHECK_OK(pert_tape_jacobian(tape, jac));
  for (int b = 0; b < B; b++) {
    double p[D], z = 0;
    for (int i = 0; i < D; i++) z += p[i] = exp(theta[b * D + i] / sigma);
    for (int i = 0; i < D; i++) p[i] /= z;
    for (int i = 0; i < D; i++) {
      CHECK_NEAR(y[b * D + i], p[i], 5 * sqrt(p[i] * (1 - p[i]) / N_SAMPLES) + 1e-6);
      for (int j = 0; j < D; j++) {
        double want = ((i == j ? p[i] : 0) - p[i] * p[j]) / sigma;
        /* one-hot outputs: s.d. <= 1 / (sigma sqrt(N)) */
        CHECK_NEAR(jac[(b * D + i) * D + j], want, 5 / (sigma * sqrt(N_SAMPLES)));
      }
    }
  }
  pert_tape_free(tape);
  pert_op_free(op);
  return true;
}

/* Normal + sign: E[sign(theta + sigma Z)] = 2 Phi(theta / sigma) - 1, J = diag 2 phi / sigma. */
static bool normal_sign_is_erf(void) {
  enum { D = 4 };
  size_t d = D;
  const double sigma = 0.05;
  const float theta[D] = {-0.03f, 0.0f, 0.02f, 0.1f};
  pert_config *c = config(PERT_NOISE_NORMAL, sigma, 7);
  int64_t shape[1] = {D};
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_sign, &d, &op));
  pert_config_free(c);
  float y[D], jac[D * D];
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 1, y, &tape));
  CHECK_OK(pert_tape_jacobian(tape, jac));
  for (int i = 0; i < D; i++) {
    double m = 2 * normal_cdf(theta[i] / sigma) - 1;
    CHECK_NEAR(y[i], m, 5 * sqrt((1 - m * m) / N_SAMPLES) + 1e-6);
    for (int j = 0; j < D; j++) {
      double want = i == j ? 2 * normal_pdf(theta[i] / sigma) / sigma : 0.0;
      /* |Y| = 1 and E[Z^2] = 1: s.d. <= 1 / (sigma sqrt(N)) */
      CHECK_NEAR(jac[i * D + j], want, 5 / (sigma * sqrt(N_SAMPLES)));
    }
  }
  pert_tape_free(tape);
  pert_op_free(op);
  return true;
}

/* Identity + Normal: y = theta and J = I. */
static bool identity_gives_theta_and_unit_jacobian(void) {
  enum { D = 3 };
  size_t d = D;
  const double sigma = 0.5;
  const float theta[D] = {1.0f, -0.5f, 0.25f};
  pert_config *c = config(PERT_NOISE_NORMAL, sigma, 3);
  int64_t shape[1] = {D};
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_identity, &d, &op));
  pert_config_free(c);
  float y[D], jac[D * D];
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 1, y, &tape));
  CHECK_OK(pert_tape_jacobian(tape, jac));
  for (int i = 0; i < D; i++) {
    CHECK_NEAR(y[i], theta[i], 5 * sigma / sqrt(N_SAMPLES));
    for (int j = 0; j < D; j++) {
      /* s.d. of J_ij = sqrt(theta_i^2 + sigma^2 E[Z_i^2 Z_j^2]) / (sigma sqrt(N)) */
      double sd = sqrt(theta[i] * theta[i] + sigma * sigma * (i == j ? 3 : 1)) / (sigma * sqrt(N_SAMPLES));
      CHECK_NEAR(jac[i * D + j], i == j ? 1.0 : 0.0, 5 * sd);
    }
  }
  pert_tape_free(tape);
  pert_op_free(op);
  return true;
}

/* Gumbel + OR over signs: 1 - 2 prod_i exp(-exp(theta_i / sigma)); output rank 0. */
static bool gumbel_or_closed_form(void) {
  enum { B = 2, D = 2 };
  size_t d = D;
  const double sigma = 0.1;
  const float theta[B * D] = {-5.0f, 0.2f, -5.0f, 0.1f};
  pert_config *c = config(PERT_NOISE_GUMBEL, sigma, 11);
  int64_t shape[1] = {D};
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, NULL, 0, solve_or, &d, &op));
  pert_config_free(c);
  CHECK(pert_op_output_numel(op) == 1);
  float y[B];
  CHECK_OK(pert_forward(op, theta, B, y, NULL));
  for (int b = 0; b < B; b++) {
    double q = 1.0;
    for (int i = 0; i < D; i++) q *= exp(-exp(theta[b * D + i] / sigma));
    double m = 1 - 2 * q;
    CHECK_NEAR(y[b], m, 5 * sqrt((1 - m * m) / N_SAMPLES) + 1e-6);
  }
  pert_op_free(op);
  return true;
}

/* VJP(g) equals J^T g from the same tape (an exact identity up to float rounding). */
static bool vjp_is_jacobian_transpose_times_g(void) {
  enum { B = 2, D = 4, O = 4 };
  size_t d = D;
  const float theta[B * D] = {0.3f, -0.1f, 0.2f, 0.0f, 1.0f, 0.9f, -2.0f, 0.95f};
  const float g[B * O] = {1.0f, -2.0f, 0.5f, 3.0f, -1.0f, 0.25f, 2.0f, -0.5f};
  pert_config *c = config(PERT_NOISE_NORMAL, 0.3, 5);
  int64_t shape[1] = {D};
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &d, &op));
  pert_config_free(c);
  float y[B * O], jac[B * O * D], vjp[B * D];
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, B, y, &tape));
  CHECK_OK(pert_tape_jacobian(tape, jac));
  CHECK_OK(pert_tape_vjp(tape, g, vjp));
  for (int b = 0; b < B; b++)
    for (int j = 0; j < D; j++) {
      double want = 0;
      for (int i = 0; i < O; i++) want += jac[(b * O + i) * D + j] * g[b * O + i];
      CHECK_NEAR(vjp[b * D + j], want, 1e-5 * (1 + fabs(want)));
    }
  pert_tape_free(tape);
  pert_op_free(op);
  return true;
}

/* Historical bug: the Jacobian summed over samples instead of averaged grows with N;
 * ours must not (and must carry the 1/sigma factor: checked by the softmax oracle). */
static bool jacobian_does_not_grow_with_num_samples(void) {
  enum { D = 3 };
  size_t d = D;
  const float theta[D] = {0.1f, 0.0f, -0.1f};
  int64_t shape[1] = {D};
  double diag[2];
  const uint64_t ns[2] = {1000, 100000};
  for (int k = 0; k < 2; k++) {
    pert_config *c = config(PERT_NOISE_GUMBEL, 1.0, 9);
    pert_config_set_num_samples(c, ns[k]);
    pert_op *op = NULL;
    CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &d, &op));
    pert_config_free(c);
    float y[D], jac[D * D];
    pert_tape *tape = NULL;
    CHECK_OK(pert_forward(op, theta, 1, y, &tape));
    CHECK_OK(pert_tape_jacobian(tape, jac));
    diag[k] = jac[0];
    pert_tape_free(tape);
    pert_op_free(op);
  }
  /* both estimate p0 (1 - p0) ~ 0.22 (sigma = 1), within 5 / sqrt(1000) = 0.16 */
  CHECK_NEAR(diag[0], diag[1], 5 / sqrt(1000.0) + 5 / sqrt(100000.0));
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(gumbel_argmax_is_softmax),
      TEST(normal_sign_is_erf),
      TEST(identity_gives_theta_and_unit_jacobian),
      TEST(gumbel_or_closed_form),
      TEST(vjp_is_jacobian_transpose_times_g),
      TEST(jacobian_does_not_grow_with_num_samples),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
