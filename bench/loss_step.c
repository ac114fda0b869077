/* Times one training step's calls from C, as the Python package makes them (the reference
 * of bench/python_vs_c.py): the Fenchel-Young loss with its bound (pert_fenchel_young_with_bound,
 * MODE fy; fy-plain: pert_fenchel_young) or forward with a tape and its VJP (MODE vjp), batch BATCH of D = 40 edge costs,
 * N samples, sigma 1, device "cpu", the built-in argmax (KIND 0, maximize) or the grid
 * shortest-path C solver (KIND 1, examples/c/grid_shortest_path.c, minimize); the median
 * of CALLS calls after CALLS / 4 of warm-up, in milliseconds.
 *
 *   target/bench/loss_step BATCH N KIND MODE CALLS */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "bench_util.h"

int32_t grid_shortest_path(void *user_data, const float *costs, size_t count, float *paths);

enum { D = 40 };

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s BATCH N KIND MODE CALLS\n", argv[0]);
    return 2;
  }
  size_t b = (size_t)atol(argv[1]);
  uint64_t n = (uint64_t)atoll(argv[2]);
  int kind = atoi(argv[3]), fy = strcmp(argv[4], "fy") == 0, plain = strcmp(argv[4], "fy-plain") == 0,
      calls = atoi(argv[5]);
  if (b == 0 || n == 0 || calls < 4 || kind < 0 || kind > 1) return 2;
  pert_config *c;
  check(pert_config_new(&c));
  check(pert_config_set_num_samples(c, n));
  check(pert_config_set_sigma(c, 1.0));
  check(pert_config_set_device(c, "cpu"));
  check(pert_config_set_sense(c, kind ? PERT_SENSE_MINIMIZE : PERT_SENSE_MAXIMIZE));
  int64_t dims[1] = {D};
  pert_op *op;
  if (kind)
    check(pert_op_new(c, dims, 1, dims, 1, grid_shortest_path, NULL, &op));
  else
    check(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, dims, 1, &op));
  pert_config_free(c);
  float *theta = malloc(b * D * sizeof(float)), *y = malloc(b * D * sizeof(float)),
        *out = malloc(b * D * sizeof(float)), *grad = malloc(b * D * sizeof(float)),
        *loss = malloc(b * sizeof(float)), *bound = malloc(b * sizeof(float));
  double *t = malloc((size_t)calls * sizeof(double));
  if (!theta || !y || !out || !grad || !loss || !bound || !t) return 1;
  for (size_t i = 0; i < b * D; i++) theta[i] = 0.5f + (float)((i * 7919) % 1000) / 1000.0f;
  /* targets: the solver's own solutions of theta (feasible) */
  if (kind)
    grid_shortest_path(NULL, theta, b, y);
  else
    for (size_t r = 0; r < b; r++) {
      size_t best = 0;
      for (size_t i = 1; i < D; i++)
        if (theta[r * D + i] > theta[r * D + best]) best = i;
      for (size_t i = 0; i < D; i++) y[r * D + i] = i == best ? 1.0f : 0.0f;
    }
  for (int it = -calls / 4; it < calls; it++) {
    double t0 = now();
    if (fy) {
      check(pert_fenchel_young_with_bound(op, theta, y, b, loss, grad, bound));
    } else if (plain) {
      check(pert_fenchel_young(op, theta, y, b, loss, grad));
    } else {
      pert_tape *tape;
      check(pert_forward(op, theta, b, out, &tape));
      check(pert_tape_vjp(tape, out, grad));
      pert_tape_free(tape);
    }
    if (it >= 0) t[it] = now() - t0;
  }
  qsort(t, (size_t)calls, sizeof(double), by_value);
  printf("%.4f\n", t[calls / 2] * 1e3);
  pert_op_free(op);
  free(theta);
  free(y);
  free(out);
  free(grad);
  free(loss);
  free(bound);
  free(t);
  return 0;
}
