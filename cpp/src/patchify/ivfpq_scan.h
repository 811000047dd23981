// Fused IVFPQ scanner: scans the PQ codes of the probed inverted lists of a faiss IndexIVFPQ (inner product,
// by_residual) with ADC lookup tables and, in the same pass, keeps the best score and best patch per *image*.
//
// Why fused: faiss returns a patch-level top-k. To get the top-k images one would have to ask faiss for a much
// larger k' (an image owns many patches, all near each other) and group in numpy, paying for a big heap and a
// Python pass. Here, for k <= kSmallTopK, the scan keeps the top-k distinct images directly (SmallTopImages: a
// code below the k-th best image's score is skipped after one compare, like faiss's heap test); for larger k each
// scanned code updates a dense per-image "best so far" array and the top-k is taken over the touched images.
//
// Arithmetic follows faiss's IVFPQScanner for METRIC_INNER_PRODUCT with by_residual:
//   score(q, code in list l) = <q, coarse_centroid[l]> + sum_m table[m][code[m]],
//   table[m][c] = <q_m, pq_centroid[m][c]>            (q_m = the m-th sub-vector of q)
// so every patch score equals faiss's own search distance up to float summation order.
//
// Two code layouts: faiss IndexIVFPQ's (code_size bytes per vector, any nbits) and, with packed4, faiss
// IndexIVFPQFastScan's 4-bit codes in blocks of 32 vectors (pq4_fastscan.h), scanned with uint8-quantised tables
// in SIMD registers; the per-image max and the pruned top-k are the same for both. Fast-scan scores are the
// quantised ones (dis0 + offset + acc / scale), as faiss's own fast-scan search returns them.
//
// This header knows nothing of faiss or Python: it reads faiss's inverted lists through raw pointers that the
// caller (python/patchify/index/ivfpq.py via the bindings) extracts and keeps alive, and rebuilds after every
// add/remove (faiss may reallocate its lists).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "patchify/cpu_features.h"
#include "patchify/parallel.h"
#include "patchify/pq4_fastscan.h"
#include "patchify/round.h"
#include "patchify/topk.h"

namespace patchify {

// One inverted list as faiss stores it: n codes of code_size bytes and n int64 ids (our patch ids).
// images (optional) is the list's image ids in list order (-1 = removed): with it the scan reads image ids
// sequentially instead of looking each patch id up in the patch -> image map, a random access (cache miss at
// millions of patches) per scanned code.
struct InvertedListView {
  const uint8_t* codes = nullptr;
  const int64_t* ids = nullptr;
  size_t size = 0;
  const int32_t* images = nullptr;
};

namespace detail {

// Reads nbits-wide codes packed little-endian, least significant bit first, like faiss's PQDecoderGeneric.
class BitDecoder {
 public:
  BitDecoder(const uint8_t* code, int nbits) : code_(code), nbits_(nbits) {}
  uint32_t next() {
    uint32_t value = 0;
    int filled = 0;
    while (filled < nbits_) {
      const int avail = 8 - offset_;
      const int take = std::min(avail, nbits_ - filled);
      const uint32_t bits = (static_cast<uint32_t>(*code_) >> offset_) & ((1u << take) - 1u);
      value |= bits << filled;
      filled += take;
      offset_ += take;
      if (offset_ == 8) {
        offset_ = 0;
        ++code_;
      }
    }
    return value;
  }

