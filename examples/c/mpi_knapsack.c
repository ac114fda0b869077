/* Training with a MILP solver spread over an MPI job: the knapsack model of
 * bench/pool_knapsack.c (a linear model of 5 features, Fenchel-Young loss, N = 10, sigma 1,
 * Adam) whose perturbed knapsacks are solved by GLPK on every rank of the job, one model
 * per worker thread. Root trains; the other ranks serve until root frees its op.
 *
 *   mpicc -std=c11 mpi_knapsack.c ../../bindings/mpi/perturbations_mpi.c -I../../include \
 *         -I../../bindings/mpi -L../../target/release -lperturbations -Wl,-rpath,../../target/release \
 *         -lglpk -lm -o mpi_knapsack
 *   mpirun -np 4 ./mpi_knapsack [EPOCHS]
 *
 * With `--fail-on-rank R`, rank R's knapsacks have a negative capacity, so GLPK finds no
 * solution there: root's first call fails with PERT_STATUS_SOLVER_FAILED naming rank R,
 * and the program says so (exit 0 when the failure is reported as it should be). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "knapsack_training.h"
#include "perturbations_mpi.h"

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void fail(const char *what, pert_status s) {
  char message[4096];
  pert_last_error(message, sizeof message);
  fprintf(stderr, "%s: %s: %s\n", what, pert_status_name(s), message);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

/* Root: EPOCHS epochs of training; 0 when the test regret fell. */
static int train(pert_op *op, int epochs, int size) {
  static model m;
  double untrained = regret(&m);
  printf("knapsack training over %d ranks (GLPK on each): untrained test regret %.4f\n", size, untrained);
  for (int e = 0; e < epochs; e++) {
    double t0 = seconds();
    for (int s = 0; s < TRAIN; s += BATCH) {
      float theta[BATCH][ITEMS], loss[BATCH], grad[BATCH][ITEMS];
      predict(&m, s, theta);
      pert_status st = pert_fenchel_young(op, &theta[0][0], &sol[s][0], BATCH, loss, &grad[0][0]);
      if (st != PERT_STATUS_OK) fail("pert_fenchel_young", st);
      adam_step(&m, s, grad);
    }
    printf("epoch %d: %.3f s, %d MILPs, test regret %.4f\n", e + 1, seconds() - t0, TRAIN * 10, regret(&m));
  }
  return regret(&m) < 0.5 * untrained ? 0 : 1;
}

/* Root, with a failing rank: the call must fail, naming it. */
static int expect_failure(pert_op *op, int failing) {
  float theta[BATCH][ITEMS], loss[BATCH], grad[BATCH][ITEMS];
  static model m;
  predict(&m, 0, theta);
  pert_status st = pert_fenchel_young(op, &theta[0][0], &sol[0][0], BATCH, loss, &grad[0][0]);
  char message[4096], want[32];
  pert_last_error(message, sizeof message);
  snprintf(want, sizeof want, "rank %d failed", failing);
  printf("with rank %d's GLPK failing: %s: %s\n", failing, pert_status_name(st), message);
  return st == PERT_STATUS_SOLVER_FAILED && strstr(message, want) && strstr(message, "GLPK") ? 0 : 1;
}

int main(int argc, char **argv) {
  int provided = 0, rank = 0, size = 0, epochs = 3, failing = -1;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--fail-on-rank") == 0 && i + 1 < argc) failing = atoi(argv[++i]);
    else epochs = atoi(argv[i]);
  }
  make_data(); /* the same seed on every rank; only root uses the data */

  pert_config *config = NULL;
  pert_config_new(&config);
  pert_config_set_num_samples(config, 10);
  pert_config_set_sigma(config, 1.0);
  pert_config_set_seed(config, 7);
  pert_config_set_device(config, "cpu");
  pert_config_set_threads(config, 1); /* GLPK workers per rank */
  pert_config_set_remote_timeout(config, 60);
  knapsack models = {.capacity = rank == failing ? -1 : CAPACITY};
  const int64_t shape[1] = {ITEMS};
  pert_op *op = NULL;
  pert_status st = pert_mpi_op_new(config, shape, 1, shape, 1, MPI_COMM_WORLD, 0, solve_glpk, &models, build_model,
                                   free_model, &op);
  pert_config_free(config);
  if (st != PERT_STATUS_OK) fail("pert_mpi_op_new", st);

  int status = 0;
  if (rank == 0) {
    status = failing >= 0 ? expect_failure(op, failing) : train(op, epochs, size);
    pert_op_free(op); /* ends the service on every rank */
  } else {
    st = pert_mpi_serve(op);
    if (st != PERT_STATUS_OK) fail("pert_mpi_serve", st);
    pert_op_free(op);
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
