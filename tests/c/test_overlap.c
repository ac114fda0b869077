/* Overlapping buffers: every call gives the same results when an output buffer is one of
 * its input buffers (output == theta, grad_input == grad_output, ...) or overlaps it in
 * part, as with separate buffers. Each case runs twice on ops made from one config (same
 * seed, same call count), once with separate buffers and once overlapping. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "solvers.h"

enum { B = 3, D = 4 };
static size_t DD = D;
static const int64_t SHAPE[1] = {D};

static pert_config *config(uint32_t baseline) {
  pert_config *c = NULL;
  if (pert_config_new(&c) != PERT_STATUS_OK) return NULL;
  pert_config_set_num_samples(c, 64);
  pert_config_set_sigma(c, 0.7);
  pert_config_set_seed(c, 11);
  pert_config_set_baseline(c, baseline);
  pert_config_set_device(c, test_device());
  return c;
}

static pert_op *make(const pert_config *c) {
  pert_op *op = NULL;
  pert_op_new(c, SHAPE, 1, SHAPE, 1, solve_argmax, &DD, &op);
  return op;
}

static const float THETA[B * D] = {0.1f, 0.5f, -0.2f, 0.3f, 1.0f, 0.0f, 0.2f, 0.9f, -0.4f, -0.1f, 0.0f, 0.2f};

static bool same(const float *a, const float *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (a[i] != b[i]) {
      fprintf(stderr, "  entry %zu: %.9g vs %.9g\n", i, a[i], b[i]);
      return false;
    }
  return true;
}

/* The two tapes' objectives (of at most 64 problems) agree. */
static bool same_objective(const pert_tape *a, const pert_tape *b, size_t batch) {
  float fa[64], fb[64];
  CHECK(batch <= 64);
  CHECK_OK(pert_tape_objective(a, fa));
  CHECK_OK(pert_tape_objective(b, fb));
  return same(fa, fb, batch);
}

/* output == theta, and output one float before theta (a partial overlap), with tapes
 * whose VJP, JVP and objective are then computed in place too. */
static bool forward_vjp_jvp_objective_in_place(void) {
  for (uint32_t baseline = 0; baseline <= 2; baseline++) {
    pert_config *c = config(baseline);
    CHECK(c);
    pert_op *a = make(c), *b = make(c), *s = make(c);
    pert_config_free(c);
    CHECK(a && b && s);
    float y[B * D], buf[B * D + 1];
    pert_tape *ta = NULL, *tb = NULL, *ts = NULL;
    CHECK_OK(pert_forward(a, THETA, B, y, &ta));
    memcpy(buf, THETA, sizeof THETA);
    CHECK_OK(pert_forward(b, buf, B, buf, &tb));
    CHECK(same(buf, y, B * D));
    memcpy(buf + 1, THETA, sizeof THETA); /* theta at buf + 1, output at buf */
    CHECK_OK(pert_forward(s, buf + 1, B, buf, &ts));
    pert_tape_free(ts);
    /* the third op is a separate one with call count 0: same draws */
    CHECK(same(buf, y, B * D));

    const float g[B * D] = {1, -2, 0.5f, 3, 0, 1, 1, -1, 2, 2, -0.5f, 0};
    float want[B * D];
    CHECK_OK(pert_tape_vjp(ta, g, want));
    memcpy(buf, g, sizeof g);
    CHECK_OK(pert_tape_vjp(tb, buf, buf));
    CHECK(same(buf, want, B * D));
    memcpy(buf + 1, g, sizeof g);
    CHECK_OK(pert_tape_vjp(tb, buf + 1, buf));
    CHECK(same(buf, want, B * D));

    CHECK_OK(pert_tape_jvp(ta, g, want));
    memcpy(buf, g, sizeof g);
    CHECK_OK(pert_tape_jvp(tb, buf, buf));
    CHECK(same(buf, want, B * D));

    float jac_a[B * D * D], jac_b[B * D * D];
    CHECK_OK(pert_tape_jacobian(ta, jac_a));
    CHECK_OK(pert_tape_jacobian(tb, jac_b));
    CHECK(same(jac_a, jac_b, B * D * D));
    CHECK(same_objective(ta, tb, B));
    pert_tape_free(ta);
    pert_tape_free(tb);
    pert_op_free(a);
    pert_op_free(b);
    pert_op_free(s);
  }
  return true;
}

