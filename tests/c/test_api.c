/* Every function and status code: NULLs, bad values, solver failures, no partial
 * results, messages, version, ownership. */
#include <stdint.h>
#include <stdlib.h>

#include <float.h>

#include "harness.h"
#include "solvers.h"

static size_t D3 = 3;
static const int64_t SHAPE3[1] = {3};

static pert_op *make_op(pert_solver_fn solver, void *user_data) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, 100);
  pert_config_set_device(c, "cpu");
  pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solver, user_data, &op);
  pert_config_free(c);
  return op;
}

static bool version_matches_header(void) {
  char want[64];
  snprintf(want, sizeof want, "%d.%d.%d", PERT_VERSION_MAJOR, PERT_VERSION_MINOR, PERT_VERSION_PATCH);
  CHECK(strcmp(pert_version(), want) == 0);
  return true;
}

static bool status_names_cover_every_code(void) {
  CHECK(strcmp(pert_status_name(PERT_STATUS_OK), "PERT_STATUS_OK") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_NULL_ARGUMENT), "PERT_STATUS_NULL_ARGUMENT") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_INVALID_ARGUMENT), "PERT_STATUS_INVALID_ARGUMENT") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_NON_FINITE_INPUT), "PERT_STATUS_NON_FINITE_INPUT") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_SOLVER_FAILED), "PERT_STATUS_SOLVER_FAILED") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_DEVICE_UNAVAILABLE), "PERT_STATUS_DEVICE_UNAVAILABLE") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_TORCH_ERROR), "PERT_STATUS_TORCH_ERROR") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_PANIC), "PERT_STATUS_PANIC") == 0);
  CHECK(strcmp(pert_status_name(PERT_STATUS_INTERRUPTED), "PERT_STATUS_INTERRUPTED") == 0);
  CHECK(strcmp(pert_status_name(9), "PERT_STATUS_UNKNOWN") == 0);
  CHECK(strcmp(pert_status_name(UINT32_MAX), "PERT_STATUS_UNKNOWN") == 0);
  return true;
}

static bool last_error_copies_truncates_and_terminates(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sigma(c, -1.0));
  const char *want = "sigma must be finite and > 0, got -1";
  char buf[128];
  CHECK(pert_last_error(buf, sizeof buf) == strlen(want));
  CHECK(strcmp(buf, want) == 0);
  char small[6];
  memset(small, 'x', sizeof small);
  CHECK(pert_last_error(small, sizeof small) == strlen(want));
  CHECK(strcmp(small, "sigma") == 0);
  CHECK(pert_last_error(NULL, 0) == strlen(want));
  /* a successful call leaves the message */
  CHECK_OK(pert_config_set_sigma(c, 1.0));
  CHECK(pert_last_error(NULL, 0) == strlen(want));
  pert_config_free(c);
  return true;
}

