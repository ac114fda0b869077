/* Solution pools (pert_pool_*, pert_op_set_pool, pert_config_set_solve_ratio,
 * pert_op_solver_calls): distinct members first in first out, a full pool answering as the
 * solver would (bit for bit), the share of rows solved, growth from the solves, the same
 * bits for any number of threads, a pool shared by ops on several threads, the handle freed
 * while an op uses it, a child forked while other threads change the pool, and every bad
 * argument refused with nothing changed. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "forking.h"
#include "harness.h"
#include "solvers.h"

enum { D = 6, B = 3, N = 400 };
static size_t DIM = D;
static const int64_t SHAPE[1] = {D};
static const float THETA[B * D] = {0.3f, -0.2f, 1.1f, 0.4f, -0.9f, 0.0f, 1.2f, 0.1f, -0.3f,
                                   0.8f, 0.5f,  -1.0f, -0.4f, 0.6f, 0.2f, 0.9f, -0.1f, 0.3f};

static pert_op *op_of(double ratio, uint32_t threads, int linear) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, N);
  pert_config_set_sigma(c, 0.7);
  pert_config_set_seed(c, 5);
  pert_config_set_threads(c, threads);
  pert_config_set_solve_ratio(c, ratio);
  pert_config_set_linear_objective(c, linear);
  pert_op_new(c, SHAPE, 1, SHAPE, 1, solve_argmax, &DIM, &op);
  pert_config_free(c);
  return op;
}

static pert_pool *pool_of_one_hots(size_t capacity) {
  pert_pool *pool = NULL;
  if (pert_pool_new(SHAPE, 1, capacity, &pool) != PERT_STATUS_OK) return NULL;
  float rows[D * D] = {0};
  for (int i = 0; i < D; i++) rows[i * D + i] = 1.0f;
  if (pert_pool_add(pool, rows, D) != PERT_STATUS_OK) return NULL;
  return pool;
}

static bool members_first_in_first_out(void) {
  pert_pool *pool = NULL;
  const int64_t two[1] = {2}, zero[2] = {2, 0};
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_pool_new(two, 1, 3, NULL));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_pool_new(zero, 2, 3, &pool));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_pool_new(two, 1, 0, &pool));
  CHECK(last_error_contains("capacity must be >= 1") && pool == NULL);
  CHECK_OK(pert_pool_new(two, 1, 3, &pool));
  CHECK(pert_pool_size(pool) == 0 && pert_pool_size(NULL) == 0);
  const float first[8] = {1, 0, 0, 1, 1, 0, -0.0f, 1}; /* [1,0] twice, [0,1] = [-0,1] */
  CHECK_OK(pert_pool_add(pool, first, 4));
  CHECK(pert_pool_size(pool) == 2);
  const float bad[4] = {5, 6, NAN, 1};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_pool_add(pool, bad, 2));
  CHECK(last_error_contains("solutions[1][0] is NaN") && pert_pool_size(pool) == 2);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_pool_add(pool, NULL, 1));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_pool_add(NULL, first, 1));
  CHECK_OK(pert_pool_add(pool, NULL, 0));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_pool_add(pool, first, SIZE_MAX / 2 + 1));
  CHECK(last_error_contains("count * output_numel") && pert_pool_size(pool) == 2);
  const float more[6] = {2, 2, 3, 3, 4, 4};
  CHECK_OK(pert_pool_add(pool, more, 3)); /* five distinct, capacity 3: the last three stay */
  CHECK(pert_pool_size(pool) == 3);
  pert_pool_free(pool);
  pert_pool_free(NULL);
  return true;
}

/* With a pool of every solution, answering 70% of the samples gives the results of solving
 * all of them, bit for bit (the callback's tie rule, the first of equals, is the pool's:
 * the oldest), tapes included; the rows solved are counted. */
