/* The helpers of the C timing programs (bench/forward_vjp.c, bench/loss_step.c): a
 * monotonic clock, a comparison for qsort of doubles, and a status check that prints the
 * library's message and exits. */
#ifndef PERT_BENCH_UTIL_H
#define PERT_BENCH_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "perturbations.h"

static inline double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static inline int by_value(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static inline void check(pert_status s) {
  if (s != PERT_STATUS_OK) {
    char message[512];
    pert_last_error(message, sizeof message);
    fprintf(stderr, "error: %s\n", message);
    exit(1);
  }
}

#endif
