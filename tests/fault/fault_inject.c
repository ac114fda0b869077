/* Fault injection (issue 26, `make check-deep`): against the fault-injection build of the
 * library (nightly, --cfg pert_fault_injection: a failed Rust allocation panics, and the C
 * boundary returns an error, instead of aborting), every allocation of a small call is
 * failed in turn (malloc and friends are interposed here), a thread that cannot start,
 * and a solver that fails at every call index. Each time: an error status (or, where the
 * library can do without, OK with the right numbers), nothing written, no leak, no crash,
 * and the op works afterwards.
 *
 * usage: fault_inject (prints the allocations failed per case) */
#define _GNU_SOURCE
#include <stdlib.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <dlfcn.h>

#include "../c/harness.h"
#include "../c/solvers.h"

/* ---- interposed allocation and thread start ------------------------------------------ */

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static atomic_long countdown;  /* > 0: the countdown-th allocation from now fails */
static atomic_long allocations; /* allocations seen while counting */
static atomic_int counting;
static atomic_long live;        /* allocations not yet freed */
static atomic_int fail_threads;

/* Set while glibc registers a thread-local destructor: glibc ends the process when that
 * allocation fails ("failed to register TLS destructor"), whatever the library does, so
 * those allocations are never failed (nor counted). */
static _Thread_local int in_tls_registration;

typedef int (*atexit_fn)(void (*)(void *), void *, void *);
int __cxa_thread_atexit_impl(void (*dtor)(void *), void *obj, void *dso) {
  static atexit_fn real;
  if (!real) {
    void *f = dlsym(RTLD_NEXT, "__cxa_thread_atexit_impl");
    memcpy(&real, &f, sizeof f);
  }
  in_tls_registration++;
  int r = real(dtor, obj, dso);
  in_tls_registration--;
  return r;
}

/* Whether this allocation is to fail. */
static int fails(void) {
  if (in_tls_registration) return 0;
  if (atomic_load_explicit(&counting, memory_order_relaxed)) atomic_fetch_add(&allocations, 1);
  long c = atomic_load_explicit(&countdown, memory_order_relaxed);
  return c > 0 && atomic_fetch_sub(&countdown, 1) == 1;
}

static void *counted(void *p) {
  if (p) atomic_fetch_add_explicit(&live, 1, memory_order_relaxed);
  return p;
}

void *malloc(size_t n) { return fails() ? NULL : counted(__libc_malloc(n)); }
void *calloc(size_t n, size_t m) { return fails() ? NULL : counted(__libc_calloc(n, m)); }
void *realloc(void *p, size_t n) {
  if (!p) return malloc(n);
  if (n == 0) {
    free(p);
    return NULL;
  }
  return fails() ? NULL : __libc_realloc(p, n);
}
void free(void *p) {
  if (p) atomic_fetch_sub_explicit(&live, 1, memory_order_relaxed);
  __libc_free(p);
}
void *memalign(size_t a, size_t n) { return fails() ? NULL : counted(__libc_memalign(a, n)); }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
  void *p = memalign(a, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void *valloc(size_t n) { return memalign(4096, n); }

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);
int pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*start)(void *), void *arg) {
  static create_fn real;
  if (!real) {
    void *f = dlsym(RTLD_NEXT, "pthread_create");
    memcpy(&real, &f, sizeof f);
  }
  if (atomic_load(&fail_threads)) return EAGAIN;
  return real(t, attr, start, arg);
}

/* ---- the calls ------------------------------------------------------------------------ */

#define D 5
#define B 3
static size_t d_size = D;
static atomic_long solver_countdown; /* > 0: the countdown-th solver call from now fails */

static int32_t argmax_failing(void *user_data, const float *x, size_t count, float *y) {
  long c = atomic_load(&solver_countdown);
  if (c > 0 && atomic_fetch_sub(&solver_countdown, 1) == 1) {
    pert_solver_set_error("injected solver failure");
    return 3;
  }
  return solve_argmax(user_data, x, count, y);
}
static int32_t argmax_ex(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)info;
  return argmax_failing(user_data, x, count, y);
}

static const float theta[B * D] = {0.1f, 0.5f, -0.2f, 0.3f, 0.45f, 1, 0, 0, 0.5f, 0.2f, -1, 2, 0.5f, 0.5f, 1.9f};
static const float g[B * D] = {1, -2, 0.5f, 3, -1, 2, 1, 0.25f, 0, 2, -1, 1, 0.5f, 0.5f, -3};