static bool full_pool_answers_as_the_solver(void) {
  pert_op *solved = op_of(1.0, 1, 1), *cached = op_of(0.3, 1, 1);
  pert_pool *p1 = pool_of_one_hots(100), *p2 = pool_of_one_hots(100);
  CHECK(solved && cached && p1 && p2);
  CHECK_OK(pert_op_set_pool(solved, p1));
  CHECK_OK(pert_op_set_pool(cached, p2));
  float y1[B * D], y2[B * D], g[B * D], v1[B * D], v2[B * D];
  for (int i = 0; i < B * D; i++) g[i] = (float)(i % 5) - 2.0f;
  pert_tape *t1 = NULL, *t2 = NULL;
  CHECK_OK(pert_forward(solved, THETA, B, y1, &t1));
  CHECK_OK(pert_forward(cached, THETA, B, y2, &t2));
  CHECK(memcmp(y1, y2, sizeof y1) == 0);
  CHECK_OK(pert_tape_vjp(t1, g, v1));
  CHECK_OK(pert_tape_vjp(t2, g, v2));
  CHECK(memcmp(v1, v2, sizeof v1) == 0);
  uint64_t rows1 = 0, rows2 = 0;
  CHECK_OK(pert_op_solver_calls(solved, &rows1));
  CHECK_OK(pert_op_solver_calls(cached, &rows2));
  CHECK(rows1 == (uint64_t)B * N);
  /* rows solved ~ Binomial(B N, 0.3): within 5 standard deviations */
  double mean = 0.3 * B * N, sd = sqrt(B * N * 0.3 * 0.7);
  CHECK(fabs((double)rows2 - mean) < 5 * sd);
  CHECK(pert_pool_size(p2) == D); /* nothing new */
  pert_tape_free(t1), pert_tape_free(t2);
  pert_pool_free(p1), pert_pool_free(p2);
  pert_op_free(solved), pert_op_free(cached);
  return true;
}

/* An empty pool grows from the solves, the same for 1 and 2 threads; the handle may be
 * freed while the op uses the pool; pert_op_solve adds to it too. */
static bool empty_pool_grows_the_same_for_any_threads(void) {
  float y[2][B * D];
  uint64_t rows[2];
  for (int t = 0; t < 2; t++) {
    pert_op *op = op_of(0.5, (uint32_t)t + 1, 1);
    pert_pool *pool = NULL;
    CHECK(op);
    CHECK_OK(pert_pool_new(SHAPE, 1, 4, &pool));
    CHECK_OK(pert_op_set_pool(op, pool));
    float first[B * D];
    CHECK_OK(pert_forward(op, THETA, B, first, NULL));
    CHECK_OK(pert_op_solver_calls(op, &rows[t]));
    CHECK(rows[t] == (uint64_t)B * N); /* nothing to answer from at first */
    CHECK(pert_pool_size(pool) == 4);
    pert_pool_free(pool); /* the op keeps it */
    CHECK_OK(pert_forward(op, THETA, B, y[t], NULL));
    CHECK_OK(pert_op_solver_calls(op, &rows[t]));
    CHECK(rows[t] < (uint64_t)2 * B * N);
    pert_pool *plain = NULL;
    CHECK_OK(pert_pool_new(SHAPE, 1, 10, &plain));
    CHECK_OK(pert_op_set_pool(op, plain));
    float sol[B * D];
    CHECK_OK(pert_op_solve(op, THETA, B, sol));
    CHECK(pert_pool_size(plain) == 3); /* three problems, three argmaxes */
    CHECK_OK(pert_op_set_pool(op, NULL));
    CHECK_OK(pert_op_solve(op, THETA, B, sol));
    CHECK(pert_pool_size(plain) == 3);
    pert_pool_free(plain);
    pert_op_free(op);
  }
  CHECK(memcmp(y[0], y[1], sizeof y[0]) == 0 && rows[0] == rows[1]);
  return true;
}

typedef struct {
  pert_op *op;
  pert_status status;
} job;

static void *forward_job(void *arg) {
  job *j = arg;
  float y[B * D];
  for (int k = 0; k < 5 && j->status == PERT_STATUS_OK; k++) j->status = pert_forward(j->op, THETA, B, y, NULL);
  return NULL;
}

/* One pool shared by ops that run on several threads at once, and added to meanwhile: every
 * call succeeds and the pool stays within its capacity (a stress test for races, which
 * `make tsan` and valgrind look at). */