static bool config_rejects_bad_values(void) {
  pert_config *c = NULL;
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_new(NULL));
  CHECK_OK(pert_config_new(&c));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_sigma(NULL, 1.0));
  CHECK(last_error_contains("config is NULL"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sigma(c, 0.0));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sigma(c, NAN));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sigma(c, INFINITY));
  /* finite and > 0, but 0, subnormal or inf as float32 */
  const double beyond[4] = {1e-300, 1e-39, 1e39, 1e300};
  for (int k = 0; k < 4; k++) {
    CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_sigma(c, beyond[k]));
    CHECK(last_error_contains("sigma must be within float32's normal range (1.1754944e-38 to 3.4028235e38)"));
  }
  CHECK_OK(pert_config_set_sigma(c, FLT_MIN));
  CHECK_OK(pert_config_set_sigma(c, FLT_MAX));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_num_samples(c, 0));
  CHECK(last_error_contains("got 0"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_num_samples(c, UINT64_MAX));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_noise(c, 3));
  CHECK(last_error_contains("got 3"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_threads(c, PERT_MAX_THREADS + 1));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_device(c, NULL));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_device(c, "gpu"));
  CHECK(last_error_contains("\"gpu\""));
  CHECK_STATUS(PERT_STATUS_DEVICE_UNAVAILABLE, pert_config_set_device(c, "cuda:1000"));
  if (pert_cuda_device_count() == 0) CHECK_STATUS(PERT_STATUS_DEVICE_UNAVAILABLE, pert_config_set_device(c, "cuda"));
  CHECK_OK(pert_config_set_device(c, "auto"));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_noise(c, PERT_NOISE_GUMBEL));
  CHECK_OK(pert_config_set_seed(c, UINT64_MAX));
  CHECK_OK(pert_config_set_threads(c, 0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_num_samples(NULL, 1));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_noise(NULL, 0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_seed(NULL, 0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_threads(NULL, 0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_device(NULL, "cpu"));
  pert_config_free(c);
  pert_config_free(NULL);
  return true;
}

/* A one-hot solver whose one is 3e38: its means fit in float32, sums of them do not. */
static int32_t solve_huge(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data, (void)x;
  for (size_t r = 0; r < count; r++) y[3 * r] = 3e38f, y[3 * r + 1] = 0, y[3 * r + 2] = 0;
  return 0;
}

/* PERT_STATUS_OK means numbers: results beyond float32's range from finite inputs are
 * refused with nothing written (theta near its limit, whose sums of samples overflow it;
 * a sigma small enough for the Jacobian's 1/sigma to), and results that stay in range at
 * such settings are returned. */
static bool results_beyond_float32_are_refused(void) {
  static size_t d3 = 3;
  const int64_t shape[1] = {3};
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, 16);
  pert_config_set_sigma(c, 1.0);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &d3, &op));
  /* 3e38 is in range, sums of its samples are not (the float32 partial sums the header
   * speaks of: any two of them) */
  const float theta[3] = {3e38f, 1, -1}, y_true[3] = {1, 0, 0};
  float y[3] = {-7, -7, -7}, value = -7, loss = -7, grad[3] = {-7, -7, -7};
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 1, y, &tape));
  CHECK(y[0] == 1 && y[1] == 0 && y[2] == 0);
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_tape_objective(tape, &value));
  CHECK(last_error_contains("value[0] would be inf, beyond float32's range"));
  CHECK(value == -7);
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_fenchel_young(op, theta, y_true, 1, &loss, grad));
  CHECK(last_error_contains("would be"));
  CHECK(loss == -7 && grad[0] == -7 && grad[1] == -7 && grad[2] == -7);
  pert_tape_free(tape);
  pert_op_free(op);
  /* solutions whose float32 sums overflow: the forward's mean is refused too */
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_huge, NULL, &op));
  y[0] = -7;
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_forward(op, theta, 1, y, NULL));
  CHECK(last_error_contains("output[0] would be inf"));
  CHECK(y[0] == -7);
  pert_op_free(op);
  /* the smallest sigma: 1 / (N sigma) is 5e36; a cotangent of 1e30 takes the plain
   * estimator's VJP beyond float32's range, while the clean-input baseline's stays 0 (every
   * sample is solved as the clean input is) */
  const float theta2[3] = {1, 0.5f, -1}, big_g[3] = {1e30f, 1e30f, 1e30f};
  float v[3] = {-7, -7, -7};
  CHECK_OK(pert_config_set_sigma(c, FLT_MIN));
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_NONE));
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &d3, &op));
  CHECK_OK(pert_forward(op, theta2, 1, y, &tape));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_tape_vjp(tape, big_g, v));
  CHECK(last_error_contains("grad_input["));
  CHECK(v[0] == -7 && v[1] == -7 && v[2] == -7);
  pert_tape_free(tape);
  pert_op_free(op);
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &d3, &op));
  CHECK_OK(pert_forward(op, theta2, 1, y, &tape));
  CHECK_OK(pert_tape_vjp(tape, big_g, v));
  CHECK(v[0] == 0 && v[1] == 0 && v[2] == 0);
  pert_tape_free(tape);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

