/* Times the decision-focused methods against the solver calls they make (issue 30): per
 * batch of BATCH shortest-path problems (the grid solver of examples/c/grid_shortest_path.c,
 * D = 40 edge costs, minimize, one thread), the median over CALLS calls after CALLS / 4 of
 * warm-up, in microseconds, of
 *   SPO+    pert_spo_plus                                    vs the solver on BATCH rows
 *   DBB     pert_op_solve + pert_blackbox_vjp (a training step) vs the solver on BATCH rows, twice
 *   NID     pert_op_solve + pert_negative_identity_vjp        vs the solver on BATCH rows
 *   PG      pert_perturbation_gradient (two-sided)            vs the solver on BATCH rows, twice
 * and prints a Markdown table with the ratio (the library's share beyond the solves).
 *
 *   target/bench/methods [BATCH [CALLS]] */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bench_util.h"

int32_t grid_shortest_path(void *user_data, const float *costs, size_t count, float *paths);

enum { D = 40 };

static size_t batch;
static pert_op *op;
static float *pred, *cost, *sol, *obj, *g, *y, *out, *loss;

static void solve_alone(void) { grid_shortest_path(NULL, pred, batch, y); }
static void solve_twice(void) {
  grid_shortest_path(NULL, pred, batch, y);
  grid_shortest_path(NULL, cost, batch, out);
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

static double median_us(void (*f)(void), int calls) {
  double *t = malloc((size_t)calls * sizeof(double));
  if (!t) exit(1);
  for (int it = -calls / 4; it < calls; it++) {
    double t0 = now();
    f();
    if (it >= 0) t[it] = now() - t0;
  }
  qsort(t, (size_t)calls, sizeof(double), by_value);
  double m = t[calls / 2] * 1e6;
  free(t);
  return m;
}

int main(int argc, char **argv) {
  batch = argc > 1 ? (size_t)atol(argv[1]) : 32;
  int calls = argc > 2 ? atoi(argv[2]) : 2000;
  if (batch == 0 || calls < 4) return 2;
  pert_config *c;
  check(pert_config_new(&c));
  check(pert_config_set_device(c, "cpu"));
  check(pert_config_set_sense(c, PERT_SENSE_MINIMIZE));
  int64_t dims[1] = {D};
  check(pert_op_new(c, dims, 1, dims, 1, grid_shortest_path, NULL, &op));
  pert_config_free(c);
  size_t n = batch * D;
  pred = malloc(n * sizeof(float)), cost = malloc(n * sizeof(float)), sol = malloc(n * sizeof(float));
  g = malloc(n * sizeof(float)), y = malloc(n * sizeof(float)), out = malloc(n * sizeof(float));
  obj = malloc(batch * sizeof(float)), loss = malloc(batch * sizeof(float));
  if (!pred || !cost || !sol || !g || !y || !out || !obj || !loss) return 1;
  for (size_t i = 0; i < n; i++) {
    pred[i] = 0.5f + (float)((i * 7919) % 1000) / 1000.0f;
    cost[i] = 0.5f + (float)((i * 104729) % 1000) / 1000.0f;
    g[i] = (float)((i * 31) % 17) / 17.0f - 0.5f;
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
      {"SPO+", spo, solve_alone, "1 x batch"},
      {"DBB (solve + backward)", dbb, solve_twice, "2 x batch"},
      {"NID (solve + backward)", nid, solve_alone, "1 x batch"},
      {"PG (two-sided)", pg, solve_twice, "2 x batch"},
  };
  printf("Methods per batch of %zu shortest paths (D = %d, one thread), medians of %d calls:\n\n", batch, D, calls);
  printf("| method | library | solver calls alone | solves | library / solves |\n|---|---|---|---|---|\n");
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    double a = median_us(cases[k].method, calls), b = median_us(cases[k].solves, calls);
    printf("| %s | %.1f us | %.1f us | %s | %.2fx |\n", cases[k].name, a, b, cases[k].what, a / b);
  }
  pert_op_free(op);
  return 0;
}
