/* Solvers from real codebases (pert_op_new_ex): persistent workers (init once per worker
 * over several calls, worker w always on one thread, fini at pert_op_free on that thread),
 * solve info (rows cover every (problem, sample) once, problem-major, spanning problems;
 * clean rows flagged), solver messages, max_threads (refused below threads; one core with
 * max_threads = 1), results equal to the plain callback's bit for bit, concurrent calls. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdatomic.h>
#include <time.h>

#include "harness.h"

#define MAXW 8
#define D 4

typedef struct {
  atomic_int inits[MAXW];
  atomic_int finis[MAXW];
  pthread_t init_thread[MAXW];
  pthread_t fini_thread[MAXW];
  pthread_t solve_thread[MAXW];
  atomic_int solves[MAXW];
  atomic_int busy[MAXW];  /* a solve in flight on worker w */
  atomic_int overlap;     /* a worker ran two solves at once */
  atomic_int thread_moved; /* a worker's solve ran on another thread */
  atomic_int bad_info;
  atomic_int multi_problem_calls;
  atomic_int clean_calls;
  atomic_int *cover;      /* per global row: times solved */
  size_t cover_len;
  const float *theta;     /* for the clean rows */
  int fail_init;          /* worker init returns non-zero */
  long fail_row;          /* the solve covering this global row fails (-1: none) */
  int spin;               /* busy work per row */
} state;

static int32_t init_hook(void *user_data, uint32_t worker) {
  state *s = user_data;
  if (worker >= MAXW) return 1;
  atomic_fetch_add(&s->inits[worker], 1);
  s->init_thread[worker] = pthread_self();
  if (s->fail_init) {
    pert_solver_set_error("cannot build the model: licence missing");
    return 7;
  }
  return 0;
}

static void fini_hook(void *user_data, uint32_t worker) {
  state *s = user_data;
  atomic_fetch_add(&s->finis[worker], 1);
  s->fini_thread[worker] = pthread_self();
}

static volatile double spin_sink; /* busy work lands here */

/* argmax of each row, plus bookkeeping */
static int32_t solve_ex(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  state *s = user_data;
  uint32_t w = info->worker;
  if (info->struct_size != sizeof(pert_solve_info) || w >= MAXW || count == 0 || info->reserved != 0) {
    atomic_fetch_add(&s->bad_info, 1);
    return 1;
  }
  if (atomic_fetch_add(&s->busy[w], 1) != 0) atomic_fetch_add(&s->overlap, 1);
  if (atomic_fetch_add(&s->solves[w], 1) == 0)
    s->solve_thread[w] = pthread_self();
  else if (!pthread_equal(s->solve_thread[w], pthread_self()))
    atomic_fetch_add(&s->thread_moved, 1);
  if (info->clean) {
    atomic_fetch_add(&s->clean_calls, 1);
    for (size_t r = 0; r < count; r++)
      for (int i = 0; i < D; i++)
        if (x[r * D + i] != s->theta[(info->first_row + r) * D + i]) atomic_fetch_add(&s->bad_info, 1);
  } else {
    uint64_t n = info->num_samples;
    if ((info->first_row + count - 1) / n != info->first_row / n) atomic_fetch_add(&s->multi_problem_calls, 1);
    for (size_t r = 0; r < count; r++) {
      uint64_t g = info->first_row + r;
      if (g >= s->cover_len) {
        atomic_fetch_add(&s->bad_info, 1);
        continue;
      }
      atomic_fetch_add(&s->cover[g], 1);
      if (s->fail_row >= 0 && g == (uint64_t)s->fail_row) {
        atomic_fetch_sub(&s->busy[w], 1);
        pert_solver_set_error("infeasible: capacity 3 exceeded");
        return 42;
      }
    }
  }
  for (size_t r = 0; r < count; r++) {
    for (int k = 0; k < s->spin; k++) spin_sink += k * 1e-9;
    size_t best = 0;
    for (size_t i = 1; i < D; i++)
      if (x[r * D + i] > x[r * D + best]) best = i;
    for (size_t i = 0; i < D; i++) y[r * D + i] = (float)(i == best);
  }
  atomic_fetch_sub(&s->busy[w], 1);
  return 0;
}

