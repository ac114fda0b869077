/* The decision-focused methods over an op's exact solver (pert_spo_plus,
 * pert_blackbox_vjp, pert_negative_identity_vjp, pert_perturbation_gradient): hand-computed
 * values per sense, the same bits for 1 and 2 threads and for workers, overlapping
 * buffers, and every error writing nothing. */
#include <stdint.h>
#include <stdlib.h>

#include "harness.h"
#include "solvers.h"

static size_t D3 = 3;
static const int64_t SHAPE3[1] = {3};

/* One-hot argmin over d = *(size_t *)user_data entries (the first of equal ones). */
static int32_t solve_argmin(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < d; i++)
      if (x[r * d + i] < x[r * d + best]) best = i;
    for (size_t i = 0; i < d; i++) y[r * d + i] = i == best ? 1.0f : 0.0f;
  }
  return 0;
}

static int32_t argmin_ex(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  if (!info->clean) return 5; /* the methods' solves are plain solves */
  return solve_argmin(user_data, x, count, y);
}

static int32_t solve_fail(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data, (void)x, (void)count, (void)y;
  return 17;
}

static pert_op *op_of(uint32_t sense, uint32_t threads, int workers) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_device(c, "cpu");
  pert_config_set_sense(c, sense);
  pert_config_set_threads(c, threads);
  if (workers)
    pert_op_new_ex(c, SHAPE3, 1, SHAPE3, 1, argmin_ex, &D3, NULL, NULL, &op);
  else
    pert_op_new(c, SHAPE3, 1, SHAPE3, 1, sense == PERT_SENSE_MINIMIZE ? solve_argmin : solve_argmax, &D3, &op);
  pert_config_free(c);
  return op;
}

static bool spo_plus_by_hand(void) {
  pert_op *min = op_of(PERT_SENSE_MINIMIZE, 1, 0), *max = op_of(PERT_SENSE_MAXIMIZE, 1, 0);
  CHECK(min && max);
  /* problem 0: q = 2 pred - c = (5, 0, 1), y*(q) = e1: loss = -0 + 2*3 - 1 = 5, grad 2(e0 - e1);
   * problem 1: pred = c: loss 0, grad 0 */
  const float pred[6] = {3, 1, 2, 0.5f, -1, 2}, cost[6] = {1, 2, 3, 0.5f, -1, 2};
  const float sol[6] = {1, 0, 0, 0, 1, 0}, obj[2] = {1, -1};
  float loss[2], grad[6];
  CHECK_OK(pert_spo_plus(min, pred, cost, sol, obj, 2, loss, grad));
  CHECK(loss[0] == 5.0f && loss[1] == 0.0f);
  const float want[6] = {2, -2, 0, 0, 0, 0};
  CHECK(memcmp(grad, want, sizeof grad) == 0);
  /* maximizing the negated costs: the same loss, the gradient 2(y*(q) - sol) */
  float npred[6], ncost[6], nobj[2] = {-1, 1};
  for (int i = 0; i < 6; i++) npred[i] = -pred[i], ncost[i] = -cost[i];
  CHECK_OK(pert_spo_plus(max, npred, ncost, sol, nobj, 2, loss, grad));
  CHECK(loss[0] == 5.0f && loss[1] == 0.0f);
  for (int i = 0; i < 6; i++) CHECK(grad[i] == -want[i]);
  /* no gradient asked for; outputs over the inputs */
  CHECK_OK(pert_spo_plus(min, pred, cost, sol, obj, 2, loss, NULL));
  CHECK(loss[0] == 5.0f);
  float inout[6];
  memcpy(inout, pred, sizeof inout);
  float obj_inout[2] = {1, -1};
  CHECK_OK(pert_spo_plus(min, inout, cost, sol, obj_inout, 2, obj_inout, inout));
  CHECK(obj_inout[0] == 5.0f && obj_inout[1] == 0.0f && memcmp(inout, want, sizeof inout) == 0);
  pert_op_free(min);
  pert_op_free(max);
  return true;
}

