// Kernels of the coarse search (which inverted lists an IVFPQ query probes): the fp32 dot products of the query
// with every centroid (the reference ranking), the int8 prefilter's exact integer dot products (int16 query codes
// against int8 centroid codes; AVX2 and AVX-512 BW+VNNI, four queries at a time for batches), and the helpers its
// selection uses. The prefilter's bound and selection live with their data in IVFPQScanner (ivfpq_scan.h).
// Each kernel has a portable version; the SIMD ones are picked at run time (cpu_features.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "patchify/cpu_features.h"

namespace patchify {
namespace detail {

// Eight independent partial sums: without -ffast-math the compiler may not reorder a single float accumulator,
// so a plain loop would run one dependent add per cycle; this form pipelines and vectorises.
inline float dot(const float* a, const float* b, size_t d) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  size_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (size_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// scores[j] = <q, centroids[j]> for n centroids: the native coarse search's dot products (nlist x dim per query,
// the largest dense cost of a search). Baseline version: eight partial sums per row so the adds pipeline.
inline void dots_to_rows_generic(const float* q, const float* rows, size_t n, size_t d, float* scores) {
  for (size_t j = 0; j < n; ++j) scores[j] = dot(q, rows + j * d, d);
}

#if PATCHIFY_X86
// Every AVX2 kernel below sums a row the same way (8 lanes of FMA over i, this reduction, then a scalar FMA
// tail), so a score does not depend on which kernel, or which position in a group, produced it: the batched
// and the one-query coarse searches then pick exactly the same lists.
__attribute__((target("avx2,fma"))) inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float row_dot_avx2(const float* q, const float* r, size_t d) {
  const size_t d8 = d - d % 8;
  __m256 a = _mm256_setzero_ps();
  for (size_t i = 0; i < d8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(r + i), a);
  float s = hsum_avx2(a);
  for (size_t i = d8; i < d; ++i) s = std::fma(q[i], r[i], s);
  return s;
}

// AVX2/FMA version, picked at run time: four rows at a time, each with its own 8-lane accumulator, so four
// independent FMA chains hide the FMA latency and each load of q serves four rows. Written with intrinsics
// because GCC's auto-vectoriser does not find this schedule on its own.
__attribute__((target("avx2,fma"))) inline void dots_to_rows_avx2(const float* q, const float* rows, size_t n,
                                                                    size_t d, float* scores) {
  const size_t d8 = d - d % 8;
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float* r0 = rows + j * d;
    const float* r1 = r0 + d;
    const float* r2 = r1 + d;
    const float* r3 = r2 + d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (size_t i = 0; i < d8; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r1 + i), a1);
      a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r2 + i), a2);
      a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r3 + i), a3);
    }
    float s0 = hsum_avx2(a0), s1 = hsum_avx2(a1), s2 = hsum_avx2(a2), s3 = hsum_avx2(a3);
    for (size_t i = d8; i < d; ++i) {
      s0 = std::fma(q[i], r0[i], s0);
      s1 = std::fma(q[i], r1[i], s1);
      s2 = std::fma(q[i], r2[i], s2);
      s3 = std::fma(q[i], r3[i], s3);
    }
    scores[j] = s0;
    scores[j + 1] = s1;
    scores[j + 2] = s2;
    scores[j + 3] = s3;
  }
  for (; j < n; ++j) scores[j] = row_dot_avx2(q, rows + j * d, d);
}

