/* The bit-equality sweep (issue 26): random shapes and settings, ops of every kind (plain
 * and worker callbacks, built-in argmax, top-k and ranks, device solvers on the CPU), each
 * case under three random settings of threads (1..8) and max_threads (0, or threads..8),
 * each through one of pert_forward with separate buffers, pert_forward with the output
 * over theta, and the two-phase API: y, VJP, JVP, Jacobian and objective must equal those
 * of threads = 1, max_threads = 0 bit for bit.
 *
 * usage: sweep_bits [cases] [seed]   (default 40 cases, seed 1) */
#include <inttypes.h>

#include "harness.h"
#include "solvers.h"

enum kind { PLAIN, WORKERS, ARGMAX, TOPK, RANKS, DEVICE, KINDS };
static const char *kind_names[] = {"plain", "workers", "argmax", "top-k", "ranks", "device"};

typedef struct {
  enum kind kind;
  size_t d, batch;
  int64_t k;
  uint64_t n;
  uint32_t noise, perturbation, baseline;
  bool antithetic;
  double sigma;
  uint64_t seed;
} params;

static uint64_t rng_state;
static uint64_t next(void) { /* splitmix64 */
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static size_t pick(size_t n) { return (size_t)(next() % n); }

/* The solver of every kind: argmax (first of equal largest), or the built-ins' rule. */
typedef struct {
  rule r; /* k = 0 with ranks; argmax when is_argmax */
  bool is_argmax;
} solver_data;

static int32_t solve(void *user_data, const float *x, size_t count, float *y) {
  solver_data *s = user_data;
  return s->is_argmax ? solve_argmax(&s->r.d, x, count, y) : solve_by_rule(&s->r, x, count, y);
}
static int32_t solve_ex(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y) {
  (void)info;
  return solve(user_data, x, count, y);
}
static int32_t solve_device(void *user_data, const pert_solve_info *info, const float *x, size_t count, float *y,
                            void *stream) {
  (void)info, (void)stream;
  return solve(user_data, x, count, y);
}

typedef struct {
  float *y, *vjp, *jvp, *jacobian, *objective;
} results;

static void results_free(results *r) {
  free(r->y), free(r->vjp), free(r->jvp), free(r->jacobian), free(r->objective);
}

static bool results_alloc(results *r, const params *p) {
  size_t d = p->d, b = p->batch;
  r->y = malloc(b * d * sizeof(float));
  r->vjp = malloc(b * d * sizeof(float));
  r->jvp = malloc(b * d * sizeof(float));
  r->jacobian = malloc(b * d * d * sizeof(float));
  r->objective = malloc(b * sizeof(float));
  return r->y && r->vjp && r->jvp && r->jacobian && r->objective;
}

static bool same(const char *what, const float *a, const float *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      fprintf(stderr, "  %s differs at %zu of %zu: %.9g vs %.9g\n", what, i, n, a[i], b[i]);
      return false;
    }
  return true;
}

static bool equal(const results *a, const results *b, const params *p) {
  size_t d = p->d, n = p->batch * d;
  return same("y", a->y, b->y, n) && same("vjp", a->vjp, b->vjp, n) && same("jvp", a->jvp, b->jvp, n) &&
         same("jacobian", a->jacobian, b->jacobian, n * d) && same("objective", a->objective, b->objective, p->batch);
}

static pert_op *make_op(const params *p, uint32_t threads, uint32_t max_threads, solver_data *s) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, p->n);
  pert_config_set_sigma(c, p->sigma);
  pert_config_set_noise(c, p->noise);
  pert_config_set_perturbation(c, p->perturbation);
  pert_config_set_baseline(c, p->baseline);
  pert_config_set_antithetic(c, p->antithetic);
  pert_config_set_seed(c, p->seed);
  pert_config_set_device(c, "cpu");
  pert_config_set_threads(c, threads);
  pert_config_set_max_threads(c, max_threads);
  int64_t shape[] = {(int64_t)p->d};
  pert_op *op = NULL;
  pert_status st = PERT_STATUS_OK;
  switch (p->kind) {
    case PLAIN: st = pert_op_new(c, shape, 1, shape, 1, solve, s, &op); break;
    case WORKERS: st = pert_op_new_ex(c, shape, 1, shape, 1, solve_ex, s, NULL, NULL, &op); break;
    case ARGMAX: st = pert_op_new_builtin(c, PERT_BUILTIN_ARGMAX, 0, shape, 1, &op); break;
    case TOPK: st = pert_op_new_builtin(c, PERT_BUILTIN_TOPK, p->k, shape, 1, &op); break;
    case RANKS: st = pert_op_new_builtin(c, PERT_BUILTIN_RANKS, 0, shape, 1, &op); break;
    case DEVICE: st = pert_op_new_device(c, shape, 1, shape, 1, solve_device, s, &op); break;
    default: break;
  }
  if (st != PERT_STATUS_OK) {
    char msg[512];
    pert_last_error(msg, sizeof msg);
    fprintf(stderr, "  cannot make the op: %s\n", msg);
  }
  pert_config_free(c);
  return op;
}