static bool blackbox_and_negative_identity_by_hand(void) {
  pert_op *min = op_of(PERT_SENSE_MINIMIZE, 1, 0), *max = op_of(PERT_SENSE_MAXIMIZE, 1, 0);
  const float theta[3] = {1, 2, 3}, g[3] = {1, 0, 0};
  float y[3], grad[3];
  CHECK_OK(pert_op_solve(min, theta, 1, y));
  CHECK(y[0] == 1 && y[1] == 0 && y[2] == 0);
  /* theta + 1.5 g = (2.5, 2, 3): y* = e1; grad = (e1 - e0) / 1.5 */
  CHECK_OK(pert_blackbox_vjp(min, theta, y, g, 1, 1.5, grad));
  CHECK(grad[0] == -1.0f / 1.5f && grad[1] == 1.0f / 1.5f && grad[2] == 0.0f);
  /* a small step moves nothing */
  CHECK_OK(pert_blackbox_vjp(min, theta, y, g, 1, 0.5, grad));
  CHECK(grad[0] == 0 && grad[1] == 0 && grad[2] == 0);
  /* maximizing: theta - 1.5 g; y*(theta) = e2, theta' = (1, 2, 3) - 1.5 (0, 0, 1) = (1, 2, 1.5): e1;
   * grad = -(e1 - e2) / 1.5 */
  const float g2[3] = {0, 0, 1};
  CHECK_OK(pert_op_solve(max, theta, 1, y));
  CHECK(y[2] == 1);
  CHECK_OK(pert_blackbox_vjp(max, theta, y, g2, 1, 1.5, grad));
  CHECK(grad[0] == 0 && grad[1] == -1.0f / 1.5f && grad[2] == 1.0f / 1.5f);
  /* NID: -g minimizing, g maximizing; in place */
  float inout[3] = {1, -2, 3};
  CHECK_OK(pert_negative_identity_vjp(min, inout, 1, inout));
  CHECK(inout[0] == -1 && inout[1] == 2 && inout[2] == -3);
  CHECK_OK(pert_negative_identity_vjp(max, inout, 1, grad));
  CHECK(memcmp(grad, inout, sizeof grad) == 0);
  pert_op_free(min);
  pert_op_free(max);
  return true;
}

static bool perturbation_gradient_by_hand(void) {
  pert_op *min = op_of(PERT_SENSE_MINIMIZE, 1, 0), *max = op_of(PERT_SENSE_MAXIMIZE, 1, 0);
  const float pred[3] = {1, 2, 3}, cost[3] = {3, 1, 2};
  float loss, grad[3];
  /* pred + c = (4, 3, 5): e1; pred - c = (-2, 1, 1): e0; loss (3 - (-2)) / 2, grad (e1 - e0) / 2 */
  CHECK_OK(pert_perturbation_gradient(min, pred, cost, 1, 1.0, 1, &loss, grad));
  CHECK(loss == 2.5f && grad[0] == -0.5f && grad[1] == 0.5f && grad[2] == 0);
  /* one-sided: y*(pred) = e0 = y*(pred - c): loss 1 - (-2) = 3 = <c, y*(pred)>, grad 0 */
  CHECK_OK(pert_perturbation_gradient(min, pred, cost, 1, 1.0, 0, &loss, grad));
  CHECK(loss == 3.0f && grad[0] == 0 && grad[1] == 0 && grad[2] == 0);
  /* maximizing: pred + c: e2 (5); pred - c = (-2, 1, 1): e1 (first of the equal); loss
   * -(5 - 1) / 2 = -2, grad -(e2 - e1) / 2 */
  CHECK_OK(pert_perturbation_gradient(max, pred, cost, 1, 1.0, 1, &loss, grad));
  CHECK(loss == -2.0f && grad[0] == 0 && grad[1] == 0.5f && grad[2] == -0.5f);
  pert_op_free(min);
  pert_op_free(max);
  return true;
}

