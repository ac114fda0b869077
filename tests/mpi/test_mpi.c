/* The MPI component over 3 ranks (mpirun -np 3): settings that differ are refused on every
 * rank; an op spread over the ranks equals the same op in one process, bit for bit
 * (forward, tape, Fenchel-Young, plain solves, the clean-input baseline), and its solver
 * is told the global rows; a solver failure on a rank fails root's call naming the rank;
 * a stuck rank fails root's call within the timeout, and later calls go on. */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "perturbations_mpi.h"

#define D 6
#define N 16
#define POISON (-777.0f) /* x[1] of a row that fails on rank 2 */
#define SLEEPY (-555.0f) /* x[1] of a row that takes 6 s on rank 1 */
#define ROOT_FAILS (-888.0f) /* x[1] of a row that fails on root and takes 3 s on rank 1 */
#define SLOWISH (-444.0f)    /* x[1] of a row that takes 0.5 s on rank 1: within the timeout */
#define LATE_ROOT (-333.0f)  /* x[1] of a row that fails on root after 0.5 s */
#define NAN_OUT (-222.0f)    /* x[1] of a row whose solution rank 2 leaves NaN */
#define WIDE 4096           /* the output of the op whose answers are too large to go eagerly */

static int my_rank = 0;
static size_t rows_solved = 0; /* by this rank's solver */
static const int64_t SHAPE[1] = {D};

/* A failed check ends the whole job at once: the other ranks may be serving an op this
 * rank will not free, and would wait for it until mpirun's time limit. */
static void fail_job(void) {
  fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

#define CHECK(cond)                                                                         \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      fprintf(stderr, "rank %d: %s:%d: CHECK(%s) failed\n", my_rank, __FILE__, __LINE__, #cond); \
      fail_job();                                                                           \
      return false;                                                                         \
    }                                                                                       \
  } while (0)

#define CHECK_STATUS(expected, call)                                                              \
  do {                                                                                            \
    pert_status got_ = (call);                                                                    \
    if (got_ != (expected)) {                                                                     \
      char msg_[4096];                                                                            \
      pert_last_error(msg_, sizeof msg_);                                                         \
      fprintf(stderr, "rank %d: %s:%d: %s gave %s, expected %s (%s)\n", my_rank, __FILE__, __LINE__, \
              #call, pert_status_name(got_), pert_status_name(expected), msg_);                   \
      fail_job();                                                                                 \
      return false;                                                                               \
    }                                                                                             \
  } while (0)

static bool error_has(const char *needle) {
  char msg[4096];
  pert_last_error(msg, sizeof msg);
  if (strstr(msg, needle)) return true;
  fprintf(stderr, "rank %d: the message \"%s\" lacks \"%s\"\n", my_rank, msg, needle);
  return false;
}

/* Problem p has x[0] = 1000 + 10 p: the solver checks that its rows are the global ones
 * (perturbed rows move by sigma 0.5, far less than 5). The solution is the one-hot argmax
 * of x[1..]. */
static int32_t solve(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    const float *row = x + r * D;
    uint64_t global = info->first_row + r;
    uint64_t problem = info->clean ? global : global / info->num_samples;
    if (fabsf(row[0] - (1000.0f + 10.0f * (float)problem)) > 5.0f || problem >= info->batch ||
        info->num_samples != N || info->struct_size != sizeof(pert_solve_info)) {
      char msg[160];
      snprintf(msg, sizeof msg, "rank %d: row %zu is not problem %llu", my_rank, r, (unsigned long long)problem);
      pert_solver_set_error(msg);
      return 1;
    }
    if (row[1] == POISON && my_rank == 2) {
      pert_solver_set_error("poisoned on rank 2 at unperturbed problem 3"); /* (the user's words: kept) */
      return 1;
    }
    if ((row[1] == POISON || row[1] == NAN_OUT) && my_rank != 2) {
      /* the other ranks take their time with these rows, so that rank 2 gets some however
       * the machine schedules (root's driver could otherwise take all 60 before rank 2
       * asks: the call then succeeded, and the check failed once) */
      struct timespec t = {0, 20000000};
      nanosleep(&t, NULL);
    }
    if (row[1] == LATE_ROOT && my_rank == 0 && r == 0) {
      struct timespec t = {0, 500000000};
      nanosleep(&t, NULL);
      pert_solver_set_error("failed late on root");
      return 1;
    }
    if (row[1] == SLOWISH && my_rank == 1 && r == 0) {
      struct timespec t = {0, 500000000};
      nanosleep(&t, NULL);
    }
    if (row[1] == ROOT_FAILS && my_rank == 0) {
      pert_solver_set_error("failed on root");
      return 1;
    }
    if ((row[1] == SLEEPY || row[1] == ROOT_FAILS) && my_rank == 1 && r == 0) {
      struct timespec t = {row[1] == SLEEPY ? 6 : 3, 0};
      nanosleep(&t, NULL);
    }
    size_t best = 1;
    for (size_t i = 2; i < D; i++)
      if (row[i] > row[best]) best = i;
    for (size_t i = 0; i < D; i++) y[r * D + i] = i == best ? 1.0f : 0.0f;
    if (row[1] == NAN_OUT && my_rank == 2) y[r * D + 1] = NAN;
  }
  __atomic_add_fetch(&rows_solved, count, __ATOMIC_SEQ_CST);
  return 0;
}

