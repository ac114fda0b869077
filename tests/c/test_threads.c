/* Threads: results do not depend on the number of solver threads; ops on different
 * threads are independent; tapes may be freed on another thread. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "harness.h"
#include "solvers.h"

enum { D = 6, B = 3 };
static size_t DIM = D;
static const int64_t SHAPE[1] = {D};
static const float THETA[B * D] = {0.1f, 0.0f, -0.1f, 0.05f, 0.2f, 0.15f, 1, 2, 3, 4, 5, 6, -1, 0, 1, 0, -1, 0.5f};


static pert_op *make_op(uint32_t threads) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, 20000);
  pert_config_set_sigma(c, 0.3);
  pert_config_set_seed(c, 123);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  pert_op_new(c, SHAPE, 1, SHAPE, 1, solve_argmax, &DIM, &op);
  pert_config_free(c);
  return op;
}

static bool results_are_bitwise_equal_for_any_thread_count(void) {
  float y1[B * D], y[B * D], j1[B * D * D], j[B * D * D];
  const uint32_t counts[4] = {1, 2, 3, 0};
  for (int k = 0; k < 4; k++) {
    pert_op *op = make_op(counts[k]);
    pert_tape *tape = NULL;
    CHECK_OK(pert_forward(op, THETA, B, k ? y : y1, &tape));
    CHECK_OK(pert_tape_jacobian(tape, k ? j : j1));
    if (k) {
      CHECK(memcmp(y, y1, sizeof y) == 0);
      CHECK(memcmp(j, j1, sizeof j) == 0);
    }
    pert_tape_free(tape);
    pert_op_free(op);
  }
  return true;
}

/* A solver whose calls wait (up to 10 s) until two calls have been in flight at once:
 * with threads = 2 the library must run two calls concurrently; with one thread it
 * would not, and the wait would time out. */
static atomic_int in_flight, max_in_flight;
static int32_t waits_for_company(void *user_data, const float *x, size_t count, float *y) {
  int now = atomic_fetch_add(&in_flight, 1) + 1;
  struct timespec start, t;
  clock_gettime(CLOCK_MONOTONIC, &start);
  do {
    now = atomic_load(&in_flight);
    if (now > atomic_load(&max_in_flight)) atomic_store(&max_in_flight, now);
    clock_gettime(CLOCK_MONOTONIC, &t);
  } while (atomic_load(&max_in_flight) < 2 && t.tv_sec - start.tv_sec < 10); /* once seen, stop waiting */
  int32_t rc = solve_argmax(user_data, x, count, y);
  atomic_fetch_sub(&in_flight, 1);
  return rc;
}

static bool multithreaded_solver_runs_concurrently_on_slices(void) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_num_samples(c, 4000));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_threads(c, 2));
  CHECK_OK(pert_config_set_chunk_bytes(c, 4096)); /* many blocks */
  CHECK_OK(pert_op_new(c, SHAPE, 1, SHAPE, 1, waits_for_company, &DIM, &op));
  pert_config_free(c);
  atomic_store(&max_in_flight, 0);
  float y[B * D];
  CHECK_OK(pert_forward(op, THETA, 1, y, NULL));
  CHECK(atomic_load(&max_in_flight) == 2);
  pert_op_free(op);
  return true;
}

typedef struct {
  pert_tape *tape;
  float y[B * D];
  pert_status status;
} job;

static void *forward_job(void *arg) {
  job *j = arg;
  pert_op *op = make_op(1);
  j->status = pert_forward(op, THETA, B, j->y, &j->tape);
  pert_op_free(op);
  return NULL;
}

static void *free_tape(void *arg) {
  pert_tape_free(arg);
  return NULL;
}

static bool ops_on_many_threads_agree_and_tapes_free_anywhere(void) {
  enum { T = 4 };
  job jobs[T];
  pthread_t th[T];
  for (int t = 0; t < T; t++) {
    jobs[t].tape = NULL;
    CHECK(pthread_create(&th[t], NULL, forward_job, &jobs[t]) == 0);
  }
  for (int t = 0; t < T; t++) pthread_join(th[t], NULL);
  for (int t = 0; t < T; t++) {
    CHECK_OK(jobs[t].status);
    CHECK(memcmp(jobs[t].y, jobs[0].y, sizeof jobs[0].y) == 0);
  }
  for (int t = 0; t < T; t++) {
    CHECK(pthread_create(&th[t], NULL, free_tape, jobs[t].tape) == 0);
    pthread_join(th[t], NULL);
  }
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(results_are_bitwise_equal_for_any_thread_count),
      TEST(multithreaded_solver_runs_concurrently_on_slices),
      TEST(ops_on_many_threads_agree_and_tapes_free_anywhere),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
