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
#include "patchify/half.h"
#include "patchify/parallel.h"
#include "patchify/pq4_fastscan.h"
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

// Approximate coarse scores from float16 centroids: scores[j] = <q, half(rows[j])> in fp32. Half the bytes of
// dots_to_rows (the one-query coarse search streams all centroids from memory, so bytes are its cost); the
// caller bounds the error and rescores the shortlist exactly. Portable version: each row widened, then dot().
inline void dots_to_half_rows_generic(const float* q, const uint16_t* rows, size_t n, size_t d, float* scores) {
  std::vector<float> row(d);
  for (size_t j = 0; j < n; ++j) {
    for (size_t i = 0; i < d; ++i) row[i] = half_to_float(rows[j * d + i]);
    scores[j] = dot(q, row.data(), d);
  }
}

#if PATCHIFY_X86
constexpr size_t kHalfPrefetchRows = 16;  // 24 KB ahead at dim 384: measured best of 8, 16, 32

// Eight halves widened to floats (a function, not a lambda: a lambda does not inherit the target attribute).
__attribute__((target("avx2,fma,f16c"))) inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// AVX2/FMA/F16C: the fp32 kernel's schedule (four rows, four FMA chains) with 8 halves widened per load.
__attribute__((target("avx2,fma,f16c"))) inline void dots_to_half_rows_avx2(const float* q, const uint16_t* rows,
                                                                             size_t n, size_t d, float* scores) {
  const size_t d8 = d - d % 8;
  size_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const uint16_t* r0 = rows + j * d;
    const uint16_t* r1 = r0 + d;
    const uint16_t* r2 = r1 + d;
    const uint16_t* r3 = r2 + d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    // The group kHalfPrefetchRows rows ahead, a line per row every 32 halves: without it the stream is read at
    // L3/RAM latency (measured 140 -> 103 us at 4096 x 384).
    const bool prefetch = j + kHalfPrefetchRows + 4 <= n;
    const char* ahead = prefetch ? reinterpret_cast<const char*>(r0 + kHalfPrefetchRows * d) : nullptr;
    for (size_t i = 0; i < d8; i += 8) {
      if (prefetch && i % 32 == 0)
        for (int r = 0; r < 4; ++r) _mm_prefetch(ahead + (r * d + i) * sizeof(uint16_t), _MM_HINT_T0);
      const __m256 qv = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(qv, load_half8(r0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, load_half8(r1 + i), a1);
      a2 = _mm256_fmadd_ps(qv, load_half8(r2 + i), a2);
      a3 = _mm256_fmadd_ps(qv, load_half8(r3 + i), a3);
    }
    float s0 = hsum_avx2(a0), s1 = hsum_avx2(a1), s2 = hsum_avx2(a2), s3 = hsum_avx2(a3);
    for (size_t i = d8; i < d; ++i) {
      s0 = std::fma(q[i], half_to_float(r0[i]), s0);
      s1 = std::fma(q[i], half_to_float(r1[i]), s1);
      s2 = std::fma(q[i], half_to_float(r2[i]), s2);
      s3 = std::fma(q[i], half_to_float(r3[i]), s3);
    }
    scores[j] = s0;
    scores[j + 1] = s1;
    scores[j + 2] = s2;
    scores[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const uint16_t* r = rows + j * d;
    __m256 a = _mm256_setzero_ps();
    for (size_t i = 0; i < d8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_half8(r + i), a);
    float s = hsum_avx2(a);
    for (size_t i = d8; i < d; ++i) s = std::fma(q[i], half_to_float(r[i]), s);
    scores[j] = s;
  }
}
#endif

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
// it is skipped after one compare; the rare candidate above the threshold costs a linear pass over k entries.
// At 1M images the dense array (4 MB of scores + 8 MB of patch ids) misses the cache on nearly every scanned
// code; this keeps the working set to the codes and the tables, as faiss's own patch-level heap does.
// Exact: gives the same images, scores and (smallest-id) best patches as the dense per-image max.
class SmallTopImages {
 public:
  explicit SmallTopImages(size_t k) : k_(k) { hits_.reserve(k); }
  float threshold() const { return threshold_; }
  void offer(float score, int64_t image, int64_t patch) {
    for (size_t i = 0; i < hits_.size(); ++i) {
      ImageHit& h = hits_[i];
      if (h.image != image) continue;
      if (score > h.score || (score == h.score && patch < h.patch)) {
        h.score = score;
        h.patch = patch;
        if (hits_.size() == k_ && i == worst_) find_worst();
      }
      return;
    }
    const ImageHit hit{score, image, patch};
    if (hits_.size() < k_) {
      hits_.push_back(hit);
      if (hits_.size() == k_) find_worst();
    } else if (better(hit, hits_[worst_])) {
      hits_[worst_] = hit;
      find_worst();
    }
  }
  std::vector<ImageHit> take_sorted() {
    std::sort(hits_.begin(), hits_.end(), better);
    std::vector<ImageHit> out;
    out.swap(hits_);
    return out;
  }

 private:
  void find_worst() {
    worst_ = 0;
    for (size_t i = 1; i < hits_.size(); ++i)
      if (better(hits_[worst_], hits_[i])) worst_ = i;
    threshold_ = hits_[worst_].score;
  }
  size_t k_;
  size_t worst_ = 0;
  float threshold_ = -std::numeric_limits<float>::infinity();
  std::vector<ImageHit> hits_;
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
    build_half_coarse();
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
  // prefilter ran (see coarse_probe_half); either way the probes are exactly coarse_probe_exhaustive's.
  size_t coarse_probe(const float* query, size_t nprobe, float* scores_scratch, int64_t* probes) const {
    const size_t n = std::min(nprobe, nlist_);
    if (half_prefilter_usable(n)) {
      const size_t scored = coarse_probe_half(query, n, scores_scratch, probes);
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

  // Native coarse search for a batch: probes[qi * nprobe ...] for every query, the same lists as coarse_probe
  // (identical dot products). One query at a time would stream all nlist x dim centroids (6 MB at 4096 x 384)
  // from memory per query; here the centroids are walked in chunks that stay in L2 while a block of queries
  // is scored against them, so a batch reads them about once per block instead of once per query.
  void coarse_probe_batch(const float* queries, size_t nq, size_t nprobe, int num_threads, int64_t* probes) const {
    constexpr size_t kQueryBlock = 16;
    const size_t chunk_rows = std::max<size_t>(16, (192 * 1024) / (dim_ * sizeof(float)));
    const size_t n_blocks = (nq + kQueryBlock - 1) / kQueryBlock;
    const size_t n = std::min(nprobe, nlist_);
    parallel_for(0, n_blocks, num_threads, [&](size_t b) {
      const size_t q0 = b * kQueryBlock, q1 = std::min(nq, q0 + kQueryBlock);
      std::vector<float> scores((q1 - q0) * nlist_);
      const float* qs[kQueryBlock];
      float* out[kQueryBlock];
      for (size_t r0 = 0; r0 < nlist_; r0 += chunk_rows) {
        const size_t rows = std::min(chunk_rows, nlist_ - r0);
        for (size_t qi = q0; qi < q1; ++qi) {
          qs[qi - q0] = queries + qi * dim_;
          out[qi - q0] = scores.data() + (qi - q0) * nlist_ + r0;
        }
        detail::dots_queries_to_rows(qs, q1 - q0, coarse_.data() + r0 * dim_, rows, dim_, out);
      }
      std::vector<int64_t> order;  // filled by top_lists, reused across the block
      for (size_t qi = q0; qi < q1; ++qi) {
        const float* sc = scores.data() + (qi - q0) * nlist_;
        top_lists(sc, n, order);
        for (size_t j = 0; j < nprobe; ++j) probes[qi * nprobe + j] = j < n ? order[j] : -1;
      }
    });
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
            [&](size_t j, uint32_t acc) { visit(list.ids[j], image_of(list, j), lut.score(dis0, acc)); },
            portable_kernels_);
      } else if (nbits_ == 8) {
        scan_list_8bit(list, tables.table.data(), dis0, visit);
      } else {
        scan_list_generic(list, tables.table.data(), dis0, visit);
      }
    }
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

  // The float16 copy of the centroids and, per centroid, the coefficient of the error bound (see
  // coarse_probe_half). No copy (the prefilter off) if a coordinate does not fit a half or is not finite.
  void build_half_coarse() {
    half_ok_ = true;
    for (float x : coarse_)
      if (!(std::fabs(x) < 65504.f)) half_ok_ = false;  // also false for NaN
    if (!half_ok_) return;
    coarse_half_.resize(coarse_.size());
    for (size_t i = 0; i < coarse_.size(); ++i) coarse_half_[i] = float_to_half(coarse_[i]);
    // fp32 summation of d terms (any of the kernels' orders: lanes, the horizontal sum, the tail, a product
    // rounding where there is no FMA) errs by at most gamma * sum |q_i x_i|, gamma = (d + 16) 2^-24 (with slack).
    const double gamma = (static_cast<double>(dim_) + 16.0) * std::ldexp(1.0, -24);
    const double rel = std::ldexp(1.0, -11);  // half rounding of a normal number, relative
    const double sub = std::ldexp(1.0, -25) * std::sqrt(static_cast<double>(dim_));  // subnormal halves, absolute
    coarse_bound_.resize(nlist_);
    max_half_norm_ = 0;
    for (size_t j = 0; j < nlist_; ++j) {
      double c2 = 0, h2 = 0;
      for (size_t i = 0; i < dim_; ++i) {
        const double c = coarse_[j * dim_ + i], h = half_to_float(coarse_half_[j * dim_ + i]);
        c2 += c * c;
        h2 += h * h;
      }
      const double bound = (rel + gamma) * std::sqrt(c2) + gamma * std::sqrt(h2) + sub;
      coarse_bound_[j] = static_cast<float>(bound * (1.0 + std::ldexp(1.0, -16)));  // rounded up, with room
      max_half_norm_ = std::max(max_half_norm_, std::sqrt(h2));
    }
  }

  bool half_prefilter_usable(size_t n) const {
    if (!half_ok_ || n == 0 || n >= nlist_) return false;
    if (portable_kernels_) return true;
    return patchify::has_avx2_fma_f16c();
  }

  // One-query coarse search over float16 centroids, exact: the approximate score a_j = fl(<q, half(c_j)>) and the
  // fp32 score s_j the exhaustive search computes (fl(<q, c_j>)) differ by at most
  //   E_j = |q| ((2^-11 + gamma) |c_j| + gamma |half(c_j)| + 2^-25 sqrt(d)) + flush-to-zero slack
  // (half rounding: |half(x) - x| <= 2^-11 |x|, or 2^-25 below the normal range; each fp32 sum: gamma times the
  // sum of |terms|; sum |q_i x_i| <= |q| |x| by Cauchy-Schwarz). With T the n-th largest lower bound a_j - E_j,
  // n lists score at least T, so a list with a_j + E_j < T scores strictly less than n others and cannot be
  // probed, whatever the tie-break. The rest (n plus the near-ties, typically a few dozen) are scored exactly
  // with the exhaustive search's kernel and ranked as it ranks them. Writes probes[0..n); returns the number
  // scored exactly, or 0 where the bound cannot be trusted (a non-finite or huge query): then nothing is written.
  size_t coarse_probe_half(const float* query, size_t n, float* approx, int64_t* probes) const {
    double q2 = 0;
    for (size_t i = 0; i < dim_; ++i) q2 += static_cast<double>(query[i]) * query[i];
    const double qnorm = std::sqrt(q2);
    // |every partial sum| <= |q| |half(c)|: far below FLT_MAX, so no fp32 sum overflows.
    if (!std::isfinite(qnorm) || qnorm * max_half_norm_ > 1e36) return 0;
#if PATCHIFY_X86
    if (!portable_kernels_)
      detail::dots_to_half_rows_avx2(query, coarse_half_.data(), nlist_, dim_, approx);
    else
#endif
      detail::dots_to_half_rows_generic(query, coarse_half_.data(), nlist_, dim_, approx);
    // The bound in float, so that the two passes below vectorise (in double they cost a sixth of the kernel):
    // e_j = qn * coef_j + c0 >= the true E_j plus every float rounding of e_j, a_j - e_j and a_j + e_j, because
    // coef_j and qn are rounded up by 2^-16 relative (each float operation errs by at most 2^-24 relative) and c0
    // holds 2^-18 |q| max|half(c)| >= 2^-18 |a_j| (no |a_j| exceeds that) plus the flush-to-zero slack (products
    // or sums flushed to zero, should a -ffast-math library set FTZ/DAZ: < 2^-126 per operation, both sums).
    const float qn = static_cast<float>(qnorm * (1.0 + std::ldexp(1.0, -16)));
    const float c0 = static_cast<float>(4.0 * (static_cast<double>(dim_) + 8.0) * std::ldexp(1.0, -126) +
                                        std::ldexp(1.0, -18) * qnorm * max_half_norm_);
    const float* coef = coarse_bound_.data();
    // approx[j] becomes the lower bound a_j - e_j; the upper bound is lo_j + 2 e_j.
    for (size_t j = 0; j < nlist_; ++j) approx[j] -= qn * coef[j] + c0;
    // T: the n-th largest lower bound, with a min-heap of n (most lists fail the first compare).
    std::vector<float> heap;
    heap.reserve(n);
    for (size_t j = 0; j < nlist_; ++j) {
      const float lo = approx[j];
      if (heap.size() < n) {
        heap.push_back(lo);
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      } else if (lo > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = lo;
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    }
    const float threshold = heap.front();
    std::vector<std::pair<float, int64_t>> cand;  // (exact score, list id), ids ascending
    for (size_t j = 0; j < nlist_; ++j)
      if (approx[j] + 2.f * (qn * coef[j] + c0) >= threshold) cand.emplace_back(0.f, static_cast<int64_t>(j));
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
    if (list.images) return list.images[j];
    const int64_t pid = list.ids[j];
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
  // The one-query coarse search's float16 prefilter: centroids as halves, each one's error-bound coefficient.
  bool half_ok_ = false;
  std::vector<uint16_t> coarse_half_;
  std::vector<float> coarse_bound_;
  double max_half_norm_ = 0;
  std::vector<float> pq_t_;  // M x dsub x ksub
  std::vector<InvertedListView> lists_;
  const int32_t* map_ = nullptr;
  size_t map_size_ = 0;
  size_t num_images_ = 0;
  mutable std::mutex pool_mutex_;
  mutable std::vector<std::unique_ptr<Scratch>> pool_;
};

}  // namespace patchify