 private:
  const uint8_t* code_;
  int nbits_;
  int offset_ = 0;
};

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
// coarse search rescores its float16 shortlist with it and must reproduce the fp32 scores bit for bit.
inline float row_dot(const float* q, const float* r, size_t d) {
#if PATCHIFY_X86
  if (patchify::has_avx2_fma()) return row_dot_avx2(q, r, d);
#endif
  return dot(q, r, d);
}

// Approximate coarse scores from int8 centroids: out[j] = sum_i q[i] * rows[j][i], the query quantised to int16
// and each centroid to int8 (scaled per row by the caller), summed exactly in int32 (the caller keeps
// |q[i]| <= int8_query_limit(d), so no sum overflows). A quarter of the bytes of the fp32 centroids (the one-query
// coarse search streams all of them per query, so bytes are its cost) and twice the float16 kernel's throughput
// (measured at 4096 x 384: 46 vs 101 us); the caller bounds the error and rescores the shortlist exactly. Integer
// sums are exact, so the portable and AVX2 kernels give the same numbers.
inline void dots_to_int8_rows_generic(const int16_t* q, const int8_t* rows, size_t n, size_t d, int32_t* out) {
  for (size_t j = 0; j < n; ++j) {
    int32_t s = 0;
    for (size_t i = 0; i < d; ++i) s += int32_t(q[i]) * rows[j * d + i];
    out[j] = s;
  }
}

// The largest |query code| that keeps every int32 sum of d products with |row code| <= 127 exact (<= int16 max).
inline int32_t int8_query_limit(size_t d) {
  const int64_t limit = (int64_t(std::numeric_limits<int32_t>::max()) / 127) / static_cast<int64_t>(std::max<size_t>(d, 1));
  return static_cast<int32_t>(std::min<int64_t>(limit, std::numeric_limits<int16_t>::max()));
}

#if PATCHIFY_X86
constexpr size_t kInt8PrefetchRows = 16;  // 6 KB ahead at dim 384 (the float16 kernel's best distance, in rows)

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
    for (size_t i = d16; i < d; ++i) {
      s0 += int32_t(q[i]) * r0[i];
      s1 += int32_t(q[i]) * r1[i];
      s2 += int32_t(q[i]) * r2[i];
      s3 += int32_t(q[i]) * r3[i];
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
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
    for (size_t i = d16; i < d; ++i) {
      s0 += int32_t(q[0][i]) * r[i];
      s1 += int32_t(q[1][i]) * r[i];
      s2 += int32_t(q[2][i]) * r[i];
      s3 += int32_t(q[3][i]) * r[i];
    }
    out[0][j] = s0;
    out[1][j] = s1;
    out[2][j] = s2;
    out[3][j] = s3;
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
    for (size_t i = d32; i < d; ++i) {
      s0 += int32_t(q[i]) * r0[i];
      s1 += int32_t(q[i]) * r1[i];
      s2 += int32_t(q[i]) * r2[i];
      s3 += int32_t(q[i]) * r3[i];
    }
    out[j] = s0;
    out[j + 1] = s1;
    out[j + 2] = s2;
    out[j + 3] = s3;
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
    for (size_t i = d32; i < d; ++i) {
      s0 += int32_t(q[0][i]) * r[i];
      s1 += int32_t(q[1][i]) * r[i];
      s2 += int32_t(q[2][i]) * r[i];
      s3 += int32_t(q[3][i]) * r[i];
    }
    out[0][j] = s0;
    out[1][j] = s1;
    out[2][j] = s2;
    out[3][j] = s3;
  }
}
#endif

// for_each_above(v, n, threshold, f): f(j) for every j, in order, with v[j] > threshold(), where f may raise the
// threshold as it goes (the coarse prefilter's running n-th largest lower bound); for_each_at_least(v, n, t, f):
// f(j) for every v[j] >= t. Few values pass (a few dozen of 4096), so the AVX2 versions compare eight at a time
// and go to the scalar test only for blocks with a passing lane (measured at 4096 lists: 6 and 5 us -> ~1 us each,
// of a ~50 us coarse search).
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

// The M x ksub ADC table from codebooks stored M x dsub x ksub: the inner loop runs over the ksub centroids
// (independent outputs), so it vectorises without reordering any sum. Compiled twice (baseline and AVX2/FMA,
// picked at run time like dots_to_rows): GCC's target_clones("arch=haswell") dispatches on the CPU model and
// ran the SSE2 clone on AMD Zen 3, where the table was 13 % of a batched nprobe=1 search.
__attribute__((always_inline)) inline void adc_table_body(const float* query, const float* pq_t, size_t M,
                                                          size_t dsub, size_t ksub, float* table) {
  for (size_t m = 0; m < M; ++m) {
    const float* qm = query + m * dsub;
    float* out = table + m * ksub;
    const float* col = pq_t + m * dsub * ksub;
    for (size_t c = 0; c < ksub; ++c) out[c] = qm[0] * col[c];
    for (size_t i = 1; i < dsub; ++i) {
      const float qi = qm[i];
      const float* row = col + i * ksub;
      for (size_t c = 0; c < ksub; ++c) out[c] += qi * row[c];
    }
  }
}

#if PATCHIFY_X86
__attribute__((target("avx2,fma"))) inline void adc_table_avx2(const float* query, const float* pq_t, size_t M,
                                                                 size_t dsub, size_t ksub, float* table) {
  adc_table_body(query, pq_t, M, dsub, ksub, table);
}
#endif

inline void adc_table(const float* query, const float* pq_t, size_t M, size_t dsub, size_t ksub, float* table) {
#if PATCHIFY_X86
  if (patchify::has_avx2_fma()) return adc_table_avx2(query, pq_t, M, dsub, ksub, table);
#endif
  adc_table_body(query, pq_t, M, dsub, ksub, table);
}

// Per-worker scratch: a dense "best so far" per image. Dense (not a hash map) because a probe touches thousands
// of patches and a hash map's probing costs more than a cache miss on a flat array; only touched entries are
// reset after each query, so reuse is O(touched), not O(num_images).
struct ImageBest {
  std::vector<float> score;     // -inf = not touched by the current query
  std::vector<int64_t> patch;
  std::vector<int32_t> touched;
  void ensure(size_t num_images) {
    if (score.size() < num_images) {
      score.resize(num_images, -std::numeric_limits<float>::infinity());
      patch.resize(num_images, -1);
    }
  }
};

// Top-k *distinct images* for small k, without a per-image array: a patch scoring below the current k-th best
// image can neither enter the top-k nor change an image already in it (that image's best is >= the k-th), so
// it is skipped after one compare. At 1M images the dense array (4 MB of scores + 8 MB of patch ids) misses the
// cache on nearly every scanned code; this keeps the working set to the codes and the tables, as faiss's own
// patch-level heap does. Exact: gives the same images, scores and (smallest-id) best patches as the dense
// per-image max. A candidate above the threshold costs, up to kLinear entries, a linear pass (fastest for a
// top-10); beyond (a two-stage search's shortlist of 100-200), a hash lookup of its image and an indexed min-heap
// of the entries (measured at 1M x L2, k = 200: the linear passes were most of a ~0.45 ms first stage).
class SmallTopImages {
 public:
  static constexpr size_t kLinear = 32;

  explicit SmallTopImages(size_t k) : k_(k) {
    hits_.reserve(k);
    if (k > kLinear) {
      size_t capacity = 16;
      while (capacity < 2 * k) capacity *= 2;
      table_.assign(capacity, -1);
      heap_.reserve(k);
      position_.reserve(k);
    }
  }
  float threshold() const { return threshold_; }

  void offer(float score, int64_t image, int64_t patch) {
    const ImageHit hit{score, image, patch};
    const int32_t slot = find(image);
    if (slot >= 0) {
      ImageHit& h = hits_[static_cast<size_t>(slot)];
      if (score > h.score || (score == h.score && patch < h.patch)) {
        h.score = score;
        h.patch = patch;
        improved(static_cast<size_t>(slot));
      }
      return;
    }
    if (hits_.size() < k_) {
      hits_.push_back(hit);
      added(hits_.size() - 1);
    } else if (better(hit, hits_[worst()])) {
      const size_t w = worst();
      if (hashed()) erase(hits_[w].image);
      hits_[w] = hit;
      if (hashed()) insert(image, w);
      improved(w);  // the worst entry replaced by a better one: it moves like an improvement
    }
  }

  std::vector<ImageHit> take_sorted() {
    std::sort(hits_.begin(), hits_.end(), better);
    std::vector<ImageHit> out;
    out.swap(hits_);
    return out;
  }

 private:
  bool hashed() const { return !table_.empty(); }