static bool op_new_checks_arguments(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_op *op = NULL;
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_new(NULL, SHAPE3, 1, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_new(c, SHAPE3, 1, SHAPE3, 1, NULL, &D3, &op));
  CHECK(last_error_contains("solver is NULL"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_new(c, NULL, 1, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK(last_error_contains("input_shape is NULL"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_identity, &D3, NULL));
  const int64_t zero[2] = {3, 0};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, zero, 2, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK(last_error_contains("input_shape[1] must be >= 1, got 0"));
  const int64_t negative[1] = {-4};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, SHAPE3, 1, negative, 1, solve_identity, &D3, &op));
  const int64_t huge[2] = {INT64_MAX / 2, 4};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, huge, 2, SHAPE3, 1, solve_identity, &D3, &op));
  CHECK(op == NULL);
  /* rank 0 input and output: one scalar each */
  CHECK_OK(pert_op_new(c, NULL, 0, NULL, 0, solve_identity, &(size_t){1}, &op));
  CHECK(pert_op_input_numel(op) == 1 && pert_op_output_numel(op) == 1);
  pert_op_free(op);
  CHECK(pert_op_input_numel(NULL) == 0 && pert_op_output_numel(NULL) == 0);
  pert_op_free(NULL);
  pert_config_free(c);
  return true;
}

static int32_t solve_fail(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data, (void)x, (void)count, (void)y;
  return 17;
}
static int32_t solve_nan(void *user_data, const float *x, size_t count, float *y) {
  solve_identity(user_data, x, count, y);
  y[count * 3 - 1] = NAN;
  return 0;
}
static int32_t solve_nothing(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data, (void)x, (void)count, (void)y;
  return 0;
}

/* On every error: status, message, output untouched, tape not written. */
static bool forward_errors_leave_outputs_untouched(void) {
  pert_op *op = make_op(solve_identity, &D3);
  CHECK(op != NULL);
  const float theta[6] = {1, 2, 3, 4, 5, 6};
  float out[6] = {-7, -7, -7, -7, -7, -7};
  pert_tape *tape = NULL;
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_forward(NULL, theta, 2, out, &tape));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_forward(op, NULL, 2, out, &tape));
  CHECK(last_error_contains("theta is NULL"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_forward(op, theta, 2, NULL, &tape));
  const float bad[6] = {1, 2, 3, 4, NAN, 6};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_forward(op, bad, 2, out, &tape));
  CHECK(last_error_contains("theta[1][1] is NaN"));
  const float inf[3] = {INFINITY, 0, 0};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_forward(op, inf, 1, out, &tape));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_forward(op, theta, SIZE_MAX / 2, out, &tape));
  CHECK(last_error_contains("overflows"));
  for (int i = 0; i < 6; i++) CHECK(out[i] == -7);
  CHECK(tape == NULL);

  pert_solver_fn failing[3] = {solve_fail, solve_nan, solve_nothing};
  const char *messages[3] = {"returned 17", "NaN", "NaN"};
  for (int k = 0; k < 3; k++) {
    pert_op *bad_op = make_op(failing[k], &D3);
    CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(bad_op, theta, 2, out, &tape));
    CHECK(last_error_contains(messages[k]));
    for (int i = 0; i < 6; i++) CHECK(out[i] == -7);
    CHECK(tape == NULL);
    pert_op_free(bad_op);
  }
  /* batch 0: OK, nothing written, NULL buffers allowed; a tape, when asked for, is a
   * valid empty tape whose products succeed and write nothing */
  CHECK_OK(pert_forward(op, NULL, 0, NULL, NULL));
  CHECK_OK(pert_forward(op, NULL, 0, NULL, &tape));
  CHECK(tape != NULL && pert_tape_batch(tape) == 0);
  CHECK_OK(pert_tape_vjp(tape, NULL, NULL));
  CHECK_OK(pert_tape_jvp(tape, NULL, NULL));
  CHECK_OK(pert_tape_jacobian(tape, NULL));
  CHECK_OK(pert_tape_objective(tape, NULL));
  float untouched = -7;
  CHECK_OK(pert_tape_vjp(tape, &untouched, &untouched));
  CHECK(untouched == -7);
  pert_tape_free(tape);
  pert_op_free(op);
  return true;
}

