// float <-> half (patchify/half.h) against references that share no code with it: every half's value computed
// with ldexp, float -> half as "the nearest of all finite halves, ties to the even one" found by binary search,
// and, where the CPU has F16C, the hardware conversions the SIMD kernels use. Checks all 65536 halves, the
// midpoints between neighbouring halves (and the floats just beside them), millions of random floats and the
// edge cases: signed zeros, subnormals, the normal/subnormal boundary, overflow to inf, inf and NaN.
#include "patchify/half.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "patchify/cpu_features.h"

using patchify::float_to_half;
using patchify::half_to_float;

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

bool half_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }

// The value of a finite or infinite half, by the definition (IEEE 754 binary16).
double half_value(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  const double sign = (h & 0x8000u) ? -1.0 : 1.0;
  if (exp == 31) return sign * std::numeric_limits<double>::infinity();
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  return sign * std::ldexp(static_cast<double>(1024 + mant), exp - 25);
}

// Magnitudes of the non-negative halves 0x0000..0x7c00 in increasing order; 0x7c00 (inf) stands at 65536, the
// value a float must round to (with an unbounded exponent) to overflow.
const std::vector<double>& magnitudes() {
  static const std::vector<double> table = [] {
    std::vector<double> t(0x7c01);
    for (uint32_t h = 0; h < 0x7c00; ++h) t[h] = half_value(static_cast<uint16_t>(h));
    t[0x7c00] = 65536.0;
    return t;
  }();
  return table;
}

// float -> half by the definition: the nearest half, ties to the even bit pattern; inf stays inf; NaN is
// handled by the callers.
uint16_t reference_float_to_half(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const double a = std::fabs(static_cast<double>(f));
  const auto& t = magnitudes();
  if (a >= 65536.0) return sign | 0x7c00u;  // includes inf
  // t[lo] <= a < t[lo + 1]
  const size_t lo = static_cast<size_t>(std::upper_bound(t.begin(), t.end(), a) - t.begin()) - 1;
  const double below = a - t[lo], above = t[lo + 1] - a;
  size_t h = lo;
  if (above < below || (above == below && (lo & 1u))) h = lo + 1;
  return static_cast<uint16_t>(sign | h);
}

#if PATCHIFY_X86
__attribute__((target("f16c"))) uint16_t hardware_float_to_half(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float hardware_half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#endif

bool has_f16c() {
#if PATCHIFY_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

int mismatches = 0;

// One float: the converter against the references (definition for non-NaN, F16C when present, NaN rules).
void check_float(float f) {
  const uint16_t got = float_to_half(f);
  bool ok;
  if (std::isnan(f)) {
    // NaN: stays NaN, keeps its sign, quiet, top payload bits kept.
    const uint32_t u = bits_of(f);
    ok = half_is_nan(got) && ((got & 0x8000u) != 0) == ((u >> 31) != 0) && (got & 0x200u) &&
         (got & 0x1ffu) == ((u >> 13) & 0x1ffu);
  } else {
    ok = got == reference_float_to_half(f);
  }
#if PATCHIFY_X86
  if (has_f16c()) ok = ok && got == hardware_float_to_half(f);
#endif
  if (!ok && mismatches++ < 10)
    std::fprintf(stderr, "float_to_half(%a) [bits %08x] = %04x, reference %04x\n", static_cast<double>(f), bits_of(f),
                 got, std::isnan(f) ? 0 : reference_float_to_half(f));
}

void test_every_half() {
  const bool f16c = has_f16c();
  int bad_value = 0, bad_round_trip = 0, bad_hardware = 0;
  for (uint32_t i = 0; i < 0x10000; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = half_to_float(h);
    if (half_is_nan(h)) {
      // NaN: NaN float with the same sign and payload; back to half it comes out quietened, otherwise equal.
      const uint32_t u = bits_of(f);
      bad_value += !(std::isnan(f) && (u >> 31) == (h >> 15) && ((u >> 13) & 0x3ffu) == (h & 0x3ffu));
      bad_round_trip += float_to_half(f) != (h | 0x200u);
      continue;
    }
    // Exact value (and the sign of zero), and back to the same bits.
    bad_value += !(static_cast<double>(f) == half_value(h) && std::signbit(f) == ((h & 0x8000u) != 0));
    bad_round_trip += float_to_half(f) != h;
#if PATCHIFY_X86
    if (f16c) bad_hardware += bits_of(f) != bits_of(hardware_half_to_float(h));
#endif
  }
  (void)f16c;
  CHECK(bad_value == 0);
  CHECK(bad_round_trip == 0);
  CHECK(bad_hardware == 0);
}

void test_midpoints() {
  // The exact midpoint between two neighbouring halves (representable as a float: 12 significant bits), and the
  // floats one ulp below and above it: where round-to-nearest-even is decided.
  const auto& t = magnitudes();
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float mid = static_cast<float>((t[h] + t[h + 1]) / 2);
    CHECK(static_cast<double>(mid) == (t[h] + t[h + 1]) / 2);
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f)}) {
      check_float(f);
      check_float(-f);
    }
  }
}