static int inits = 0, finis = 0;
static int32_t init(void *user_data, uint32_t worker) {
  (void)user_data, (void)worker;
  __atomic_add_fetch(&inits, 1, __ATOMIC_SEQ_CST);
  return 0;
}
static void fini(void *user_data, uint32_t worker) {
  (void)user_data, (void)worker;
  __atomic_add_fetch(&finis, 1, __ATOMIC_SEQ_CST);
}

static pert_config *make_config(uint32_t baseline) {
  pert_config *c = NULL;
  pert_config_new(&c);
  pert_config_set_num_samples(c, N);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_seed(c, 11);
  pert_config_set_threads(c, 2);
  pert_config_set_device(c, "cpu");
  pert_config_set_baseline(c, baseline);
  pert_config_set_remote_timeout(c, 0.2); /* per row of a worker: blocks of 5 rows a worker here */
  return c;
}

static void problems(float *theta, size_t batch, float marker) {
  for (size_t p = 0; p < batch; p++) {
    theta[p * D] = 1000.0f + 10.0f * (float)p;
    theta[p * D + 1] = marker;
    for (size_t i = 2; i < D; i++) theta[p * D + i] = (float)((p * 7 + i * 3) % 5) * 0.3f;
  }
}

/* Every rank: constructions whose settings differ fail on every rank, naming the rank. */
static bool differing_settings_are_refused(int size) {
  pert_config *c = make_config(PERT_BASELINE_SAMPLE_MEAN);
  pert_op *op = NULL;
  if (my_rank == 2) pert_config_set_num_samples(c, 17);
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT,
               pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, 0, solve, NULL, NULL, NULL, &op));
  CHECK(op == NULL && error_has("rank 2") && error_has("num_samples=17") && error_has("num_samples=16"));
  pert_config_free(c);

  c = make_config(PERT_BASELINE_SAMPLE_MEAN);
  pert_config_set_threads(c, (uint32_t)(1 + my_rank)); /* threads are each rank's own */
  const int64_t other[2] = {2, D / 2};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_mpi_op_new(c, my_rank == 1 ? other : SHAPE, my_rank == 1 ? 2 : 1,
                                                             SHAPE, 1, MPI_COMM_WORLD, 0, solve, NULL, NULL, NULL, &op));
  CHECK(op == NULL && error_has("rank 1's settings differ") && error_has("input_shape=2,3,"));

  /* a rank's own argument error reaches every rank */
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, 0, solve, NULL, NULL,
                                                          NULL, my_rank == size - 1 ? NULL : &op));
  CHECK(op == NULL && error_has("out is NULL"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT,
               pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, size, solve, NULL, NULL, NULL, &op));
  CHECK(error_has("root 3 is not a rank") || error_has("different roots"));
  /* ranks that name different roots: refused on every rank, none waits */
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, my_rank == 1 ? 1 : 0,
                                                             solve, NULL, NULL, NULL, &op));
  CHECK(op == NULL && error_has("different roots (0 to 1)"));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, my_rank == 2 ? 5 : 0,
                                                             solve, NULL, NULL, NULL, &op));
  CHECK(op == NULL && error_has("different roots (0 to 5)"));
  pert_config_free(c);
  return true;
}

