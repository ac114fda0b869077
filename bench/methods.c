/* Times the decision-focused methods against the solver calls they make (issue 30): per
 * batch of BATCH shortest-path problems (D = 40 edge costs, minimize, one thread), the median
 * over CALLS calls after CALLS / 4 of warm-up, in microseconds, of
 *   SPO+    pert_spo_plus                                      vs the solver at 2 pred - cost
 *   DBB     pert_op_solve + pert_blackbox_vjp (a training step) vs the solver at theta and at
 *                                                              theta + lambda * g
 *   NID     pert_op_solve + pert_negative_identity_vjp          vs the solver at theta
 *   PG      pert_perturbation_gradient (two-sided)              vs the solver at pred +- sigma * cost
 * (each solver call on BATCH rows, on the inputs the method solves; the method's calls and
 * the solver's taken in turns, so that both see the same phases of the machine), and prints a Markdown
 * table with the ratio (the library's share beyond the solves), twice: with the grid's
 * dynamic programme of examples/c/grid_shortest_path.c (about 90 ns a problem, the cheapest
 * solver there is for this graph, so the ratio is the library's share at its largest), and
 * with Bellman-Ford on the same graph (what a general shortest-path code runs when costs can
 * be negative, as SPO+'s and perturbed costs can).
 *
 *   target/bench/methods [BATCH [CALLS]] */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bench_util.h"

int32_t grid_shortest_path(void *user_data, const float *costs, size_t count, float *paths);

enum { D = 40, NODES = 25, SIDE = 5 };

/* Bellman-Ford from the top-left node over the 40 edges in index order, rounds until
 * nothing changes; the 0/1 edge indicator of the path to the bottom-right node. */
static int32_t bellman_ford(void *user_data, const float *costs, size_t count, float *paths) {
  (void)user_data;
  int from[D], to[D];
  for (int i = 0; i < SIDE; i++)
    for (int j = 0; j + 1 < SIDE; j++) {
      from[i * (SIDE - 1) + j] = i * SIDE + j, to[i * (SIDE - 1) + j] = i * SIDE + j + 1; /* right */
      from[SIDE * (SIDE - 1) + j * SIDE + i] = j * SIDE + i;                             /* down */
      to[SIDE * (SIDE - 1) + j * SIDE + i] = (j + 1) * SIDE + i;
    }
  for (size_t r = 0; r < count; r++) {
    const float *c = costs + r * D;
    float *path = paths + r * D;
    double dist[NODES];
    int via[NODES];
    for (int v = 0; v < NODES; v++) dist[v] = 1e300, via[v] = -1;
    dist[0] = 0;
    for (int round = 0, changed = 1; changed && round < NODES; round++) {
      changed = 0;
      for (int e = 0; e < D; e++)
        if (dist[from[e]] + c[e] < dist[to[e]]) dist[to[e]] = dist[from[e]] + c[e], via[to[e]] = e, changed = 1;
    }
    for (int e = 0; e < D; e++) path[e] = 0.0f;
    for (int v = NODES - 1; v != 0; v = from[via[v]]) path[via[v]] = 1.0f;
  }
  return 0;
}

static pert_solver_fn solver;

static size_t batch;
static pert_op *op;
static float *pred, *cost, *sol, *obj, *g, *y, *out, *loss;

/* the solver calls each method makes, on the same inputs: SPO+ at 2 pred - cost; DBB at theta
 * = pred and at theta + lambda * g (lambda 10, minimize); NID at theta; PG at pred + sigma *
 * cost and pred - sigma * cost (sigma 1) */
static float *spo_in, *dbb_in, *pg_plus, *pg_minus;
static void solve_spo(void) { solver(NULL, spo_in, batch, y); }
static void solve_dbb(void) {
  solver(NULL, pred, batch, y);
  solver(NULL, dbb_in, batch, out);
}
static void solve_nid(void) { solver(NULL, pred, batch, y); }
static void solve_pg(void) {
  solver(NULL, pg_plus, batch, y);
  solver(NULL, pg_minus, batch, out);
}
static void spo(void) { check(pert_spo_plus(op, pred, cost, sol, obj, batch, loss, out)); }
static void dbb(void) {
  check(pert_op_solve(op, pred, batch, y));
  check(pert_blackbox_vjp(op, pred, y, g, batch, 10.0, out));
}
static void nid(void) {
  check(pert_op_solve(op, pred, batch, y));
  check(pert_negative_identity_vjp(op, g, batch, out));
}
static void pg(void) { check(pert_perturbation_gradient(op, pred, cost, batch, 1.0, 1, loss, out)); }