enum kind { PLAIN, WORKERS, ARGMAX, TOPK, DEVICE_CPU, KINDS };
static const char *names[] = {"plain", "workers", "argmax", "top-k", "device"};

static int32_t device_argmax(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y,
                             void *stream) {
  (void)info, (void)stream;
  return argmax_failing(user_data, x, count, y);
}

static double solve_ratio = 1.0; /* of the ops made (a pool answers the others' samples) */

static pert_op *make(enum kind kind, uint32_t threads) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_solve_ratio(c, solve_ratio);
  pert_config_set_linear_objective(c, 1);
  pert_config_set_num_samples(c, 40);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_seed(c, 9);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  pert_config_set_max_threads(c, threads);
  pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT);
  int64_t shape[] = {D};
  pert_op *op = NULL;
  switch (kind) {
    case PLAIN: pert_op_new(c, shape, 1, shape, 1, argmax_failing, &d_size, &op); break;
    case WORKERS: pert_op_new_ex(c, shape, 1, shape, 1, argmax_ex, &d_size, NULL, NULL, &op); break;
    case ARGMAX: pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &op); break;
    case TOPK: pert_op_new_builtin(c, PERT_BUILTIN_TOPK, 2, shape, 1, &op); break;
    case DEVICE_CPU: pert_op_new_device(c, shape, 1, shape, 1, device_argmax, &d_size, &op); break;
    default: break;
  }
  pert_config_free(c);
  return op;
}

/* One call of every kind on `op` into out[0 .. 2 * B * D): forward with a tape, its VJP
 * (mode 0); the Fenchel-Young loss and gradient (mode 1); draw + finish (mode 2). */
static int stage; /* of the last call: 0 (the forward, loss or finish) or 1 (the VJP) */
#define SENTINEL 12345.0f
#define OUT (2 * B * D)

static pert_status call(pert_op *op, int mode, float *out) {
  pert_status st;
  stage = 0;
  for (int i = 0; i < OUT; i++) out[i] = SENTINEL; /* (what a call does not write stays so) */
  if (mode == 0) {
    pert_tape *tape = NULL;
    st = pert_forward(op, theta, B, out, &tape);
    if (st == PERT_STATUS_OK) {
      stage = 1;
      st = pert_tape_vjp(tape, g, out + B * D);
      pert_tape_free(tape);
    }
  } else if (mode == 1) {
    float y_true[B * D] = {0};
    for (int b = 0; b < B; b++) y_true[b * D + 1] = 1;
    st = pert_fenchel_young(op, theta, y_true, B, out, out + B * D);
  } else {
    pert_draw *draw = NULL;
    st = pert_draw_new(op, theta, B, &draw);
    if (st == PERT_STATUS_OK) {
      size_t rows = pert_draw_count(draw);
      float *solutions = __libc_malloc(rows * D * sizeof(float)); /* (not counted, never failed) */
      solve_argmax(&d_size, pert_draw_inputs(draw), rows, solutions);
      pert_tape *tape = NULL;
      st = pert_draw_finish(draw, solutions, out, &tape);
      if (st == PERT_STATUS_OK) {
        stage = 1;
        st = pert_tape_vjp(tape, g, out + B * D);
        pert_tape_free(tape);
      }
      __libc_free(solutions);
      pert_draw_free(draw);
    }
  }
  return st;
}

/* Nothing written by the call that failed (the VJP's half, when the forward before it
 * had succeeded; all of it else). */
static bool untouched(const float *out) {
  for (int i = stage == 1 ? B * D : 0; i < OUT; i++)
    if (out[i] != SENTINEL) return false;
  return true;
}

/* The op made again for each call, so that every call is the op's first: the same draws. */
static pert_status fresh_call(enum kind kind, int mode, float *out) {
  pert_op *op = make(kind, 1);
  if (!op) return PERT_STATUS_PANIC;
  pert_status st = call(op, mode, out);
  pert_op_free(op);
  return st;
}

