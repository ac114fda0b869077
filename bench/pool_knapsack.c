/* Expensive solvers with a solution pool (issue 31): a linear model learns the item values
 * of 0-1 knapsacks (24 items, capacity 60, the weights of examples/c/glpk_knapsack.c) from
 * 5 features, by the perturbed Fenchel-Young loss (N = 10 samples, sigma 1, Adam, batch 20,
 * 200 training and 100 test instances), with GLPK solving every perturbed knapsack as a
 * MILP on the op's worker (pert_op_new_ex, one model per worker), for solve_ratio 1, 0.3
 * and 0.1. The pool is seeded with the training set's optimal solutions and grows from the
 * solves. Printed per ratio (a Markdown table): seconds per epoch, MILPs solved per epoch,
 * the pool's size at the end, and the test regret after each epoch count
 * (sum of (opt - value of the predicted decision) / sum of opt, decisions by an exact DP).
 *
 *   target/bench/pool_knapsack [EPOCHS] */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../examples/c/glpk_knapsack.h"
#include "bench_util.h"

enum { P = 5, TRAIN = 200, TEST = 100, BATCH = 20 };

static double value(const float *c, const float *x) {
  double s = 0;
  for (int j = 0; j < ITEMS; j++) s += (double)c[j] * x[j];
  return s;
}

static unsigned long long rng_state = 88172645463325252ULL;
static double uniform(void) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
}
static double normal(void) { return sqrt(-2 * log(uniform())) * cos(6.283185307179586 * uniform()); }

/* Data: PyEPO's knapsack generator in spirit: values ((B x)/sqrt(P) + 3)^4 / 3.5^4 + 0.5,
 * with multiplicative noise in [0.75, 1.25]. */
static float feat[TRAIN + TEST][P], cost[TRAIN + TEST][ITEMS], sol[TRAIN + TEST][ITEMS];

static void make_data(void) {
  double b[ITEMS][P];
  for (int j = 0; j < ITEMS; j++)
    for (int k = 0; k < P; k++) b[j][k] = uniform() < 0.5 ? 1.0 : 0.0;
  for (int i = 0; i < TRAIN + TEST; i++) {
    for (int k = 0; k < P; k++) feat[i][k] = (float)normal();
    for (int j = 0; j < ITEMS; j++) {
      double s = 0;
      for (int k = 0; k < P; k++) s += b[j][k] * feat[i][k];
      double v = pow(s / sqrt((double)P) + 3.0, 4) / pow(3.5, 4) + 0.5;
      cost[i][j] = (float)(v * (0.75 + 0.5 * uniform()));
    }
    solve_dp(NULL, cost[i], 1, sol[i]);
  }
}

/* The test regret of model (w, b). */
static double regret(float w[ITEMS][P], const float *bias) {
  double lost = 0, best = 0;
  for (int i = TRAIN; i < TRAIN + TEST; i++) {
    float pred[ITEMS], x[ITEMS];
    for (int j = 0; j < ITEMS; j++) {
      double s = bias[j];
      for (int k = 0; k < P; k++) s += w[j][k] * feat[i][k];
      pred[j] = (float)s;
    }
    solve_dp(NULL, pred, 1, x);
    double opt = value(cost[i], sol[i]);
    lost += opt - value(cost[i], x);
    best += opt;
  }
  return lost / best;
}