// Four queries against two rows per step: 8 accumulators, and each 8-float step loads 6 vectors for 8 FMAs (the
// one-query kernel loads 5 for 4), so a block of queries scored against L2-resident rows is bound by the FMA
// units rather than by loads.
__attribute__((target("avx2,fma"))) inline void dots_4q_avx2(const float* const* q, const float* rows, size_t n,
                                                               size_t d, float* const* scores) {
  const size_t d8 = d - d % 8;
  size_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const float* r0 = rows + j * d;
    const float* r1 = r0 + d;
    __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a10 = _mm256_setzero_ps(),
           a11 = _mm256_setzero_ps(), a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps(),
           a30 = _mm256_setzero_ps(), a31 = _mm256_setzero_ps();
    for (size_t i = 0; i < d8; i += 8) {
      const __m256 x0 = _mm256_loadu_ps(r0 + i), x1 = _mm256_loadu_ps(r1 + i);
      const __m256 q0 = _mm256_loadu_ps(q[0] + i), q1 = _mm256_loadu_ps(q[1] + i);
      const __m256 q2 = _mm256_loadu_ps(q[2] + i), q3 = _mm256_loadu_ps(q[3] + i);
      a00 = _mm256_fmadd_ps(q0, x0, a00);
      a01 = _mm256_fmadd_ps(q0, x1, a01);
      a10 = _mm256_fmadd_ps(q1, x0, a10);
      a11 = _mm256_fmadd_ps(q1, x1, a11);
      a20 = _mm256_fmadd_ps(q2, x0, a20);
      a21 = _mm256_fmadd_ps(q2, x1, a21);
      a30 = _mm256_fmadd_ps(q3, x0, a30);
      a31 = _mm256_fmadd_ps(q3, x1, a31);
    }
    const __m256 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int t = 0; t < 4; ++t) {
      float s0 = hsum_avx2(acc[t][0]), s1 = hsum_avx2(acc[t][1]);
      for (size_t i = d8; i < d; ++i) {
        s0 = std::fma(q[t][i], r0[i], s0);
        s1 = std::fma(q[t][i], r1[i], s1);
      }
      scores[t][j] = s0;
      scores[t][j + 1] = s1;
    }
  }
  for (; j < n; ++j)
    for (int t = 0; t < 4; ++t) scores[t][j] = row_dot_avx2(q[t], rows + j * d, d);
}
#endif

inline void dots_to_rows(const float* q, const float* rows, size_t n, size_t d, float* scores) {
#if PATCHIFY_X86
  if (patchify::has_avx2_fma()) return dots_to_rows_avx2(q, rows, n, d, scores);
#endif
  dots_to_rows_generic(q, rows, n, d, scores);
}

// One row's exact dot product, summed exactly as dots_to_rows sums it (the same kernel choice): the one-query
// coarse search rescores its int8 prefilter's shortlist with it and must reproduce the fp32 scores bit for bit.
inline float row_dot(const float* q, const float* r, size_t d) {
#if PATCHIFY_X86
  if (patchify::has_avx2_fma()) return row_dot_avx2(q, r, d);
#endif
  return dot(q, r, d);
}

// The scalar tail of one row's integer dot product: sum over i in [from, d) of q[i] * row[i] (the SIMD kernels'
// leftover codes past their last full vector).
inline int32_t int8_tail_dot(const int16_t* q, const int8_t* row, size_t from, size_t d) {
  int32_t s = 0;
  for (size_t i = from; i < d; ++i) s += int32_t(q[i]) * row[i];
  return s;
}

// Approximate coarse scores from int8 centroids: out[j] = sum_i q[i] * rows[j][i], the query quantised to int16
// and each centroid to int8 (scaled per row by the caller), summed exactly in int32 (the caller keeps
// |q[i]| <= int8_query_limit(d), so no sum overflows). A quarter of the bytes of the fp32 centroids (the one-query
// coarse search streams all of them per query, so bytes are its cost) and twice the float16 kernel's throughput
// (measured at 4096 x 384: 46 vs 101 us); the caller bounds the error and rescores the shortlist exactly. Integer
// sums are exact, so the portable and SIMD kernels give the same numbers.
inline void dots_to_int8_rows_generic(const int16_t* q, const int8_t* rows, size_t n, size_t d, int32_t* out) {
  for (size_t j = 0; j < n; ++j) out[j] = int8_tail_dot(q, rows + j * d, 0, d);
}

// The largest |query code| that keeps every int32 sum of d products with |row code| <= 127 exact (<= int16 max).
inline int32_t int8_query_limit(size_t d) {
  const int64_t limit =
      (int64_t(std::numeric_limits<int32_t>::max()) / 127) / static_cast<int64_t>(std::max<size_t>(d, 1));
  return static_cast<int32_t>(std::min<int64_t>(limit, std::numeric_limits<int16_t>::max()));
}