static bool tape_checks_arguments_and_outlives_op(void) {
  pert_op *op = make_op(solve_identity, &D3);
  const float theta[3] = {1, 2, 3};
  float out[3], grad[3] = {9, 9, 9};
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 1, out, &tape));
  pert_op_free(op); /* the tape stays valid */
  CHECK(pert_tape_batch(tape) == 1 && pert_tape_batch(NULL) == 0);
  const float g[3] = {1, 0, 0};
  const float g_nan[3] = {1, NAN, 0};
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_vjp(NULL, g, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_vjp(tape, NULL, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_vjp(tape, g, NULL));
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_tape_vjp(tape, g_nan, grad));
  CHECK(last_error_contains("grad_output[0][1] is NaN"));
  for (int i = 0; i < 3; i++) CHECK(grad[i] == 9);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_jacobian(NULL, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_tape_jacobian(tape, NULL));
  CHECK_OK(pert_tape_vjp(tape, g, grad));
  /* identity: J ~ I, so J^T e_0 ~ e_0 (s.d. ~ sqrt(1 + 0.0025 * 3) / (0.05 * 10) ~ 2) */
  CHECK(isfinite(grad[0]) && isfinite(grad[1]) && isfinite(grad[2]));
  pert_tape_free(tape);
  pert_tape_free(NULL);
  return true;
}

static bool config_is_copied_by_op(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_num_samples(c, 50));
  pert_op *a = NULL, *b = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_sign, &D3, &a));
  CHECK_OK(pert_config_set_sigma(c, 10.0));
  CHECK_OK(pert_config_set_sigma(c, 0.05));
  pert_config_free(c); /* a keeps its own copy */
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_num_samples(c, 50));
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_sign, &D3, &b));
  pert_config_free(c);
  const float theta[3] = {0.01f, -0.02f, 0.0f};
  float ya[3], yb[3];
  CHECK_OK(pert_forward(a, theta, 1, ya, NULL));
  CHECK_OK(pert_forward(b, theta, 1, yb, NULL));
  CHECK(memcmp(ya, yb, sizeof ya) == 0);
  pert_op_free(a);
  pert_op_free(b);
  return true;
}

static bool draws_depend_on_seed_and_call_count_only(void) {
  const float theta[3] = {0.01f, -0.02f, 0.0f};
  float first[3], second[3], again[3];
  pert_op *a = make_op(solve_sign, &D3);
  pert_op *b = make_op(solve_sign, &D3);
  CHECK_OK(pert_forward(a, theta, 1, first, NULL));
  CHECK_OK(pert_forward(a, theta, 1, second, NULL));
  CHECK(memcmp(first, second, sizeof first) != 0); /* fresh noise each call */
  CHECK_OK(pert_forward(b, theta, 1, again, NULL));
  CHECK(memcmp(first, again, sizeof first) == 0); /* same seed, first call */
  pert_op_free(a);
  pert_op_free(b);
  return true;
}

/* A tape above the config's max_tape_bytes is refused before any work, nothing written.
 * (A tape whose memory runs out during the call is a TORCH_ERROR with nothing written:
 * tests/reliability.rs checks it under an address-space limit, which sanitizers and
 * valgrind, running this file, do not allow.) */
static bool tape_limit_is_checked_before_any_work(void) {
  pert_op *op = NULL;
  pert_tape *tape = NULL;
  float theta[16] = {0}, out[16];
  out[0] = -7;
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_max_tape_bytes(c, 1000));
  CHECK_OK(pert_config_set_chunk_bytes(c, 0));
  CHECK_OK(pert_config_set_chunk_bytes(c, 4096));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_chunk_bytes(NULL, 4096));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_max_tape_bytes(NULL, 4096));
  const int64_t shape[1] = {16};
  size_t d16 = 16;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_identity, &d16, &op));
  pert_config_free(c);
  /* 16 x 16 floats = 1024 bytes > 1000 */
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_forward(op, theta, 1, out, &tape));
  CHECK(last_error_contains("above max_tape_bytes 1000"));
  CHECK(tape == NULL && out[0] == -7);
  CHECK_OK(pert_forward(op, theta, 1, out, NULL)); /* no tape: nothing to limit */
  pert_op_free(op);
  return true;
}

/* The two-phase Fenchel-Young loss: a batch solved elsewhere gives what pert_fenchel_young
 * gives for the same seed and call count, bit for bit, in both senses; outputs may overlap
 * inputs; errors write nothing. */