/* The products of one tape into r (y already there). */
static bool products(pert_tape *tape, const float *g, const float *t, results *r) {
  CHECK_OK(pert_tape_vjp(tape, g, r->vjp));
  CHECK_OK(pert_tape_jvp(tape, t, r->jvp));
  CHECK_OK(pert_tape_jacobian(tape, r->jacobian));
  CHECK_OK(pert_tape_objective(tape, r->objective));
  return true;
}

/* mode 0: forward; 1: forward with the output over theta; 2: draw + finish */
static bool run(const params *p, uint32_t threads, uint32_t max_threads, int mode, const float *theta, const float *g,
                const float *t, results *r) {
  solver_data s = {{p->d, p->kind == RANKS ? 0 : p->k}, p->kind == ARGMAX || p->kind == PLAIN ||
                                                            p->kind == WORKERS || p->kind == DEVICE};
  if (p->kind == TOPK) s.is_argmax = p->k == 1; /* top-1 is the argmax's rule */
  pert_op *op = make_op(p, threads, max_threads, &s);
  CHECK(op != NULL);
  size_t n = p->batch * p->d;
  pert_tape *tape = NULL;
  if (mode == 2) {
    pert_draw *draw = NULL;
    CHECK_OK(pert_draw_new(op, theta, p->batch, &draw));
    size_t rows = pert_draw_count(draw);
    float *solutions = malloc(rows * p->d * sizeof(float));
    CHECK(solutions != NULL);
    solve(&s, pert_draw_inputs(draw), rows, solutions);
    CHECK_OK(pert_draw_finish(draw, solutions, r->y, &tape));
    free(solutions);
    pert_draw_free(draw);
  } else if (mode == 1) {
    memcpy(r->y, theta, n * sizeof(float));
    CHECK_OK(pert_forward(op, r->y, p->batch, r->y, &tape));
  } else {
    CHECK_OK(pert_forward(op, theta, p->batch, r->y, &tape));
  }
  bool ok = products(tape, g, t, r);
  pert_tape_free(tape);
  pert_op_free(op);
  return ok;
}

static void random_params(params *p) {
  static const uint64_t counts[] = {1, 2, 8, 64, 300, 2500};
  p->kind = (enum kind)pick(KINDS);
  p->d = 1 + pick(24);
  p->batch = 1 + pick(5);
  p->k = 1 + (int64_t)pick(p->d);
  p->n = counts[pick(6)];
  p->noise = pick(2) ? PERT_NOISE_GUMBEL : PERT_NOISE_NORMAL;
  p->perturbation = p->noise == PERT_NOISE_NORMAL && pick(3) == 0 ? PERT_PERTURBATION_MULTIPLICATIVE
                                                                   : PERT_PERTURBATION_ADDITIVE;
  p->baseline = (uint32_t)pick(3);
  p->antithetic = p->noise == PERT_NOISE_NORMAL && p->n % 2 == 0 && pick(3) == 0;
  p->sigma = pick(2) ? 0.5 : 0.05;
  p->seed = next() % 1000;
}

static void describe(const params *p) {
  fprintf(stderr, "  case: %s d %zu batch %zu k %" PRId64 " n %" PRIu64 " noise %u perturbation %u baseline %u antithetic %d sigma %g seed %" PRIu64 "\n",
          kind_names[p->kind], p->d, p->batch, p->k, p->n, p->noise, p->perturbation, p->baseline, p->antithetic,
          p->sigma, p->seed);
}

int main(int argc, char **argv) {
  int cases = argc > 1 ? atoi(argv[1]) : 40;
  rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
  int failed = 0;
  for (int c = 0; c < cases && failed < 5; c++) {
    params p;
    random_params(&p);
    size_t n = p.batch * p.d;
    float *theta = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float)), *t = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
      /* a few distinct values: ties among the inputs too */
      theta[i] = (float)((int)pick(9) - 4) / 4.0f + (p.perturbation == PERT_PERTURBATION_MULTIPLICATIVE ? 1.5f : 0.0f);
      g[i] = (float)((int)pick(11) - 5);
      t[i] = (float)((int)pick(7) - 3) / 3.0f;
    }
    results ref, other;
    bool ok = results_alloc(&ref, &p) && results_alloc(&other, &p) && run(&p, 1, 0, 0, theta, g, t, &ref);
    /* every setting of threads and max_threads, and the other two modes */
    for (int trial = 0; ok && trial < 3; trial++) {
      uint32_t threads = 1 + (uint32_t)pick(8);
      uint32_t max_threads = pick(3) == 0 ? 0 : threads + (uint32_t)pick(9 - threads);
      int mode = (int)pick(3);
      ok = run(&p, threads, max_threads, mode, theta, g, t, &other) && equal(&ref, &other, &p);
      if (!ok) fprintf(stderr, "  threads %u, max_threads %u, mode %d\n", threads, max_threads, mode);
    }
    if (!ok) {
      describe(&p);
      failed++;
    }
    results_free(&ref);
    results_free(&other);
    free(theta), free(g), free(t);
  }
  printf("bit-equality sweep: %d cases, %d failed\n", cases, failed);
  return failed ? 1 : 0;
}