/* The same bits on 1 and 2 threads and on an op's workers, over a batch of 61 problems. */
static bool same_bits_for_any_threads(void) {
  enum { B = 61, N = B * 3 };
  float pred[N], cost[N], sol[N], obj[B], g[N];
  uint64_t s = 12345;
  for (int i = 0; i < N; i++) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    pred[i] = (float)((s >> 40) % 1000) / 250.0f - 2.0f;
    cost[i] = (float)((s >> 20) % 1000) / 250.0f - 2.0f;
    g[i] = (float)((s >> 10) % 1000) / 500.0f - 1.0f;
  }
  CHECK(solve_argmin(&D3, cost, B, sol) == 0);
  for (int b = 0; b < B; b++)
    obj[b] = cost[3 * b] * sol[3 * b] + cost[3 * b + 1] * sol[3 * b + 1] + cost[3 * b + 2] * sol[3 * b + 2];
  float out[3][2 * B + 3 * N];
  for (int k = 0; k < 3; k++) {
    pert_op *op = op_of(PERT_SENSE_MINIMIZE, k == 0 ? 1 : 2, k == 2);
    CHECK(op != NULL);
    float *o = out[k], y[N];
    CHECK_OK(pert_spo_plus(op, pred, cost, sol, obj, B, o, o + B));
    CHECK_OK(pert_op_solve(op, pred, B, y));
    CHECK_OK(pert_blackbox_vjp(op, pred, y, g, B, 10.0, o + B + N));
    CHECK_OK(pert_perturbation_gradient(op, pred, cost, B, 0.5, 1, o + B + 2 * N, o + 2 * B + 2 * N));
    pert_op_free(op);
  }
  CHECK(memcmp(out[0], out[1], sizeof out[0]) == 0);
  CHECK(memcmp(out[0], out[2], sizeof out[0]) == 0);
  return true;
}