  // The entry holding `image`, or -1.
  int32_t find(int64_t image) const {
    if (!hashed()) {
      for (size_t i = 0; i < hits_.size(); ++i)
        if (hits_[i].image == image) return static_cast<int32_t>(i);
      return -1;
    }
    const size_t mask = table_.size() - 1;
    for (size_t b = bucket(image);; b = (b + 1) & mask) {
      const int32_t slot = table_[b];
      if (slot < 0 || hits_[static_cast<size_t>(slot)].image == image) return slot;
    }
  }
  size_t bucket(int64_t image) const {
    // Fibonacci hashing: image ids are often consecutive; the high bits of the product spread them.
    return static_cast<size_t>((static_cast<uint64_t>(image) * 0x9E3779B97F4A7C15ull) >> 32) & (table_.size() - 1);
  }
  void insert(int64_t image, size_t slot) {
    const size_t mask = table_.size() - 1;
    size_t b = bucket(image);
    while (table_[b] >= 0) b = (b + 1) & mask;
    table_[b] = static_cast<int32_t>(slot);
  }
  // Linear probing's backward-shift deletion: later entries of the same run move into the hole if their home
  // bucket does not lie (cyclically) between the hole and them.
  void erase(int64_t image) {
    const size_t mask = table_.size() - 1;
    size_t hole = bucket(image);
    while (hits_[static_cast<size_t>(table_[hole])].image != image) hole = (hole + 1) & mask;
    for (size_t b = (hole + 1) & mask; table_[b] >= 0; b = (b + 1) & mask) {
      const size_t home = bucket(hits_[static_cast<size_t>(table_[b])].image);
      if (((b - home) & mask) >= ((b - hole) & mask)) {
        table_[hole] = table_[b];
        hole = b;
      }
    }
    table_[hole] = -1;
  }

  // The worst entry (the one a better candidate replaces once k are held).
  size_t worst() const { return hashed() ? heap_.front() : worst_; }

  void added(size_t slot) {
    if (hashed()) {
      insert(hits_[slot].image, slot);
      heap_.push_back(slot);
      position_.push_back(heap_.size() - 1);
      sift_up(heap_.size() - 1);
    }
    if (hits_.size() == k_) refresh_worst();
  }
  void improved(size_t slot) {
    if (hashed()) {
      sift_down(position_[slot]);  // a better entry moves away from the worst end
      if (hits_.size() == k_) threshold_ = hits_[heap_.front()].score;
    } else if (hits_.size() == k_ && slot == worst_) {
      refresh_worst();
    }
  }
  void refresh_worst() {
    if (hashed()) {
      threshold_ = hits_[heap_.front()].score;
      return;
    }
    worst_ = 0;
    for (size_t i = 1; i < hits_.size(); ++i)
      if (better(hits_[worst_], hits_[i])) worst_ = i;
    threshold_ = hits_[worst_].score;
  }

  // heap_: entry indices, the worst at the front (a is above b when b is better than a); position_: where each
  // entry sits in heap_.
  bool above(size_t a, size_t b) const { return better(hits_[b], hits_[a]); }
  void place(size_t at, size_t slot) {
    heap_[at] = slot;
    position_[slot] = at;
  }
  void sift_up(size_t at) {
    const size_t slot = heap_[at];
    while (at > 0) {
      const size_t parent = (at - 1) / 2;
      if (!above(slot, heap_[parent])) break;
      place(at, heap_[parent]);
      at = parent;
    }
    place(at, slot);
  }
  void sift_down(size_t at) {
    const size_t slot = heap_[at], n = heap_.size();
    for (;;) {
      size_t child = 2 * at + 1;
      if (child >= n) break;
      if (child + 1 < n && above(heap_[child + 1], heap_[child])) ++child;
      if (!above(heap_[child], slot)) break;
      place(at, heap_[child]);
      at = child;
    }
    place(at, slot);
  }

  size_t k_;
  size_t worst_ = 0;  // linear mode
  float threshold_ = -std::numeric_limits<float>::infinity();
  std::vector<ImageHit> hits_;
  std::vector<int32_t> table_;     // hashed mode: open addressing, image -> entry index (-1 empty)
  std::vector<size_t> heap_;       // hashed mode
  std::vector<size_t> position_;   // hashed mode
};

}  // namespace detail

class IVFPQScanner {
 public:
  // coarse_centroids: nlist x dim; pq_centroids: M x ksub x (dim / M), ksub = 2^nbits (faiss ProductQuantizer
  // layout). Both are copied (a few MB at most), the inverted lists are not. packed4: the lists are faiss
  // fast-scan blocks (nbits 4, M <= 256).
  IVFPQScanner(size_t dim, size_t nlist, size_t M, int nbits, const float* coarse_centroids,
               const float* pq_centroids, bool packed4 = false)
      : dim_(dim), nlist_(nlist), M_(M), nbits_(nbits), packed4_(packed4) {
    if (dim == 0 || M == 0 || dim % M != 0)
      throw std::invalid_argument("IVFPQScanner: dim (" + std::to_string(dim) + ") must be a positive multiple of M (" +
                                  std::to_string(M) + ")");
    if (nbits < 1 || nbits > 16) throw std::invalid_argument("IVFPQScanner: nbits must be in [1, 16]");
    if (nlist == 0) throw std::invalid_argument("IVFPQScanner: nlist must be positive");
    if (packed4 && (nbits != 4 || M > kPq4MaxM))
      throw std::invalid_argument("IVFPQScanner: the fast-scan layout takes nbits 4 and M <= 256, got nbits " +
                                  std::to_string(nbits) + ", M " + std::to_string(M));
    dsub_ = dim / M;
    ksub_ = size_t(1) << nbits;
    code_size_ = (M * static_cast<size_t>(nbits) + 7) / 8;
    coarse_.assign(coarse_centroids, coarse_centroids + nlist * dim);
    int8_query_limit_ = detail::int8_query_limit(dim);
    build_int8_coarse();
    // Codebooks transposed to M x dsub x ksub: the table loop then runs over the ksub centroids contiguously
    // (independent outputs, so it vectorises with no reordering of any sum).
    pq_t_.resize(M * ksub_ * dsub_);
    for (size_t m = 0; m < M; ++m)
      for (size_t c = 0; c < ksub_; ++c)
        for (size_t i = 0; i < dsub_; ++i)
          pq_t_[(m * dsub_ + i) * ksub_ + c] = pq_centroids[(m * ksub_ + c) * dsub_ + i];
    lists_.resize(nlist);
  }

  size_t dim() const { return dim_; }
  size_t nlist() const { return nlist_; }
  size_t code_size() const { return code_size_; }
  bool packed4() const { return packed4_; }

  // Code bytes of a list of n vectors: n * code_size, or whole blocks of 32 in the fast-scan layout.
  size_t list_code_bytes(size_t n) const { return packed4_ ? pq4_list_bytes(n, M_) : n * code_size_; }

