/* What a callback or the host process can change under the library (issue 26): a fork()
 * while other threads call ops, a callback that switches on flush-to-zero, the caller's
 * OpenMP count under max_threads, products under every thread setting, one tie rule for
 * the built-ins, and the two-phase API against pert_forward, bit for bit. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "forking.h"
#include "harness.h"
#include "solvers.h"

static pert_config *config(uint64_t n, uint32_t threads, uint32_t max_threads) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, n);
  pert_config_set_sigma(c, 0.5);
  pert_config_set_seed(c, 5);
  pert_config_set_device(c, "cpu");
  pert_config_set_max_threads(c, max_threads);
  pert_config_set_threads(c, threads);
  return c;
}

static bool same_bits(const float *a, const float *b, size_t n) {
  if (memcmp(a, b, n * sizeof(float)) == 0) return true;
  for (size_t i = 0; i < n; i++)
    if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      fprintf(stderr, "  entry %zu of %zu: %.9g vs %.9g\n", i, n, a[i], b[i]);
      break;
    }
  return false;
}

/* ---- fork ---------------------------------------------------------------------------- */

#define FD 4
static size_t fd_size = FD;

static int32_t solve_ex_argmax(void *user_data, const pert_solve_info *info, const float *x, size_t count,
                               float *y) {
  (void)info;
  return solve_argmax(user_data, x, count, y);
}

typedef struct {
  pert_op *op;
  atomic_int stop;
} caller;

static void *call_until_stopped(void *arg) {
  caller *c = arg;
  float theta[2 * FD] = {0.1f, 0.4f, -0.2f, 0.3f, 0.0f, 0.2f, 0.5f, -0.1f}, y[2 * FD];
  while (!atomic_load(&c->stop)) pert_forward(c->op, theta, 2, y, NULL);
  return NULL;
}

static int32_t init_ok(void *user_data, uint32_t worker) {
  (void)user_data, (void)worker;
  return 0;
}
static void fini_noop(void *user_data, uint32_t worker) { (void)user_data, (void)worker; }
static int32_t device_argmax_fork(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y,
                                  void *stream) {
  (void)info, (void)stream;
  return solve_argmax(user_data, x, count, y);
}

#define OPS 6

/* In a child: frees every op of the parent's callers. */
static int free_every_op(void *arg) {
  caller *callers = arg;
  for (int i = 0; i < OPS; i++) pert_op_free(callers[i].op);
  return 0;
}

/* Children forked at random moments of other threads' calls (ops with workers and hooks,
 * a plain op on helper threads, built-in top-k and argmax, a device solver) free every op
 * and exit: none hangs. $PERT_FORK_SWEEP sets the number of forks (150; the fork sweep of
 * `make check-deep` runs thousands). */
static bool freeing_ops_in_a_child_forked_during_calls_never_hangs(void) {
  pert_config *c = config(64, 2, 0);
  CHECK(c != NULL);
  caller callers[OPS] = {{0}};
  int64_t shape[] = {FD};
  CHECK_OK(pert_op_new_ex(c, shape, 1, shape, 1, solve_ex_argmax, &fd_size, NULL, NULL, &callers[0].op));
  CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &fd_size, &callers[1].op));
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_TOPK, 2, shape, 1, &callers[2].op));
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &callers[3].op));
  CHECK_OK(pert_op_new_ex(c, shape, 1, shape, 1, solve_ex_argmax, &fd_size, init_ok, fini_noop, &callers[4].op));
  CHECK_OK(pert_op_new_device(c, shape, 1, shape, 1, device_argmax_fork, &fd_size, &callers[5].op));
  pthread_t threads[OPS];
  for (int i = 0; i < OPS; i++) CHECK(pthread_create(&threads[i], NULL, call_until_stopped, &callers[i]) == 0);
  const char *sweep = getenv("PERT_FORK_SWEEP");
  int forks = sweep && atoi(sweep) > 0 ? atoi(sweep) : 150;
  int hung = 0, failed = 0;
  for (int k = 0; k < forks; k++) {
    usleep((useconds_t)(k * 37 % 400));
    child_end end = fork_and_wait(free_every_op, callers);
    hung += end == CHILD_HUNG, failed += end == CHILD_FAILED;
  }
  for (int i = 0; i < OPS; i++) atomic_store(&callers[i].stop, 1);
  for (int i = 0; i < OPS; i++) pthread_join(threads[i], NULL);
  if (hung || failed || forks > 150) fprintf(stderr, "  %d forks: %d children hung, %d failed\n", forks, hung, failed);
  CHECK(hung == 0 && failed == 0);
  for (int i = 0; i < OPS; i++) pert_op_free(callers[i].op);
  pert_config_free(c);
  return true;
}

