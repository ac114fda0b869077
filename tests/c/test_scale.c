/* Built-in solvers, the two-phase API and external ops through the C API. */
#include <stdint.h>
#include <stdlib.h>

#include "harness.h"
#include "solvers.h"

static size_t D5 = 5;
static const int64_t SHAPE5[1] = {5};
static const float THETA[10] = {-0.6f, 1.9f, -0.2f, 1.1f, -1.0f, -0.6f, 1.0f, -0.2f, 1.8f, -1.0f};

static pert_config *config(uint64_t n) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_noise(c, PERT_NOISE_GUMBEL);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_num_samples(c, n);
  pert_config_set_seed(c, 77);
  if (pert_config_set_device(c, test_device()) != PERT_STATUS_OK) return NULL;
  return c;
}

static bool builtin_argmax_is_softmax(void) {
  enum { N = 200000 };
  pert_config *c = config(N);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, SHAPE5, 1, &op));
  pert_config_free(c);
  float y[10];
  CHECK_OK(pert_forward(op, THETA, 2, y, NULL));
  for (int b = 0; b < 2; b++) {
    double z = 0, p[5];
    for (int i = 0; i < 5; i++) z += p[i] = exp(THETA[b * 5 + i] / 0.5);
    for (int i = 0; i < 5; i++) CHECK_NEAR(y[b * 5 + i], p[i] / z, 5 * sqrt(p[i] / z * (1 - p[i] / z) / N) + 1e-6);
  }
  pert_op_free(op);
  return true;
}

static bool builtin_arguments_are_checked(void) {
  pert_config *c = config(100);
  pert_op *op = NULL;
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new_builtin(c, 3, 0, SHAPE5, 1, &op));
  CHECK(last_error_contains("got 3"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new_builtin(c, PERT_BUILTIN_TOPK, 6, SHAPE5, 1, &op));
  CHECK(last_error_contains("got k = 6"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new_builtin(c, PERT_BUILTIN_TOPK, 0, SHAPE5, 1, &op));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new_builtin(c, PERT_BUILTIN_RANKS, 0, NULL, 0, &op));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_new_builtin(NULL, PERT_BUILTIN_RANKS, 0, SHAPE5, 1, &op));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_new_builtin(c, PERT_BUILTIN_RANKS, 0, SHAPE5, 1, NULL));
  CHECK(op == NULL);
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_TOPK, 5, SHAPE5, 1, &op));
  float y[10];
  CHECK_OK(pert_forward(op, THETA, 2, y, NULL));
  for (int i = 0; i < 10; i++) CHECK(y[i] == 1.0f); /* k = 5 of 5: always all ones */
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* draw -> solve the rows anywhere -> finish gives what pert_forward gives. */
static bool two_phase_equals_the_callback_path(void) {
  pert_config *c = config(3000);
  pert_op *callback = NULL, *external = NULL;
  CHECK_OK(pert_op_new(c, SHAPE5, 1, SHAPE5, 1, solve_argmax, &D5, &callback));
  CHECK_OK(pert_op_new_external(c, SHAPE5, 1, SHAPE5, 1, &external));
  pert_config_free(c);
  float y1[10], y2[10], j1[50], j2[50];
  pert_tape *t1 = NULL, *t2 = NULL;
  CHECK_OK(pert_forward(callback, THETA, 2, y1, &t1));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_forward(external, THETA, 2, y2, NULL));
  CHECK(last_error_contains("two-phase"));
  pert_draw *draw = NULL;
  CHECK_OK(pert_draw_new(external, THETA, 2, &draw));
  pert_op_free(external); /* the draw outlives its op */
  size_t count = pert_draw_count(draw);
  CHECK(count == 2 * 3000);
  float *solutions = malloc(count * 5 * sizeof *solutions);
  CHECK(solutions != NULL);
  CHECK(solve_argmax(&D5, pert_draw_inputs(draw), count, solutions) == 0);
  CHECK_OK(pert_draw_finish(draw, solutions, y2, &t2));
  CHECK(memcmp(y1, y2, sizeof y1) == 0);
  CHECK_OK(pert_tape_jacobian(t1, j1));
  CHECK_OK(pert_tape_jacobian(t2, j2));
  CHECK(memcmp(j1, j2, sizeof j1) == 0);
  /* errors: NaN solutions, NULLs; nothing written */
  solutions[3] = NAN;
  float keep[10] = {-7};
  pert_tape *t3 = NULL;
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_draw_finish(draw, solutions, keep, &t3));
  CHECK(last_error_contains("solutions[0][3] is NaN"));
  CHECK(keep[0] == -7 && t3 == NULL);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_draw_finish(draw, NULL, keep, NULL));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_draw_finish(NULL, solutions, keep, NULL));
  CHECK(pert_draw_count(NULL) == 0 && pert_draw_inputs(NULL) == NULL);
  pert_draw *none = NULL;
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_draw_new(callback, THETA, 0, &none));
  const float bad[5] = {0, NAN, 0, 0, 0};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_draw_new(callback, bad, 1, &none));
  CHECK(none == NULL);
  free(solutions);
  pert_draw_free(draw);
  pert_draw_free(NULL);
  pert_tape_free(t1);
  pert_tape_free(t2);
  pert_op_free(callback);
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(builtin_argmax_is_softmax),
      TEST(builtin_arguments_are_checked),
      TEST(two_phase_equals_the_callback_path),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