/* The medians, in microseconds, of CALLS timings of `a` and of `b` taken in turns (a, b, a,
 * b, ...) after CALLS / 4 turns of warm-up: a phase of the machine (another process, the
 * clock) then slows both alike, and the ratio of the medians stays put. */
static void medians_us(void (*a)(void), void (*b)(void), int calls, double *ma, double *mb) {
  double *ta = malloc((size_t)calls * sizeof(double)), *tb = malloc((size_t)calls * sizeof(double));
  if (!ta || !tb) exit(1);
  for (int it = -calls / 4; it < calls; it++) {
    double t0 = now();
    a();
    double t1 = now();
    b();
    double t2 = now();
    if (it >= 0) ta[it] = t1 - t0, tb[it] = t2 - t1;
  }
  qsort(ta, (size_t)calls, sizeof(double), by_value);
  qsort(tb, (size_t)calls, sizeof(double), by_value);
  *ma = ta[calls / 2] * 1e6, *mb = tb[calls / 2] * 1e6;
  free(ta);
  free(tb);
}

int main(int argc, char **argv) {
  batch = argc > 1 ? (size_t)atol(argv[1]) : 32;
  int calls = argc > 2 ? atoi(argv[2]) : 2000;
  if (batch == 0 || calls < 4) return 2;
  size_t n = batch * D;
  pred = malloc(n * sizeof(float)), cost = malloc(n * sizeof(float)), sol = malloc(n * sizeof(float));
  g = malloc(n * sizeof(float)), y = malloc(n * sizeof(float)), out = malloc(n * sizeof(float));
  obj = malloc(batch * sizeof(float)), loss = malloc(batch * sizeof(float));
  spo_in = malloc(n * sizeof(float)), dbb_in = malloc(n * sizeof(float));
  pg_plus = malloc(n * sizeof(float)), pg_minus = malloc(n * sizeof(float));
  if (!pred || !cost || !sol || !g || !y || !out || !obj || !loss || !spo_in || !dbb_in || !pg_plus || !pg_minus)
    return 1;
  for (size_t i = 0; i < n; i++) {
    pred[i] = 0.5f + (float)((i * 7919) % 1000) / 1000.0f;
    cost[i] = 0.5f + (float)((i * 104729) % 1000) / 1000.0f;
    g[i] = (float)((i * 31) % 17) / 17.0f - 0.5f;
    spo_in[i] = 2.0f * pred[i] - cost[i];
    dbb_in[i] = pred[i] + 10.0f * g[i];
    pg_plus[i] = pred[i] + 1.0f * cost[i], pg_minus[i] = pred[i] - 1.0f * cost[i];
  }
  grid_shortest_path(NULL, cost, batch, sol);
  for (size_t b = 0; b < batch; b++) {
    double z = 0;
    for (size_t i = 0; i < D; i++) z += (double)cost[b * D + i] * sol[b * D + i];
    obj[b] = (float)z;
  }
  struct {
    const char *name;
    void (*method)(void);
    void (*solves)(void);
    const char *what;
  } cases[] = {
      {"SPO+", spo, solve_spo, "1 x batch"},
      {"DBB (solve + backward)", dbb, solve_dbb, "2 x batch"},
      {"NID (solve + backward)", nid, solve_nid, "1 x batch"},
      {"PG (two-sided)", pg, solve_pg, "2 x batch"},
  };
  struct {
    const char *name;
    pert_solver_fn fn;
  } solvers[] = {{"the grid's dynamic programme", grid_shortest_path}, {"Bellman-Ford", bellman_ford}};
  for (size_t s = 0; s < sizeof solvers / sizeof solvers[0]; s++) {
    solver = solvers[s].fn;
    pert_config *c;
    check(pert_config_new(&c));
    check(pert_config_set_device(c, "cpu"));
    check(pert_config_set_sense(c, PERT_SENSE_MINIMIZE));
    int64_t dims[1] = {D};
    check(pert_op_new(c, dims, 1, dims, 1, solver, NULL, &op));
    pert_config_free(c);
    printf("Methods per batch of %zu shortest paths (D = %d, %s, one thread), medians of %d calls:\n\n", batch, D,
           solvers[s].name, calls);
    printf("| method | library | solver calls alone | solves | library / solves |\n|---|---|---|---|---|\n");
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
      double a, b;
      medians_us(cases[k].method, cases[k].solves, calls, &a, &b);
      printf("| %s | %.1f us | %.1f us | %s | %.2fx |\n", cases[k].name, a, b, cases[k].what, a / b);
    }
    printf("\n");
    pert_op_free(op);
  }
  return 0;
}