static bool two_phase_fenchel_young_equals_the_callback_one(void) {
  enum { B = 4 };
  const float theta[B * 3] = {0.3f, -0.1f, 0.2f, 0.0f, 0.5f, 0.1f, -0.2f, 0.2f, 0.1f, 0.4f, 0.4f, 0.0f};
  const float y_true[B * 3] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0};
  for (uint32_t sense = 0; sense <= 1; sense++) {
    pert_config *c = NULL;
    CHECK_OK(pert_config_new(&c));
    CHECK_OK(pert_config_set_device(c, "cpu"));
    CHECK_OK(pert_config_set_num_samples(c, 64));
    CHECK_OK(pert_config_set_sigma(c, 0.3));
    CHECK_OK(pert_config_set_sense(c, sense));
    pert_op *op = NULL, *ext = NULL;
    CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &op));
    CHECK_OK(pert_op_new_external(c, SHAPE3, 1, SHAPE3, 1, &ext));
    float want_loss[B], want_grad[B * 3], loss[B], grad[B * 3];
    CHECK_OK(pert_fenchel_young(op, theta, y_true, B, want_loss, want_grad));
    pert_draw *draw = NULL;
    CHECK_OK(pert_draw_new(ext, theta, B, &draw));
    size_t rows = pert_draw_count(draw);
    float *solutions = malloc(rows * 3 * sizeof(float));
    CHECK(solutions != NULL);
    CHECK(solve_argmax(&D3, pert_draw_inputs(draw), rows, solutions) == 0);
    CHECK_OK(pert_draw_fenchel_young(draw, solutions, y_true, loss, grad));
    CHECK(memcmp(loss, want_loss, sizeof loss) == 0);
    CHECK(memcmp(grad, want_grad, sizeof grad) == 0);
    /* the gradient over the targets, and NULL for no gradient */
    float over[B * 3];
    memcpy(over, y_true, sizeof over);
    CHECK_OK(pert_draw_fenchel_young(draw, solutions, over, loss, over));
    CHECK(memcmp(over, want_grad, sizeof over) == 0);
    CHECK_OK(pert_draw_fenchel_young(draw, solutions, y_true, loss, NULL));
    CHECK(memcmp(loss, want_loss, sizeof loss) == 0);
    /* errors: NaN in the solutions or targets, nothing written */
    float bad[B * 3];
    memcpy(bad, y_true, sizeof bad);
    bad[4] = NAN;
    loss[0] = -9;
    CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_draw_fenchel_young(draw, solutions, bad, loss, grad));
    CHECK(loss[0] == -9);
    solutions[0] = INFINITY;
    CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_draw_fenchel_young(draw, solutions, y_true, loss, grad));
    CHECK(loss[0] == -9);
    CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_draw_fenchel_young(NULL, solutions, y_true, loss, grad));
    free(solutions);
    pert_draw_free(draw);
    pert_op_free(op);
    pert_op_free(ext);
    /* an op whose output is not its input's shape has no Fenchel-Young loss */
    const int64_t one[1] = {1};
    CHECK_OK(pert_op_new_external(c, SHAPE3, 1, one, 1, &ext));
    CHECK_OK(pert_draw_new(ext, theta, 1, &draw));
    float sol[64] = {0}, l1;
    CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_draw_fenchel_young(draw, sol, y_true, &l1, NULL));
    pert_draw_free(draw);
    pert_op_free(ext);
    pert_config_free(c);
  }
  return true;
}

/* argmin of each row of 3: the solver of a minimizing problem */
static int32_t solve_argmin3(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < 3; i++)
      if (x[3 * r + i] < x[3 * r + best]) best = i;
    for (size_t i = 0; i < 3; i++) y[3 * r + i] = i == best ? 1.0f : 0.0f;
  }
  return 0;
}

/* pert_fenchel_young_with_bound: the loss of an exact solver is never below the bound, a
 * solver of the other sense falls below it; with the bound the loss and gradient are
 * those of pert_fenchel_young; NULL bound; the two-phase form; nothing written on error. */