static bool pool_shared_by_threads(void) {
  enum { T = 4 };
  pert_pool *pool = NULL;
  CHECK_OK(pert_pool_new(SHAPE, 1, 5, &pool));
  job jobs[T];
  pthread_t th[T];
  for (int t = 0; t < T; t++) {
    jobs[t].op = op_of(0.3, 1, 1);
    jobs[t].status = PERT_STATUS_OK;
    CHECK(jobs[t].op);
    CHECK_OK(pert_op_set_pool(jobs[t].op, pool));
  }
  for (int t = 0; t < T; t++) CHECK(pthread_create(&th[t], NULL, forward_job, &jobs[t]) == 0);
  float rows[D * D] = {0};
  for (int i = 0; i < D; i++) rows[i * D + (D - 1 - i)] = 1.0f;
  for (int k = 0; k < 20; k++) CHECK_OK(pert_pool_add(pool, rows + (k % D) * D, 1));
  for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
  for (int t = 0; t < T; t++) {
    CHECK_OK(jobs[t].status);
    pert_op_free(jobs[t].op);
  }
  CHECK(pert_pool_size(pool) == 5);
  pert_pool_free(pool);
  return true;
}

/* One-hot argmin over 3 entries (the first of equals). */
static int32_t argmin3(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < 3; i++)
      if (x[r * 3 + i] < x[r * 3 + best]) best = i;
    for (size_t i = 0; i < 3; i++) y[r * 3 + i] = i == best ? 1.0f : 0.0f;
  }
  return 0;
}

/* The pool-based losses against hand-worked values: pool e0, e1, e2; problem 0: pred (1, 2,
 * 4), c (3, 1, 2), w* = e1; problem 1: pred = c = (3, 1, 2), minimizing. */
static bool pool_losses_by_hand(void) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_sense(c, PERT_SENSE_MINIMIZE);
  pert_config_set_linear_objective(c, 1);
  const int64_t three[1] = {3};
  CHECK_OK(pert_op_new(c, three, 1, three, 1, argmin3, NULL, &op));
  pert_config_free(c);
  const float pred[6] = {1, 2, 4, 3, 1, 2}, cost[6] = {3, 1, 2, 3, 1, 2}, sol[6] = {0, 1, 0, 0, 1, 0};
  float loss[2] = {-7, -7}, grad[6];
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_nce(op, pred, sol, 2, loss, grad));
  CHECK(last_error_contains("needs the op's solution pool") && loss[0] == -7);
  pert_pool *pool = NULL;
  CHECK_OK(pert_pool_new(three, 1, 10, &pool));
  CHECK_OK(pert_op_set_pool(op, pool));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_cmap(op, pred, sol, 0, loss, grad));
  CHECK(last_error_contains("pool is empty"));
  const float eye[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  CHECK_OK(pert_pool_add(pool, eye, 3));
  const double third = 1.0 / 3.0, tol = 1e-6;
  CHECK_OK(pert_nce(op, pred, sol, 2, loss, grad));
  CHECK_NEAR(loss[0], -third, tol);
  CHECK_NEAR(grad[0], -third, tol);
  CHECK_NEAR(grad[1], 2 * third, tol);
  CHECK_NEAR(grad[2], -third, tol);
  CHECK_NEAR(loss[1], -1.0, tol); /* margins 1-3, 1-1, 1-2: mean -1 */
  CHECK_OK(pert_cmap(op, pred, sol, 2, loss, NULL));
  CHECK_NEAR(loss[0], 1.0, tol);
  CHECK_NEAR(loss[1], 0.0, tol);
  CHECK_OK(pert_ltr_pointwise(op, pred, cost, 2, loss, grad));
  CHECK_NEAR(loss[0], 3.0, tol);
  CHECK_NEAR(grad[0], -4 * third, tol);
  CHECK_NEAR(grad[1], 2 * third, tol);
  CHECK_NEAR(grad[2], 4 * third, tol);
  CHECK_NEAR(loss[1], 0.0, tol);
  CHECK_OK(pert_ltr_pairwise(op, pred, cost, 2, loss, grad));
  CHECK_NEAR(loss[0], 0.5, tol);
  CHECK_NEAR(grad[0], -0.5, tol);
  CHECK_NEAR(grad[1], 0.5, tol);
  CHECK_NEAR(grad[2], 0.0, tol);
  CHECK_NEAR(loss[1], 0.0, tol); /* the best for c is also the best for pred */
  CHECK_OK(pert_ltr_listwise(op, pred, cost, 2, loss, grad));
  double p[3] = {exp(-3.0), exp(-1.0), exp(-2.0)}, q[3] = {exp(-1.0), exp(-2.0), exp(-4.0)};
  double zp = p[0] + p[1] + p[2], zq = q[0] + q[1] + q[2], want = 0;
  for (int j = 0; j < 3; j++) want -= p[j] / zp * log(q[j] / zq);
  CHECK_NEAR(loss[0], want, tol);
  for (int j = 0; j < 3; j++) CHECK_NEAR(grad[j], p[j] / zp - q[j] / zq, tol);
  /* bad inputs write nothing */
  const float bad[6] = {1, 2, NAN, 3, 1, 2};
  float keep[2] = {-7, -7};
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_ltr_listwise(op, bad, cost, 2, keep, grad));
  CHECK(last_error_contains("pred_cost[0][2] is NaN") && keep[0] == -7 && keep[1] == -7);
  CHECK_STATUS(PERT_STATUS_NON_FINITE_INPUT, pert_nce(op, pred, bad, 2, keep, grad));
  CHECK(last_error_contains("true_sol[0][2]"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_nce(op, pred, sol, 2, NULL, grad));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_nce(NULL, pred, sol, 2, keep, grad));
  CHECK(pert_pool_size(pool) == 3); /* the refreshes (argmin of pred: e0, e1) added nothing */
  pert_pool_free(pool);
  pert_op_free(op);
  return true;
}