static int32_t solve_plain(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < D; i++)
      if (x[r * D + i] > x[r * D + best]) best = i;
    for (size_t i = 0; i < D; i++) y[r * D + i] = (float)(i == best);
  }
  return 0;
}

static pert_config *make_config(uint32_t threads, uint64_t n) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, n);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_seed(c, 11);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  return c;
}

static void fill_theta(float *theta, size_t batch) {
  for (size_t i = 0; i < batch * D; i++) theta[i] = (float)((i * 7919) % 13) / 13.0f;
}

static bool init_once_per_worker_same_thread_and_fini_at_free(void) {
  enum { B = 64, N = 50, T = 3 };
  static atomic_int cover[B * N];
  state s = {.cover = cover, .cover_len = B * N, .fail_row = -1};
  float theta[B * D], y[B * D];
  fill_theta(theta, B);
  pert_config *c = make_config(T, N);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, init_hook, fini_hook, &op));
  for (int call = 0; call < 4; call++) {
    for (size_t g = 0; g < B * N; g++) atomic_store(&cover[g], 0);
    CHECK_OK(pert_forward(op, theta, B, y, NULL));
    for (size_t g = 0; g < B * N; g++) CHECK(atomic_load(&cover[g]) == 1); /* every row once */
  }
  int used = 0;
  for (int w = 0; w < MAXW; w++) {
    CHECK(atomic_load(&s.inits[w]) <= 1);
    if (w >= T) CHECK(atomic_load(&s.solves[w]) == 0);
    if (atomic_load(&s.solves[w]) > 0) {
      used++;
      CHECK(atomic_load(&s.inits[w]) == 1);
      CHECK(pthread_equal(s.init_thread[w], s.solve_thread[w]));
      CHECK(!pthread_equal(s.solve_thread[w], pthread_self())); /* never the calling thread */
    }
  }
  CHECK(used >= 1); /* which workers take blocks is up to the scheduler */
  CHECK(atomic_load(&s.thread_moved) == 0);
  CHECK(atomic_load(&s.overlap) == 0);
  CHECK(atomic_load(&s.bad_info) == 0);
  CHECK(atomic_load(&s.multi_problem_calls) > 0); /* N = 50: a call spans problems */
  for (int w = 0; w < MAXW; w++) CHECK(atomic_load(&s.finis[w]) == 0);
  pert_op_free(op);
  for (int w = 0; w < MAXW; w++) {
    CHECK(atomic_load(&s.finis[w]) == atomic_load(&s.inits[w]));
    if (atomic_load(&s.inits[w])) CHECK(pthread_equal(s.fini_thread[w], s.init_thread[w]));
  }
  pert_config_free(c);
  return true;
}

static bool results_equal_the_plain_callback_for_any_threads(void) {
  enum { B = 37, N = 30 };
  float theta[B * D], want[B * D], got[B * D], g[B * D], want_vjp[B * D], got_vjp[B * D];
  fill_theta(theta, B);
  for (size_t i = 0; i < B * D; i++) g[i] = (float)(i % 5) - 2.0f;
  pert_config *c1 = make_config(1, N);
  pert_op *plain = NULL;
  pert_tape *tape = NULL;
  CHECK_OK(pert_op_new(c1, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_plain, NULL, &plain));
  CHECK_OK(pert_forward(plain, theta, B, want, &tape));
  CHECK_OK(pert_tape_vjp(tape, g, want_vjp));
  pert_tape_free(tape);
  for (uint32_t t = 1; t <= 4; t++) {
    static atomic_int cover[B * N];
    state s = {.cover = cover, .cover_len = B * N, .fail_row = -1};
    pert_config *c = make_config(t, N);
    pert_op *op = NULL;
    CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, NULL, NULL, &op));
    CHECK_OK(pert_forward(op, theta, B, got, &tape));
    CHECK_OK(pert_tape_vjp(tape, g, got_vjp));
    CHECK(memcmp(got, want, sizeof got) == 0);
    CHECK(memcmp(got_vjp, want_vjp, sizeof got_vjp) == 0);
    pert_tape_free(tape);
    pert_op_free(op);
    pert_config_free(c);
  }
  pert_op_free(plain);
  pert_config_free(c1);
  return true;
}

