// EXPECT for the C++ tests: counts failures and goes on, so one run reports all of them.
#ifndef PERT_TEST_EXPECT_HPP
#define PERT_TEST_EXPECT_HPP

#include <cstdio>

inline int& expect_failures() {
  static int failures = 0;
  return failures;
}

#define EXPECT(cond)                                                    \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "  %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++expect_failures();                                              \
    }                                                                   \
  } while (0)

/// Prints the closing line and returns the exit status.
inline int expect_report() {
  int failed = expect_failures() ? 1 : 0;
  std::printf("%d passed, %d failed\n", 1 - failed, failed);
  return failed;
}

#endif
