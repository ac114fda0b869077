/* A tiny test harness: bool test functions, a runner, non-zero exit on failure. */
#ifndef PERT_TEST_HARNESS_H
#define PERT_TEST_HARNESS_H

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "perturbations.h"

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      return false;                                                              \
    }                                                                            \
  } while (0)

/* Checks a status and prints the library's message when it is not the expected one. */
#define CHECK_STATUS(expected, call)                                                   \
  do {                                                                                 \
    pert_status got_ = (call);                                                         \
    if (got_ != (expected)) {                                                          \
      char msg_[512];                                                                  \
      pert_last_error(msg_, sizeof msg_);                                              \
      fprintf(stderr, "  %s:%d: %s returned %s, expected %s (last error: %s)\n",       \
              __FILE__, __LINE__, #call, pert_status_name(got_),                       \
              pert_status_name(expected), msg_);                                       \
      return false;                                                                    \
    }                                                                                  \
  } while (0)

#define CHECK_OK(call) CHECK_STATUS(PERT_STATUS_OK, call)

/* |got - want| <= tol, printed on failure. */
#define CHECK_NEAR(got, want, tol)                                                     \
  do {                                                                                 \
    double g_ = (got), w_ = (want), t_ = (tol);                                        \
    if (!(fabs(g_ - w_) <= t_)) {                                                      \
      fprintf(stderr, "  %s:%d: %s = %.6g, expected %.6g +- %.3g\n", __FILE__,         \
              __LINE__, #got, g_, w_, t_);                                             \
      return false;                                                                    \
    }                                                                                  \
  } while (0)

/* The last error message contains `needle`. */
static inline bool last_error_contains(const char *needle) {
  char msg[512];
  pert_last_error(msg, sizeof msg);
  if (strstr(msg, needle) == NULL) {
    fprintf(stderr, "  last error \"%s\" lacks \"%s\"\n", msg, needle);
    return false;
  }
  return true;
}

typedef struct {
  const char *name;
  bool (*fn)(void);
} test_case;

static inline int run_tests(const test_case *tests, size_t n) {
  int failed = 0;
  for (size_t i = 0; i < n; i++) {
    bool ok = tests[i].fn();
    printf("%s %s\n", ok ? "ok  " : "FAIL", tests[i].name);
    failed += !ok;
  }
  printf("%d passed, %d failed\n", (int)n - failed, failed);
  return failed ? 1 : 0;
}

#define TEST(name) {#name, name}

/* The device the closed-form tests run on: $PERT_TEST_DEVICE ("cuda" on a GPU machine,
 * see scripts/gpu-check.sh), else "cpu". */
static inline const char *test_device(void) {
  const char *d = getenv("PERT_TEST_DEVICE");
  return d && *d ? d : "cpu";
}

#endif