/* Root: one call of each kind on the spread op and on the same op in one process. */
static bool equal_to_one_process(pert_op *spread, pert_op *single, size_t batch) {
  float theta[64 * D], y1[64 * D], y2[64 * D], g[64 * D], gin1[64 * D], gin2[64 * D];
  problems(theta, batch, 0.0f);
  for (size_t i = 0; i < batch * D; i++) g[i] = (float)((i * 5) % 7) - 3.0f;
  pert_tape *t1 = NULL, *t2 = NULL;
  CHECK_STATUS(PERT_STATUS_OK, pert_forward(spread, theta, batch, y1, &t1));
  CHECK_STATUS(PERT_STATUS_OK, pert_forward(single, theta, batch, y2, &t2));
  CHECK(memcmp(y1, y2, batch * D * sizeof(float)) == 0);
  CHECK_STATUS(PERT_STATUS_OK, pert_tape_vjp(t1, g, gin1));
  CHECK_STATUS(PERT_STATUS_OK, pert_tape_vjp(t2, g, gin2));
  CHECK(memcmp(gin1, gin2, batch * D * sizeof(float)) == 0);
  pert_tape_free(t1);
  pert_tape_free(t2);
  float loss1[64], loss2[64];
  CHECK_STATUS(PERT_STATUS_OK, pert_fenchel_young(spread, theta, y2, batch, loss1, gin1));
  CHECK_STATUS(PERT_STATUS_OK, pert_fenchel_young(single, theta, y2, batch, loss2, gin2));
  CHECK(memcmp(loss1, loss2, batch * sizeof(float)) == 0 && memcmp(gin1, gin2, batch * D * sizeof(float)) == 0);
  CHECK_STATUS(PERT_STATUS_OK, pert_op_solve(spread, theta, batch, y1));
  CHECK_STATUS(PERT_STATUS_OK, pert_op_solve(single, theta, batch, y2));
  CHECK(memcmp(y1, y2, batch * D * sizeof(float)) == 0);
  return true;
}

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Root: the spread op against one process, a remote failure, a stuck rank. */
static bool root_checks(pert_op *spread, uint32_t baseline) {
  pert_config *c = make_config(baseline);
  pert_op *single = NULL;
  CHECK_STATUS(PERT_STATUS_OK, pert_op_new_ex(c, SHAPE, 1, SHAPE, 1, solve, NULL, NULL, NULL, &single));
  pert_config_free(c);
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_mpi_serve(spread));
  CHECK(error_has("not a serving rank's handle"));
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT, pert_mpi_serve(NULL));
  size_t sizes[] = {1, 2, 7, 40};
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    if (!equal_to_one_process(spread, single, sizes[i])) return false;
  if (baseline != PERT_BASELINE_SAMPLE_MEAN) {
    pert_op_free(single);
    return true;
  }

  /* a solver failure on rank 2: the call fails naming it, nothing is written */
  float theta[60 * D], y[60 * D];
  problems(theta, 60, POISON);
  for (size_t i = 0; i < 60 * D; i++) y[i] = -9.0f;
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(spread, theta, 60, y));
  CHECK(error_has("rank 2 failed") && error_has("poisoned on rank 2 at unperturbed problem 3"));
  for (size_t i = 0; i < 60 * D; i++) CHECK(y[i] == -9.0f);
  if (!equal_to_one_process(spread, single, 7)) return false;

  /* a NaN solution on rank 2: its rows are named in the call's terms, and the library's
   * check of the block names the row within the block (not an "unperturbed problem") */
  problems(theta, 60, NAN_OUT);
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(spread, theta, 60, y));
  CHECK(error_has("rank 2 failed on unperturbed problem") && error_has("wrote NaN at output 1 of row 0 of the block"));
  for (size_t i = 0; i < 60 * D; i++) CHECK(y[i] == -9.0f);
  if (!equal_to_one_process(spread, single, 7)) return false;

  /* rank 1 slow but within its limit (0.5 s of 1 s): the call succeeds */
  problems(theta, 60, SLOWISH);
  float want[60 * D];
  CHECK_STATUS(PERT_STATUS_OK, pert_op_solve(spread, theta, 60, y));
  CHECK_STATUS(PERT_STATUS_OK, pert_op_solve(single, theta, 60, want));
  CHECK(memcmp(y, want, sizeof want) == 0);
  for (size_t i = 0; i < 60 * D; i++) y[i] = -9.0f;

  /* root's own failure once the other ranks have answered: named as root's */
  problems(theta, 60, LATE_ROOT);
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(spread, theta, 60, y));
  CHECK(error_has("rank 0 (root) failed") && error_has("failed late on root"));
  for (size_t i = 0; i < 60 * D; i++) CHECK(y[i] == -9.0f);

  /* root's own failure while rank 1 is slow: the call fails at once, naming root */
  problems(theta, 60, ROOT_FAILS);
  double begin = seconds();
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(spread, theta, 60, y));
  CHECK(seconds() - begin < 0.9 && error_has("rank 0 (root) failed on unperturbed problem") &&
        error_has("failed on root"));
  for (size_t i = 0; i < 60 * D; i++) CHECK(y[i] == -9.0f);
  struct timespec rest = {3, 500000000};
  nanosleep(&rest, NULL); /* rank 1 answers late, and is back */
  if (!equal_to_one_process(spread, single, 40)) return false;

  /* rank 1 stuck for 6 s on its block (timeout 0.2 s a row of a worker: about 1 s for
   * the guided block of up to 5 rows a worker; fewer when root's driver took its block
   * first): the call fails naming it, once that limit, which the message gives, has
   * passed, and well before rank 1 answers (on a loaded machine too) */
  problems(theta, 60, SLEEPY);
  double start = seconds();
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(spread, theta, 60, y));
  double took = seconds() - start;
  CHECK(error_has("rank 1 did not answer") && error_has("remote_timeout"));
  char said[4096];
  pert_last_error(said, sizeof said);
  const char *within = strstr(said, " within ");
  double limit = within ? atof(within + strlen(" within ")) : 0.0;
  CHECK(limit >= 0.2 && limit <= 1.0); /* 1 to 5 rows a worker x 0.2 s */
  if (!(took > limit * 0.95 && took < 5.0))
    fprintf(stderr, "rank 0: the stuck rank's call took %.2f s (its limit %.2f s)\n", took, limit);
  CHECK(took > limit * 0.95 && took < 5.0);
  for (size_t i = 0; i < 60 * D; i++) CHECK(y[i] == -9.0f);
  /* later calls go on without it, then with it once it has answered */
  if (!equal_to_one_process(spread, single, 40)) return false;
  struct timespec t = {6, 0};
  nanosleep(&t, NULL);
  if (!equal_to_one_process(spread, single, 40)) return false;
  printf("a stuck rank failed the call after %.2f s (remote_timeout 0.2 s per row of a worker)\n", took);
  pert_op_free(single);
  return true;
}