  // Tests only: run the portable fast-scan kernel (the two must agree bit for bit) and the portable float16
  // coarse prefilter even where AVX2 is there.
  void set_portable_kernels(bool portable) { portable_kernels_ = portable; }

  void set_list(size_t list_no, const uint8_t* codes, const int64_t* ids, size_t size,
                const int32_t* images = nullptr) {
    if (list_no >= nlist_) throw std::out_of_range("IVFPQScanner: list number out of range");
    if (size > 0 && (codes == nullptr || ids == nullptr))
      throw std::invalid_argument("IVFPQScanner: non-empty list without codes or ids");
    lists_[list_no] = InvertedListView{codes, ids, size, images};
  }

  // patch id -> image id (int32; -1 = removed/unknown). Not owned; num_images bounds the image ids (ids at or
  // above it are never reported) and so the number of distinct images a search can return.
  void set_image_map(const int32_t* map, size_t map_size, size_t num_images) {
    map_ = map;
    map_size_ = map_size;
    num_images_ = num_images;
  }
  size_t num_images() const { return num_images_; }

  // Output columns worth allocating for a top-k search: min(k, num_images), so memory is bounded by the index
  // whatever k is.
  size_t result_width(size_t k) const { return std::min(k, num_images_); }

  // The M x ksub ADC table of one query: table[m * ksub + c] = <q_m, pq_centroid[m][c]>.
  void compute_table(const float* query, float* table) const {
    detail::adc_table(query, pq_t_.data(), M_, dsub_, ksub_, table);
  }

  // Native coarse search: the nprobe lists whose centroids have the largest inner product with the query
  // (ties -> smaller list id). Same ranking as faiss's IndexFlatIP up to float rounding, so a near-tie at the
  // nprobe boundary may pick a different (equally close) list; pass faiss's probes where exact parity matters.
  // Returns how many lists were scored exactly: nlist for the exhaustive fp32 search, fewer when the float16
  // prefilter ran (see coarse_probe_int8); either way the probes are exactly coarse_probe_exhaustive's.
  size_t coarse_probe(const float* query, size_t nprobe, float* scores_scratch, int64_t* probes) const {
    const size_t n = std::min(nprobe, nlist_);
    if (int8_prefilter_usable(n)) {
      const size_t scored = coarse_probe_int8(query, n, scores_scratch, probes);
      if (scored > 0) {
        for (size_t j = n; j < nprobe; ++j) probes[j] = -1;
        return scored;
      }
    }
    coarse_probe_exhaustive(query, nprobe, scores_scratch, probes);
    return nlist_;
  }

  // The reference one-query coarse search: every centroid's fp32 dot product (the batched search's numbers).
  void coarse_probe_exhaustive(const float* query, size_t nprobe, float* scores_scratch, int64_t* probes) const {
    detail::dots_to_rows(query, coarse_.data(), nlist_, dim_, scores_scratch);
    const size_t n = std::min(nprobe, nlist_);
    std::vector<int64_t> order;  // filled by top_lists
    top_lists(scores_scratch, n, order);
    for (size_t j = 0; j < nprobe; ++j) probes[j] = j < n ? order[j] : -1;
  }

  // A query's int16 codes and the terms of its error bound (see coarse_probe_int8; public for the batch helpers' signatures).
  struct Int8Query {
    std::vector<int16_t> codes;
    float t = 0;                 // query scale: q^ = t codes
    float A = 0, B = 0, c0 = 0;  // e_j = A |c_j| + B |c_j - c^_j| + c0
  };

  // Native coarse search for a batch: probes[qi * nprobe ...] for every query, the same lists as coarse_probe
  // (both are exactly the exhaustive search's). With the int8 prefilter, blocks of queries are scored against the
  // int8 centroids four at a time (each row widened once for four queries; measured at 4096 x 384 on one core:
  // the fp32 batch path below costs ~84 us per query, the int8 one ~25), then each query's bound and exact
  // rescoring as in coarse_probe_int8. Without it (or for a query whose bound cannot be trusted), fp32: the
  // centroids are walked in chunks that stay in L2 while a block of queries is scored against them, so a batch
  // reads them about once per block instead of once per query.
  void coarse_probe_batch(const float* queries, size_t nq, size_t nprobe, int num_threads, int64_t* probes) const {
    constexpr size_t kQueryBlock = 16;
    const size_t n_blocks = (nq + kQueryBlock - 1) / kQueryBlock;
    const size_t n = std::min(nprobe, nlist_);
    const bool int8 = int8_prefilter_usable(n);
    parallel_for(0, n_blocks, num_threads, [&](size_t b) {
      const size_t q0 = b * kQueryBlock, q1 = std::min(nq, q0 + kQueryBlock);
      std::vector<size_t> exact;  // queries of the block scored by the fp32 path
      if (int8) {
        std::vector<Int8Query> qz(q1 - q0);
        std::vector<size_t> quantised;
        for (size_t qi = q0; qi < q1; ++qi)
          (quantise_int8(queries + qi * dim_, qz[qi - q0]) ? quantised : exact).push_back(qi);
        std::vector<int32_t> acc(quantised.size() * nlist_);
        int8_dots(qz, quantised, q0, acc.data());
        std::vector<float> approx(nlist_);
        for (size_t u = 0; u < quantised.size(); ++u) {
          const size_t qi = quantised[u];
          select_int8(queries + qi * dim_, qz[qi - q0], acc.data() + u * nlist_, n, approx.data(), probes + qi * nprobe);
          for (size_t j = n; j < nprobe; ++j) probes[qi * nprobe + j] = -1;
        }
      } else {
        for (size_t qi = q0; qi < q1; ++qi) exact.push_back(qi);
      }
      if (!exact.empty()) coarse_probe_fp32_block(queries, exact, n, nprobe, probes);
    });
  }

