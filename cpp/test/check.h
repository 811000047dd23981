// Tiny assertion helpers for the C++ tests: each test is a plain executable run by ctest; it prints every
// failed check with its location and exits non-zero if any failed.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace patchify_test {
inline int& failures() {
  static int count = 0;
  return count;
}
}  // namespace patchify_test

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++patchify_test::failures();                                               \
    }                                                                            \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                              \
  do {                                                                                     \
    const double check_a_ = (a), check_b_ = (b);                                           \
    if (!(std::fabs(check_a_ - check_b_) <= (tol))) {                                      \
      std::fprintf(stderr, "%s:%d: CHECK_NEAR failed: %s = %g vs %s = %g (tol %g)\n", __FILE__, \
                   __LINE__, #a, check_a_, #b, check_b_, static_cast<double>(tol));        \
      ++patchify_test::failures();                                                         \
    }                                                                                      \
  } while (0)

#define CHECK_THROWS(expr, exception_type)                                               \
  do {                                                                                   \
    bool thrown_ = false;                                                                \
    try {                                                                                \
      (void)(expr);                                                                      \
    } catch (const exception_type&) {                                                    \
      thrown_ = true;                                                                    \
    }                                                                                    \
    if (!thrown_) {                                                                      \
      std::fprintf(stderr, "%s:%d: expected %s from %s\n", __FILE__, __LINE__, #exception_type, #expr); \
      ++patchify_test::failures();                                                       \
    }                                                                                    \
  } while (0)

#define TEST_MAIN_RESULT() (patchify_test::failures() == 0 ? 0 : (std::fprintf(stderr, "%d check(s) failed\n", patchify_test::failures()), 1))
