/* A MILP solver from a real library, made differentiable: GLPK solves a 0-1 knapsack
 *     maximize sum_i theta_i x_i  subject to  sum_i w_i x_i <= C,  x_i in {0, 1}
 * whose item values theta are perturbed (Normal noise, sigma 0.5, N = 100). The op comes
 * from pert_op_new_ex: each worker builds one glp_prob in its init hook (on its own thread:
 * GLPK keeps its environment per thread), a solve only changes the objective coefficients
 * of that model, and the fini hook frees the model and the thread's GLPK environment.
 *
 * Printed: the perturbed solution next to that of a plain C dynamic-programming solver of
 * the same knapsack (same seed, so the same draws: they agree up to ties), a failure
 * message from GLPK carried through pert_solver_set_error, the throughput in perturbed
 * MILP solves per second with 1 and 2 worker threads, and with and without warm starts
 * from a solution pool.
 */
#define _POSIX_C_SOURCE 200809L
#include <glpk.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "glpk_knapsack.h"
#include "perturbations.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static pert_config *config_with(uint32_t threads) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) exit(1);
  pert_config_set_num_samples(c, 100);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_seed(c, 2026);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  return c;
}

static void check(pert_status status, const char *what) {
  if (status != PERT_STATUS_OK) {
    char message[512];
    pert_last_error(message, sizeof message);
    fprintf(stderr, "%s: %s: %s\n", what, pert_status_name(status), message);
    exit(1);
  }
}

enum { BATCH = 16 };

/* Perturbed MILP solves per second of forward calls on `op` (N = 100), over at least
 * half a second and two calls. */
static double solves_per_second(pert_op *op, const float *theta, float *y) {
  int calls = 0;
  double start = now(), elapsed = 0;
  while (elapsed < 0.5 || calls < 2) {
    check(pert_forward(op, theta, BATCH, y, NULL), "forward");
    calls++;
    elapsed = now() - start;
  }
  return calls * BATCH * 100.0 / elapsed;
}

int main(void) {
  const int64_t shape[1] = {ITEMS};
  static float theta[BATCH * ITEMS], with_glpk[BATCH * ITEMS], with_dp[BATCH * ITEMS];
  for (int i = 0; i < BATCH * ITEMS; i++) theta[i] = 1.0f + 0.25f * (float)((i * 37) % 11); /* item values */

  /* GLPK keeps one environment per thread only when it was built with thread-local
     storage; otherwise its workers would share one: stay on one thread then */
  uint32_t threads = glp_config("TLS") != NULL ? 2 : 1;
  if (threads == 1) printf("this GLPK has no thread-local environment: one worker thread\n");

  /* 1. GLPK on 2 workers against the plain solver, same seed and call count */
  knapsack models = {.capacity = CAPACITY};
  pert_config *two = config_with(threads);
  pert_op *glpk = NULL, *dp = NULL;
  check(pert_op_new_ex(two, shape, 1, shape, 1, solve_glpk, &models, build_model, free_model, &glpk), "pert_op_new_ex");
  check(pert_op_new(two, shape, 1, shape, 1, solve_dp, NULL, &dp), "pert_op_new");
  check(pert_forward(glpk, theta, BATCH, with_glpk, NULL), "GLPK forward");
  check(pert_forward(dp, theta, BATCH, with_dp, NULL), "DP forward");
  double most = 0;
  for (int i = 0; i < BATCH * ITEMS; i++) most = fmax(most, fabs(with_glpk[i] - with_dp[i]));
  printf("0-1 knapsack, %d items, capacity %d, batch %d, N = 100, sigma 0.5\n", ITEMS, CAPACITY, BATCH);
  printf("problem 0, P(item i taken) with GLPK:  ");
  for (int i = 0; i < 8; i++) printf("%.2f ", with_glpk[i]);
  printf("...\nproblem 0, P(item i taken) with the DP: ");
  for (int i = 0; i < 8; i++) printf("%.2f ", with_dp[i]);
  printf("...\nlargest difference over the batch: %.4f (a tie solved differently moves an entry by 1/N = 0.01)\n", most);
  if (most > 0.02) {
    fprintf(stderr, "GLPK and the DP disagree beyond ties\n");
    return 1;
  }

  /* 2. a failing model: GLPK's reason reaches the caller */
  knapsack broken = {.capacity = -1.0};
  pert_op *infeasible = NULL;
  check(pert_op_new_ex(two, shape, 1, shape, 1, solve_glpk, &broken, build_model, free_model, &infeasible),
        "pert_op_new_ex");
  pert_status status = pert_forward(infeasible, theta, 1, with_glpk, NULL);
  char message[512];
  pert_last_error(message, sizeof message);
  printf("negative capacity: %s: %s\n", pert_status_name(status), message);
  if (status != PERT_STATUS_SOLVER_FAILED || strstr(message, "GLPK") == NULL) return 1;
  pert_op_free(infeasible);

  /* 3. throughput, 1 and 2 workers (models built once per worker, then reused) */
  for (uint32_t t = 1; t <= threads; t++) {
    pert_config *c = config_with(t);
    knapsack k = {.capacity = CAPACITY};
    pert_op *op = NULL;
    check(pert_op_new_ex(c, shape, 1, shape, 1, solve_glpk, &k, build_model, free_model, &op), "pert_op_new_ex");
    check(pert_forward(op, theta, BATCH, with_glpk, NULL), "warm-up"); /* builds the models */
    printf("%u worker thread%s: %.0f perturbed MILP solves per second\n", t, t == 1 ? "" : "s",
           solves_per_second(op, theta, with_glpk));
    pert_op_free(op);
    pert_config_free(c);
  }

  /* 4. warm starts: a pooled op (every sample solved, the pool growing from the solves)
     whose MILPs start from the pool's best solution (pert_solve_info.pool_best), against
     the same without; both without GLPK's presolver (which warm starts cannot use) */
  double rate[2];
  for (int warm = 0; warm <= 1; warm++) {
    pert_config *c = config_with(1);
    pert_config_set_linear_objective(c, 1);
    knapsack k = {.capacity = CAPACITY, .warm_start = 1};
    pert_op *op = NULL;
    pert_pool *pool = NULL;
    check(pert_op_new_ex(c, shape, 1, shape, 1, solve_glpk, &k, build_model, free_model, &op), "pert_op_new_ex");
    check(pert_pool_new(shape, 1, 1000, &pool), "pert_pool_new");
    check(pert_op_set_pool(op, pool), "pert_op_set_pool");
    check(pert_forward(op, theta, BATCH, with_glpk, NULL), "warm-up"); /* models built, pool filled */
    k.warm_start = warm, k.no_presolve = 1;
    rate[warm] = solves_per_second(op, theta, with_glpk);
    pert_pool_free(pool);
    pert_op_free(op);
    pert_config_free(c);
  }
  printf("warm starts from the pool (1 worker, no presolver): %.0f MILP solves per second without, %.0f with\n",
         rate[0], rate[1]);
  pert_op_free(glpk);
  pert_op_free(dp);
  pert_config_free(two);
  return 0;
}