int main(int argc, char **argv) {
  int epochs = argc > 1 ? atoi(argv[1]) : 5;
  make_data();
  const int64_t shape[1] = {ITEMS};
  const double ratios[3] = {1.0, 0.3, 0.1};
  printf("0-1 knapsack, %d items: a linear model of %d features trained with the Fenchel-Young loss "
         "(N = 10, sigma 1, Adam 0.05, batch %d, %d train / %d test), GLPK as the solver, one worker thread:\n\n",
         ITEMS, P, BATCH, TRAIN, TEST);
  printf("| solve_ratio | s / epoch | MILPs / epoch | pool at the end | test regret after 1 epoch | after %d |\n",
         epochs);
  printf("|---|---|---|---|---|---|\n");
  for (int r = 0; r < 3; r++) {
    pert_config *c = NULL;
    check(pert_config_new(&c));
    pert_config_set_num_samples(c, 10);
    pert_config_set_sigma(c, 1.0);
    pert_config_set_seed(c, 7);
    pert_config_set_device(c, "cpu");
    pert_config_set_threads(c, 1);
    check(pert_config_set_solve_ratio(c, ratios[r]));
    pert_config_set_linear_objective(c, 1);
    knapsack models = {.capacity = CAPACITY};
    pert_op *op = NULL;
    check(pert_op_new_ex(c, shape, 1, shape, 1, solve_glpk, &models, build_model, free_model, &op));
    pert_config_free(c);
    pert_pool *pool = NULL;
    check(pert_pool_new(shape, 1, 100000, &pool));
    check(pert_pool_add(pool, &sol[0][0], TRAIN));
    check(pert_op_set_pool(op, pool));
    static float w[ITEMS][P], bias[ITEMS], mw[ITEMS][P], vw[ITEMS][P], mb[ITEMS], vb[ITEMS];
    memset(w, 0, sizeof w), memset(bias, 0, sizeof bias), memset(mw, 0, sizeof mw);
    memset(vw, 0, sizeof vw), memset(mb, 0, sizeof mb), memset(vb, 0, sizeof vb);
    double seconds = 0, first_regret = 0;
    int step = 0;
    uint64_t solved_before = 0, solved_after = 0;
    check(pert_op_solver_calls(op, &solved_before));
    for (int e = 0; e < epochs; e++) {
      double t0 = now();
      for (int s = 0; s < TRAIN; s += BATCH) {
        float theta[BATCH][ITEMS], loss[BATCH], grad[BATCH][ITEMS];
        for (int i = 0; i < BATCH; i++)
          for (int j = 0; j < ITEMS; j++) {
            double v = bias[j];
            for (int k = 0; k < P; k++) v += w[j][k] * feat[s + i][k];
            theta[i][j] = (float)v;
          }
        check(pert_fenchel_young(op, &theta[0][0], &sol[s][0], BATCH, loss, &grad[0][0]));
        step++;
        const double lr = 0.05, b1 = 0.9, b2 = 0.999, c1 = 1 - pow(b1, step), c2 = 1 - pow(b2, step);
        for (int j = 0; j < ITEMS; j++) {
          double gb = 0, gw[P] = {0};
          for (int i = 0; i < BATCH; i++) {
            gb += grad[i][j] / BATCH;
            for (int k = 0; k < P; k++) gw[k] += grad[i][j] * feat[s + i][k] / BATCH;
          }
          mb[j] = (float)(b1 * mb[j] + (1 - b1) * gb), vb[j] = (float)(b2 * vb[j] + (1 - b2) * gb * gb);
          bias[j] -= (float)(lr * (mb[j] / c1) / (sqrt(vb[j] / c2) + 1e-8));
          for (int k = 0; k < P; k++) {
            mw[j][k] = (float)(b1 * mw[j][k] + (1 - b1) * gw[k]);
            vw[j][k] = (float)(b2 * vw[j][k] + (1 - b2) * gw[k] * gw[k]);
            w[j][k] -= (float)(lr * (mw[j][k] / c1) / (sqrt(vw[j][k] / c2) + 1e-8));
          }
        }
      }
      seconds += now() - t0;
      if (e == 0) first_regret = regret(w, bias);
    }
    check(pert_op_solver_calls(op, &solved_after));
    printf("| %.1f | %.3f | %.0f | %zu | %.4f | %.4f |\n", ratios[r], seconds / epochs,
           (double)(solved_after - solved_before) / epochs, pert_pool_size(pool), first_regret, regret(w, bias));
    fflush(stdout);
    pert_pool_free(pool);
    pert_op_free(op);
  }
  return 0;
}