static bool errors_write_nothing(void) {
  pert_op *op = op_of(PERT_SENSE_MINIMIZE, 1, 0);
  const float x[6] = {1, 2, 3, 4, 5, 6}, bad[6] = {1, 2, 3, 4, NAN, 6}, obj[2] = {1, 4};
  float loss[2] = {-7, -7}, grad[6] = {-7, -7, -7, -7, -7, -7};
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_spo_plus(NULL, x, x, x, obj, 2, loss, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_spo_plus(op, x, NULL, x, obj, 2, loss, grad));
  CHECK(last_error_contains("true_cost is NULL"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_spo_plus(op, x, x, x, NULL, 2, loss, grad));
  CHECK(last_error_contains("true_obj is NULL"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_spo_plus(op, x, x, x, obj, 2, NULL, grad));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_spo_plus(op, x, x, bad, obj, 2, loss, grad));
  CHECK(last_error_contains("true_sol[1][1] is NaN"));
  /* each input named, whichever makes 2 * pred_cost - true_cost non-finite (inf - inf too) */
  const float inf[6] = {1, INFINITY, 3, 4, 5, 6}, minus_inf[6] = {1, 2, 3, -INFINITY, 5, 6};
  const float bad_obj[2] = {1, INFINITY};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_spo_plus(op, bad, x, x, obj, 2, loss, grad));
  CHECK(last_error_contains("pred_cost[1][1] is NaN"));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_spo_plus(op, x, minus_inf, x, obj, 2, loss, grad));
  CHECK(last_error_contains("true_cost[1][0] is -inf"));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_spo_plus(op, inf, inf, x, obj, 2, loss, grad));
  CHECK(last_error_contains("pred_cost[0][1] is inf"));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_spo_plus(op, x, x, x, bad_obj, 2, loss, grad));
  CHECK(last_error_contains("true_obj[1] is inf")); /* one value per problem: one index */
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_spo_plus(op, x, x, x, obj, SIZE_MAX / 2, loss, grad));
  const double bad_steps[5] = {0.0, -1.0, NAN, INFINITY, 1e-50};
  for (int i = 0; i < 5; i++) {
    CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_blackbox_vjp(op, x, x, x, 2, bad_steps[i], grad));
    CHECK(last_error_contains("lambda must be finite and > 0"));
    CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT,
                 pert_perturbation_gradient(op, x, x, 2, bad_steps[i], 1, loss, grad));
    CHECK(last_error_contains("sigma must be finite and > 0"));
  }
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_blackbox_vjp(op, x, x, bad, 2, 1.0, grad));
  CHECK(last_error_contains("grad_output[1][1] is NaN"));
  /* the methods check their inputs as they read them: each input still named, in order */
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_blackbox_vjp(op, bad, x, x, 2, 1.0, grad));
  CHECK(last_error_contains("theta[1][1] is NaN"));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_blackbox_vjp(op, x, minus_inf, x, 2, 1.0, grad));
  CHECK(last_error_contains("y[1][0] is -inf"));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_blackbox_vjp(op, inf, x, inf, 2, 1.0, grad));
  CHECK(last_error_contains("theta[0][1] is inf"));
  const float huge[6] = {3e38f, 3e38f, 3e38f, 3e38f, 3e38f, 3e38f};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_blackbox_vjp(op, huge, x, huge, 2, 10.0, grad));
  CHECK(last_error_contains("theta + lambda * grad_output is inf at [0][0]"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_negative_identity_vjp(op, x, 2, NULL));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_negative_identity_vjp(op, minus_inf, 2, grad));
  CHECK(last_error_contains("grad_output[1][0] is -inf"));
  for (int two_sided = 0; two_sided < 2; two_sided++) {
    CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT,
                 pert_perturbation_gradient(op, bad, x, 2, 1.0, two_sided, loss, grad));
    CHECK(last_error_contains("pred_cost[1][1] is NaN"));
    CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT,
                 pert_perturbation_gradient(op, x, minus_inf, 2, 1.0, two_sided, loss, grad));
    CHECK(last_error_contains("true_cost[1][0] is -inf"));
  }
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_perturbation_gradient(op, huge, huge, 2, 1.0, 1, loss, grad));
  CHECK(last_error_contains("pred_cost + sigma * true_cost is inf at [0][0]"));
  pert_op *failing = NULL;
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_fail, &D3, &failing));
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_spo_plus(failing, x, x, x, obj, 2, loss, grad));
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_blackbox_vjp(failing, x, x, x, 2, 1.0, grad));
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_perturbation_gradient(failing, x, x, 2, 1.0, 1, loss, grad));
  /* solutions not of the cost's shape: no linear objective */
  pert_op *scalar = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, NULL, 0, solve_or, &D3, &scalar));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_spo_plus(scalar, x, x, x, obj, 2, loss, grad));
  CHECK(last_error_contains("SPO+ needs output_shape == input_shape"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_negative_identity_vjp(scalar, x, 2, grad));
  /* an op without a solver */
  pert_op *external = NULL;
  CHECK_OK(pert_op_new_external(c, SHAPE3, 1, SHAPE3, 1, &external));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_spo_plus(external, x, x, x, obj, 2, loss, grad));
  CHECK(loss[0] == -7 && loss[1] == -7);
  for (int i = 0; i < 6; i++) CHECK(grad[i] == -7);
  /* batch 0: nothing read or written */
  CHECK_OK(pert_spo_plus(op, NULL, NULL, NULL, NULL, 0, NULL, NULL));
  CHECK_OK(pert_blackbox_vjp(op, NULL, NULL, NULL, 0, 1.0, NULL));
  CHECK_OK(pert_negative_identity_vjp(op, NULL, 0, NULL));
  CHECK_OK(pert_perturbation_gradient(op, NULL, NULL, 0, 1.0, 1, NULL, NULL));
  pert_op_free(external);
  pert_op_free(scalar);
  pert_op_free(failing);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* Results near float32's limit: a gradient beyond it fails only a call that asks for the
 * gradient (the loss alone is returned when grad is NULL), and SPO+'s 2 pred - cost is
 * refused only when it is itself beyond float32's range (not for an intermediate 2 pred). */