static bool clean_rows_are_flagged_and_are_theta(void) {
  enum { B = 9, N = 20 };
  static atomic_int cover[B * N];
  float theta[B * D], y[B * D];
  fill_theta(theta, B);
  state s = {.cover = cover, .cover_len = B * N, .fail_row = -1, .theta = theta};
  pert_config *c = make_config(2, N);
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
  pert_op *op = NULL;
  pert_tape *tape = NULL;
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, NULL, NULL, &op));
  CHECK_OK(pert_forward(op, theta, B, y, &tape));
  CHECK(atomic_load(&s.clean_calls) >= 1);
  CHECK(atomic_load(&s.bad_info) == 0);
  for (size_t g = 0; g < B * N; g++) CHECK(atomic_load(&cover[g]) == 1);
  pert_tape_free(tape);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

static bool failures_name_problem_sample_and_the_solvers_message(void) {
  enum { B = 8, N = 10 };
  static atomic_int cover[B * N];
  float theta[B * D], y[B * D], before[B * D];
  fill_theta(theta, B);
  for (size_t i = 0; i < B * D; i++) y[i] = before[i] = -3.0f;
  state s = {.cover = cover, .cover_len = B * N, .fail_row = 5 * N + 3};
  pert_config *c = make_config(2, N);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, init_hook, fini_hook, &op));
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(op, theta, B, y, NULL));
  CHECK(last_error_contains("infeasible: capacity 3 exceeded"));
  CHECK(last_error_contains("returned 42"));
  CHECK(last_error_contains("problem 5, sample")); /* the call's rows start in problem 5 or before */
  CHECK(memcmp(y, before, sizeof y) == 0);         /* nothing written */
  pert_op_free(op);

  /* an init that fails: that call and every later one fail with its message; init ran
     once per worker, and each worker whose init ran gets its fini */
  state f = {.cover = cover, .cover_len = B * N, .fail_row = -1, .fail_init = 1};
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &f, init_hook, fini_hook, &op));
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(op, theta, B, y, NULL));
  CHECK(last_error_contains("cannot build the model: licence missing"));
  CHECK(last_error_contains("worker"));
  CHECK(last_error_contains("problem"));
  f.fail_init = 0;
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(op, theta, B, y, NULL));
  CHECK(last_error_contains("cannot build the model: licence missing"));
  CHECK(memcmp(y, before, sizeof y) == 0);
  int ran = 0;
  for (int w = 0; w < MAXW; w++) {
    CHECK(atomic_load(&f.inits[w]) <= 1);
    ran += atomic_load(&f.inits[w]);
  }
  CHECK(ran >= 1);
  pert_op_free(op);
  for (int w = 0; w < MAXW; w++) CHECK(atomic_load(&f.finis[w]) == atomic_load(&f.inits[w]));
  pert_config_free(c);
  return true;
}

/* A solver that calls its own op: refused inside (it would wait for itself), no hang. */
static pert_op *reentered_op;
static atomic_int reentry_status = -1;

static int32_t solve_reentering(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)user_data, (void)info;
  float t[D] = {0}, o[D];
  atomic_store(&reentry_status, (int)pert_forward(reentered_op, t, 1, o, NULL));
  return solve_plain(NULL, x, count, y);
}

static bool a_solver_calling_its_own_op_is_refused_not_a_hang(void) {
  float theta[2 * D] = {0.1f, 0.2f, 0.3f, 0.4f, 0.4f, 0.3f, 0.2f, 0.1f}, y[2 * D];
  pert_config *c = make_config(2, 10);
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_reentering, NULL, NULL, NULL,
                          &reentered_op));
  CHECK_OK(pert_forward(reentered_op, theta, 2, y, NULL));
  CHECK(atomic_load(&reentry_status) == (int)PERT_STATUS_INVALID_ARGUMENT);
  pert_op_free(reentered_op);
  pert_config_free(c);
  return true;
}

