/* libFuzzer harness: the input is a program of C API calls with random arguments (shapes,
 * ranks, sizes near overflow, NaN/Inf/denormals, NULLs, solvers that fail, write NaN or
 * write nothing, handles freed and then passed as NULL). Every call must return a status
 * (never crash, never read or write outside the buffers it was given), and on error leave
 * its outputs untouched. Built with -fsanitize=fuzzer,address,undefined by make check-deep. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "perturbations.h"

static unsigned long long api_calls;

static void report(void) { fprintf(stderr, "fuzz_api: %llu C API calls\n", api_calls); }

typedef struct {
  const uint8_t *p;
  size_t n;
} input;

static uint64_t take(input *in, size_t bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < bytes && in->n; i++, in->p++, in->n--) v |= (uint64_t)*in->p << (8 * i);
  return v;
}

static float take_float(input *in) {
  switch (take(in, 1) % 8) {
    case 0: return NAN;
    case 1: return INFINITY;
    case 2: return 1e-40f; /* denormal */
    case 3: return -0.0f;
    default: {
      uint32_t bits = (uint32_t)take(in, 4);
      float f;
      memcpy(&f, &bits, sizeof f);
      return isfinite(f) && fabsf(f) < 1e6f ? f : (float)(bits % 1000) / 100.0f;
    }
  }
}

/* Solvers: user_data is the behaviour; outputs have `o` entries per row. */
typedef struct {
  int behaviour;
  size_t d, o;
} solver_state;

static int32_t solver(void *user_data, const float *x, size_t count, float *y) {
  solver_state *s = user_data;
  switch (s->behaviour) {
    case 0: /* fine: thresholds of the first inputs */
      for (size_t r = 0; r < count; r++)
        for (size_t i = 0; i < s->o; i++) y[r * s->o + i] = x[r * s->d + i % s->d] > 0 ? 1.0f : 0.0f;
      return 0;
    case 1: return -3; /* fails */
    case 2:            /* writes NaN */
      for (size_t i = 0; i < count * s->o; i++) y[i] = NAN;
      return 0;
    default: return 0; /* writes nothing */
  }
}