static bool float32_limits(void) {
  pert_op *op = op_of(PERT_SENSE_MINIMIZE, 1, 0);
  CHECK(op != NULL);
  float loss = -7, grad[3] = {-7, -7, -7};
  /* SPO+: q = (0, 2, 2), y*(q) = e0, loss = -0 + 2 <pred, sol> - 0 = 0; grad[0] = 2 (3e38 - 1) */
  const float pred[3] = {0, 1, 1}, cost[3] = {0, 0, 0}, sol[3] = {3e38f, 0, 0}, obj[1] = {0};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_spo_plus(op, pred, cost, sol, obj, 1, &loss, grad));
  CHECK(last_error_contains("the SPO+ gradient is inf at [0][0]"));
  CHECK(loss == -7 && grad[0] == -7 && grad[1] == -7 && grad[2] == -7);
  CHECK_OK(pert_spo_plus(op, pred, cost, sol, obj, 1, &loss, NULL));
  CHECK(loss == 0);
  /* PG, two-sided, sigma 1e-40: w+ = e1, w- = e0, loss 0, grad (e1 - e0) / 2e-40 */
  const float p2[3] = {0, 0, 5}, t2[3] = {1, -1, 0};
  loss = -7;
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_perturbation_gradient(op, p2, t2, 1, 1e-40, 1, &loss, grad));
  CHECK(last_error_contains("the PG gradient is"));
  CHECK(loss == -7 && grad[0] == -7);
  CHECK_OK(pert_perturbation_gradient(op, p2, t2, 1, 1e-40, 1, &loss, NULL));
  CHECK(loss == 0);
  /* SPO+ at 2 * 3e38 - 3e38 = 3e38 (finite; 2 pred alone is not): q = (3e38, 1, 2),
   * y*(q) = e1, loss = -1 + 2 * 1 - 1 = 0, grad = 2 (e1 - e1) = 0 */
  const float p3[3] = {3e38f, 1, 2}, c3[3] = {3e38f, 1, 2}, s3[3] = {0, 1, 0}, o3[1] = {1};
  CHECK_OK(pert_spo_plus(op, p3, c3, s3, o3, 1, &loss, grad));
  CHECK(loss == 0 && grad[0] == 0 && grad[1] == 0 && grad[2] == 0);
  /* beyond it: 2 * 3e38 - (-3e38) */
  const float c4[3] = {-3e38f, 1, 2};
  loss = -7;
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_spo_plus(op, p3, c4, s3, o3, 1, &loss, grad));
  CHECK(last_error_contains("2 * pred_cost - true_cost is inf at [0][0]"));
  CHECK(loss == -7);
  pert_op_free(op);
  return true;
}

/* Sum-of-Gamma noise: forward calls and the Fenchel-Young loss run, a tape is refused,
 * bad parameters are refused with the config unchanged. */