/* After fork() the op's workers do not exist: a call in the child is an error, not a hang. */
static bool an_op_used_after_fork_fails_in_the_child(void) {
  float theta[2 * D] = {0}, y[2 * D];
  state s = {.fail_row = -1};
  pert_config *c = make_config(2, 10);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, NULL, NULL, &op));
  fflush(NULL);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    pert_status st = pert_forward(op, theta, 2, y, NULL);
    int ok = st == PERT_STATUS_INVALID_ARGUMENT && last_error_contains("fork");
    pert_op_free(op); /* no hang either */
    _exit(ok ? 0 : 1);
  }
  int status = 0;
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK_OK(pert_forward(op, theta, 2, y, NULL)); /* the parent's op still works */
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

static bool max_threads_below_threads_is_refused(void) {
  pert_config *c = make_config(2, 10);
  CHECK_OK(pert_config_set_max_threads(c, 1));
  pert_op *op = NULL;
  state s = {.fail_row = -1};
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT,
               pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, NULL, NULL, &op));
  CHECK(last_error_contains("max_threads"));
  CHECK(op == NULL);
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_op_new(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_plain, NULL, &op));
  CHECK_STATUS(PERT_STATUS_INVALID_ARGUMENT, pert_config_set_max_threads(c, 5000));
  CHECK_OK(pert_config_set_max_threads(c, 2));
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, NULL, NULL, &op));
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

static double seconds_of(clockid_t clock) {
  struct timespec t;
  clock_gettime(clock, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* CPU time over wall time of forward + tape + VJP calls on `op`, repeated for at least
 * `seconds` of wall time. */
static double cpu_over_wall(pert_op *op, const float *theta, size_t batch, float *y, const float *g, float *out,
                            double seconds) {
  double wall0 = seconds_of(CLOCK_MONOTONIC), cpu0 = seconds_of(CLOCK_PROCESS_CPUTIME_ID), wall = 0;
  for (int rep = 0; rep < 200 && wall < seconds; rep++) {
    pert_tape *tape = NULL;
    if (pert_forward(op, theta, batch, y, &tape) != PERT_STATUS_OK || pert_tape_vjp(tape, g, out) != PERT_STATUS_OK)
      return -1;
    pert_tape_free(tape);
    wall = seconds_of(CLOCK_MONOTONIC) - wall0;
  }
  return (seconds_of(CLOCK_PROCESS_CPUTIME_ID) - cpu0) / wall;
}

/* max_threads = 1: a call's CPU time is about its wall time (one core), for a callback, the
 * fused built-in, and a built-in large enough that libtorch's kernels (a dense Jacobian of
 * 2^21 entries, products of 16384 entries a problem) run in the call. The check can only
 * see a second thread when the machine has a core to spare: a control run without the cap
 * says whether it can (and the result is printed either way). */
static bool max_threads_one_keeps_a_call_on_one_core(void) {
  enum { B = 128, N = 300, BIG = 128 };
  static atomic_int cover[B * N];
  static float theta[B * BIG], y[B * BIG], g[B * BIG], out[B * BIG];
  fill_theta(theta, B * BIG / D);
  for (size_t i = 0; i < B * BIG; i++) g[i] = (float)(i % 3) - 1.0f;
  state s = {.cover = cover, .cover_len = B * N, .fail_row = -1, .spin = 2000};
  for (int capped = 1; capped >= 0; capped--) {
    pert_config *c = make_config(capped ? 1 : 2, N);
    CHECK_OK(pert_config_set_max_threads(c, capped ? 1 : 0));
    pert_op *ops[3] = {NULL, NULL, NULL};
    CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, NULL, NULL, &ops[0]));
    CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, (int64_t[]){D}, 1, &ops[1]));
    CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, (int64_t[]){BIG}, 1, &ops[2]));
    static const char *names[3] = {"callback", "fused built-in", "built-in, d = 128"};
    static const size_t batches[3] = {B, B, B};
    for (int k = 0; k < 3; k++) {
      double ratio = cpu_over_wall(ops[k], theta, batches[k], y, g, out, 0.3);
      CHECK(ratio > 0);
      printf("  max_threads %s, %s: CPU time / wall time %.2f\n", capped ? "1" : "0 (threads 2)", names[k], ratio);
      if (capped) CHECK(ratio <= 1.15); /* one core (a second would add about 1) */
    }
    for (int k = 0; k < 3; k++) pert_op_free(ops[k]);
    pert_config_free(c);
  }
  return true;
}