static bool the_fenchel_young_bound_catches_a_wrong_sense(void) {
  enum { B = 4 };
  const float theta[B * 3] = {0.3f, -0.1f, 0.2f, 0.0f, 0.5f, 0.1f, -0.2f, 0.2f, 0.1f, 0.4f, 0.4f, 0.0f};
  const float y_true[B * 3] = {0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1};
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_num_samples(c, 200));
  CHECK_OK(pert_config_set_sigma(c, 0.3));
  pert_op *right = NULL, *wrong = NULL, *twin = NULL, *ext = NULL;
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &right));
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &twin));
  CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmin3, NULL, &wrong));
  CHECK_OK(pert_op_new_external(c, SHAPE3, 1, SHAPE3, 1, &ext));
  float loss[B], grad[B * 3], bound[B], want_loss[B], want_grad[B * 3];
  CHECK_OK(pert_fenchel_young_with_bound(right, theta, y_true, B, loss, grad, bound));
  CHECK_OK(pert_fenchel_young(twin, theta, y_true, B, want_loss, want_grad));
  CHECK(memcmp(loss, want_loss, sizeof loss) == 0 && memcmp(grad, want_grad, sizeof grad) == 0);
  for (int b = 0; b < B; b++) CHECK(loss[b] >= bound[b] - 1e-5f);
  CHECK_OK(pert_fenchel_young_with_bound(wrong, theta, y_true, B, loss, NULL, bound));
  int below = 0;
  for (int b = 0; b < B; b++) below += loss[b] < bound[b] - 0.01f;
  CHECK(below >= 3);
  /* the draw's form, on the same noise (the external op's call 0 is the ops' call 0) */
  pert_draw *draw = NULL;
  CHECK_OK(pert_draw_new(ext, theta, B, &draw));
  size_t rows = pert_draw_count(draw);
  float *solutions = malloc(rows * 3 * sizeof(float));
  CHECK(solutions != NULL);
  CHECK(solve_argmax(&D3, pert_draw_inputs(draw), rows, solutions) == 0);
  float draw_loss[B], draw_bound[B];
  CHECK_OK(pert_draw_fenchel_young_with_bound(draw, solutions, y_true, draw_loss, NULL, draw_bound));
  CHECK(memcmp(draw_loss, want_loss, sizeof draw_loss) == 0);
  for (int b = 0; b < B; b++) CHECK(draw_loss[b] >= draw_bound[b] - 1e-5f);
  /* errors: nothing written, the bound included */
  float bad[B * 3];
  memcpy(bad, y_true, sizeof bad);
  bad[2] = NAN;
  bound[0] = -9;
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_fenchel_young_with_bound(right, theta, bad, B, loss, grad, bound));
  CHECK(bound[0] == -9);
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT,
               pert_draw_fenchel_young_with_bound(draw, solutions, bad, loss, grad, bound));
  CHECK(bound[0] == -9);
  /* NULL: as without the bound */
  CHECK_OK(pert_fenchel_young_with_bound(right, theta, y_true, B, loss, NULL, NULL));
  free(solutions);
  pert_draw_free(draw);
  pert_op_free(right);
  pert_op_free(twin);
  pert_op_free(wrong);
  pert_op_free(ext);
  pert_config_free(c);
  return true;
}

/* pert_op_solve: y*(x) by the op's solver (callback on 1 or 2 threads, workers with
 * info->clean, built-in), no noise (later draws unchanged), every error writes nothing. */
static int32_t solve_ex_checking_clean(void *user_data, const pert_solve_info *info, const float *x, size_t count,
                                       float *y) {
  if (!info->clean) return 5; /* a plain solve is clean: no perturbed rows */
  return solve_argmax(user_data, x, count, y);
}