/* grad_theta over theta, over y_true, and the loss over the first entries of theta. */
static bool fenchel_young_in_place(void) {
  pert_config *c = config(PERT_BASELINE_SAMPLE_MEAN);
  CHECK(c);
  pert_op *ops[4];
  for (int i = 0; i < 4; i++) CHECK((ops[i] = make(c)));
  pert_config_free(c);
  const float y_true[B * D] = {0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1};
  float loss[B], grad[B * D];
  CHECK_OK(pert_fenchel_young(ops[0], THETA, y_true, B, loss, grad));

  float t[B * D], l[B];
  memcpy(t, THETA, sizeof t);
  CHECK_OK(pert_fenchel_young(ops[1], t, y_true, B, l, t)); /* grad over theta */
  CHECK(same(t, grad, B * D) && same(l, loss, B));

  float yt[B * D];
  memcpy(yt, y_true, sizeof yt);
  CHECK_OK(pert_fenchel_young(ops[2], THETA, yt, B, l, yt)); /* grad over y_true */
  CHECK(same(yt, grad, B * D) && same(l, loss, B));

  memcpy(t, THETA, sizeof t);
  memcpy(yt, y_true, sizeof yt);
  CHECK_OK(pert_fenchel_young(ops[3], t, yt, B, t, yt)); /* loss over theta[0..B) */
  CHECK(same(t, loss, B) && same(yt, grad, B * D));
  for (int i = 0; i < 4; i++) pert_op_free(ops[i]);
  return true;
}

/* Two-phase: the output over the solutions handed back. */
static bool draw_finish_in_place(void) {
  pert_config *c = config(PERT_BASELINE_SAMPLE_MEAN);
  CHECK(c);
  pert_op *op = NULL;
  CHECK_OK(pert_op_new_external(c, SHAPE, 1, SHAPE, 1, &op));
  pert_config_free(c);
  pert_draw *draw = NULL;
  CHECK_OK(pert_draw_new(op, THETA, B, &draw));
  size_t rows = pert_draw_count(draw);
  float *sol = malloc(rows * D * sizeof *sol);
  CHECK(sol);
  CHECK(solve_argmax(&DD, pert_draw_inputs(draw), rows, sol) == 0);
  float y[B * D];
  pert_tape *ta = NULL, *tb = NULL;
  CHECK_OK(pert_draw_finish(draw, sol, y, &ta));
  CHECK_OK(pert_draw_finish(draw, sol, sol, &tb)); /* output over the first rows */
  CHECK(same(sol, y, B * D));
  float ja[B * D * D], jb[B * D * D];
  CHECK_OK(pert_tape_jacobian(ta, ja));
  CHECK_OK(pert_tape_jacobian(tb, jb));
  CHECK(same(ja, jb, B * D * D));
  pert_tape_free(ta);
  pert_tape_free(tb);
  free(sol);
  pert_draw_free(draw);
  pert_op_free(op);
  return true;
}

/* A device solver (pert_op_new_device) of the argmax on host memory: a CPU op of such a
 * solver runs the chunked libtorch path. */
static int32_t device_argmax(void *user_data, const struct pert_solve_info *info, const float *x, size_t count,
                             float *y, void *stream) {
  (void)info, (void)stream;
  return solve_argmax(user_data, x, count, y);
}

/* The argmax as a per-worker solver (pert_op_new_ex). */
static int32_t worker_argmax(void *user_data, const struct pert_solve_info *info, const float *x, size_t count,
                             float *y) {
  (void)info;
  return solve_argmax(user_data, x, count, y);
}

/* pert_forward reads theta in place (borrowed for the call): a tape must hold nothing of
 * the caller's buffer. Forward with a tape from a heap copy of theta, which is then
 * overwritten (with values that would change every product) and freed (AddressSanitizer,
 * `make sanitizers`, reports any later read of it), then the tape's VJP, JVP and
 * objective: the same bits as those of a tape whose theta stayed. For the tape's forms:
 * additive and multiplicative noise (whose Jacobian scales by 1 / theta), each baseline
 * (the clean input's y*(theta) is solved from theta itself), Gumbel, kept scores (N = 1,
 * 16) and Jacobian sums (N = 128), one and two solver threads (two stages on two cores),
 * the host path (of a plain and of a per-worker solver) and the chunked path of a device
 * solver, small and large calls. */