  // acc[u * nlist + j] = the integer sum of quantised query `quantised[u]` (codes in qz[quantised[u] - q0]) with
  // centroid j: four queries at a time over chunks of rows that stay in L1/L2, the rest one at a time.
  void int8_dots(const std::vector<Int8Query>& qz, const std::vector<size_t>& quantised, size_t q0,
                 int32_t* acc) const {
    const size_t chunk_rows = std::max<size_t>(16, (32 * 1024) / dim_);
    for (size_t r0 = 0; r0 < nlist_; r0 += chunk_rows) {
      const size_t rows = std::min(chunk_rows, nlist_ - r0);
      const int8_t* chunk = coarse_i8_.data() + r0 * dim_;
      size_t u = 0;
      for (; u + 4 <= quantised.size(); u += 4) {
        const int16_t* q[4];
        int32_t* out[4];
        for (size_t v = 0; v < 4; ++v) {
          q[v] = qz[quantised[u + v] - q0].codes.data();
          out[v] = acc + (u + v) * nlist_ + r0;
        }
        if (!detail::dots_4q_int8_rows(q, chunk, rows, dim_, out, portable_kernels_)) break;
      }
      for (; u < quantised.size(); ++u)
        detail::dots_to_int8_rows(qz[quantised[u] - q0].codes.data(), chunk, rows, dim_, acc + u * nlist_ + r0,
                                  portable_kernels_);
    }
  }

  // The fp32 batch path for the queries `which` (ascending): exact dot products, top n lists each.
  void coarse_probe_fp32_block(const float* queries, const std::vector<size_t>& which, size_t n, size_t nprobe,
                               int64_t* probes) const {
    const size_t chunk_rows = std::max<size_t>(16, (192 * 1024) / (dim_ * sizeof(float)));
    const size_t m = which.size();
    std::vector<float> scores(m * nlist_);
    std::vector<const float*> qs(m);
    std::vector<float*> out(m);
    for (size_t r0 = 0; r0 < nlist_; r0 += chunk_rows) {
      const size_t rows = std::min(chunk_rows, nlist_ - r0);
      for (size_t u = 0; u < m; ++u) {
        qs[u] = queries + which[u] * dim_;
        out[u] = scores.data() + u * nlist_ + r0;
      }
      detail::dots_queries_to_rows(qs.data(), m, coarse_.data() + r0 * dim_, rows, dim_, out.data());
    }
    std::vector<int64_t> order;  // filled by top_lists, reused across the block
    for (size_t u = 0; u < m; ++u) {
      top_lists(scores.data() + u * nlist_, n, order);
      for (size_t j = 0; j < nprobe; ++j) probes[which[u] * nprobe + j] = j < n ? order[j] : -1;
    }
  }

  // One query's tables: the float ADC table, and its quantised form for the fast-scan layout.
  struct QueryTables {
    std::vector<float> table;  // M x ksub
    Pq4Lut lut;                // packed4 only
  };

  void prepare_tables(const float* query, QueryTables& t) const {
    t.table.resize(M_ * ksub_);
    compute_table(query, t.table.data());
    if (packed4_) t.lut.quantise(t.table.data(), M_);
  }

  // Calls visit(patch_id, image_id, score) for every code in the probed lists (probe ids < 0 are skipped, like faiss's
  // padding) that can score at least threshold() (a lower bound the caller raises as it goes: the fast-scan kernel
  // skips a block's codes below it in SIMD; the caller still compares each visited score). This is the one scoring
  // loop, shared by search() and the test hook patch_scores().
  template <class Visit, class Threshold>
  void scan(const float* query, const int64_t* probes, size_t nprobe, const QueryTables& tables, Visit&& visit,
            Threshold&& threshold) const {
    // Fast-scan hits wait in a small buffer with their map entry prefetched: the fast-scan lists carry no image ids
    // in list order (that would cost 4 B/patch more), so each hit looks its patch up in the patch -> image map, a
    // cache miss at millions of patches; buffered, the misses overlap instead of stalling the scan one by one.
    // Visiting late only lags the threshold (more codes pass the SIMD test); every hit is still visited.
    constexpr size_t kPending = 16;
    std::pair<int64_t, float> pending[kPending];
    size_t n_pending = 0;
    auto flush = [&]() {
      for (size_t i = 0; i < n_pending; ++i) visit(pending[i].first, image_of_patch(pending[i].first), pending[i].second);
      n_pending = 0;
    };
    for (size_t p = 0; p < nprobe; ++p) {
      const int64_t l = probes[p];
      if (l < 0) continue;
      if (static_cast<size_t>(l) >= nlist_) throw std::out_of_range("IVFPQScanner: probed list out of range");
      const InvertedListView& list = lists_[static_cast<size_t>(l)];
      if (list.size == 0) continue;
      // faiss: dis0 = <q, reconstructed centroid>, then dis = dis0 + sum of table entries.
      const float dis0 = detail::dot(query, coarse_.data() + static_cast<size_t>(l) * dim_, dim_);
      if (packed4_) {
        const Pq4Lut& lut = tables.lut;
        detail::pq4_scan_list(
            list.codes, list.size, lut, [&]() { return lut.floor_acc(dis0, threshold()); },
            [&](size_t j, uint32_t acc) {
              const float score = lut.score(dis0, acc);
              if (score < threshold()) return;
              const int64_t pid = list.ids[j];
#if PATCHIFY_X86
              if (pid >= 0 && static_cast<size_t>(pid) < map_size_)
                _mm_prefetch(reinterpret_cast<const char*>(map_ + pid), _MM_HINT_T0);
#endif
              pending[n_pending++] = {pid, score};
              if (n_pending == kPending) flush();
            },
            portable_kernels_);
      } else if (nbits_ == 8) {
        scan_list_8bit(list, tables.table.data(), dis0, visit);
      } else {
        scan_list_generic(list, tables.table.data(), dis0, visit);
      }
    }
    flush();
  }

  // k up to this uses detail::SmallTopImages (threshold-pruned, no per-image array); larger k the dense array.
  // 256, not 64: a two-stage search asks the scanner for a shortlist of 100+ images, and at 1M images the dense
  // array misses the cache on nearly every code while the threshold skips almost every code after the first lists.
  static constexpr size_t kSmallTopK = 256;