static bool op_solve_is_the_plain_solver(void) {
  const float x[6] = {0.5f, 1.0f, 0.2f, 3.0f, -1.0f, 2.0f};
  const float want[6] = {0, 1, 0, 1, 0, 0};
  float y[6];
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_num_samples(c, 50);
  pert_config_set_device(c, "cpu");
  for (uint32_t threads = 1; threads <= 2; threads++) {
    CHECK_OK(pert_config_set_threads(c, threads));
    pert_op *ops[3] = {NULL, NULL, NULL};
    CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &ops[0]));
    CHECK_OK(pert_op_new_ex(c, SHAPE3, 1, SHAPE3, 1, solve_ex_checking_clean, &D3, NULL, NULL, &ops[1]));
    CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, SHAPE3, 1, &ops[2]));
    for (int k = 0; k < 3; k++) {
      memset(y, 0xff, sizeof y);
      CHECK_OK(pert_op_solve(ops[k], x, 2, y));
      CHECK(memcmp(y, want, sizeof y) == 0);
    }
    /* no noise drawn: a forward call after a solve equals one on a fresh op */
    pert_op *fresh = NULL;
    CHECK_OK(pert_op_new(c, SHAPE3, 1, SHAPE3, 1, solve_argmax, &D3, &fresh));
    float a[6], b[6];
    CHECK_OK(pert_forward(ops[0], x, 2, a, NULL));
    CHECK_OK(pert_forward(fresh, x, 2, b, NULL));
    CHECK(memcmp(a, b, sizeof a) == 0);
    /* output over x */
    float inout[6];
    memcpy(inout, x, sizeof inout);
    CHECK_OK(pert_op_solve(ops[0], inout, 2, inout));
    CHECK(memcmp(inout, want, sizeof inout) == 0);
    pert_op_free(fresh);
    for (int k = 0; k < 3; k++) pert_op_free(ops[k]);
  }
  /* errors: nothing written */
  pert_op *op = make_op(solve_argmax, &D3);
  float out[6] = {-7, -7, -7, -7, -7, -7};
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_solve(NULL, x, 2, out));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_solve(op, NULL, 2, out));
  CHECK(last_error_contains("x is NULL"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_solve(op, x, 2, NULL));
  const float bad[6] = {1, 2, 3, 4, NAN, 6};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_op_solve(op, bad, 2, out));
  CHECK(last_error_contains("x[1][1] is NaN"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_solve(op, x, SIZE_MAX / 2, out));
  pert_op *failing = make_op(solve_fail, &D3);
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(failing, x, 2, out));
  /* a solver that leaves outputs unwritten, or writes NaN, is caught (the room it
   * writes is NaN until it does) */
  pert_solver_fn unfinished[2] = {solve_nothing, solve_nan};
  for (int k = 0; k < 2; k++) {
    pert_op *careless = make_op(unfinished[k], &D3);
    CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(careless, x, 2, out));
    CHECK(last_error_contains(k == 0 ? "NaN at output 0 of unperturbed problem 0" : "NaN at output 2 of unperturbed problem 1"));
    pert_op_free(careless);
  }
  pert_op *external = NULL;
  CHECK_OK(pert_op_new_external(c, SHAPE3, 1, SHAPE3, 1, &external));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_solve(external, x, 2, out));
  for (int i = 0; i < 6; i++) CHECK(out[i] == -7);
  CHECK_OK(pert_op_solve(op, NULL, 0, NULL)); /* batch 0 */
  pert_op_free(external);
  pert_op_free(failing);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

static int freed_count = 0, finis_done = 0, finis_at_hook = -1;
static void count_free(void *data) {
  freed_count += *(int *)data;
}
static int32_t argmax_ex(void *data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)info;
  return solve_argmax(data, x, count, y);
}
static void count_fini(void *data, uint32_t worker) {
  (void)data, (void)worker;
  __atomic_add_fetch(&finis_done, 1, __ATOMIC_SEQ_CST);
}
static void note_finis(void *data) {
  (void)data;
  finis_at_hook = __atomic_load_n(&finis_done, __ATOMIC_SEQ_CST);
}

/* pert_config_clone, pert_config_describe, pert_config_set_remote_timeout: the copy has
 * every setting, the description tells configs apart, bad values are refused. */
static bool config_clone_and_describe(void) {
  pert_config *c = NULL, *copy = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_num_samples(c, 123));
  CHECK_OK(pert_config_set_sigma(c, 0.1));
  CHECK_OK(pert_config_set_remote_timeout(c, 2.5));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_remote_timeout(c, 0));
  CHECK(last_error_contains("remote_timeout"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_remote_timeout(c, NAN));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_remote_timeout(c, 2e6));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_remote_timeout(NULL, 1));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_clone(NULL, &copy));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_clone(c, NULL));
  CHECK(copy == NULL);
  CHECK_OK(pert_config_clone(c, &copy));
  char a[2048], b[2048];
  size_t n = pert_config_describe(c, a, sizeof a);
  CHECK(n > 0 && n < sizeof a && strlen(a) == n && a[n - 1] == '\n');
  CHECK(strstr(a, "num_samples=123\n") && strstr(a, "sigma=0.1\n") && strstr(a, "remote_timeout=2.5\n"));
  CHECK(pert_config_describe(copy, b, sizeof b) == n && strcmp(a, b) == 0);
  CHECK_OK(pert_config_set_seed(copy, 7)); /* the copy is its own */
  CHECK(pert_config_describe(copy, b, sizeof b) == n && strcmp(a, b) != 0);
  CHECK(pert_config_describe(c, a, sizeof a) == n && strstr(a, "seed=0\n"));
  char small[8];
  memset(small, 'x', sizeof small);
  CHECK(pert_config_describe(c, small, sizeof small) == n && small[7] == 0 && strlen(small) == 7);
  CHECK(pert_config_describe(c, NULL, 0) == n);
  CHECK(pert_config_describe(NULL, a, sizeof a) == 0 && a[0] == 0);
  pert_config_free(copy);
  pert_config_free(c);
  return true;
}

