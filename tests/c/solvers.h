/* Small solvers shared by the C tests. user_data points to the problem size. */
#ifndef PERT_TEST_SOLVERS_H
#define PERT_TEST_SOLVERS_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

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

static inline double normal_cdf(double x) { return 0.5 * erfc(-x / sqrt(2.0)); }
static inline double normal_pdf(double x) { return exp(-0.5 * x * x) / sqrt(2.0 * 3.14159265358979323846); }

#endif