/* A thread's first call runs libtorch's and MKL's per-thread set-up, which takes MKL's own
 * lock: a child forked while a parent's thread held it hung at its own first call (about 1
 * fork in 5000 here). Parent threads keep starting threads that make one call each; each
 * child makes its first call on a new thread and frees the op. $PERT_FORK_SWEEP as above. */
typedef struct {
  pert_op *op;
  atomic_int stop;
  atomic_int failed;
} first_calls;

static void *one_first_call(void *arg) {
  first_calls *f = arg;
  float theta[FD] = {0.1f, 0.4f, -0.2f, 0.3f}, y[FD];
  if (pert_forward(f->op, theta, 1, y, NULL) != PERT_STATUS_OK) atomic_store(&f->failed, 1);
  return NULL;
}

static void *start_first_calls(void *arg) {
  first_calls *f = arg;
  while (!atomic_load(&f->stop)) {
    pthread_t t;
    if (pthread_create(&t, NULL, one_first_call, f) == 0) pthread_join(t, NULL);
  }
  return NULL;
}

/* In a child: one call on a new thread, then the op freed. */
static int first_call_on_a_new_thread(void *arg) {
  first_calls *f = arg;
  pthread_t t;
  if (pthread_create(&t, NULL, one_first_call, f) != 0) return 2;
  pthread_join(t, NULL);
  pert_op_free(f->op);
  return atomic_load(&f->failed) ? 3 : 0;
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PERT_UNDER_ASAN 1
#endif
#endif

static bool a_childs_first_call_never_hangs_on_a_lock_of_the_parents_first_calls(void) {
#if defined(__SANITIZE_ADDRESS__) || defined(PERT_UNDER_ASAN)
  /* clang-14's ASan allocator takes no lock around fork(): a child forked while the
   * parent's new threads allocate waits forever inside ASan (seen: a child's new thread in
   * SizeClassAllocator64::GetFromAllocator under pthread_getattr_np), whatever this library
   * does. The plain build (make test, make sweeps) runs this test. */
  fprintf(stderr, "  skipped under AddressSanitizer (its allocator is not fork-safe)\n");
  return true;
#endif
  pert_config *c = config(8, 1, 0);
  CHECK(c != NULL);
  first_calls f = {0};
  int64_t shape[] = {FD};
  CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &f.op));
  /* one call first: libtorch sets up each of its operations once per process, under
   * locks no fork handler can reach (README, "fork()"); the threads' first calls follow */
  one_first_call(&f);
  CHECK(!atomic_load(&f.failed));
  enum { STARTERS = 4 };
  pthread_t threads[STARTERS];
  for (int i = 0; i < STARTERS; i++) CHECK(pthread_create(&threads[i], NULL, start_first_calls, &f) == 0);
  const char *sweep = getenv("PERT_FORK_SWEEP");
  int forks = sweep && atoi(sweep) > 0 ? atoi(sweep) : 150;
  int hung = 0, failed = 0;
  for (int k = 0; k < forks; k++) {
    usleep((useconds_t)(50 + k * 37 % 500));
    child_end end = fork_and_wait(first_call_on_a_new_thread, &f);
    hung += end == CHILD_HUNG, failed += end == CHILD_FAILED;
  }
  atomic_store(&f.stop, 1);
  for (int i = 0; i < STARTERS; i++) pthread_join(threads[i], NULL);
  if (hung || failed || forks > 150) fprintf(stderr, "  %d forks: %d children hung, %d failed\n", forks, hung, failed);
  CHECK(hung == 0 && failed == 0 && !atomic_load(&f.failed));
  pert_op_free(f.op);
  pert_config_free(c);
  return true;
}