/* One-hot of the larger of two entries (the first of equals). */
static int32_t argmax2(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    int second = x[2 * r + 1] > x[2 * r];
    y[2 * r] = second ? 0.0f : 1.0f;
    y[2 * r + 1] = second ? 1.0f : 0.0f;
  }
  return 0;
}

/* The member of a pool of capacity 1 (read by a probe whose calls are all answered from
 * the pool: the NCE gradient against a zero target, maximizing, is the member). */
static bool member_of(pert_pool *pool, float member[2]) {
  const int64_t shape[1] = {2};
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  CHECK_OK(pert_config_set_linear_objective(c, true));
  CHECK_OK(pert_config_set_solve_ratio(c, 1e-300));
  pert_op *probe = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, argmax2, NULL, &probe));
  pert_config_free(c);
  CHECK_OK(pert_op_set_pool(probe, pool));
  const float zero[2] = {0, 0};
  float loss;
  CHECK_OK(pert_nce(probe, zero, zero, 1, &loss, member));
  pert_op_free(probe);
  return true;
}

/* A forward call's row order for its pool: the clean-input rows first, then the samples
 * (as pert_op_set_pool says), so the pool ends as pert_pool_add of them in that order. */
static bool a_call_adds_its_clean_rows_first(void) {
  const int64_t shape[1] = {2};
  const float theta[2] = {1.0f, 0.0f}; /* y*(theta) = (1, 0) */
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, 1);
  pert_config_set_sigma(c, 10.0);
  pert_config_set_seed(c, 2); /* its one sample's solution is (0, 1) */
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
  CHECK_OK(pert_config_set_linear_objective(c, true));
  pert_op *op = NULL, *external = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, argmax2, NULL, &op));
  CHECK_OK(pert_op_new_external(c, shape, 1, shape, 1, &external));
  pert_config_free(c);
  pert_pool *pool = NULL, *twin = NULL;
  CHECK_OK(pert_pool_new(shape, 1, 1, &pool));
  CHECK_OK(pert_pool_new(shape, 1, 1, &twin));
  CHECK_OK(pert_op_set_pool(op, pool));
  float y[2];
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 1, y, &tape));
  /* the same call's rows through a draw (the sample, then the clean row) */
  pert_draw *draw = NULL;
  CHECK_OK(pert_draw_new(external, theta, 1, &draw));
  CHECK(pert_draw_count(draw) == 2);
  float sol[4];
  argmax2(NULL, pert_draw_inputs(draw), 2, sol);
  CHECK(sol[0] == 0 && sol[1] == 1 && sol[2] == 1 && sol[3] == 0); /* (not vacuous) */
  const float clean_then_sample[4] = {sol[2], sol[3], sol[0], sol[1]};
  CHECK_OK(pert_pool_add(twin, clean_then_sample, 2));
  float got[2], want[2];
  CHECK(member_of(pool, got));
  CHECK(member_of(twin, want));
  CHECK(got[0] == want[0] && got[1] == want[1] && got[0] == 0 && got[1] == 1);
  pert_tape_free(tape);
  pert_draw_free(draw);
  pert_pool_free(pool);
  pert_pool_free(twin);
  pert_op_free(op);
  pert_op_free(external);
  return true;
}

