/* Times one training-regime point in C: forward (with a tape) + VJP of a built-in or of a
 * C one-hot argmax callback, the median of many calls on one op (the "Before -> after"
 * numbers of README's training-regime section).
 *
 *   cc -std=c11 -O2 bench/forward_vjp.c bench/bench_solvers.c -Iinclude \
 *      -Ltarget/release -lperturbations -Wl,-rpath,$PWD/target/release \
 *      -o target/bench/forward_vjp
 *   target/bench/forward_vjp BATCH D N KIND CALLS [THREADS [MAX_THREADS]]
 *
 * KIND: 0 argmax, 1 top-k (k = D/10, at least 1), 2 ranks, 3 the plain C argmax callback of
 * the training table (bench_argmax_plain), 4 its hand-vectorized one (bench_argmax: eight
 * lanes).
 * THREADS: the op's solver threads (pert_config_set_threads; default 1); MAX_THREADS:
 * pert_config_set_max_threads (default 0, one per core). Normal noise,
 * sigma 0.1, device "cpu". Prints the median and 90th percentile of forward+tape+VJP, and
 * the best forward+tape and VJP. */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "bench_util.h"

/* The argmax callbacks of the training table (bench/bench_solvers.c, linked in). */
int32_t bench_argmax(void *user_data, const float *x, size_t count, float *y);
int32_t bench_argmax_plain(void *user_data, const float *x, size_t count, float *y);

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: %s BATCH D N KIND CALLS [THREADS [MAX_THREADS]]\n", argv[0]);
    return 2;
  }
  size_t b = (size_t)atol(argv[1]), d = (size_t)atol(argv[2]);
  uint64_t n = (uint64_t)atoll(argv[3]);
  int kind = atoi(argv[4]), calls = atoi(argv[5]);
  uint32_t threads = argc > 6 ? (uint32_t)atoi(argv[6]) : 1;
  uint32_t max_threads = argc > 7 ? (uint32_t)atoi(argv[7]) : 0;
  if (b == 0 || d == 0 || calls < 1 || kind < 0 || kind > 4) {
    fprintf(stderr, "BATCH, D and CALLS must be positive, KIND 0 to 4\n");
    return 2;
  }
  pert_config *c;
  check(pert_config_new(&c));
  check(pert_config_set_num_samples(c, n));
  check(pert_config_set_sigma(c, 0.1));
  check(pert_config_set_device(c, "cpu"));
  check(pert_config_set_threads(c, threads));
  check(pert_config_set_max_threads(c, max_threads));
  int64_t dims[1] = {(int64_t)d};
  pert_op *op;
  if (kind >= 3)
    check(pert_op_new(c, dims, 1, dims, 1, kind == 3 ? bench_argmax_plain : bench_argmax, &d, &op));
  else
    check(pert_op_new_builtin(c, (uint32_t)kind, d / 10 ? (int64_t)(d / 10) : 1, dims, 1, &op));
  pert_config_free(c);
  float *theta = malloc(b * d * sizeof(float)), *y = malloc(b * d * sizeof(float)),
        *g = malloc(b * d * sizeof(float));
  double *total = malloc((size_t)calls * sizeof(double));
  if (!theta || !y || !g || !total) return 1;
  for (size_t i = 0; i < b * d; i++) theta[i] = (float)((i * 7919) % 1000) / 1000.0f;
  double best_forward = 1e9, best_vjp = 1e9;
  for (int it = 0; it < calls; it++) {
    pert_tape *tape;
    double t0 = now();
    check(pert_forward(op, theta, b, y, &tape));
    double t1 = now();
    check(pert_tape_vjp(tape, y, g));
    double t2 = now();
    pert_tape_free(tape);
    if (t1 - t0 < best_forward) best_forward = t1 - t0;
    if (t2 - t1 < best_vjp) best_vjp = t2 - t1;
    total[it] = t2 - t0;
  }
  qsort(total, (size_t)calls, sizeof(double), by_value);
  printf("forward+tape+vjp median %.3f ms, p90 %.3f ms; best forward+tape %.3f ms, best vjp %.3f ms\n",
         total[calls / 2] * 1e3, total[calls * 9 / 10] * 1e3, best_forward * 1e3, best_vjp * 1e3);
  pert_op_free(op);
  free(theta);
  free(y);
  free(g);
  free(total);
  return 0;
}