#if PATCHIFY_X86
constexpr size_t kInt8PrefetchRows = 16;  // 6 KB ahead at dim 384 (in rows: the best of 8/16/32 for the float16
                                          // kernel this one replaced)

__attribute__((target("avx2"))) inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Sixteen int8 codes widened to int16 (a function, not a lambda: a lambda does not inherit the target attribute).
__attribute__((target("avx2"))) inline __m256i load_int8x16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// AVX2: four rows at a time (each load of q serves four), 16 codes per vpmaddwd (int16 x int16 -> int32 pairs).
__attribute__((target("avx2"))) inline void dots_to_int8_rows_avx2(const int16_t* q, const int8_t* rows, size_t n,
                                                                     size_t d, int32_t* out) {
  const size_t d16 = d - d % 16;
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const int8_t* r0 = rows + j * d;
    const int8_t* r1 = r0 + d;
    const int8_t* r2 = r1 + d;
    const int8_t* r3 = r2 + d;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    // The group kInt8PrefetchRows rows ahead, a line per row every 64 codes: the stream would otherwise be read at
    // L3/RAM latency.
    const bool prefetch = j + kInt8PrefetchRows + 4 <= n;
    const char* ahead = prefetch ? reinterpret_cast<const char*>(r0 + kInt8PrefetchRows * d) : nullptr;
    for (size_t i = 0; i < d16; i += 16) {
      if (prefetch && i % 64 == 0)
        for (size_t r = 0; r < 4; ++r) _mm_prefetch(ahead + r * d + i, _MM_HINT_T0);
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i));
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(qv, load_int8x16(r0 + i)));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(qv, load_int8x16(r1 + i)));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(qv, load_int8x16(r2 + i)));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(qv, load_int8x16(r3 + i)));
    }
    int32_t s0 = hsum_epi32_avx2(a0), s1 = hsum_epi32_avx2(a1), s2 = hsum_epi32_avx2(a2), s3 = hsum_epi32_avx2(a3);
    out[j] = s0 + int8_tail_dot(q, r0, d16, d);
    out[j + 1] = s1 + int8_tail_dot(q, r1, d16, d);
    out[j + 2] = s2 + int8_tail_dot(q, r2, d16, d);
    out[j + 3] = s3 + int8_tail_dot(q, r3, d16, d);
  }
  dots_to_int8_rows_generic(q, rows + j * d, n - j, d, out + j);
}

// Four queries against the same rows (a batch's coarse search): each row's codes are widened once for all four.
__attribute__((target("avx2"))) inline void dots_4q_int8_rows_avx2(const int16_t* const* q, const int8_t* rows,
                                                                     size_t n, size_t d, int32_t* const* out) {
  const size_t d16 = d - d % 16;
  for (size_t j = 0; j < n; ++j) {
    const int8_t* r = rows + j * d;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < d16; i += 16) {
      const __m256i c = load_int8x16(r + i);
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[0] + i)), c));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[1] + i)), c));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[2] + i)), c));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[3] + i)), c));
    }
    int32_t s0 = hsum_epi32_avx2(a0), s1 = hsum_epi32_avx2(a1), s2 = hsum_epi32_avx2(a2), s3 = hsum_epi32_avx2(a3);
    out[0][j] = s0 + int8_tail_dot(q[0], r, d16, d);
    out[1][j] = s1 + int8_tail_dot(q[1], r, d16, d);
    out[2][j] = s2 + int8_tail_dot(q[2], r, d16, d);
    out[3][j] = s3 + int8_tail_dot(q[3], r, d16, d);
  }
}