/* ---- floating-point state ------------------------------------------------------------ */

#if defined(__x86_64__)
#define FTZ_DAZ 0x8040u

/* argmax, then flush-to-zero and denormals-are-zero switched on for the rest of the thread */
static int32_t argmax_then_ftz(void *user_data, const float *x, size_t count, float *y) {
  int32_t r = solve_argmax(user_data, x, count, y);
  _mm_setcsr(_mm_getcsr() | FTZ_DAZ);
  return r;
}

static int32_t device_argmax(void *user_data, const pert_solve_info *info, const float *x, size_t count,
                             float *y, void *stream) {
  (void)info, (void)stream;
  return solve_argmax(user_data, x, count, y);
}

static int32_t device_argmax_then_ftz(void *user_data, const pert_solve_info *info, const float *x, size_t count,
                                      float *y, void *stream) {
  (void)info, (void)stream;
  return argmax_then_ftz(user_data, x, count, y);
}

static int32_t init_ftz(void *user_data, uint32_t worker) {
  (void)user_data, (void)worker;
  _mm_setcsr(_mm_getcsr() | FTZ_DAZ);
  return 0;
}

/* y and the VJP of an op made by `make` (kind 0: plain, 1: device solver, 2: with workers
 * whose init switches FTZ on; ftz: the solver switches it on) on denormal theta (the VJP:
 * of theta just above them). */