/* pert_op_on_free runs its hook once, at pert_op_free, after the op's workers' fini hooks;
 * a second registration replaces the first; pert_set_last_error sets the message. */
static bool op_free_hook_runs_once(void) {
  int one = 1, ten = 10;
  freed_count = 0;
  pert_op *op = make_op(solve_argmax, &D3);
  CHECK(op != NULL);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_on_free(NULL, count_free, &one));
  CHECK_OK(pert_op_on_free(op, count_free, &one));
  CHECK_OK(pert_op_on_free(op, count_free, &ten)); /* replaces: only this one runs */
  CHECK(freed_count == 0);
  pert_op_free(op);
  CHECK(freed_count == 10);
  op = make_op(solve_argmax, &D3);
  CHECK_OK(pert_op_on_free(op, count_free, &one));
  CHECK_OK(pert_op_on_free(op, NULL, NULL)); /* removed */
  pert_op_free(op);
  CHECK(freed_count == 10);
  /* an op with workers: the hook runs once their fini hooks have all run */
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_threads(c, 2);
  pert_config_set_num_samples(c, 100);
  pert_config_set_device(c, "cpu");
  CHECK_OK(pert_op_new_ex(c, SHAPE3, 1, SHAPE3, 1, argmax_ex, &D3, NULL, count_fini, &op));
  pert_config_free(c);
  const float theta[3] = {0.1f, 0.5f, 0.2f};
  float y[3];
  CHECK_OK(pert_forward(op, theta, 1, y, NULL)); /* the workers solve */
  CHECK(pert_op_solver_threads(op) == 2);
  CHECK_OK(pert_op_on_free(op, note_finis, NULL));
  pert_op_free(op);
  CHECK(finis_done >= 1 && finis_at_hook == finis_done); /* (each worker that solved) */
  CHECK(pert_op_solver_threads(NULL) == 0);
  op = make_op(solve_argmax, &D3); /* threads 1 */
  CHECK(pert_op_solver_threads(op) == 1);
  pert_op_free(op);
  CHECK(pert_set_last_error(PERT_STATUS_SOLVER_FAILED, "rank 2: the solver failed") == PERT_STATUS_SOLVER_FAILED);
  CHECK(last_error_contains("rank 2: the solver failed"));
  CHECK(pert_set_last_error(PERT_STATUS_INVALID_ARGUMENT, NULL) == PERT_STATUS_INVALID_ARGUMENT);
  CHECK(last_error_contains("PERT_STATUS_INVALID_ARGUMENT"));
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(the_fenchel_young_bound_catches_a_wrong_sense),
      TEST(version_matches_header),
      TEST(status_names_cover_every_code),
      TEST(last_error_copies_truncates_and_terminates),
      TEST(config_rejects_bad_values),
      TEST(results_beyond_float32_are_refused),
      TEST(op_new_checks_arguments),
      TEST(forward_errors_leave_outputs_untouched),
      TEST(tape_checks_arguments_and_outlives_op),
      TEST(config_is_copied_by_op),
      TEST(draws_depend_on_seed_and_call_count_only),
      TEST(tape_limit_is_checked_before_any_work),
      TEST(two_phase_fenchel_young_equals_the_callback_one),
      TEST(op_solve_is_the_plain_solver),
      TEST(config_clone_and_describe),
      TEST(op_free_hook_runs_once),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