  // Top-k images per query. queries: nq x dim; probes: nq x nprobe list ids from faiss's coarse quantiser, or
  // nullptr to run the native coarse search (one call, no Python in between); outputs nq x k, padded with
  // -inf / -1 where a query reaches fewer images. Size k with result_width(): the per-query heaps and scratch
  // never hold more than min(k, num_images) images anyway, so a huge k cannot allocate. k = 0 writes nothing.
  void search(const float* queries, size_t nq, const int64_t* probes, size_t nprobe, size_t k, int num_threads,
              float* out_scores, int64_t* out_images, int64_t* out_patches) const {
    if (map_ == nullptr && map_size_ > 0) throw std::runtime_error("IVFPQScanner: image map not set");
    if (nq == 0 || k == 0) return;
    const size_t kk = result_width(k);  // the most hits a query can have: heap sizes
    if (kk == 0) {  // no image can be reported (num_images = 0): all padding
      for (size_t qi = 0; qi < nq; ++qi) write_hits({}, k, out_scores + qi * k, out_images + qi * k, out_patches + qi * k);
      return;
    }
    std::vector<int64_t> batch_probes;
    if (probes == nullptr && nq > 1) {
      batch_probes.resize(nq * nprobe);
      coarse_probe_batch(queries, nq, nprobe, num_threads, batch_probes.data());
      probes = batch_probes.data();
    }
    parallel_for(0, nq, num_threads, [&](size_t qi) {
      Lease lease(*this);
      Scratch& s = *lease.scratch;
      const float* q = queries + qi * dim_;
      const int64_t* query_probes = probes ? probes + qi * nprobe : nullptr;
      if (!query_probes) {
        s.coarse.resize(nlist_);
        s.probes.resize(nprobe);
        coarse_probe(q, nprobe, s.coarse.data(), s.probes.data());
        query_probes = s.probes.data();
      }
      prepare_tables(q, s.tables);
      if (kk <= kSmallTopK) {
        detail::SmallTopImages top(kk);
        scan(
            q, query_probes, nprobe, s.tables,
            [&](int64_t pid, int32_t img, float score) {
              if (score < top.threshold()) return;
              if (img < 0 || static_cast<size_t>(img) >= num_images_) return;
              top.offer(score, img, pid);
            },
            [&]() { return top.threshold(); });
        write_hits(top.take_sorted(), k, out_scores + qi * k, out_images + qi * k, out_patches + qi * k);
        return;
      }
      s.best.ensure(num_images_);
      float* best = s.best.score.data();
      int64_t* best_patch = s.best.patch.data();
      std::vector<int32_t>& touched = s.best.touched;
      touched.clear();
      scan(q, query_probes, nprobe, s.tables, [&](int64_t pid, int32_t img, float score) {
        if (img < 0 || static_cast<size_t>(img) >= num_images_) return;
        float& b = best[img];
        if (b == -std::numeric_limits<float>::infinity()) {
          touched.push_back(img);
          b = score;
          best_patch[img] = pid;
        } else if (score > b || (score == b && pid < best_patch[img])) {
          b = score;
          best_patch[img] = pid;
        }
      }, no_threshold);
      TopKCollector top(kk);
      for (int32_t img : touched) {
        const float sc = best[img];
        if (sc >= top.threshold()) top.push(ImageHit{sc, img, best_patch[img]});
        best[img] = -std::numeric_limits<float>::infinity();  // reset for the next query
      }
      write_hits(top.take_sorted(), k, out_scores + qi * k, out_images + qi * k, out_patches + qi * k);
    });
  }

  // Every (patch id, score) the scanner computes for one query: the test hook that compares each score with
  // faiss's own distance for that id.
  void patch_scores(const float* query, const int64_t* probes, size_t nprobe, std::vector<int64_t>& ids,
                    std::vector<float>& scores) const {
    QueryTables tables;
    prepare_tables(query, tables);
    ids.clear();
    scores.clear();
    scan(
        query, probes, nprobe, tables,
        [&](int64_t pid, int32_t, float score) {
          ids.push_back(pid);
          scores.push_back(score);
        },
        no_threshold);
  }

 private:
  static float no_threshold() { return -std::numeric_limits<float>::infinity(); }

  struct Scratch {
    detail::ImageBest best;
    QueryTables tables;
    std::vector<float> coarse;
    std::vector<int64_t> probes;
  };

  // Scratch buffers are pooled on the scanner so that repeated searches do not reallocate the dense per-image
  // arrays (MBs at 1M images); a worker borrows one per query.
  struct Lease {
    const IVFPQScanner& owner;
    std::unique_ptr<Scratch> scratch;
    explicit Lease(const IVFPQScanner& o) : owner(o) {
      std::lock_guard<std::mutex> lock(owner.pool_mutex_);
      if (owner.pool_.empty()) {
        scratch = std::make_unique<Scratch>();
      } else {
        scratch = std::move(owner.pool_.back());
        owner.pool_.pop_back();
      }
    }
    ~Lease() {
      std::lock_guard<std::mutex> lock(owner.pool_mutex_);
      owner.pool_.push_back(std::move(scratch));
    }
  };

  // The int8 copy of the centroids (per row: codes = round(c / s), s = max|c| / 127) and each row's bound
  // coefficients (see coarse_probe_int8). No copy (the prefilter off) if a coordinate is not finite or the dimension
  // leaves too few query levels for exact int32 sums.
  void build_int8_coarse() {
    int8_ok_ = int8_query_limit_ >= 1024;
    for (float x : coarse_)
      if (!std::isfinite(x)) int8_ok_ = false;
    if (!int8_ok_) return;
    coarse_i8_.resize(coarse_.size());
    coarse_i8_scale_.resize(nlist_);
    coarse_norm_.resize(nlist_);
    coarse_i8_err_.resize(nlist_);
    const double room = 1.0 + std::ldexp(1.0, -16);  // coefficients rounded up, with room for float evaluation
    max_i8_norm_ = 0;
    for (size_t j = 0; j < nlist_; ++j) {
      const float* c = coarse_.data() + j * dim_;
      double peak = 0;
      for (size_t i = 0; i < dim_; ++i) peak = std::max(peak, std::fabs(static_cast<double>(c[i])));
      // A float scale, so that the search multiplies in float (vectorised); c^ = scale * code is defined with it,
      // and |c - c^| is measured, so any rounding of the scale (or a clamped code) is inside the bound.
      const float scale = static_cast<float>(peak / 127.0);
      double c2 = 0, f2 = 0, h2 = 0;
      for (size_t i = 0; i < dim_; ++i) {
        const double code = scale > 0 ? std::clamp(round_nearest(static_cast<double>(c[i]) / scale), -127.0, 127.0) : 0.0;
        coarse_i8_[j * dim_ + i] = static_cast<int8_t>(code);
        const double h = static_cast<double>(scale) * code;
        c2 += static_cast<double>(c[i]) * c[i];
        f2 += (c[i] - h) * (c[i] - h);
        h2 += h * h;
      }
      coarse_i8_scale_[j] = scale;
      coarse_norm_[j] = static_cast<float>(std::sqrt(c2) * room);
      coarse_i8_err_[j] = static_cast<float>(std::sqrt(f2) * room);
      max_i8_norm_ = std::max(max_i8_norm_, std::sqrt(h2));
    }
  }