/* A pool loss whose gradient alone is beyond float32's range: refused when the gradient is
 * asked for, the loss returned when grad is NULL. */
static bool a_pool_loss_without_its_gradient(void) {
  const int64_t shape[1] = {2};
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  CHECK_OK(pert_config_set_linear_objective(c, true));
  CHECK_OK(pert_config_set_solve_ratio(c, 1e-300)); /* nothing solved: the pool as it is */
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, argmax2, NULL, &op));
  pert_config_free(c);
  pert_pool *pool = NULL;
  CHECK_OK(pert_pool_new(shape, 1, 1, &pool));
  const float member[2] = {-3e38f, 0}, pred[2] = {0, 0}, true_sol[2] = {3e38f, 0};
  CHECK_OK(pert_pool_add(pool, member, 1));
  CHECK_OK(pert_op_set_pool(op, pool));
  /* maximizing: loss = -(<0, w*> - <0, w>) = 0, grad = -(w* - w) = (-6e38, 0) */
  float loss = -7, grad[2] = {-7, -7};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_nce(op, pred, true_sol, 1, &loss, grad));
  CHECK(last_error_contains("the NCE gradient is"));
  CHECK(loss == -7 && grad[0] == -7 && grad[1] == -7);
  CHECK_OK(pert_nce(op, pred, true_sol, 1, &loss, NULL));
  CHECK(loss == 0);
  pert_pool_free(pool);
  pert_op_free(op);
  return true;
}

static bool bad_arguments_are_refused(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  const double bad[4] = {-1e-300, -0.1, 1.5, NAN};
  for (int i = 0; i < 4; i++) {
    CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_solve_ratio(c, bad[i]));
    CHECK(last_error_contains("solve_ratio must be in [0, 1]"));
  }
  CHECK_OK(pert_config_set_solve_ratio(c, 0.0));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_config_set_solve_ratio(NULL, 0.5));
  pert_config_free(c);
  pert_op *plain = op_of(0.5, 1, 0), *op = op_of(0.5, 1, 1);
  pert_pool *pool = pool_of_one_hots(10), *wrong = NULL;
  const int64_t seven[1] = {7};
  CHECK(plain && op && pool);
  CHECK_OK(pert_pool_new(seven, 1, 10, &wrong));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_set_pool(plain, pool));
  CHECK(last_error_contains("declare the solver's objective linear"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_set_pool(op, wrong));
  CHECK(last_error_contains("output shape"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_set_pool(NULL, pool));
  uint64_t rows = 7;
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_solver_calls(op, NULL));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_op_solver_calls(NULL, &rows));
  CHECK(rows == 7);
  pert_pool_free(pool), pert_pool_free(wrong);
  pert_op_free(plain), pert_op_free(op);
  return true;
}

/* Warm starts: a pooled op's solver gets `pool_best`, which gives the member of best <x, y>
 * of the pool as the call began (checked against the members by hand, row by row); an op
 * without a pool gets NULL. */
static const float MEMBERS[3 * D] = {1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0};
static int warm_rows = 0, warm_wrong = 0, warm_null = 0;