static bool tape_holds_nothing_of_theta(void) {
  enum { BB = 48, DW = 100 };
  static size_t dw = DW;
  static const int64_t shape[1] = {DW};
  static float theta[BB * DW], g[BB * DW], want[BB * DW], got[BB * DW];
  for (size_t i = 0; i < BB * DW; i++) {
    theta[i] = 0.25f + (float)((i * 37) % 101) / 50.0f; /* positive: multiplicative works */
    g[i] = (float)((i * 13) % 7) - 3.0f;
  }
  struct {
    uint32_t noise, perturbation, baseline, samples, threads, solver; /* 0 plain, 1 device, 2 workers */
  } cases[] = {
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_ADDITIVE, PERT_BASELINE_NONE, 1, 1, 0},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_ADDITIVE, PERT_BASELINE_SAMPLE_MEAN, 16, 1, 0},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_ADDITIVE, PERT_BASELINE_CLEAN_INPUT, 16, 2, 0},
      {PERT_NOISE_GUMBEL, PERT_PERTURBATION_ADDITIVE, PERT_BASELINE_SAMPLE_MEAN, 8, 1, 0},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_MULTIPLICATIVE, PERT_BASELINE_NONE, 1, 2, 0},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_MULTIPLICATIVE, PERT_BASELINE_CLEAN_INPUT, 16, 1, 0},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_MULTIPLICATIVE, PERT_BASELINE_SAMPLE_MEAN, 128, 1, 0},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_MULTIPLICATIVE, PERT_BASELINE_CLEAN_INPUT, 16, 1, 1},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_ADDITIVE, PERT_BASELINE_SAMPLE_MEAN, 4, 2, 1},
      {PERT_NOISE_NORMAL, PERT_PERTURBATION_MULTIPLICATIVE, PERT_BASELINE_CLEAN_INPUT, 16, 2, 2},
  };
  for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
    for (size_t batch = 2; batch <= BB; batch += BB - 2) {
      pert_config *c = NULL;
      CHECK_OK(pert_config_new(&c));
      CHECK_OK(pert_config_set_noise(c, cases[k].noise));
      CHECK_OK(pert_config_set_perturbation(c, cases[k].perturbation));
      CHECK_OK(pert_config_set_baseline(c, cases[k].baseline));
      CHECK_OK(pert_config_set_num_samples(c, cases[k].samples));
      CHECK_OK(pert_config_set_threads(c, cases[k].threads));
      CHECK_OK(pert_config_set_sigma(c, 0.3));
      CHECK_OK(pert_config_set_device(c, cases[k].solver == 1 ? "cpu" : test_device()));
      pert_op *a = NULL, *b = NULL;
      if (cases[k].solver == 1) {
        CHECK_OK(pert_op_new_device(c, shape, 1, shape, 1, device_argmax, &dw, &a));
        CHECK_OK(pert_op_new_device(c, shape, 1, shape, 1, device_argmax, &dw, &b));
      } else if (cases[k].solver == 2) {
        CHECK_OK(pert_op_new_ex(c, shape, 1, shape, 1, worker_argmax, &dw, NULL, NULL, &a));
        CHECK_OK(pert_op_new_ex(c, shape, 1, shape, 1, worker_argmax, &dw, NULL, NULL, &b));
      } else {
        CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &dw, &a));
        CHECK_OK(pert_op_new(c, shape, 1, shape, 1, solve_argmax, &dw, &b));
      }
      pert_config_free(c);
      pert_tape *ta = NULL, *tb = NULL;
      float *kept = malloc(batch * DW * sizeof *kept);
      CHECK(kept);
      memcpy(kept, theta, batch * DW * sizeof *kept);
      CHECK_OK(pert_forward(a, theta, batch, want, &ta));
      CHECK_OK(pert_forward(b, kept, batch, got, &tb));
      CHECK(same(got, want, batch * DW));
      for (size_t i = 0; i < batch * DW; i++) kept[i] = -1e6f - (float)i; /* theta changes */
      free(kept);                                                          /* and goes */
      CHECK_OK(pert_tape_vjp(ta, g, want));
      CHECK_OK(pert_tape_vjp(tb, g, got));
      if (!same(got, want, batch * DW)) {
        fprintf(stderr, "  VJP, case %zu, batch %zu\n", k, batch);
        return false;
      }
      CHECK_OK(pert_tape_jvp(ta, g, want));
      CHECK_OK(pert_tape_jvp(tb, g, got));
      CHECK(same(got, want, batch * DW));
      CHECK(same_objective(ta, tb, batch));
      pert_tape_free(ta);
      pert_tape_free(tb);
      pert_op_free(a);
      pert_op_free(b);
    }
  }
  return true;
}

int main(void) {
  const test_case tests[] = {
      TEST(forward_vjp_jvp_objective_in_place),
      TEST(fenchel_young_in_place),
      TEST(draw_finish_in_place),
      TEST(tape_holds_nothing_of_theta),
  };
  return run_tests(tests, sizeof tests / sizeof tests[0]);
}