  bool int8_prefilter_usable(size_t n) const {
    if (!int8_ok_ || n == 0 || n >= nlist_) return false;
    if (portable_kernels_) return true;
    return patchify::has_avx2();
  }

  // One-query coarse search over int8 centroids, exact. The query is quantised to int16 codes qq (q^ = t qq, t the
  // float nearest max|q| / L, L = int8_query_limit(d)), each centroid c_j to int8 codes (c^_j = s_j code_j, s_j a
  // float; |q - q^| and |c_j - c^_j| are measured with these very scales); the kernel's integer sum is exact, so the
  // approximate score a_j = fl(fl(fl(acc_j) t) s_j) errs from the fp32 score the exhaustive search computes
  // (fl(<q, c_j>)) by at most
  //   E_j = (|q - q^| + gamma |q|) |c_j| + |q^| |c_j - c^_j| + 2^-21 |q^| |c^_j| + underflow slack
  // (<q, c> - <q^, c^> = <q - q^, c> + <q^, c - c^>, Cauchy-Schwarz on both; the fp32 sum errs by gamma
  // sum |q_i c_i| <= gamma |q| |c|; the three float roundings of a_j by 3 x 2^-24 relative). With T the n-th largest
  // lower bound a_j - E_j, n lists score at least T, so a list with a_j + E_j < T scores strictly less than n others
  // and cannot be probed, whatever the tie-break. The rest (n plus the near-ties, typically a few dozen) are scored
  // exactly with the exhaustive search's kernel and ranked as it ranks them. Writes probes[0..n); returns the number
  // scored exactly, or 0 where the bound cannot be trusted (a zero, non-finite or huge query): then nothing is
  // written.
  size_t coarse_probe_int8(const float* query, size_t n, float* approx, int64_t* probes) const {
    Int8Query qz;
    if (!quantise_int8(query, qz)) return 0;
    std::vector<int32_t> acc(nlist_);
    detail::dots_to_int8_rows(qz.codes.data(), coarse_i8_.data(), nlist_, dim_, acc.data(), portable_kernels_);
    return select_int8(query, qz, acc.data(), n, approx, probes);
  }

  // False where the bound cannot be trusted (a zero, non-finite or huge query).
  bool quantise_int8(const float* query, Int8Query& qz) const {
    double q2 = 0, peak = 0;
    for (size_t i = 0; i < dim_; ++i) {
      q2 += static_cast<double>(query[i]) * query[i];
      peak = std::max(peak, std::fabs(static_cast<double>(query[i])));
    }
    const double qnorm = std::sqrt(q2);
    // |every partial sum| <= |q| |c|: far below FLT_MAX, so no fp32 sum overflows.
    if (!std::isfinite(qnorm) || !(peak > 0) || qnorm * max_i8_norm_ > 1e36) return false;
    const float t = static_cast<float>(peak / int8_query_limit_);  // q^ = t codes, measured in double below
    if (!(t >= std::numeric_limits<float>::min())) return false;
    const double limit = int8_query_limit_, inv_t = 1.0 / t;  // any code choice is fine: |q - q^| is measured
    qz.codes.resize(dim_);
    double e2 = 0, h2 = 0;
    for (size_t i = 0; i < dim_; ++i) {
      const double code = std::clamp(round_nearest(static_cast<double>(query[i]) * inv_t), -limit, limit);
      qz.codes[i] = static_cast<int16_t>(code);
      const double h = static_cast<double>(t) * code;
      e2 += (query[i] - h) * (query[i] - h);
      h2 += h * h;
    }
    // The bound in float, so that the passes of select_int8 vectorise: e_j = A |c_j| + B |c_j - c^_j| + c0 >= E_j
    // plus every float rounding of e_j, a_j - e_j and a_j + e_j, because A, B and the per-row norms are rounded up
    // by 2^-16 relative (each float operation errs by at most 2^-24 relative) and c0 holds 2^-18 |q^| max|c^|
    // (>= the 2^-21 term and 2^-23 |a_j|) plus the underflow slack: the fp32 sums' products and a_j's last product
    // may be subnormal or, should a -ffast-math library set FTZ/DAZ, flushed to zero (< 2^-126 per operation; a
    // subnormal s_j read as zero loses at most |acc_j| t 2^-126); t itself is kept normal (else no prefilter).
    const double room = 1.0 + std::ldexp(1.0, -16);
    const double gamma = (static_cast<double>(dim_) + 16.0) * std::ldexp(1.0, -24);
    const double hnorm = std::sqrt(h2);
    qz.t = t;
    qz.A = static_cast<float>((std::sqrt(e2) + gamma * qnorm) * room);
    qz.B = static_cast<float>(hnorm * room);
    const double max_acc = static_cast<double>(dim_) * 127.0 * int8_query_limit_;
    qz.c0 = static_cast<float>((4.0 * (static_cast<double>(dim_) + 8.0) * std::ldexp(1.0, -126) +
                                (1.0 + max_acc * static_cast<double>(t)) * std::ldexp(1.0, -125) +
                                std::ldexp(1.0, -18) * std::max(hnorm, qnorm) * max_i8_norm_) * room);
    return true;
  }