static int32_t solve_warm(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)user_data;
  int has = info->struct_size >= sizeof(pert_solve_info) && info->pool_best != NULL;
  for (size_t r = 0; r < count; r++) {
    const float *row = x + r * D;
    if (has) {
      size_t want = 0;
      double best = -INFINITY;
      for (size_t m = 0; m < 3; m++) {
        double score = 0;
        for (size_t i = 0; i < D; i++) score += (double)row[i] * MEMBERS[m * D + i];
        if (score > best) best = score, want = m;
      }
      float out[D], untouched[D];
      /* a wrong n, or NULL x or out: 0, and nothing written */
      for (size_t i = 0; i < D; i++) out[i] = untouched[i] = -7.5f;
      int refused = info->pool_best(info, row, D - 1, out) != 0 || info->pool_best(info, NULL, D, out) != 0 ||
                    info->pool_best(info, row, D, NULL) != 0 || memcmp(out, untouched, sizeof out) != 0;
      int got = info->pool_best(info, row, D, out);
      __atomic_add_fetch(&warm_wrong, refused, __ATOMIC_SEQ_CST);
      __atomic_add_fetch(&warm_wrong, got != 1 || memcmp(out, MEMBERS + want * D, sizeof out) != 0, __ATOMIC_SEQ_CST);
      __atomic_add_fetch(&warm_rows, 1, __ATOMIC_SEQ_CST);
    } else {
      __atomic_add_fetch(&warm_null, 1, __ATOMIC_SEQ_CST);
    }
  }
  return solve_argmax(&DIM, x, count, y);
}

static bool warm_starts_get_the_pools_best(void) {
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, 50);
  pert_config_set_sigma(c, 0.7);
  pert_config_set_threads(c, 2);
  pert_config_set_linear_objective(c, 1);
  pert_op *pooled = NULL, *plain = NULL;
  CHECK_OK(pert_op_new_ex(c, SHAPE, 1, SHAPE, 1, solve_warm, NULL, NULL, NULL, &pooled));
  CHECK_OK(pert_op_new_ex(c, SHAPE, 1, SHAPE, 1, solve_warm, NULL, NULL, NULL, &plain));
  pert_config_free(c);
  pert_pool *pool = NULL;
  CHECK_OK(pert_pool_new(SHAPE, 1, 100, &pool));
  CHECK_OK(pert_pool_add(pool, MEMBERS, 3));
  CHECK_OK(pert_op_set_pool(pooled, pool));
  float y[B * D];
  warm_rows = warm_wrong = warm_null = 0;
  CHECK_OK(pert_forward(pooled, THETA, B, y, NULL)); /* the pool as it began: the 3 members */
  CHECK(warm_rows == B * 50 && warm_wrong == 0 && warm_null == 0);
  CHECK_OK(pert_forward(plain, THETA, B, y, NULL));
  CHECK(warm_null == B * 50);
  CHECK_OK(pert_op_solve(pooled, THETA, B, y)); /* a plain solve: no pool offered */
  CHECK(warm_null == B * 50 + B && warm_rows == B * 50);
  pert_pool_free(pool);
  pert_op_free(pooled);
  pert_op_free(plain);
  return true;
}

/* ---- fork ---------------------------------------------------------------------------- */

enum { WIDE = 512, WIDE_CAPACITY = 1500, WIDE_BATCH = 64 };
static const int64_t WIDE_SHAPE[1] = {WIDE};

typedef struct {
  pert_pool *pool;
  pert_op *op;
  atomic_int stop;
} pool_user;

/* Adds batches of rows the pool never held (a copy of the members when a reader holds the
 * old version, in place otherwise: the pool's lock is held most of the time). */
static void *add_until_stopped(void *arg) {
  pool_user *u = arg;
  float *rows = malloc(sizeof(float) * WIDE * WIDE_BATCH);
  if (rows == NULL) return NULL;
  for (uint32_t k = 1; !atomic_load(&u->stop); k++) {
    for (int r = 0; r < WIDE_BATCH; r++) {
      for (int j = 0; j < WIDE; j++) rows[r * WIDE + j] = (float)((r + j) % 7);
      rows[r * WIDE] = (float)k, rows[r * WIDE + 1] = (float)r; /* (k, r): a new row */
    }
    pert_pool_add(u->pool, rows, WIDE_BATCH);
  }
  free(rows);
  return NULL;
}

/* Calls a pooled op (a snapshot of the members, additions from its solves) and sets its
 * pool again (the op's pool slot), over and over. */
static void *call_until_stopped(void *arg) {
  pool_user *u = arg;
  float *theta = calloc(2 * WIDE, sizeof(float)), *y = malloc(sizeof(float) * 2 * WIDE);
  if (theta == NULL || y == NULL) return free(theta), free(y), NULL;
  theta[3] = 1.0f;
  while (!atomic_load(&u->stop)) {
    pert_forward(u->op, theta, 2, y, NULL);
    pert_op_set_pool(u->op, u->pool);
  }
  free(theta);
  free(y);
  return NULL;
}

