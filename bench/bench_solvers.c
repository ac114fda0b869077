/* The C solver of the benchmark's callback case, as a shared library for ctypes: the
 * shortest path on the 9-node graph of the examples. */
#define _POSIX_C_SOURCE 199309L
#include <time.h>

#include "../examples/c/graph.h"

int32_t bench_shortest_path(void *user_data, const float *costs, size_t count, float *on_path) {
  return shortest_path(user_data, costs, count, on_path);
}

size_t bench_edges(void) { return EDGES; }

const float *bench_costs(void) { return COST; }

int32_t bench_argmax_plain(void *user_data, const float *x, size_t count, float *y);

/* A nearly free solver for the per-row overhead case: one-hot of the largest of the
 * 13 costs (a few nanoseconds a row), the plain argmax below. */
int32_t bench_one_hot(void *user_data, const float *x, size_t count, float *y) {
  (void)user_data;
  size_t d = EDGES;
  return bench_argmax_plain(&d, x, count, y);
}

/* Seconds for `count` rows of bench_one_hot alone, on inputs laid out like the library's
 * (the best of `repeats` runs), to subtract from the library's time. */
double bench_one_hot_alone(size_t count, int repeats) {
  float *x = malloc(count * EDGES * sizeof *x), *y = malloc(count * EDGES * sizeof *y);
  for (size_t i = 0; i < count * EDGES; i++) x[i] = COST[i % EDGES] + 1e-3f * (float)(i % 7);
  double best = 1e30;
  for (int k = 0; k < repeats; k++) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    bench_one_hot(NULL, x, count, y);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double t = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    if (t < best) best = t;
  }
  volatile float sink = y[count * EDGES - 1];
  (void)sink;
  free(x);
  free(y);
  return best;
}

/* One-hot argmax over d = *(size_t *)user_data entries: the C callback of the
 * training-regime table, written as a C programmer would for speed: the largest value in
 * one pass over eight independent lanes (which the compiler can vectorize), then its first
 * position. */
int32_t bench_argmax(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    const float *xr = x + r * d;
    float lane[8], top = xr[0];
    for (int j = 0; j < 8; j++) lane[j] = xr[0];
    size_t i = 0;
    for (; i + 8 <= d; i += 8)
      for (int j = 0; j < 8; j++) lane[j] = xr[i + j] > lane[j] ? xr[i + j] : lane[j];
    for (; i < d; i++) top = xr[i] > top ? xr[i] : top;
    for (int j = 0; j < 8; j++) top = lane[j] > top ? lane[j] : top;
    size_t best = 0;
    while (xr[best] != top) best++;
    float *yr = y + r * d;
    memset(yr, 0, d * sizeof(float));
    yr[best] = 1.0f;
  }
  return 0;
}

/* The same one-hot argmax written the plain way most callbacks are: one loop that keeps
 * the first largest entry, then one that writes the row (the training table's "plain"
 * columns). */
int32_t bench_argmax_plain(void *user_data, const float *x, size_t count, float *y) {
  size_t d = *(const size_t *)user_data;
  for (size_t r = 0; r < count; r++) {
    const float *xr = x + r * d;
    size_t best = 0;
    for (size_t i = 1; i < d; i++)
      if (xr[i] > xr[best]) best = i;
    for (size_t i = 0; i < d; i++) y[r * d + i] = (i == best) ? 1.0f : 0.0f;
  }
  return 0;
}