/* Every allocation of the call failed in turn. */
static bool every_allocation_fails_in_turn(enum kind kind, int mode) {
  if (kind == TOPK && mode == 1) return true;  /* (the same path as argmax) */
  float reference[OUT], out[OUT];
  for (int warm = 0; warm < 3; warm++) CHECK_OK(fresh_call(kind, mode, reference));
  /* the calls's allocations, counted (the op is made outside the count) */
  pert_op *op = make(kind, 1);
  CHECK(op != NULL);
  atomic_store(&allocations, 0);
  atomic_store(&counting, 1);
  CHECK_OK(call(op, mode, out));
  atomic_store(&counting, 0);
  pert_op_free(op);
  long total = atomic_load(&allocations);
  long live_before = atomic_load(&live);
  int errors = 0;
  for (long k = 1; k <= total; k++) {
    op = make(kind, 1);
    CHECK(op != NULL);
    atomic_store(&countdown, k);
    pert_status st = call(op, mode, out);
    atomic_store(&countdown, 0);
    if (st == PERT_STATUS_OK) {
      if (memcmp(out, reference, sizeof out) != 0) {
        fprintf(stderr, "  %s mode %d: allocation %ld failed, OK but other numbers\n", names[kind], mode, k);
        return false;
      }
    } else {
      errors++;
      if (st == PERT_STATUS_PANIC) { /* out of memory is TORCH_ERROR: a panic is a bug */
        char msg[512];
        pert_last_error(msg, sizeof msg);
        fprintf(stderr, "  %s mode %d: allocation %ld failed: PERT_STATUS_PANIC (%s)\n", names[kind], mode, k, msg);
        return false;
      }
      if (!untouched(out)) {
        fprintf(stderr, "  %s mode %d: allocation %ld failed, %s at stage %d, outputs written\n", names[kind], mode,
                k, pert_status_name(st), stage);
        for (int i = 0; i < OUT; i++) fprintf(stderr, "%g ", out[i]);
        fprintf(stderr, "\n");
        return false;
      }
    }
    /* the op still works, and gives the right numbers: those of its first call, or of
     * its second when the failed call counted as one (as a fresh op's second call) */
    float again[OUT], want[OUT];
    pert_status next = call(op, mode, again);
    if (next != PERT_STATUS_OK)
      fprintf(stderr, "  %s mode %d: the call after allocation %ld failed (%s) fails\n", names[kind], mode, k,
              pert_status_name(st));
    CHECK_OK(next);
    pert_op_free(op);
    pert_op *twin = make(kind, 1);
    CHECK(twin != NULL);
    CHECK_OK(call(twin, mode, want));
    CHECK_OK(call(twin, mode, want));
    pert_op_free(twin);
    if (memcmp(again, want, sizeof again) != 0 && memcmp(again, reference, sizeof again) != 0) {
      fprintf(stderr, "  %s mode %d: after allocation %ld failed (%s), the op's next call gives other numbers:\n",
              names[kind], mode, k, pert_status_name(st));
      for (int i = 0; i < OUT; i++) fprintf(stderr, "  %g %g %g\n", again[i], want[i], reference[i]);
      return false;
    }
  }
  long leaked = atomic_load(&live) - live_before;
  printf("  %-7s mode %d: %ld allocations failed in turn, %d errors, %ld allocations still live after\n", names[kind],
         mode, total, errors, leaked);
  /* a leak per failed call would leave at least one allocation live per error (180 or
   * more here); the few that stay are caches of libtorch, the allocator and the channels
   * (0 to 5 seen) */
  CHECK(leaked < 16);
  return true;
}

static bool allocation_failures(void) {
  /* $FAULT_FROM_KIND: start at that kind (to debug one, with RUST_BACKTRACE=1) */
  const char *from = getenv("FAULT_FROM_KIND");
  for (int kind = from ? atoi(from) : 0; kind < KINDS; kind++)
    for (int mode = 0; mode < 3; mode++) CHECK(every_allocation_fails_in_turn((enum kind)kind, mode));
  return true;
}

/* Threads that cannot start: an op with workers is refused with nothing written; a call
 * whose solver threads or helpers cannot start runs on the threads it has, with the same
 * numbers. */