  // From the kernel's integer sums acc[0..nlist) of a quantised query: the n lists the exhaustive search would
  // probe, in its order, into probes[0..n); returns how many lists were scored exactly. approx: nlist scratch.
  size_t select_int8(const float* query, const Int8Query& qz, const int32_t* acc, size_t n, float* approx,
                     int64_t* probes) const {
    const float A = qz.A, B = qz.B, c0 = qz.c0;
    const float t = qz.t;
    const float* cn = coarse_norm_.data();
    const float* fn = coarse_i8_err_.data();
    const float* scale = coarse_i8_scale_.data();
    // approx[j] becomes the lower bound a_j - e_j, upper[j] the upper bound lo_j + 2 e_j (a vectorised pass).
    std::vector<float> upper(nlist_);
    for (size_t j = 0; j < nlist_; ++j) {
      const float a = static_cast<float>(acc[j]) * t * scale[j];
      const float e = A * cn[j] + B * fn[j] + c0;
      approx[j] = a - e;
      upper[j] = approx[j] + 2.f * e;
    }
    // T: the n-th largest lower bound, with a min-heap of n; most lists fail the compare with its minimum, the
    // rest (~90 of 4096 for n = 16) replace it and sift down once (not pop + push: half the work).
    std::vector<float> heap(approx, approx + n);
    std::make_heap(heap.begin(), heap.end(), std::greater<float>());
    float lowest = heap.front();
    detail::for_each_above(
        approx + n, nlist_ - n, [&]() { return lowest; },
        [&](size_t i) {
          detail::replace_min(heap.data(), n, approx[n + i]);
          lowest = heap.front();
        },
        portable_kernels_);
    // Candidates: upper bound >= T, i.e. not below it (nextafter down: for_each_above is strict), ids ascending.
    const float below = std::nextafter(lowest, -std::numeric_limits<float>::infinity());
    std::vector<std::pair<float, int64_t>> cand;  // (exact score, list id)
    detail::for_each_above(
        upper.data(), nlist_, [&]() { return below; },
        [&](size_t j) { cand.emplace_back(0.f, static_cast<int64_t>(j)); }, portable_kernels_);
    // The shortlist's fp32 rows are scattered over 6 MB: ask for all their lines first, so that the misses
    // overlap instead of costing a memory latency per line (measured: ~1 us per row otherwise).
#if PATCHIFY_X86
    for (const auto& c : cand) {
      const char* row = reinterpret_cast<const char*>(coarse_.data() + static_cast<size_t>(c.second) * dim_);
      for (size_t b = 0; b < dim_ * sizeof(float); b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
    }
#endif
    for (auto& c : cand)
      c.first = detail::row_dot(query, coarse_.data() + static_cast<size_t>(c.second) * dim_, dim_);
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::partial_sort(cand.begin(), cand.begin() + static_cast<std::ptrdiff_t>(n), cand.end(), better);
    for (size_t j = 0; j < n; ++j) probes[j] = cand[j].second;
    return cand.size();
  }

  // order[0..n) = the n lists with the largest scores (ties -> smaller list id).
  void top_lists(const float* scores, size_t n, std::vector<int64_t>& order) const {
    order.resize(nlist_);
    for (size_t j = 0; j < nlist_; ++j) order[j] = static_cast<int64_t>(j);
    auto better_list = [&](int64_t a, int64_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
    std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n), order.end(), better_list);
  }

  int32_t image_of(const InvertedListView& list, size_t j) const {
    return list.images ? list.images[j] : image_of_patch(list.ids[j]);
  }
  int32_t image_of_patch(int64_t pid) const {
    return (pid >= 0 && static_cast<size_t>(pid) < map_size_) ? map_[pid] : -1;
  }

  // 8-bit codes: one byte per sub-quantiser. Four codes are summed side by side so that the table lookups of
  // independent codes overlap (the loop is latency-bound on the loads otherwise).
  template <class Visit>
  void scan_list_8bit(const InvertedListView& list, const float* table, float dis0, Visit& visit) const {
    const size_t M = M_;
    const uint8_t* codes = list.codes;
    size_t j = 0;
    for (; j + 4 <= list.size; j += 4) {
      const uint8_t* c0 = codes + j * M;
      const uint8_t* c1 = c0 + M;
      const uint8_t* c2 = c1 + M;
      const uint8_t* c3 = c2 + M;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      const float* t = table;
      for (size_t m = 0; m < M; ++m, t += 256) {
        s0 += t[c0[m]];
        s1 += t[c1[m]];
        s2 += t[c2[m]];
        s3 += t[c3[m]];
      }
      visit(list.ids[j], image_of(list, j), dis0 + s0);
      visit(list.ids[j + 1], image_of(list, j + 1), dis0 + s1);
      visit(list.ids[j + 2], image_of(list, j + 2), dis0 + s2);
      visit(list.ids[j + 3], image_of(list, j + 3), dis0 + s3);
    }
    for (; j < list.size; ++j) {
      const uint8_t* c = codes + j * M;
      float s = 0.f;
      const float* t = table;
      for (size_t m = 0; m < M; ++m, t += 256) s += t[c[m]];
      visit(list.ids[j], image_of(list, j), dis0 + s);
    }
  }

  template <class Visit>
  void scan_list_generic(const InvertedListView& list, const float* table, float dis0, Visit& visit) const {
    for (size_t j = 0; j < list.size; ++j) {
      detail::BitDecoder dec(list.codes + j * code_size_, nbits_);
      float s = 0.f;
      const float* t = table;
      for (size_t m = 0; m < M_; ++m, t += ksub_) s += t[dec.next()];
      visit(list.ids[j], image_of(list, j), dis0 + s);
    }
  }

  size_t dim_, nlist_, M_;
  int nbits_;
  bool packed4_ = false;
  bool portable_kernels_ = false;
  size_t dsub_ = 0, ksub_ = 0, code_size_ = 0;
  std::vector<float> coarse_;
  // The one-query coarse search's int8 prefilter: centroid codes, per row the scale, |c| and |c - c^| (rounded up),
  // the largest |c^|, and the query code limit that keeps the kernel's int32 sums exact.
  int32_t int8_query_limit_ = 0;
  bool int8_ok_ = false;
  std::vector<int8_t> coarse_i8_;
  std::vector<float> coarse_i8_scale_;
  std::vector<float> coarse_norm_;
  std::vector<float> coarse_i8_err_;
  double max_i8_norm_ = 0;
  std::vector<float> pq_t_;  // M x dsub x ksub
  std::vector<InvertedListView> lists_;
  const int32_t* map_ = nullptr;
  size_t map_size_ = 0;
  size_t num_images_ = 0;
  mutable std::mutex pool_mutex_;
  mutable std::vector<std::unique_ptr<Scratch>> pool_;
};

}  // namespace patchify