static bool run_denormal(int kind, bool ftz, uint32_t threads, float *y, float *vjp) {
  pert_config *c = config(64, threads, 0);
  CHECK(c != NULL);
  CHECK_OK(pert_config_set_perturbation(c, PERT_PERTURBATION_MULTIPLICATIVE));
  CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
  pert_op *op = NULL;
  int64_t shape[] = {FD};
  if (kind == 0)
    CHECK_OK(pert_op_new(c, shape, 1, shape, 1, ftz ? argmax_then_ftz : solve_argmax, &fd_size, &op));
  else if (kind == 1)
    CHECK_OK(pert_op_new_device(c, shape, 1, shape, 1, ftz ? device_argmax_then_ftz : device_argmax, &fd_size, &op));
  else
    CHECK_OK(pert_op_new_ex(c, shape, 1, shape, 1, solve_ex_argmax, &fd_size, ftz ? init_ftz : NULL, NULL, &op));
  /* y of denormal theta (the clean rows and many perturbed inputs denormal); the VJP of
   * theta just above float32's least normal, whose perturbed inputs theta exp(sigma Z -
   * sigma^2/2) are often denormal too, while the multiplicative Jacobian's 1/theta stays
   * within float32 (a denormal theta takes it beyond, which the library refuses) */
  const float theta[2 * FD] = {1e-39f, 2e-39f, -1e-39f, 1.5e-39f, 3e-39f, 1e-40f, 2.5e-39f, -2e-39f};
  const float theta_normal[2 * FD] = {2e-38f, 3e-38f, -2e-38f, 2.5e-38f, 4e-38f, 1.5e-38f, 3.5e-38f, -3e-38f};
  const float g[2 * FD] = {1, -2, 0.5f, 3, -1, 2, 1, 0.25f};
  pert_tape *tape = NULL;
  unsigned before = _mm_getcsr();
  CHECK_OK(pert_forward(op, theta, 2, y, NULL));
  float y_normal[2 * FD];
  CHECK_OK(pert_forward(op, theta_normal, 2, y_normal, &tape));
  CHECK_OK(pert_tape_vjp(tape, g, vjp));
  /* the caller's thread keeps its own settings (the sticky exception flags aside, which
   * any arithmetic sets) */
  unsigned after = _mm_getcsr();
  if ((after & ~0x3fu) != (before & ~0x3fu))
    fprintf(stderr, "  kind %d, ftz %d, threads %u: MXCSR %#x -> %#x\n", kind, ftz, threads, before, after);
  CHECK((after & ~0x3fu) == (before & ~0x3fu));
  pert_tape_free(tape);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* A callback (solver of every kind, or a worker's init) that leaves flush-to-zero on
 * changes no bit of the results, and the caller's floating-point state is its own after. */
static bool a_callback_that_switches_on_flush_to_zero_changes_nothing(void) {
  for (int kind = 0; kind < 3; kind++)
    for (uint32_t threads = 1; threads <= 2; threads++) {
      float y0[2 * FD], v0[2 * FD], y1[2 * FD], v1[2 * FD];
      CHECK(run_denormal(kind, false, threads, y0, v0));
      CHECK(run_denormal(kind, true, threads, y1, v1));
      if (!same_bits(y0, y1, 2 * FD) || !same_bits(v0, v1, 2 * FD)) {
        fprintf(stderr, "  solver kind %d, threads %u: y %.3g %.3g %.3g %.3g against %.3g %.3g %.3g %.3g\n", kind,
                threads, y1[0], y1[1], y1[2], y1[3], y0[0], y0[1], y0[2], y0[3]);
        return false;
      }
      /* (not vacuous: the denormal inputs give more than one winner; and numbers) */
      CHECK(y0[0] < 1.0f);
      for (int i = 0; i < 2 * FD; i++) CHECK(isfinite(y0[i]) && isfinite(v0[i]));
    }
  return true;
}
#endif

/* ---- OpenMP counts under max_threads -------------------------------------------------- */

typedef void (*omp_set_fn)(int);
typedef int (*omp_get_fn)(void);
static omp_set_fn omp_set;
static omp_get_fn omp_get;
static atomic_int omp_seen;

static int32_t argmax_seeing_omp(void *user_data, const float *x, size_t count, float *y) {
  atomic_store(&omp_seen, omp_get());
  return solve_argmax(user_data, x, count, y);
}

typedef struct {
  uint32_t max_threads;
  int own, during, after;
  bool ok;
} omp_case;

/* on a thread of its own, so that the call is that thread's first */
static void *omp_case_thread(void *arg) {
  omp_case *k = arg;
  omp_set(k->own);
  pert_config *c = config(16, 1, k->max_threads);
  pert_op *op = NULL;
  float theta[FD] = {0.1f, 0.3f, 0.2f, 0.0f}, y[FD];
  k->ok = c && pert_op_new(c, (int64_t[]){FD}, 1, (int64_t[]){FD}, 1, argmax_seeing_omp, &fd_size, &op) ==
                   PERT_STATUS_OK &&
          pert_forward(op, theta, 1, y, NULL) == PERT_STATUS_OK;
  k->during = atomic_load(&omp_seen);
  k->after = omp_get();
  pert_op_free(op);
  pert_config_free(c);
  return NULL;
}

/* max_threads caps the OpenMP count a callback sees (never raises it), and the calling
 * thread's own count is the same after its first call as before. */
static bool max_threads_caps_the_callers_openmp_count_and_puts_it_back(void) {
  void *set = dlsym(RTLD_DEFAULT, "omp_set_num_threads"), *get = dlsym(RTLD_DEFAULT, "omp_get_max_threads");
  memcpy(&omp_set, &set, sizeof set); /* (POSIX: a function's address from dlsym) */
  memcpy(&omp_get, &get, sizeof get);
  if (!omp_set || !omp_get) {
    printf("  (this libtorch has no OpenMP: nothing to cap)\n");
    return true;
  }
  /* an own count unlike libtorch's default (without a cap too: libtorch's per-thread
   * set-up, at the call's first parallel kernel, must not overwrite it) */
  int own = 2 * (int)sysconf(_SC_NPROCESSORS_ONLN) + 1;
  omp_case cases[] = {{64, 3, 3, 3, false}, {2, 3, 2, 3, false}, {8, 1, 1, 1, false}, {0, own, own, own, false}};
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    omp_case k = cases[i];
    pthread_t t;
    CHECK(pthread_create(&t, NULL, omp_case_thread, &k) == 0);
    pthread_join(t, NULL);
    if (!k.ok || k.during != cases[i].during || k.after != cases[i].after) {
      fprintf(stderr, "  own %d, max_threads %u: %d during (want %d), %d after (want %d)\n", k.own, k.max_threads,
              k.during, cases[i].during, k.after, cases[i].after);
      return false;
    }
  }
  return true;
}

/* ---- products under every thread setting --------------------------------------------- */

#define JD 300 /* a Jacobian of 90 000 entries a problem */
static size_t jd_size = JD;

typedef struct {
  float y[2 * JD], vjp[2 * JD], jvp[2 * JD], objective[2], jacobian[2 * JD * JD];
} products;

static bool products_of(bool builtin, uint32_t threads, uint32_t max_threads, products *p) {
  pert_config *c = config(1000, threads, max_threads);
  CHECK(c != NULL);
  pert_op *op = NULL;
  int64_t shape[] = {JD};
  if (builtin)
    CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &op));
  else
    CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &jd_size, &op));
  float theta[2 * JD], g[2 * JD], t[2 * JD];
  for (size_t i = 0; i < 2 * JD; i++) {
    theta[i] = (float)((i * 7919) % 17) / 40.0f;
    g[i] = (float)((i * 31) % 11) - 5.0f;
    t[i] = (float)((i * 13) % 7) / 3.0f - 1.0f;
  }
  pert_tape *tape = NULL;
  CHECK_OK(pert_forward(op, theta, 2, p->y, &tape));
  CHECK_OK(pert_tape_vjp(tape, g, p->vjp));
  CHECK_OK(pert_tape_jvp(tape, t, p->jvp));
  CHECK_OK(pert_tape_objective(tape, p->objective));
  CHECK_OK(pert_tape_jacobian(tape, p->jacobian));
  pert_tape_free(tape);
  pert_op_free(op);
  pert_config_free(c);
  return true;
}

