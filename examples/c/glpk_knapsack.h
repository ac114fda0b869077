/* The 0-1 knapsack of the GLPK example and of bench/pool_knapsack.c:
 *     maximize sum_i theta_i x_i  subject to  sum_i w_i x_i <= C,  x_i in {0, 1}
 * as a GLPK MILP, one glp_prob per worker of an op of pert_op_new_ex (built in the init
 * hook on the worker's thread, freed in the fini hook with the thread's GLPK environment;
 * a solve only changes the objective coefficients), and the same knapsack solved by
 * dynamic programming over the capacity (an exact plain solver to compare with). */
#ifndef PERT_GLPK_KNAPSACK_H
#define PERT_GLPK_KNAPSACK_H

#include <glpk.h>
#include <math.h>
#include <stdio.h>

#include "perturbations.h"

#define ITEMS 24
#define CAPACITY 60
static const int WEIGHT[ITEMS] = {7, 3, 9, 4, 6, 8, 2, 5, 10, 3, 7, 6, 4, 9, 5, 8, 2, 6, 3, 7, 5, 4, 8, 6};

/* The models of the workers: worker w only ever touches models[w], on its own thread. */
typedef struct {
  glp_prob *models[PERT_MAX_THREADS];
  double capacity; /* the knapsack's capacity (a negative one makes GLPK fail: see main) */
  int warm_start;  /* 1: each MILP starts from the op's pool's best solution (a pooled op) */
  int no_presolve; /* 1: GLPK's settings of a warm start, without the start (to compare) */
} knapsack;

/* A warm start for GLPK: the pool's best solution, offered as a heuristic solution (an
 * incumbent) the first time the branch-and-bound asks for one. */
typedef struct {
  float start[ITEMS];
  int offered;
} incumbent;

static void offer_start(glp_tree *tree, void *data) {
  incumbent *w = data;
  if (glp_ios_reason(tree) == GLP_IHEUR && !w->offered) {
    double x[ITEMS + 1];
    for (int j = 1; j <= ITEMS; j++) x[j] = w->start[j - 1];
    glp_ios_heur_sol(tree, x); /* (GLPK keeps it only if it is feasible and better) */
    w->offered = 1;
  }
}

static int32_t build_model(void *user_data, uint32_t worker) {
  knapsack *k = user_data;
  glp_term_out(GLP_OFF);
  glp_prob *lp = glp_create_prob();
  glp_set_obj_dir(lp, GLP_MAX);
  glp_add_rows(lp, 1);
  glp_set_row_bnds(lp, 1, GLP_UP, 0.0, k->capacity);
  glp_add_cols(lp, ITEMS);
  int index[ITEMS + 1];
  double weight[ITEMS + 1];
  for (int j = 1; j <= ITEMS; j++) {
    glp_set_col_kind(lp, j, GLP_BV);
    index[j] = j;
    weight[j] = WEIGHT[j - 1];
  }
  glp_set_mat_row(lp, 1, ITEMS, index, weight);
  k->models[worker] = lp;
  return 0;
}

static void free_model(void *user_data, uint32_t worker) {
  knapsack *k = user_data;
  glp_delete_prob(k->models[worker]);
  k->models[worker] = NULL;
  glp_free_env(); /* this worker thread's GLPK environment */
}

static int32_t solve_glpk(void *user_data, const pert_solve_info *info, const float *theta, size_t count, float *x) {
  knapsack *k = user_data;
  glp_prob *lp = k->models[info->worker];
  glp_iocp parm;
  glp_init_iocp(&parm);
  parm.presolve = GLP_ON;
  parm.msg_lev = GLP_MSG_OFF;
  /* warm starts need the pool (pert_solve_info.pool_best) and GLPK's own columns: no
     presolver (which would renumber them), the LP relaxation solved first instead */
  int warm = k->warm_start && info->struct_size >= sizeof *info && info->pool_best != NULL;
  int lp_first = warm || k->no_presolve;
  incumbent w;
  glp_smcp lp_parm;
  glp_init_smcp(&lp_parm);
  lp_parm.msg_lev = GLP_MSG_OFF;
  if (lp_first) parm.presolve = GLP_OFF;
  if (warm) parm.cb_func = offer_start, parm.cb_info = &w;
  for (size_t r = 0; r < count; r++) {
    for (int j = 1; j <= ITEMS; j++) glp_set_obj_coef(lp, j, theta[r * ITEMS + j - 1]);
    if (warm) w.offered = !info->pool_best(info, theta + r * ITEMS, ITEMS, w.start); /* (an empty pool: none) */
    if (lp_first) {
      if (glp_simplex(lp, &lp_parm) != 0) {
        pert_solver_set_error("GLPK: the LP relaxation failed");
        return 1;
      }
    }
    int rc = glp_intopt(lp, &parm);
    int status = glp_mip_status(lp);
    if (rc != 0 || status != GLP_OPT) {
      char message[160];
      snprintf(message, sizeof message, "GLPK: glp_intopt returned %d, MIP status %d (%s)", rc, status,
               status == GLP_NOFEAS ? "no feasible solution" : "not optimal");
      pert_solver_set_error(message);
      return 1;
    }
    for (int j = 1; j <= ITEMS; j++) x[r * ITEMS + j - 1] = glp_mip_col_val(lp, j) > 0.5 ? 1.0f : 0.0f;
  }
  return 0;
}

/* The plain solver of the same knapsack: dynamic programming over the capacity. */
static int32_t solve_dp(void *user_data, const float *theta, size_t count, float *x) {
  (void)user_data;
  static _Thread_local double best[ITEMS + 1][CAPACITY + 1];
  for (size_t r = 0; r < count; r++) {
    const float *v = theta + r * ITEMS;
    for (int c = 0; c <= CAPACITY; c++) best[0][c] = 0;
    for (int j = 1; j <= ITEMS; j++)
      for (int c = 0; c <= CAPACITY; c++) {
        double skip = best[j - 1][c];
        double take = c >= WEIGHT[j - 1] ? best[j - 1][c - WEIGHT[j - 1]] + v[j - 1] : -INFINITY;
        best[j][c] = take > skip ? take : skip;
      }
    for (int j = ITEMS, c = CAPACITY; j >= 1; j--) {
      int taken = best[j][c] != best[j - 1][c];
      x[r * ITEMS + j - 1] = (float)taken;
      if (taken) c -= WEIGHT[j - 1];
    }
  }
  return 0;
}

#endif
