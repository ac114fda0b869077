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

#include "../examples/c/knapsack_training.h"
#include "bench_util.h"

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
    static model m;
    memset(&m, 0, sizeof m);
    double seconds = 0, first_regret = 0;
    uint64_t solved_before = 0, solved_after = 0;
    check(pert_op_solver_calls(op, &solved_before));
    for (int e = 0; e < epochs; e++) {
      double t0 = now();
      for (int s = 0; s < TRAIN; s += BATCH) {
        float theta[BATCH][ITEMS], loss[BATCH], grad[BATCH][ITEMS];
        predict(&m, s, theta);
        check(pert_fenchel_young(op, &theta[0][0], &sol[s][0], BATCH, loss, &grad[0][0]));
        adam_step(&m, s, grad);
      }
      seconds += now() - t0;
      if (e == 0) first_regret = regret(&m);
    }
    check(pert_op_solver_calls(op, &solved_after));
    printf("| %.1f | %.3f | %.0f | %zu | %.4f | %.4f |\n", ratios[r], seconds / epochs,
           (double)(solved_after - solved_before) / epochs, pert_pool_size(pool), first_regret, regret(&m));
    fflush(stdout);
    pert_pool_free(pool);
    pert_op_free(op);
  }
  return 0;
}