// AVX-512 BW+VNNI versions of the two kernels above: 32 codes widened per load, and vpdpwssd multiplies 32 int16
// pairs and adds them into the int32 lanes in one instruction (measured at 4096 x 384: one query 39 -> 28 us).
// Same integer sums, so the same numbers as the AVX2 and portable kernels.
// The halves by vector-extension shuffles, not _mm512_reduce_add_epi32 / _mm512_castsi512_si256: GCC 12's
// versions of those trip -Wuninitialized in its own header (its *_undefined_* helpers, GCC bug 105593).
__attribute__((target("avx2,avx512f,avx512bw,avx512vnni"))) inline int32_t hsum_epi32_avx512(__m512i v) {
  typedef int32_t v16i __attribute__((vector_size(64)));
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v16i x = reinterpret_cast<v16i>(v);
  const v8i low = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8i high = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  return hsum_epi32_avx2(reinterpret_cast<__m256i>(low + high));
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vnni"))) inline __m512i load_int8x32(const int8_t* p) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vnni"))) inline void dots_to_int8_rows_avx512(
    const int16_t* q, const int8_t* rows, size_t n, size_t d, int32_t* out) {
  const size_t d32 = d - d % 32;
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const int8_t* r0 = rows + j * d;
    const int8_t* r1 = r0 + d;
    const int8_t* r2 = r1 + d;
    const int8_t* r3 = r2 + d;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    const bool prefetch = j + kInt8PrefetchRows + 4 <= n;
    const char* ahead = prefetch ? reinterpret_cast<const char*>(r0 + kInt8PrefetchRows * d) : nullptr;
    for (size_t i = 0; i < d32; i += 32) {
      if (prefetch && i % 64 == 0)
        for (size_t r = 0; r < 4; ++r) _mm_prefetch(ahead + r * d + i, _MM_HINT_T0);
      const __m512i qv = _mm512_loadu_si512(q + i);
      a0 = _mm512_dpwssd_epi32(a0, qv, load_int8x32(r0 + i));
      a1 = _mm512_dpwssd_epi32(a1, qv, load_int8x32(r1 + i));
      a2 = _mm512_dpwssd_epi32(a2, qv, load_int8x32(r2 + i));
      a3 = _mm512_dpwssd_epi32(a3, qv, load_int8x32(r3 + i));
    }
    int32_t s0 = hsum_epi32_avx512(a0), s1 = hsum_epi32_avx512(a1);
    int32_t s2 = hsum_epi32_avx512(a2), s3 = hsum_epi32_avx512(a3);
    out[j] = s0 + int8_tail_dot(q, r0, d32, d);
    out[j + 1] = s1 + int8_tail_dot(q, r1, d32, d);
    out[j + 2] = s2 + int8_tail_dot(q, r2, d32, d);
    out[j + 3] = s3 + int8_tail_dot(q, r3, d32, d);
  }
  dots_to_int8_rows_generic(q, rows + j * d, n - j, d, out + j);
}

__attribute__((target("avx2,avx512f,avx512bw,avx512vnni"))) inline void dots_4q_int8_rows_avx512(
    const int16_t* const* q, const int8_t* rows, size_t n, size_t d, int32_t* const* out) {
  const size_t d32 = d - d % 32;
  for (size_t j = 0; j < n; ++j) {
    const int8_t* r = rows + j * d;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (size_t i = 0; i < d32; i += 32) {
      const __m512i c = load_int8x32(r + i);
      a0 = _mm512_dpwssd_epi32(a0, _mm512_loadu_si512(q[0] + i), c);
      a1 = _mm512_dpwssd_epi32(a1, _mm512_loadu_si512(q[1] + i), c);
      a2 = _mm512_dpwssd_epi32(a2, _mm512_loadu_si512(q[2] + i), c);
      a3 = _mm512_dpwssd_epi32(a3, _mm512_loadu_si512(q[3] + i), c);
    }
    int32_t s0 = hsum_epi32_avx512(a0), s1 = hsum_epi32_avx512(a1);
    int32_t s2 = hsum_epi32_avx512(a2), s3 = hsum_epi32_avx512(a3);
    out[0][j] = s0 + int8_tail_dot(q[0], r, d32, d);
    out[1][j] = s1 + int8_tail_dot(q[1], r, d32, d);
    out[2][j] = s2 + int8_tail_dot(q[2], r, d32, d);
    out[3][j] = s3 + int8_tail_dot(q[3], r, d32, d);
  }
}
#endif