/* A wide output (answers above MPI's eager size): root frees the op while rank 1 is still
 * busy with a block; every rank's service still ends (no hang). */
static int32_t solve_wide(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)user_data, (void)info;
  for (size_t r = 0; r < count; r++) {
    if (x[r * D + 1] == SLEEPY && my_rank == 1 && r == 0) {
      struct timespec t = {2, 0};
      nanosleep(&t, NULL);
    }
    /* root's own blocks slow too: the dispatcher hands blocks to the other ranks meanwhile,
     * whatever the scheduling (else root's driver can take all 60 rows, rank 1 none) */
    if (x[r * D + 1] == SLEEPY && my_rank == 0 && r == 0) {
      struct timespec t = {0, 300000000};
      nanosleep(&t, NULL);
    }
    memset(y + r * WIDE, 0, WIDE * sizeof(float));
    y[r * WIDE + (size_t)(r % WIDE)] = 1.0f;
  }
  return 0;
}

static bool free_while_busy(void) {
  pert_config *c = make_config(PERT_BASELINE_SAMPLE_MEAN);
  const int64_t wide[1] = {WIDE};
  pert_op *op = NULL;
  CHECK_STATUS(PERT_STATUS_OK, pert_mpi_op_new(c, SHAPE, 1, wide, 1, MPI_COMM_WORLD, 0, solve_wide, NULL, NULL, NULL, &op));
  pert_config_free(c);
  if (my_rank == 0) {
    static float theta[60 * D], y[60 * WIDE];
    problems(theta, 60, 0.0f);
    CHECK_STATUS(PERT_STATUS_OK, pert_op_solve(op, theta, 60, y));
    problems(theta, 60, SLEEPY);
    CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_op_solve(op, theta, 60, y));
    CHECK(error_has("rank 1 did not answer"));
    pert_op_free(op); /* at once: rank 1 is still in its 2 s solve */
  } else {
    CHECK_STATUS(PERT_STATUS_OK, pert_mpi_serve(op));
    double begin = seconds();
    CHECK_STATUS(PERT_STATUS_OK, pert_mpi_serve(op)); /* the service has ended: at once */
    CHECK(seconds() - begin < 0.5);
    pert_op_free(op);
  }
  return true;
}

