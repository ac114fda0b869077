/* How well the MPI component spreads a call's solves (bindings/mpi): a solver that sleeps
 * 2 ms per row, so that the time measures the distribution rather than the cores (run it
 * oversubscribed on a small machine). One forward call of BATCH problems x N samples
 * (ROWS rows), THREADS workers per rank; the median of REPEATS calls against the ideal
 * ROWS x 2 ms / (ranks x threads). Then the same calls with an instant solver give the
 * library's and MPI's own cost: per call, and per row against the same op in one process.
 * Prints one Markdown table row (ranks, time, ideal, their ratio, the overhead per call in
 * ms, per row in us); bench/mpi_scale.sh runs np = 1, 2, 4, 8.
 *
 *   mpirun -np 4 target/bench/mpi_scale [THREADS] */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "perturbations_mpi.h"

enum { D = 20, BATCH = 32, N = 10, ROWS = BATCH * N, REPEATS = 5 };
static const double SLEEP_PER_ROW = 2e-3;

static int32_t sleepy(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)info;
  int asleep = *(const int *)user_data;
  if (asleep) {
    double s = SLEEP_PER_ROW * (double)count;
    struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&t, NULL);
  }
  for (size_t r = 0; r < count; r++) { /* argmax, so that the outputs are real */
    size_t best = 0;
    for (size_t i = 1; i < D; i++)
      if (x[r * D + i] > x[r * D + best]) best = i;
    for (size_t i = 0; i < D; i++) y[r * D + i] = i == best;
  }
  return 0;
}

static pert_config *config(uint32_t threads) {
  pert_config *c = NULL;
  check(pert_config_new(&c));
  pert_config_set_num_samples(c, N);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  return c;
}

/* The median seconds of one forward call (with a tape) on `op`. */
static double median_call(pert_op *op, const float *theta, float *y) {
  double t[REPEATS];
  for (int i = 0; i < REPEATS; i++) {
    pert_tape *tape = NULL;
    double t0 = now();
    check(pert_forward(op, theta, BATCH, y, &tape));
    t[i] = now() - t0;
    pert_tape_free(tape);
  }
  qsort(t, REPEATS, sizeof t[0], by_value);
  return t[REPEATS / 2];
}

int main(int argc, char **argv) {
  int provided = 0, rank = 0, size = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  uint32_t threads = argc > 1 ? (uint32_t)atoi(argv[1]) : 1;
  const int64_t shape[1] = {D};
  static float theta[BATCH * D], y[BATCH * D];
  for (int i = 0; i < BATCH * D; i++) theta[i] = (float)((i * 7919) % 101) / 101.0f;
  double measured[2] = {0, 0};
  for (int asleep = 1; asleep >= 0; asleep--) { /* sleeping, then instant */
    pert_config *c = config(threads);
    pert_op *op = NULL;
    check(pert_mpi_op_new(c, shape, 1, shape, 1, MPI_COMM_WORLD, 0, sleepy, &asleep, NULL, NULL, &op));
    if (rank == 0) {
      median_call(op, theta, y); /* the workers' first solves */
      measured[asleep] = median_call(op, theta, y);
      pert_op_free(op);
    } else {
      check(pert_mpi_serve(op));
      pert_op_free(op);
    }
    pert_config_free(c);
  }
  if (rank == 0) {
    int asleep = 0; /* the same op in one process, instant solver */
    pert_config *c = config(threads);
    pert_op *op = NULL;
    check(pert_op_new_ex(c, shape, 1, shape, 1, sleepy, &asleep, NULL, NULL, &op));
    median_call(op, theta, y);
    double alone = median_call(op, theta, y);
    pert_op_free(op);
    pert_config_free(c);
    double ideal = ROWS * SLEEP_PER_ROW / (size * (double)threads);
    printf("| %d | %.1f | %.1f | %.3f | %.1f | %.2f |\n", size, 1e3 * measured[1], 1e3 * ideal, measured[1] / ideal,
           1e3 * (measured[1] - ideal), 1e6 * (measured[0] - alone) / ROWS);
  }
  MPI_Finalize();
  return 0;
}