void test_edge_cases() {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(float_to_half(0.0f) == 0x0000);
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(float_to_half(1.0f) == 0x3c00);
  CHECK(float_to_half(-2.0f) == 0xc000);
  CHECK(float_to_half(0.1f) == 0x2e66);
  CHECK(float_to_half(65504.0f) == 0x7bff);                          // largest half
  CHECK(float_to_half(std::nextafter(65520.0f, 0.0f)) == 0x7bff);    // just below the overflow tie
  CHECK(float_to_half(65520.0f) == 0x7c00);                          // tie -> even: inf
  CHECK(float_to_half(70000.0f) == 0x7c00);
  CHECK(float_to_half(-1e30f) == 0xfc00);
  CHECK(float_to_half(inf) == 0x7c00 && float_to_half(-inf) == 0xfc00);
  CHECK(float_to_half(1.0f + 1.0f / 2048) == 0x3c00);                // tie -> even (down)
  CHECK(float_to_half(1.0f + 3.0f / 2048) == 0x3c02);                // tie -> even (up)
  CHECK(float_to_half(std::ldexp(1.0f, -14)) == 0x0400);             // smallest normal
  CHECK(float_to_half(std::ldexp(1023.5f, -24)) == 0x0400);          // largest subnormal + half ulp: rounds up to normal
  CHECK(float_to_half(std::ldexp(1023.0f, -24)) == 0x03ff);          // largest subnormal
  CHECK(float_to_half(std::ldexp(1.0f, -24)) == 0x0001);             // smallest subnormal
  CHECK(float_to_half(std::ldexp(1.0f, -25)) == 0x0000);             // tie -> even zero
  CHECK(float_to_half(-std::ldexp(1.0f, -25)) == 0x8000);
  CHECK(float_to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_half(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(float_to_half(std::ldexp(3.0f, -25)) == 0x0002);             // 1.5 subnormal units: tie -> even (up)
  CHECK(float_to_half(std::numeric_limits<float>::denorm_min()) == 0x0000);
  CHECK(float_to_half(-std::numeric_limits<float>::denorm_min()) == 0x8000);
  CHECK(float_to_half(std::numeric_limits<float>::min()) == 0x0000);  // smallest normal float
  CHECK(half_is_nan(float_to_half(nan)) && half_is_nan(float_to_half(-nan)));
  CHECK((float_to_half(-nan) & 0x8000u) && !(float_to_half(nan) & 0x8000u));
  CHECK(float_to_half(float_of(0x7f800001u)) == 0x7e00);             // signalling NaN: quietened, not inf
  CHECK(float_to_half(float_of(0xffc02000u)) == 0xfe01);             // payload's top bits kept
  CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_to_float(0x03ff) == std::ldexp(1023.0f, -24));
  CHECK(half_to_float(0x7bff) == 65504.0f);
  CHECK(half_to_float(0x7c00) == inf && half_to_float(0xfc00) == -inf);
  CHECK(std::isnan(half_to_float(0x7e00)) && std::isnan(half_to_float(0x7c01)));
  CHECK(std::signbit(half_to_float(0x8000)) && half_to_float(0x8000) == 0.0f);
  const float specials[] = {0.0f, -0.0f, inf, -inf, nan, -nan, float_of(0x7f800001u), float_of(0xff800001u),
                            std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest(),
                            std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
                            65504.0f, 65519.0f, 65520.0f, 65536.0f, std::ldexp(1.0f, -14), std::ldexp(1.0f, -24),
                            std::ldexp(1.0f, -25), std::ldexp(1.0f, -26)};
  for (float f : specials) {
    check_float(f);
    check_float(std::nextafter(f, 0.0f));
    check_float(std::nextafter(f, inf));
  }
}

void test_random_floats() {
  std::mt19937 rng(12345);
  // Any bit pattern (mostly far outside the half range, some NaN), then floats inside and around the half
  // range: random sign, exponent 2^-27 .. 2^17 and mantissa.
  for (int i = 0; i < 2000000; ++i) check_float(float_of(static_cast<uint32_t>(rng())));
  for (int i = 0; i < 4000000; ++i) {
    const uint32_t sign = (rng() & 1u) << 31;
    const uint32_t exp = 127 - 27 + rng() % 45;
    check_float(float_of(sign | (exp << 23) | (rng() & 0x7fffffu)));
  }
}

}  // namespace

int main() {
  test_every_half();
  test_midpoints();
  test_edge_cases();
  test_random_floats();
  CHECK(mismatches == 0);
  std::printf("float <-> half checked against the definition%s\n", has_f16c() ? " and F16C" : "");
  return TEST_MAIN_RESULT();
}