typedef struct {
  pert_op *op;
  const float *theta;
  float y[16 * D];
  pert_status status;
} caller;

static void *call_forward(void *arg) {
  caller *c = arg;
  for (int k = 0; k < 20 && c->status == PERT_STATUS_OK; k++) c->status = pert_forward(c->op, c->theta, 16, c->y, NULL);
  return NULL;
}

static bool concurrent_calls_take_turns_on_the_workers(void) {
  enum { B = 16, N = 40 };
  static atomic_int cover[B * N];
  float theta[B * D];
  fill_theta(theta, B);
  state s = {.cover = cover, .cover_len = B * N, .fail_row = -1};
  pert_config *c = make_config(2, N);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, solve_ex, &s, init_hook, fini_hook, &op));
  caller callers[4];
  pthread_t threads[4];
  for (int i = 0; i < 4; i++) {
    callers[i] = (caller){.op = op, .theta = theta, .status = PERT_STATUS_OK};
    CHECK(pthread_create(&threads[i], NULL, call_forward, &callers[i]) == 0);
  }
  for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
  for (int i = 0; i < 4; i++) CHECK(callers[i].status == PERT_STATUS_OK);
  CHECK(atomic_load(&s.overlap) == 0);
  CHECK(atomic_load(&s.thread_moved) == 0);
  for (int w = 0; w < MAXW; w++) CHECK(atomic_load(&s.inits[w]) <= 1);
  for (size_t g = 0; g < B * N; g++) CHECK(atomic_load(&cover[g]) == 80); /* 4 threads x 20 calls */
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

static int32_t plain_fails(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data, (void)x, (void)count, (void)y;
  pert_solver_set_error("no path from 0 to 8");
  return 3;
}

static bool a_plain_callbacks_message_names_its_rows(void) {
  float theta[2 * D] = {0}, y[2 * D];
  pert_config *c = make_config(1, 10);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, plain_fails, NULL, &op));
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(op, theta, 2, y, NULL));
  CHECK(last_error_contains("no path from 0 to 8"));
  CHECK(last_error_contains("problem 0, sample 0"));
  pert_solver_set_error(NULL); /* harmless outside a callback */
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* Device solvers (pert_op_new_device) on a CPU op: host pointers, NULL stream, the rows
 * drawn and summed by the chunk pipeline; the perturbed argmax is softmax(theta/sigma)
 * under Gumbel noise, and the VJP is the softmax Jacobian's, within 5 s.d. */
typedef struct {
  atomic_int calls, bad;
  long fail_at; /* a call whose rows start at this global row fails (-1: none) */
  int write_nan;
} device_state;

static int32_t device_argmax(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y,
                             void *stream) {
  device_state *s = user_data;
  atomic_fetch_add(&s->calls, 1);
  if (stream != NULL || info->worker != 0 || info->struct_size != sizeof(pert_solve_info) || info->device != -1)
    atomic_fetch_add(&s->bad, 1);
  if (s->fail_at >= 0 && info->first_row <= (uint64_t)s->fail_at && (uint64_t)s->fail_at < info->first_row + count) {
    pert_solver_set_error("the device ran out of memory");
    return 2;
  }
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < D; i++)
      if (x[r * D + i] > x[r * D + best]) best = i;
    for (size_t i = 0; i < D; i++) y[r * D + i] = s->write_nan && r == 0 && i == 0 ? NAN : (float)(i == best);
  }
  return 0;
}