static bool sum_of_gamma_noise(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, 200);
  pert_config_set_sigma(c, 0.5);
  CHECK_OK(pert_config_set_noise(c, PERT_NOISE_SUM_OF_GAMMA));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sum_of_gamma(c, 0.0, 10));
  CHECK(last_error_contains("kappa must be from 0.001 to 1000"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sum_of_gamma(c, 1e-40, 10));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sum_of_gamma(c, 5e38, 10));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sum_of_gamma(c, 5.0, 0));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sum_of_gamma(c, NAN, 10));
  CHECK_OK(pert_config_set_sum_of_gamma(c, 3.0, 20));
  /* choosing Sum-of-Gamma again keeps the parameters: the draws of (3, 20), not (5, 10) */
  CHECK_OK(pert_config_set_noise(c, PERT_NOISE_SUM_OF_GAMMA));
  pert_op *op = NULL, *builtin = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op));
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, SHAPE3, 1, &builtin));
  const float theta[3] = {0.2f, 0.1f, 0.4f}, y_true[3] = {0, 0, 1};
  float y[3], y2[3], loss, grad[3];
  CHECK_OK(pert_forward(op, theta, 1, y, NULL));
  CHECK_OK(pert_forward(builtin, theta, 1, y2, NULL));
  CHECK(memcmp(y, y2, sizeof y) == 0); /* the same draws and tie rule */
  CHECK_NEAR(y[0] + y[1] + y[2], 1.0, 1e-5);
  CHECK(y[2] > y[0] && y[0] > y[1]);
  {
    /* the parameters were kept: the draws equal those of a config given (3, 20) alone */
    pert_config *c2 = NULL;
    pert_op *op2 = NULL;
    CHECK_OK(pert_config_new(&c2));
    pert_config_set_device(c2, "cpu");
    pert_config_set_num_samples(c2, 200);
    pert_config_set_sigma(c2, 0.5);
    CHECK_OK(pert_config_set_sum_of_gamma(c2, 3.0, 20));
    CHECK_OK(pert_op_new(c2, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op2));
    float y3[3];
    CHECK_OK(pert_forward(op2, theta, 1, y3, NULL));
    pert_op *fresh = NULL;
    CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &fresh));
    CHECK_OK(pert_forward(fresh, theta, 1, y2, NULL));
    CHECK(memcmp(y2, y3, sizeof y3) == 0);
    pert_op_free(fresh);
    pert_op_free(op2);
    pert_config_free(c2);
  }
  pert_tape *tape = NULL;
  float kept[3] = {-7, -7, -7};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_forward(op, theta, 1, kept, &tape));
  CHECK(last_error_contains("no closed-form density") && tape == NULL && kept[0] == -7);
  CHECK_OK(pert_fenchel_young(op, theta, y_true, 1, &loss, grad));
  CHECK(loss >= 0.0f && grad[2] < 0.0f);
  pert_op_free(builtin);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* I-MLE and AI-MLE: the forward equals pert_forward on the same draws; the one-sided
 * gradient is its formula on the draws' solutions (recomputed here from a twin op's
 * draw); the AI-MLE state moves; errors write nothing. */
