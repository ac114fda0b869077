/* pert_op_interrupt: a long call on one thread, interrupted from another (and from a
 * signal handler), returns PERT_STATUS_INTERRUPTED having written nothing; the op keeps
 * working; calls that start afterwards are not affected; NULL is ignored. The calls
 * interrupted here would take minutes; each must stop long before (a bound of 20 s keeps
 * the test meaningful on a loaded machine without making it flaky). */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "solvers.h"

enum { D = 64 };
static size_t DIM = D;
static const int64_t SHAPE[1] = {D};

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static pert_op *make_op(int builtin, uint64_t samples, uint32_t threads) {
  pert_config *c = NULL;
  pert_op *op = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, samples);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  if (builtin)
    pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, SHAPE, 1, &op);
  else
    pert_op_new(c, SHAPE, 1, SHAPE, 1, solve_argmax, &DIM, &op);
  pert_config_free(c);
  return op;
}

typedef struct {
  pert_op *op;
  int fenchel_young;
  float theta[2 * D], y[2 * D], loss[2];
  pert_tape *tape;
  pert_status status;
  atomic_int done;
  double seconds;
} call;

static void *run_call(void *arg) {
  call *c = arg;
  double t0 = now();
  if (c->fenchel_young)
    c->status = pert_fenchel_young(c->op, c->theta, c->theta, 2, c->loss, c->y);
  else
    c->status = pert_forward(c->op, c->theta, 2, c->y, &c->tape);
  c->seconds = now() - t0;
  atomic_store(&c->done, 1);
  return NULL;
}

/* Runs a call on a thread and interrupts it every 5 ms (from 20 ms on) until it ends. */
static bool interrupted(pert_op *op, int fenchel_young) {
  call c;
  memset(&c, 0, sizeof c);
  c.op = op;
  c.fenchel_young = fenchel_young;
  for (int i = 0; i < 2 * D; i++) c.theta[i] = 0.01f * (float)(i % D);
  for (int i = 0; i < 2 * D; i++) c.y[i] = 42.0f;
  c.loss[0] = c.loss[1] = 42.0f;
  pthread_t th;
  CHECK(pthread_create(&th, NULL, run_call, &c) == 0);
  usleep(20000);
  while (!atomic_load(&c.done)) {
    pert_op_interrupt(op);
    usleep(5000);
  }
  pthread_join(th, NULL);
  CHECK_STATUS(PERT_STATUS_INTERRUPTED, c.status);
  char msg[256];
  pert_last_error(msg, sizeof msg); /* the calling thread's: empty here, the call's thread had it */
  CHECK(c.tape == NULL);
  for (int i = 0; i < 2 * D; i++) CHECK(c.y[i] == 42.0f);
  CHECK(c.loss[0] == 42.0f && c.loss[1] == 42.0f);
  CHECK(c.seconds < 20.0);
  return true;
}

static bool a_long_builtin_call_stops_and_writes_nothing(void) {
  pert_op *op = make_op(1, (uint64_t)1 << 31, 0);
  CHECK(op != NULL);
  CHECK(interrupted(op, 0));
  CHECK(interrupted(op, 1));
  pert_op_free(op);
  return true;
}

static bool a_long_callback_call_stops_on_every_thread_count(void) {
  const uint32_t threads[2] = {1, 2};
  for (int k = 0; k < 2; k++) {
    pert_op *op = make_op(0, (uint64_t)1 << 30, threads[k]);
    CHECK(op != NULL);
    CHECK(interrupted(op, 0));
    pert_op_free(op);
  }
  return true;
}

static bool calls_after_an_interrupt_run_and_null_is_ignored(void) {
  pert_op *op = make_op(1, 1000, 1);
  pert_op *twin = make_op(1, 1000, 1);
  float theta[D], y[D], y2[D];
  for (int i = 0; i < D; i++) theta[i] = 0.1f * (float)i;
  pert_op_interrupt(op); /* before the call: it is not affected */
  pert_op_interrupt(NULL);
  CHECK_OK(pert_forward(op, theta, 1, y, NULL));
  CHECK_OK(pert_forward(twin, theta, 1, y2, NULL));
  CHECK(memcmp(y, y2, sizeof y) == 0);
  pert_op_free(op);
  pert_op_free(twin);
  return true;
}