// for_each_above(v, n, threshold, f): f(j) for every j, in order, with v[j] > threshold(), where f may raise the
// threshold as it goes (the coarse prefilter's running n-th largest lower bound; an "at least t" pass is
// for_each_above with nextafter(t, -inf)). Few values pass (a few dozen of 4096), so the AVX2 version compares
// eight at a time and goes to the scalar test only for blocks with a passing lane (measured at 4096 lists: 6 and
// 5 us -> ~1 us each, of a ~50 us coarse search).
template <class Threshold, class F>
void for_each_above_portable(const float* v, size_t n, Threshold&& threshold, F&& f) {
  for (size_t j = 0; j < n; ++j)
    if (v[j] > threshold()) f(j);
}

#if PATCHIFY_X86
template <class Threshold, class F>
__attribute__((target("avx2"))) void for_each_above_avx2(const float* v, size_t n, Threshold&& threshold, F&& f) {
  size_t j = 0;
  for (; j + 8 <= n; j += 8) {
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + j), _mm256_set1_ps(threshold()), _CMP_GT_OQ)));
    while (mask) {
      const size_t i = j + static_cast<size_t>(__builtin_ctz(mask));
      mask &= mask - 1;
      if (v[i] > threshold()) f(i);  // the threshold may have risen since the block's compare
    }
  }
  for (; j < n; ++j)
    if (v[j] > threshold()) f(j);
}
#endif

template <class Threshold, class F>
void for_each_above(const float* v, size_t n, Threshold&& threshold, F&& f, bool portable) {
#if PATCHIFY_X86
  if (!portable && has_avx2()) return for_each_above_avx2(v, n, threshold, f);
#endif
  (void)portable;
  for_each_above_portable(v, n, threshold, f);
}

// A min-heap of n floats (std::make_heap with std::greater): replaces the minimum with x (> it) and sifts down.
inline void replace_min(float* heap, size_t n, float x) {
  size_t i = 0;
  for (;;) {
    size_t child = 2 * i + 1;
    if (child >= n) break;
    if (child + 1 < n && heap[child + 1] < heap[child]) ++child;
    if (!(heap[child] < x)) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = x;
}

// The int8 coarse kernels' dispatch: portable (forced, or no AVX2), AVX2, or AVX-512 BW+VNNI.
inline void dots_to_int8_rows(const int16_t* q, const int8_t* rows, size_t n, size_t d, int32_t* out,
                              bool portable) {
#if PATCHIFY_X86
  if (!portable && has_avx512_vnni()) return dots_to_int8_rows_avx512(q, rows, n, d, out);
  if (!portable && has_avx2()) return dots_to_int8_rows_avx2(q, rows, n, d, out);
#endif
  (void)portable;
  dots_to_int8_rows_generic(q, rows, n, d, out);
}

// Four queries at a time: false where only the one-query kernel exists here (then the caller loops over them).
inline bool dots_4q_int8_rows(const int16_t* const* q, const int8_t* rows, size_t n, size_t d, int32_t* const* out,
                              bool portable) {
#if PATCHIFY_X86
  if (!portable && has_avx512_vnni()) return dots_4q_int8_rows_avx512(q, rows, n, d, out), true;
  if (!portable && has_avx2()) return dots_4q_int8_rows_avx2(q, rows, n, d, out), true;
#endif
  (void)q, (void)rows, (void)n, (void)d, (void)out, (void)portable;
  return false;
}

// scores[t][j] = <q[t], rows[j]> for nq queries: the same numbers as dots_to_rows per query, four queries at a
// time where AVX2 is there.
inline void dots_queries_to_rows(const float* const* q, size_t nq, const float* rows, size_t n, size_t d,
                                 float* const* scores) {
  size_t t = 0;
#if PATCHIFY_X86
  if (patchify::has_avx2_fma())
    for (; t + 4 <= nq; t += 4) dots_4q_avx2(q + t, rows, n, d, scores + t);
#endif
  for (; t < nq; ++t) dots_to_rows(q[t], rows, n, d, scores[t]);
}

}  // namespace detail
}  // namespace patchify