static bool imle_by_its_formula(void) {
  enum { B = 2, N = 16 };
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, N);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_seed(c, 5);
  CHECK_OK(pert_config_set_noise(c, PERT_NOISE_SUM_OF_GAMMA));
  pert_op *op = NULL, *twin = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op));
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &twin));
  const float theta[6] = {0.2f, 0.1f, 0.4f, 0.0f, 0.3f, -0.1f}, g[6] = {1, -1, 0.5f, 0, 2, -0.5f};
  float y[6], y_twin[6], grad[6];
  pert_imle *record = NULL;
  CHECK_OK(pert_imle_forward(op, theta, B, y, &record));
  CHECK(record != NULL && pert_imle_batch(record) == B);
  /* the twin's draw: the same inputs (its first call, as the op's) */
  pert_draw *draw = NULL;
  CHECK_OK(pert_draw_new(twin, theta, B, &draw));
  const float *x = pert_draw_inputs(draw);
  float ys[B * N * 3], moved[B * N * 3], ym[B * N * 3];
  CHECK(solve_argmax(&D3, x, B * N, ys) == 0);
  for (int r = 0; r < B * N; r++)
    for (int j = 0; j < 3; j++) moved[r * 3 + j] = x[r * 3 + j] + (-1.0f * 2.0f) * g[(r / N) * 3 + j];
  CHECK(solve_argmax(&D3, moved, B * N, ym) == 0);
  for (int b = 0; b < B; b++)
    for (int j = 0; j < 3; j++) {
      double mean = 0, diff = 0;
      for (int k = 0; k < N; k++) {
        mean += ys[(b * N + k) * 3 + j];
        diff += ym[(b * N + k) * 3 + j] - ys[(b * N + k) * 3 + j];
      }
      y_twin[b * 3 + j] = (float)(mean / N);
      grad[b * 3 + j] = (float)(-diff / N / 2.0);
    }
  for (int i = 0; i < 6; i++) CHECK_NEAR(y[i], y_twin[i], 1e-6);
  float got[6];
  CHECK_OK(pert_imle_vjp(op, record, g, 2.0, 0, got));
  for (int i = 0; i < 6; i++) CHECK_NEAR(got[i], grad[i], 1e-6);
  /* AI-MLE: the state moves by its step */
  pert_aimle_state state = pert_aimle_state_default();
  CHECK(state.alpha == 1.0 && state.grad_norm_avg == 1.0 && state.step == 1e-3);
  CHECK_OK(pert_aimle_vjp(op, record, g, 1, &state, got));
  int nonzero = 0;
  for (int i = 0; i < 6; i++) nonzero += fabsf(got[i]) > 1e-8f;
  CHECK_NEAR(state.grad_norm_avg, 0.9 + 0.1 * nonzero / 6.0, 1e-12);
  CHECK(state.alpha == (state.grad_norm_avg < 1.0 ? 1.0 + 1e-3 : 1.0 - 1e-3));
  /* errors write nothing */
  float keep[6] = {-7, -7, -7, -7, -7, -7};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_imle_vjp(twin, record, g, 2.0, 0, keep));
  CHECK(last_error_contains("comes from another op"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_imle_vjp(op, record, g, 0.0, 0, keep));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_imle_vjp(op, NULL, g, 1.0, 0, keep));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_aimle_vjp(op, record, g, 0, NULL, keep));
  pert_aimle_state bad = {-1.0, 1.0, 1e-3};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_aimle_vjp(op, record, g, 0, &bad, keep));
  CHECK(bad.alpha == -1.0);
  for (int i = 0; i < 6; i++) CHECK(keep[i] == -7);
  /* batch 0: an empty record (NULL buffers accepted), whose backward passes succeed and
     write nothing; the AI-MLE state is left as it was */
  pert_imle *empty = NULL;
  CHECK_OK(pert_imle_forward(op, NULL, 0, NULL, &empty));
  CHECK(empty != NULL && pert_imle_batch(empty) == 0 && pert_imle_batch(NULL) == 0);
  CHECK_OK(pert_imle_vjp(op, empty, NULL, 1.0, 1, NULL));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_imle_vjp(op, empty, NULL, -1.0, 0, NULL));
  pert_aimle_state kept = pert_aimle_state_default();
  CHECK_OK(pert_aimle_vjp(op, empty, NULL, 0, &kept, NULL));
  CHECK(kept.alpha == 1.0 && kept.grad_norm_avg == 1.0);
  pert_imle_free(empty);
  pert_imle_free(NULL);
  pert_draw_free(draw);
  pert_imle_free(record);
  pert_op_free(twin);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* The built-ins maximize <theta, y>: an op over one with the minimize sense would give
 * SPO+ and PG the minimizing formulas over a maximizing solver (the negated loss, silently)
 * and disagree with the pool losses: refused when made, nothing written. */
static bool a_builtin_op_needs_the_maximize_sense(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  CHECK_OK(pert_config_set_sense(c, PERT_SENSE_MINIMIZE));
  const uint32_t builtins[3] = {PERT_BUILTIN_ARGMAX, PERT_BUILTIN_TOPK, PERT_BUILTIN_RANKS};
  for (int i = 0; i < 3; i++) {
    pert_op *op = (pert_op *)&D3;
    CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new_builtin(c, builtins[i], 2, SHAPE3, 1, &op));
    CHECK(op == (pert_op *)&D3 && last_error_contains("built-in solvers maximize"));
  }
  CHECK_OK(pert_config_set_sense(c, PERT_SENSE_MAXIMIZE));
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_TOPK, 2, SHAPE3, 1, &op));
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(a_builtin_op_needs_the_maximize_sense),
      TEST(spo_plus_by_hand),
      TEST(blackbox_and_negative_identity_by_hand),
      TEST(perturbation_gradient_by_hand),
      TEST(same_bits_for_any_threads),
      TEST(errors_write_nothing),
      TEST(float32_limits),
      TEST(sum_of_gamma_noise),
      TEST(imle_by_its_formula),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