/* Large Jacobians (over 4096 entries a problem): y, VJP, JVP, objective and Jacobian are
 * the same bits for every threads and max_threads. */
static bool products_of_large_jacobians_do_not_depend_on_threads(void) {
  static products one, other;
  for (int builtin = 0; builtin < 2; builtin++) {
    CHECK(products_of(builtin, 1, 1, &one));
    uint32_t settings[][2] = {{1, 8}, {2, 8}, {2, 0}, {1, 0}};
    for (size_t s = 0; s < 4; s++) {
      CHECK(products_of(builtin, settings[s][0], settings[s][1], &other));
      if (!same_bits(one.y, other.y, 2 * JD) || !same_bits(one.vjp, other.vjp, 2 * JD) ||
          !same_bits(one.jvp, other.jvp, 2 * JD) || !same_bits(one.objective, other.objective, 2) ||
          !same_bits(one.jacobian, other.jacobian, 2 * JD * JD)) {
        fprintf(stderr, "  builtin %d, threads %u, max_threads %u\n", builtin, settings[s][0], settings[s][1]);
        return false;
      }
    }
  }
  return true;
}

/* ---- one tie rule ---------------------------------------------------------------------- */

#define TD 18

/* Built-in top-k and ranks follow one tie rule everywhere: on tied inputs (theta = 0, or
 * few distinct values with -0 and +0) with the clean baseline and noise too small to break
 * every tie, their y and Jacobian equal those of a callback that follows the documented
 * rule, and the two-phase API equals pert_forward. */