/* A solver that interrupts its own op during its call number `fire_at` (counted from 0):
 * the call it belongs to fails when that solver call returns, whichever call it is (the
 * first, or the last of the call, after the last check between blocks). */
static pert_op *self_op;
static int solver_calls, fire_at;
static int32_t interrupting_argmax(void *user_data, const float *x, size_t count, float *y) {
  if (solver_calls++ == fire_at) pert_op_interrupt(self_op);
  return solve_argmax(user_data, x, count, y);
}

static bool an_interrupt_during_any_solver_call_fails_the_call(void) {
  enum { B = 7 };
  float theta[B * D], y_true[B * D] = {0};
  for (int i = 0; i < B * D; i++) theta[i] = (float)((i * 7) % 11) / 11.0f;
  for (int b = 0; b < B; b++) y_true[b * D + b % D] = 1;
  for (int which = 0; which < 3; which++) { /* forward, forward with a tape, Fenchel-Young */
    /* the number of solver calls of such a call */
    pert_config *c = NULL;
    CHECK_OK(pert_config_new(&c));
    pert_config_set_device(c, "cpu");
    pert_config_set_num_samples(c, 16);
    CHECK_OK(pert_op_new(c, SHAPE, 1, SHAPE, 1, interrupting_argmax, &DIM, &self_op));
    float out[B * D], loss[B];
    (solver_calls = 0, fire_at = -1);
    CHECK_OK(pert_forward(self_op, theta, B, out, NULL));
    const int calls = solver_calls;
    CHECK(calls >= 1);
    for (int fire = 0; fire < calls; fire++) {
      (solver_calls = 0, fire_at = fire);
      for (int i = 0; i < B * D; i++) out[i] = -7;
      loss[0] = -7;
      pert_tape *tape = NULL;
      pert_status s = which == 2 ? pert_fenchel_young(self_op, theta, y_true, B, loss, out)
                                 : pert_forward(self_op, theta, B, out, which ? &tape : NULL);
      CHECK_STATUS(PERT_STATUS_INTERRUPTED, s);
      CHECK(tape == NULL && loss[0] == -7);
      for (int i = 0; i < B * D; i++) CHECK(out[i] == -7);
    }
    /* and the next call runs */
    fire_at = -1;
    CHECK_OK(pert_forward(self_op, theta, B, out, NULL));
    pert_op_free(self_op);
    pert_config_free(c);
  }
  return true;
}

/* Ctrl-C in a C program: the handler interrupts the op (async-signal-safe). */
static pert_op *signalled_op;
static void on_sigint(int sig) {
  (void)sig;
  pert_op_interrupt(signalled_op);
}

static bool a_signal_handler_may_interrupt(void) {
  signalled_op = make_op(1, (uint64_t)1 << 31, 1);
  CHECK(signalled_op != NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_sigint;
  CHECK(sigaction(SIGINT, &sa, NULL) == 0);
  call c;
  memset(&c, 0, sizeof c);
  c.op = signalled_op;
  pthread_t th;
  CHECK(pthread_create(&th, NULL, run_call, &c) == 0);
  usleep(20000);
  while (!atomic_load(&c.done)) {
    pthread_kill(th, SIGINT); /* the handler runs on the calling thread, mid-call */
    usleep(5000);
  }
  pthread_join(th, NULL);
  signal(SIGINT, SIG_DFL);
  CHECK_STATUS(PERT_STATUS_INTERRUPTED, c.status);
  CHECK(c.tape == NULL);
  pert_op_free(signalled_op);
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(a_long_builtin_call_stops_and_writes_nothing),
      TEST(a_long_callback_call_stops_on_every_thread_count),
      TEST(calls_after_an_interrupt_run_and_null_is_ignored),
      TEST(an_interrupt_during_any_solver_call_fails_the_call),
      TEST(a_signal_handler_may_interrupt),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