static bool device_solvers_work_on_a_cpu_op(void) {
  enum { B = 2, N = 20000 };
  const double sigma = 0.5;
  float theta[B * D] = {0.1f, 0.9f, -0.3f, 0.4f, 0.0f, 0.2f, 0.5f, -0.1f}, y[B * D], g[B * D], out[B * D];
  device_state s = {.fail_at = -1};
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_num_samples(c, N));
  CHECK_OK(pert_config_set_sigma(c, sigma));
  CHECK_OK(pert_config_set_noise(c, PERT_NOISE_GUMBEL));
  CHECK_OK(pert_config_set_device(c, "cpu"));
  CHECK_OK(pert_config_set_seed(c, 5));
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_device(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, device_argmax, &s, &op));
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, B, y, &tape));
  for (int i = 0; i < B * D; i++) g[i] = (float)(i % 3) - 1.0f;
  CHECK_OK(pert_tape_vjp(tape, g, out));
  CHECK(atomic_load(&s.calls) >= 2 && atomic_load(&s.bad) == 0);
  for (int b = 0; b < B; b++) {
    double p[D], z = 0, gp = 0;
    for (int i = 0; i < D; i++) z += exp(theta[b * D + i] / sigma);
    for (int i = 0; i < D; i++) p[i] = exp(theta[b * D + i] / sigma) / z;
    for (int i = 0; i < D; i++) gp += g[b * D + i] * p[i];
    for (int i = 0; i < D; i++) {
      CHECK_NEAR(y[b * D + i], p[i], 5 * sqrt(p[i] * (1 - p[i]) / N));
      /* (J^T g)_i = p_i (g_i - <g, p>) / sigma; an entry's s.d. <= max|g| / (sigma sqrt(N)) */
      CHECK_NEAR(out[b * D + i], p[i] * (g[b * D + i] - gp) / sigma, 5 * 1.0 / (sigma * sqrt(N)));
    }
  }
  pert_tape_free(tape);
  /* failures: the solver's message with the rows; a NaN output; nothing written */
  float before[B * D];
  memcpy(before, y, sizeof y);
  s.fail_at = N + 3; /* in problem 1 */
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(op, theta, B, y, NULL));
  CHECK(last_error_contains("the device ran out of memory") && last_error_contains("problem 1, sample"));
  s.fail_at = -1;
  s.write_nan = 1;
  CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, pert_forward(op, theta, B, y, NULL));
  CHECK(last_error_contains("NaN") && last_error_contains("problem 0, sample 0"));
  CHECK(memcmp(before, y, sizeof y) == 0);
  CHECK_STATUS(PERT_STATUS_NULL_ARGUMENT,
               pert_op_new_device(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, NULL, &s, &op));
  pert_op_free(op);
  /* a draw on a device-solver op gives what its forward gives (same seed and call count) */
  s.write_nan = 0;
  pert_op *twin = NULL, *drawn = NULL;
  CHECK_OK(pert_op_new_device(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, device_argmax, &s, &twin));
  CHECK_OK(pert_op_new_device(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, device_argmax, &s, &drawn));
  float direct[B * D], two_phase[B * D];
  CHECK_OK(pert_forward(twin, theta, B, direct, NULL));
  pert_draw *draw = NULL;
  CHECK_OK(pert_draw_new(drawn, theta, B, &draw));
  size_t rows = pert_draw_count(draw);
  float *solutions = malloc(rows * D * sizeof(float));
  CHECK(solutions != NULL);
  pert_solve_info info = {.struct_size = sizeof info, .num_samples = N, .batch = B, .device = -1};
  CHECK(device_argmax(&s, &info, pert_draw_inputs(draw), rows, solutions, NULL) == 0);
  CHECK_OK(pert_draw_finish(draw, solutions, two_phase, NULL));
  CHECK(memcmp(direct, two_phase, sizeof direct) == 0);
  free(solutions);
  pert_draw_free(draw);
  pert_op_free(twin);
  pert_op_free(drawn);
  pert_config_free(c);
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(max_threads_one_keeps_a_call_on_one_core), /* first: no libtorch pool has run yet */
      TEST(init_once_per_worker_same_thread_and_fini_at_free),
      TEST(results_equal_the_plain_callback_for_any_threads),
      TEST(clean_rows_are_flagged_and_are_theta),
      TEST(failures_name_problem_sample_and_the_solvers_message),
      TEST(max_threads_below_threads_is_refused),
      TEST(concurrent_calls_take_turns_on_the_workers),
      TEST(a_plain_callbacks_message_names_its_rows),
      TEST(a_solver_calling_its_own_op_is_refused_not_a_hang),
      TEST(an_op_used_after_fork_fails_in_the_child),
      TEST(device_solvers_work_on_a_cpu_op),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