static bool builtins_break_ties_by_one_rule(void) {
  rule rules[] = {{TD, 10}, {TD, 0}};
  float thetas[2][2 * TD] = {{0}, {0}};
  for (size_t i = 0; i < 2 * TD; i++) thetas[1][i] = (i % 3 == 0) ? -0.0f : (i % 3 == 1 ? 0.0f : 1.0f);
  for (size_t r = 0; r < 2; r++)
    for (size_t t = 0; t < 2; t++) {
      pert_config *c = config(8, 1, 0);
      CHECK(c != NULL);
      CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
      CHECK_OK(pert_config_set_sigma(c, 1e-30)); /* perturbed inputs stay tied too */
      int64_t shape[] = {TD};
      pert_op *builtin = NULL, *callback = NULL;
      CHECK_OK(pert_op_new_builtin(c, rules[r].k ? PERT_BUILTIN_TOPK : PERT_BUILTIN_RANKS, rules[r].k, shape, 1,
                                   &builtin));
      CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_by_rule, &rules[r], &callback));
      static float y[2][2 * TD], jac[3][2 * TD * TD];
      pert_tape *tape = NULL;
      CHECK_OK(pert_forward(builtin, thetas[t], 2, y[0], &tape));
      CHECK_OK(pert_tape_jacobian(tape, jac[0]));
      pert_tape_free(tape);
      CHECK_OK(pert_forward(callback, thetas[t], 2, y[1], &tape));
      CHECK_OK(pert_tape_jacobian(tape, jac[1]));
      pert_tape_free(tape);
      if (!same_bits(y[0], y[1], 2 * TD) || !same_bits(jac[0], jac[1], 2 * TD * TD)) {
        fprintf(stderr, "  %s, theta %zu: built-in against the documented rule\n", rules[r].k ? "top-k" : "ranks", t);
        return false;
      }
      /* the two-phase API on a fresh op of the same seed: the first call again */
      pert_op *again = NULL;
      CHECK_OK(pert_op_new_builtin(c, rules[r].k ? PERT_BUILTIN_TOPK : PERT_BUILTIN_RANKS, rules[r].k, shape, 1,
                                   &again));
      pert_draw *draw = NULL;
      CHECK_OK(pert_draw_new(again, thetas[t], 2, &draw));
      size_t rows = pert_draw_count(draw);
      float *solutions = malloc(rows * TD * sizeof(float));
      CHECK(solutions != NULL);
      solve_by_rule(&rules[r], pert_draw_inputs(draw), rows, solutions);
      float y2[2 * TD];
      CHECK_OK(pert_draw_finish(draw, solutions, y2, &tape));
      CHECK_OK(pert_tape_jacobian(tape, jac[2]));
      pert_tape_free(tape);
      free(solutions);
      pert_draw_free(draw);
      if (!same_bits(y[0], y2, 2 * TD) || !same_bits(jac[0], jac[2], 2 * TD * TD)) {
        fprintf(stderr, "  %s, theta %zu: two-phase against pert_forward\n", rules[r].k ? "top-k" : "ranks", t);
        return false;
      }
      pert_op_free(again);
      pert_op_free(builtin);
      pert_op_free(callback);
      pert_config_free(c);
    }
  return true;
}

/* ---- two-phase against forward --------------------------------------------------------- */

#define AD 6

/* The built-in argmax (its fused kernel) and the two-phase API on the same seed give the
 * same bits: y, VJP, JVP, Jacobian and objective; with sample counts below and above the
 * kernel's block, and on 1 and 2 threads. */
