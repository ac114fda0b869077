/* Small solvers shared by the C tests. user_data points to the problem size. */
#ifndef PERT_TEST_SOLVERS_H
#define PERT_TEST_SOLVERS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* One-hot argmax over d = *(size_t *)user_data entries. */
static inline int32_t solve_argmax(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    size_t best = 0;
    for (size_t i = 1; i < d; i++)
      if (x[r * d + i] > x[r * d + best]) best = i;
    for (size_t i = 0; i < d; i++) y[r * d + i] = i == best ? 1.0f : 0.0f;
  }
  return 0;
}

/* Elementwise sign (+1 for x >= 0). */
static inline int32_t solve_sign(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t i = 0; i < count * d; i++) y[i] = x[i] >= 0.0f ? 1.0f : -1.0f;
  return 0;
}

/* The identity. */
static inline int32_t solve_identity(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t i = 0; i < count * d; i++) y[i] = x[i];
  return 0;
}

/* The OR over signs: 1 if any entry > 0, else -1; one scalar per problem. */
static inline int32_t solve_or(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    int any = 0;
    for (size_t i = 0; i < d; i++) any |= x[r * d + i] > 0.0f;
    y[r] = any ? 1.0f : -1.0f;
  }
  return 0;
}

/* The documented rule of the built-ins: top-k the k largest in the order of total_cmp
 * (-0 < +0), ties to the first position; ranks 1-based, ties in the order of positions. */
static inline uint32_t total_order(float v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

typedef struct {
  size_t d;
  int64_t k; /* 0: ranks */
} rule;

static inline int32_t solve_by_rule(void *user_data, const float *x, size_t count, float *y) {
  const rule *r = user_data;
  size_t d = r->d;
  for (size_t row = 0; row < count; row++) {
    const float *xs = x + row * d;
    float *ys = y + row * d;
    for (size_t i = 0; i < d; i++) {
      size_t above = 0; /* entries ahead of i in the order */
      for (size_t j = 0; j < d; j++) {
        uint32_t a = total_order(xs[j]), b = total_order(xs[i]);
        if (r->k > 0 ? (a > b || (a == b && j < i)) : (a < b || (a == b && j < i))) above++;
      }
      ys[i] = r->k > 0 ? (above < (size_t)r->k ? 1.0f : 0.0f) : (float)(above + 1);
    }
  }
  return 0;
}

static inline double normal_cdf(double x) { return 0.5 * erfc(-x / sqrt(2.0)); }
static inline double normal_pdf(double x) { return exp(-0.5 * x * x) / sqrt(2.0 * 3.14159265358979323846); }

#endif
