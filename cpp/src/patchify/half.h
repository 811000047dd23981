// IEEE 754 binary16 ("half") <-> float32, exact, for the whole core: the flat index's float16 storage and the
// tiler's float16 output both use these, so both agree bit for bit with numpy's astype(float16) and with the
// F16C instructions (_mm256_cvtps_ph with round-to-nearest-even, _mm256_cvtph_ps) that the SIMD kernels use.
//
// Integer arithmetic only: no float operation whose result depends on the FPU's rounding mode or on the
// flush-to-zero / denormals-are-zero bits (a library built with -ffast-math may set them in the whole process,
// and a trick such as "add a magic float to round into a subnormal" then silently returns zero).
#pragma once

#include <cstdint>
#include <cstring>

namespace patchify {

// half bits -> float. Every half is exactly representable as a float (subnormals become normal floats);
// inf keeps its sign, NaN keeps its sign and payload.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 31) {  // inf or NaN
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {  // normal: rebias the exponent (15 -> 127)
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  } else if (mant == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal mant * 2^-24: shift the leading one up to the implicit bit, lowering the exponent
    int e = 127 - 15 + 1;  // exponent of 2^-14, the subnormal scale
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// float -> half bits, round to nearest, ties to even (numpy's astype(float16), _cvtps_ph with
// _MM_FROUND_TO_NEAREST_INT). Overflow (|x| >= 65520) gives inf; values below half the smallest subnormal
// (2^-25, a tie that goes to even zero) give a signed zero; NaN stays NaN with its sign, quietened and with the
// top payload bits kept, as F16C does.
inline uint16_t float_to_half(float value) {
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  const uint16_t sign = static_cast<uint16_t>((f >> 16) & 0x8000u);
  const uint32_t abs = f & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs & 0x7fffffu) >> 13));  // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // inf, or rounds to >= 65536
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (abs < 0x33000000u) return sign;  // < 2^-25 rounds to zero (2^-25 itself is a tie to even zero)
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    // value = mant * 2^(e - 150); in half subnormal units (2^-24) that is mant >> (126 - e), e in [102, 112].
    const int shift = 126 - static_cast<int>(abs >> 23);
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    const uint32_t rounded = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | rounded);  // rounded may reach 0x400: the smallest normal, correctly
  }
  // Normal: rebias the exponent, keep 10 mantissa bits, round the 13 dropped bits to nearest even (a carry into
  // the exponent is the correct result, up to 0x7c00 = inf handled above).
  const uint32_t rebased = abs - (static_cast<uint32_t>(127 - 15) << 23);
  const uint32_t q = rebased >> 13;
  const uint32_t rem = rebased & 0x1fffu;
  const uint32_t rounded = q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u);
  return static_cast<uint16_t>(sign | rounded);
}

}  // namespace patchify