/* Rank 1 busy for 3 s on its first block (small answers, which go eagerly) while root's
 * call fails (timeout 0.2 s a row) and root frees the op at once: rank 1 acknowledges the
 * end only after root stopped waiting for it. The next communicator of the job (a new
 * op's) must still be made and work (it hung: rank 1's late message reached it). */
static int32_t solve_busy_once(void *user_data, const pert_solve_info *info, const float *x, size_t count,
                               float *y) {
  static int once = 0;
  if (my_rank == 1 && !once++) {
    struct timespec t = {3, 0};
    nanosleep(&t, NULL);
  }
  if (my_rank == 0) {
    struct timespec t = {0, 20000000};
    nanosleep(&t, NULL);
  }
  (void)user_data, (void)info, (void)x;
  for (size_t r = 0; r < count; r++)
    for (size_t i = 0; i < D; i++) y[r * D + i] = i == 0 ? 1.0f : 0.0f;
  return 0;
}

static bool late_rank_then_a_new_op(void) {
  pert_config *c = make_config(PERT_BASELINE_SAMPLE_MEAN);
  pert_config_set_threads(c, 1);
  for (int round = 0; round < 2; round++) {
    pert_op *op = NULL;
    CHECK_STATUS(PERT_STATUS_OK, pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, 0,
                                                 round == 0 ? solve_busy_once : solve, NULL, NULL, NULL, &op));
    if (my_rank == 0) {
      static float theta[8 * D], y[8 * D];
      problems(theta, 8, 0.0f);
      pert_status s = pert_op_solve(op, theta, 8, y);
      CHECK(round == 0 ? s == PERT_STATUS_SOLVER_FAILED : s == PERT_STATUS_OK);
      pert_op_free(op);
    } else {
      CHECK_STATUS(PERT_STATUS_OK, pert_mpi_serve(op));
      pert_op_free(op);
    }
  }
  pert_config_free(c);
  return true;
}

static bool run(int size, uint32_t baseline) {
  pert_config *c = make_config(baseline);
  pert_config_set_threads(c, (uint32_t)(1 + (my_rank + 1) % 3)); /* 2, 3, 1 workers: each rank's own */
  pert_op *op = NULL;
  CHECK_STATUS(PERT_STATUS_OK, pert_mpi_op_new(c, SHAPE, 1, SHAPE, 1, MPI_COMM_WORLD, 0, solve, NULL, init, fini, &op));
  pert_config_free(c);
  (void)size;
  bool ok = true;
  if (my_rank == 0) {
    ok = root_checks(op, baseline);
    pert_op_free(op); /* ends the service */
  } else {
    CHECK_STATUS(PERT_STATUS_OK, pert_mpi_serve(op));
    CHECK(inits > 0 && finis == 0 && rows_solved > 0); /* this rank took part */
    printf("rank %d solved %zu rows\n", my_rank, rows_solved);
    pert_op_free(op);
    CHECK(finis == inits);
  }
  return ok;
}

int main(int argc, char **argv) {
  int provided = 0, size = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  MPI_Comm_rank(MPI_COMM_WORLD, &my_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  bool ok = size == 3;
  if (!ok) fprintf(stderr, "run with mpirun -np 3\n");
  ok = ok && differing_settings_are_refused(size);
  ok = ok && free_while_busy();
  ok = ok && late_rank_then_a_new_op();
  ok = ok && run(size, PERT_BASELINE_SAMPLE_MEAN);
  inits = finis = 0, rows_solved = 0;
  ok = ok && run(size, PERT_BASELINE_CLEAN_INPUT);
  int failures = !ok, total = 0;
  MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (my_rank == 0) printf("MPI component over %d ranks: %s\n", size, total ? "FAILED" : "all checks passed");
  MPI_Finalize();
  return total != 0;
}