/* In a child: the inherited pool is read and grown, and serves a new op. */
static int child_uses_the_pool(void *arg) {
  pert_pool *pool = arg;
  size_t before = pert_pool_size(pool);
  float *row = calloc(WIDE, sizeof(float)), *y = malloc(sizeof(float) * WIDE);
  if (row == NULL || y == NULL || before == 0) return 2;
  row[0] = -1.0f; /* no thread of the parent adds a negative entry */
  if (pert_pool_add(pool, row, 1) != PERT_STATUS_OK || pert_pool_size(pool) != (before < WIDE_CAPACITY ? before + 1 : before))
    return 3;
  pert_config *c = NULL;
  pert_op *op = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return 4;
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, 8);
  pert_config_set_solve_ratio(c, 0.5);
  if (pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, WIDE_SHAPE, 1, &op) != PERT_STATUS_OK) return 5;
  pert_config_free(c);
  if (pert_op_set_pool(op, pool) != PERT_STATUS_OK || pert_forward(op, row, 1, y, NULL) != PERT_STATUS_OK) return 6;
  pert_op_free(op);
  free(row);
  free(y);
  return 0;
}

/* Children forked while other threads add to a pool, read it through an op and set it on
 * the op: each child reads the pool, adds to it and uses it in an op of its own; none hangs
 * on a lock that a thread of the parent held at the fork, none fails. */
static bool a_child_forked_while_threads_use_a_pool_can_use_it(void) {
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PERT_UNDER_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(PERT_UNDER_ASAN)
  /* clang-14's ASan allocator takes no lock around fork(): a child forked while another
   * thread refills a size class waits forever inside ASan's malloc (seen: a child in
   * SizeClassAllocator64::GetFromAllocator), whatever this library does. The plain build
   * (make test) runs this test; ThreadSanitizer runs the fork gate's own tests. */
  fprintf(stderr, "  skipped under AddressSanitizer (its allocator is not fork-safe)\n");
  return true;
#endif
  pert_pool *pool = NULL;
  CHECK_OK(pert_pool_new(WIDE_SHAPE, 1, WIDE_CAPACITY, &pool));
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  pert_config_set_device(c, "cpu");
  pert_config_set_num_samples(c, 16);
  pert_config_set_solve_ratio(c, 0.5);
  pool_user u = {pool, NULL, 0};
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, WIDE_SHAPE, 1, &u.op));
  pert_config_free(c);
  CHECK_OK(pert_op_set_pool(u.op, pool));
  pthread_t adder, caller;
  CHECK(pthread_create(&adder, NULL, add_until_stopped, &u) == 0);
  if (pthread_create(&caller, NULL, call_until_stopped, &u) != 0) {
    atomic_store(&u.stop, 1);
    pthread_join(adder, NULL);
    CHECK(!"pthread_create");
  }
  for (int wait = 0; wait < 100000 && pert_pool_size(pool) < 8; wait++) usleep(100);
  int hung = 0, failed = pert_pool_size(pool) < 8, forks = 100; /* (the adder added nothing) */
  for (int k = 0; k < forks && !hung && !failed; k++) { /* (one is enough: a hang takes 20 s) */
    usleep((useconds_t)(k * 37 % 300));
    child_end end = fork_and_wait(child_uses_the_pool, pool);
    hung += end == CHILD_HUNG, failed += end == CHILD_FAILED;
  }
  atomic_store(&u.stop, 1);
  pthread_join(adder, NULL);
  pthread_join(caller, NULL);
  if (hung || failed) fprintf(stderr, "  %d forks: %d children hung, %d failed\n", forks, hung, failed);
  CHECK(hung == 0 && failed == 0);
  pert_op_free(u.op);
  pert_pool_free(pool);
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(members_first_in_first_out),
      TEST(full_pool_answers_as_the_solver),
      TEST(empty_pool_grows_the_same_for_any_threads),
      TEST(pool_shared_by_threads),
      TEST(pool_losses_by_hand),
      TEST(a_call_adds_its_clean_rows_first),
      TEST(a_pool_loss_without_its_gradient),
      TEST(bad_arguments_are_refused),
      TEST(warm_starts_get_the_pools_best),
      TEST(a_child_forked_while_threads_use_a_pool_can_use_it),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