static bool threads_that_cannot_start(void) {
  float reference[OUT], out[OUT];
  for (int kind = 0; kind < KINDS; kind++) {
    pert_op *op = make((enum kind)kind, 2);
    CHECK(op != NULL);
    CHECK_OK(call(op, 0, reference));
    pert_op_free(op);
    op = make((enum kind)kind, 2);
    CHECK(op != NULL);
    atomic_store(&fail_threads, 1);
    pert_status st = call(op, 0, out);
    atomic_store(&fail_threads, 0);
    CHECK_OK(st);
    CHECK(memcmp(out, reference, sizeof out) == 0);
    pert_op_free(op);
  }
  /* a draw large enough to fill its noise on several threads (built-in argmax, the
   * library's threads) */
  {
    pert_config *c = NULL;
    CHECK_OK(pert_config_new(&c));
    CHECK_OK(pert_config_set_num_samples(c, 20000));
    CHECK_OK(pert_config_set_device(c, "cpu"));
    int64_t shape[] = {8};
    float big_theta[2 * 8] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 1, 0, 0, 0, 0, 0, 0, 0};
    pert_draw *draws[2] = {NULL, NULL};
    for (int failing = 0; failing < 2; failing++) {
      pert_op *big = NULL;
      CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &big));
      atomic_store(&fail_threads, failing);
      pert_status st = pert_draw_new(big, big_theta, 2, &draws[failing]);
      atomic_store(&fail_threads, 0);
      CHECK_OK(st);
      pert_op_free(big);
    }
    size_t rows = pert_draw_count(draws[0]);
    CHECK(rows == pert_draw_count(draws[1]));
    CHECK(memcmp(pert_draw_inputs(draws[0]), pert_draw_inputs(draws[1]), rows * 8 * sizeof(float)) == 0);
    pert_draw_free(draws[0]);
    pert_draw_free(draws[1]);
    pert_config_free(c);
  }
  pert_op *op = (pert_op *)&op; /* a value that must stay */
  pert_config *c = NULL;
  CHECK_OK(pert_config_new(&c));
  CHECK_OK(pert_config_set_threads(c, 2));
  atomic_store(&fail_threads, 1);
  pert_status st = pert_op_new_ex(c, (int64_t[]){D}, 1, (int64_t[]){D}, 1, argmax_ex, &d_size, NULL, NULL, &op);
  atomic_store(&fail_threads, 0);
  CHECK(st != PERT_STATUS_OK && st != PERT_STATUS_PANIC);
  CHECK(op == (pert_op *)&op);
  pert_config_free(c);
  return true;
}

/* A solver that fails at each of its calls in turn: SOLVER_FAILED, nothing written, the op
 * works afterwards. */
static bool a_solver_failing_at_every_call(void) {
  static const enum kind kinds[] = {PLAIN, WORKERS, DEVICE_CPU};
  for (size_t i = 0; i < 3; i++)
    for (uint32_t threads = 1; threads <= 2; threads++) {
      float reference[OUT], out[OUT];
      pert_op *op = make(kinds[i], threads);
      CHECK(op != NULL);
      CHECK_OK(call(op, 0, reference));
      pert_op_free(op);
      for (long k = 1;; k++) {
        op = make(kinds[i], threads);
        CHECK(op != NULL);
        atomic_store(&solver_countdown, k);
        pert_status st = call(op, 0, out);
        bool reached = atomic_load(&solver_countdown) <= 0;
        atomic_store(&solver_countdown, 0);
        if (!reached) { /* k is past the last call */
          CHECK_OK(st);
          pert_op_free(op);
          printf("  %-7s threads %u: a failure at each of %ld solver calls\n", names[kinds[i]], threads, k - 1);
          break;
        }
        CHECK_STATUS(PERT_STATUS_SOLVER_FAILED, st);
        CHECK(last_error_contains("injected solver failure"));
        CHECK(untouched(out));
        float again[OUT];
        CHECK_OK(call(op, 0, again)); /* usable */
        pert_op_free(op);
      }
    }
  return true;
}

/* A pool of three of the five one-hot vectors, room for `capacity`. */
static pert_pool *three_one_hots(size_t capacity) {
  pert_pool *pool = NULL;
  int64_t shape[] = {D};
  if (pert_pool_new(shape, 1, capacity, &pool) != PERT_STATUS_OK) return NULL;
  float rows[3 * D] = {0};
  for (int i = 0; i < 3; i++) rows[i * D + i] = 1;
  if (pert_pool_add(pool, rows, 3) != PERT_STATUS_OK) return NULL;
  return pool;
}

