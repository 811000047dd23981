// Round to the nearest integer value, ties to even: what std::nearbyint does in the default rounding mode, inline.
// Compiled for baseline x86-64 (no SSE4.1 roundss) and without -ffast-math, std::nearbyint is a libm call, a few ns
// each: the per-query quantisations (the fast-scan table's 16 M entries, the int8 coarse prefilter's query codes)
// paid microseconds for it. Adding and subtracting 1.5 x 2^23 (float) or 1.5 x 2^52 (double) leaves the rounded
// value, for |x| below 2^22 / 2^51 (every caller's values are far below: table steps <= 255, codes <= 32767); the
// compiler may not fold it (no -ffast-math, and SSE arithmetic has no excess precision on x86-64).
#pragma once

#include <cmath>

namespace patchify {

inline float round_nearest(float x) {
  const float magic = std::copysign(12582912.0f, x);  // 1.5 * 2^23, branch-free (signs are random)
  return (x + magic) - magic;
}

inline double round_nearest(double x) {
  const double magic = std::copysign(6755399441055744.0, x);  // 1.5 * 2^52
  return (x + magic) - magic;
}

}  // namespace patchify