static bool argmax_forward_equals_draw_and_finish(void) {
  size_t ad = AD;
  uint64_t counts[] = {100, 40000};
  for (size_t k = 0; k < 4; k++)
    for (uint32_t threads = 1; threads <= 2; threads++) {
      pert_config *c = config(counts[k % 2], threads, 0);
      CHECK(c != NULL);
      if (k >= 2) CHECK_OK(pert_config_set_baseline(c, PERT_BASELINE_CLEAN_INPUT));
      int64_t shape[] = {AD};
      pert_op *op = NULL, *again = NULL;
      CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &op));
      CHECK_OK(pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &again));
      const float theta[3 * AD] = {0.1f, 0.5f, -0.2f, 0.3f, 0.45f, 0.0f, 1, 0, 0, 0.5f, 0.2f, 0.1f,
                                   -1, 2, 0.5f, 0.5f, 1.9f, 0};
      const float g[3 * AD] = {1, -2, 0.5f, 3, -1, 2, 1, 0.25f, 0, 2, -1, 1, 0.5f, 0.5f, -3, 1, 2, 0};
      products *p[2];
      static products store[2];
      p[0] = &store[0], p[1] = &store[1];
      pert_tape *tape = NULL;
      CHECK_OK(pert_forward(op, theta, 3, p[0]->y, &tape));
      CHECK_OK(pert_tape_vjp(tape, g, p[0]->vjp));
      CHECK_OK(pert_tape_jvp(tape, g, p[0]->jvp));
      CHECK_OK(pert_tape_objective(tape, p[0]->objective));
      CHECK_OK(pert_tape_jacobian(tape, p[0]->jacobian));
      pert_tape_free(tape);
      pert_draw *draw = NULL;
      CHECK_OK(pert_draw_new(again, theta, 3, &draw));
      size_t rows = pert_draw_count(draw);
      float *solutions = malloc(rows * AD * sizeof(float));
      CHECK(solutions != NULL);
      solve_argmax(&ad, pert_draw_inputs(draw), rows, solutions);
      CHECK_OK(pert_draw_finish(draw, solutions, p[1]->y, &tape));
      CHECK_OK(pert_tape_vjp(tape, g, p[1]->vjp));
      CHECK_OK(pert_tape_jvp(tape, g, p[1]->jvp));
      CHECK_OK(pert_tape_objective(tape, p[1]->objective));
      CHECK_OK(pert_tape_jacobian(tape, p[1]->jacobian));
      pert_tape_free(tape);
      free(solutions);
      pert_draw_free(draw);
      if (!same_bits(p[0]->y, p[1]->y, 3 * AD) || !same_bits(p[0]->vjp, p[1]->vjp, 3 * AD) ||
          !same_bits(p[0]->jvp, p[1]->jvp, 3 * AD) || !same_bits(p[0]->objective, p[1]->objective, 3) ||
          !same_bits(p[0]->jacobian, p[1]->jacobian, 3 * AD * AD)) {
        fprintf(stderr, "  N = %llu, threads %u, baseline %s\n", (unsigned long long)counts[k % 2], threads,
                k >= 2 ? "clean input" : "default");
        return false;
      }
      pert_op_free(op);
      pert_op_free(again);
      pert_config_free(c);
    }
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(freeing_ops_in_a_child_forked_during_calls_never_hangs),
      TEST(a_childs_first_call_never_hangs_on_a_lock_of_the_parents_first_calls),
#if defined(__x86_64__)
      TEST(a_callback_that_switches_on_flush_to_zero_changes_nothing),
#endif
      TEST(max_threads_caps_the_callers_openmp_count_and_puts_it_back),
      TEST(products_of_large_jacobians_do_not_depend_on_threads),
      TEST(builtins_break_ties_by_one_rule),
      TEST(argmax_forward_equals_draw_and_finish),
  };
  return run_tests(tests, sizeof tests / sizeof *tests);
}