/* A forward call (and its VJP) of a pooled op at solve_ratio 0.5, every allocation failed
 * in turn, for each kind of solver: an error with nothing written and the pool as it was
 * (a failed call adds nothing), or OK with the numbers and the pool of a call that
 * succeeds; the op works afterwards. Then pert_pool_add alike: all or nothing. */
static bool pooled_calls_fail_cleanly(void) {
  solve_ratio = 0.5;
  const enum kind kinds[] = {PLAIN, WORKERS, ARGMAX, DEVICE_CPU};
  for (size_t n = 0; n < sizeof kinds / sizeof *kinds; n++) {
    enum kind kind = kinds[n];
    float reference[OUT], out[OUT];
    pert_op *op = make(kind, 1);
    pert_pool *pool = three_one_hots(4);
    CHECK(op && pool);
    CHECK_OK(pert_op_set_pool(op, pool));
    atomic_store(&allocations, 0);
    atomic_store(&counting, 1);
    CHECK_OK(call(op, 0, reference));
    atomic_store(&counting, 0);
    size_t grown = pert_pool_size(pool);
    pert_op_free(op), pert_pool_free(pool);
    long total = atomic_load(&allocations), live_before = atomic_load(&live);
    for (long k = 1; k <= total; k++) {
      op = make(kind, 1), pool = three_one_hots(4);
      CHECK(op && pool);
      CHECK_OK(pert_op_set_pool(op, pool));
      atomic_store(&countdown, k);
      pert_status st = call(op, 0, out);
      atomic_store(&countdown, 0);
      if (st == PERT_STATUS_OK) {
        CHECK(memcmp(out, reference, sizeof out) == 0 && pert_pool_size(pool) == grown);
      } else {
        if (st == PERT_STATUS_PANIC || !untouched(out) || (stage == 0 && pert_pool_size(pool) != 3)) {
          fprintf(stderr, "  pooled %s: allocation %ld failed: %s at stage %d, pool %zu\n", names[kind], k,
                  pert_status_name(st), stage, pert_pool_size(pool));
          return false;
        }
      }
      CHECK_OK(call(op, 0, out)); /* usable */
      pert_op_free(op), pert_pool_free(pool);
    }
    long leaked = atomic_load(&live) - live_before;
    printf("  pooled %-7s: %ld allocations failed in turn, %ld allocations still live after\n", names[kind], total,
           leaked);
    CHECK(leaked < 16);
  }
  solve_ratio = 1.0;
  const float fresh[2 * D] = {0, 0, 0, 1, 0, 0, 0, 0, 0, 1};
  atomic_store(&allocations, 0);
  atomic_store(&counting, 1);
  pert_pool *pool = three_one_hots(8);
  CHECK(pool != NULL);
  atomic_store(&allocations, 0);
  CHECK_OK(pert_pool_add(pool, fresh, 2));
  atomic_store(&counting, 0);
  pert_pool_free(pool);
  long total = atomic_load(&allocations);
  for (long k = 1; k <= total; k++) {
    pool = three_one_hots(8);
    CHECK(pool != NULL);
    atomic_store(&countdown, k);
    pert_status st = pert_pool_add(pool, fresh, 2);
    atomic_store(&countdown, 0);
    CHECK(st == PERT_STATUS_OK ? pert_pool_size(pool) == 5 : st != PERT_STATUS_PANIC && pert_pool_size(pool) == 3);
    CHECK_OK(pert_pool_add(pool, fresh, 2));
    CHECK(pert_pool_size(pool) == 5);
    pert_pool_free(pool);
  }
  printf("  pool add: %ld allocations failed in turn\n", total);
  return true;
}

int main(void) {
  /* (a backtrace per injected panic would fill the symbolizer's caches: leaks to the count) */
  if (!getenv("FAULT_FROM_KIND")) setenv("RUST_BACKTRACE", "0", 1);
  const test_case tests[] = {
      TEST(allocation_failures),
      TEST(threads_that_cannot_start),
      TEST(a_solver_failing_at_every_call),
      TEST(pooled_calls_fail_cleanly),
  };
  /* $FAULT_POOL_ONLY: the pooled calls alone (to debug them) */
  if (getenv("FAULT_POOL_ONLY")) return run_tests(tests + 3, 1);
  return run_tests(tests, sizeof tests / sizeof *tests);
}