#define MAX_NUMEL 64
#define MAX_BATCH 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static int registered;
  if (!registered) registered = 1, atexit(report);
  input in = {data, size};
  pert_config *config = NULL;
  pert_op *op = NULL;
  pert_tape *tape = NULL;
  pert_draw *draw = NULL;
  solver_state state = {0, 1, 1};
  float theta[MAX_BATCH * MAX_NUMEL], out[MAX_BATCH * MAX_NUMEL * MAX_NUMEL], grad[MAX_BATCH * MAX_NUMEL];
  char message[64];
  size_t batch = 1;
  api_calls++;
  pert_config_new(&config);
  for (int steps = 0; steps < 24 && in.n; steps++) {
    api_calls++;
    switch (take(&in, 1) % 20) {
      case 0: pert_config_set_num_samples(config, take(&in, 1) % 8 == 0 ? take(&in, 8) % 3 * UINT64_MAX : take(&in, 1) % 40); break;
      case 1: pert_config_set_sigma(config, (double)take_float(&in)); break;
      case 2: pert_config_set_noise(config, (uint32_t)take(&in, 1) % 3); break;
      case 3: pert_config_set_seed(config, take(&in, 8)); break;
      case 4: {
        static const char *devices[] = {"auto", "cpu", "cuda", "cuda:7", "", "gpu", "cpu "};
        pert_config_set_device(config, take(&in, 1) % 8 == 7 ? NULL : devices[take(&in, 1) % 7]);
        break;
      }
      case 5: pert_config_set_threads(config, (uint32_t)take(&in, 1) % 5); break;
      case 6: pert_config_set_perturbation(config, (uint32_t)take(&in, 1) % 3); break;
      case 7: pert_config_set_baseline(config, (uint32_t)take(&in, 1) % 4); break;
      case 8: pert_config_set_antithetic(config, take(&in, 1) & 1); break;
      case 9: pert_config_set_sense(config, (uint32_t)take(&in, 1) % 3); break;
      case 10: pert_config_set_chunk_bytes(config, take(&in, 2)); break;
      case 11: { /* a new op: random ranks and dims, some near overflow */
        int64_t ins[3], outs[3];
        size_t ir = take(&in, 1) % 4, orank = take(&in, 1) % 4;
        size_t d = 1, o = 1;
        for (size_t i = 0; i < 3; i++) {
          uint64_t k = take(&in, 1);
          ins[i] = k == 255 ? INT64_MAX / 2 : (int64_t)(k % 6) - 1;
          outs[i] = (int64_t)(take(&in, 1) % 5);
        }
        for (size_t i = 0; i < ir; i++) d *= ins[i] > 0 ? (size_t)ins[i] : 1;
        for (size_t i = 0; i < orank; i++) o *= outs[i] > 0 ? (size_t)outs[i] : 1;
        pert_op_free(op);
        op = NULL;
        pert_tape_free(tape);
        tape = NULL;
        state.behaviour = (int)(take(&in, 1) % 4);
        state.d = d, state.o = o;
        int kind = (int)(take(&in, 1) % 3);
        if (kind == 0)
          pert_op_new(config, ir ? ins : NULL, ir, orank ? outs : NULL, orank, take(&in, 1) % 16 ? solver : NULL, &state, &op);
        else if (kind == 1)
          pert_op_new_builtin(config, (uint32_t)take(&in, 1) % 4, (int64_t)(take(&in, 1) % 8) - 1, ir ? ins : NULL, ir, &op);
        else
          pert_op_new_external(config, ir ? ins : NULL, ir, orank ? outs : NULL, orank, &op);
        if (op && (pert_op_input_numel(op) > MAX_NUMEL || pert_op_output_numel(op) > MAX_NUMEL)) {
          /* too big for this harness's buffers (the library checked the shape) */
          pert_op_free(op);
          op = NULL;
        }
        break;
      }
      case 12: /* forward (or a plain solve), maybe with a tape, maybe with NULL buffers or a huge batch */
        if (op) {
          size_t d = pert_op_input_numel(op);
          batch = take(&in, 1) % (MAX_BATCH + 1);
          for (size_t i = 0; i < batch * d; i++) theta[i] = take_float(&in);
          size_t claimed = take(&in, 1) % 16 == 0 ? SIZE_MAX / (d + 1) : batch; /* near overflow: refused before any read */
          pert_tape_free(tape);
          tape = NULL;
          if (take(&in, 1) % 8 == 0) { /* the plain solve, with the same arguments */
            pert_op_solve(op, take(&in, 1) % 16 ? theta : NULL, claimed, take(&in, 1) % 16 ? out : NULL);
            break;
          }
          pert_forward(op, take(&in, 1) % 16 ? theta : NULL, claimed, take(&in, 1) % 16 ? out : NULL,
                       take(&in, 1) & 1 ? &tape : NULL);
          if (tape && pert_tape_batch(tape) != batch) abort();
        }
        break;
      case 13: /* VJP / JVP / Jacobian / objective on the tape, or on NULL */
        if (tape) {
          size_t n = pert_tape_batch(tape) * MAX_NUMEL;
          for (size_t i = 0; i < n && i < sizeof grad / sizeof grad[0]; i++) grad[i] = take_float(&in);
          switch (take(&in, 1) % 4) {
            case 0: pert_tape_vjp(tape, grad, out); break;
            case 1: pert_tape_jvp(tape, grad, out); break;
            case 2: pert_tape_jacobian(tape, out); break;
            default: pert_tape_objective(tape, out); break;
          }
        } else {
          pert_tape_vjp(NULL, grad, out);
        }
        break;
      case 14:
        if (op) {
          size_t d = pert_op_input_numel(op);
          batch = take(&in, 1) % (MAX_BATCH + 1);
          for (size_t i = 0; i < batch * d; i++) theta[i] = take_float(&in), grad[i] = take_float(&in);
          pert_fenchel_young(op, theta, grad, batch, out, take(&in, 1) & 1 ? out + MAX_BATCH : NULL);
        }
        break;
      case 15: /* two-phase: draw, then finish with random solutions (or garbage) */
        if (op) {
          size_t d = pert_op_input_numel(op);
          batch = take(&in, 1) % (MAX_BATCH + 1);
          for (size_t i = 0; i < batch * d; i++) theta[i] = take_float(&in);
          pert_draw_free(draw);
          draw = NULL;
          pert_draw_new(op, theta, batch, &draw);
          if (draw) {
            size_t rows = pert_draw_count(draw), o = pert_op_output_numel(op);
            if (rows * o <= sizeof out / sizeof out[0] / 2) {
              float *solutions = out + sizeof out / sizeof out[0] / 2;
              for (size_t i = 0; i < rows * o; i++) solutions[i] = take(&in, 1) % 32 ? (float)(take(&in, 1) % 3) : NAN;
              pert_tape *t = NULL;
              pert_draw_finish(draw, solutions, out, take(&in, 1) & 1 ? &t : NULL);
              pert_tape_free(t);
            }
          }
        }
        break;
      case 16: pert_tape_free(tape); tape = NULL; break;
      case 17: pert_op_free(op); op = NULL; break; /* a tape made by it stays valid */
      case 18: pert_last_error(take(&in, 1) & 1 ? message : NULL, take(&in, 1) % (sizeof message + 1)); break;
      default: pert_status_name((pert_status)take(&in, 4)); pert_version(); break;
    }
  }
  pert_draw_free(draw);
  pert_tape_free(tape);
  pert_op_free(op);
  pert_config_free(config);
  return 0;
}
