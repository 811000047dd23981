// Second stage of a compressed (IVFPQ) search: for each query and each of its shortlisted images, the max inner
// product over *every* patch of the image, read from a finer copy of the vectors than the PQ codes:
//   - float16 rows (2 bytes per dimension, IEEE half, converted with half.h), or
//   - 8-bit scalar-quantised rows in faiss's ScalarQuantizer QT_8bit layout: dimension d of code c decodes to
//     vmin[d] + (c + 0.5) / 255 * vdiff[d], so <q, x> = sum_d q_d vmin_d + sum_d w_d (c_d + 0.5) with
//     w_d = q_d vdiff_d / 255: one uint8 x float dot product per row after a per-query setup, no decoding.
// Rows are addressed by patch id and may live in two segments (a memory-mapped "base" of the rows saved with the
// index, then a RAM "tail" of the rows added since); an image's patch ids are given as CSR (starts/patch_ids).
// Pure C++, no Python: the bindings release the GIL around rerank_max and rerank_top.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "patchify/cpu_features.h"
#include "patchify/half.h"
#include "patchify/parallel.h"
#include "patchify/topk.h"

#if PATCHIFY_X86
#include <immintrin.h>
#endif

namespace patchify {

enum class RerankCodec { kFloat16, kInt8 };

// Where the rows are: rows [0, n_base) at base, rows [n_base, n_base + n_tail) at tail, code_size bytes each.
struct RerankRows {
  const uint8_t* base = nullptr;
  size_t n_base = 0;
  const uint8_t* tail = nullptr;
  size_t n_tail = 0;
  size_t code_size = 0;

  const uint8_t* row(int64_t id) const {
    const size_t i = static_cast<size_t>(id);
    return i < n_base ? base + i * code_size : tail + (i - n_base) * code_size;
  }
  size_t size() const { return n_base + n_tail; }
};

namespace detail {

inline float dot_float16(const uint8_t* row, const float* q, size_t dim) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // four partial sums: lets the compiler vectorise without -ffast-math
  size_t d = 0;
  for (; d + 4 <= dim; d += 4)
    for (size_t j = 0; j < 4; ++j) acc[j] += half_to_float(h[d + j]) * q[d + j];
  for (; d < dim; ++d) acc[0] += half_to_float(h[d]) * q[d];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

inline float dot_uint8(const uint8_t* row, const float* w, size_t dim) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  size_t d = 0;
  for (; d + 8 <= dim; d += 8)
    for (size_t j = 0; j < 8; ++j) acc[j] += static_cast<float>(row[d + j]) * w[d + j];
  for (; d < dim; ++d) acc[0] += static_cast<float>(row[d]) * w[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if PATCHIFY_X86
// AVX2 + FMA (+ F16C for float16) versions, picked at run time (cpu_features.h): 8 dimensions per step into two
// accumulators, then the portable loop for the tail. Same sums in another order: results differ from the portable
// ones by float rounding only.
__attribute__((target("avx2,fma,f16c"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) inline float dot_float16_avx2(const uint8_t* row, const float* q,
                                                                      size_t dim) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  size_t d = 0;
  for (; d + 16 <= dim; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + d))),
                         _mm256_loadu_ps(q + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + d + 8))),
                         _mm256_loadu_ps(q + d + 8), a1);
  }
  float sum = hsum8(_mm256_add_ps(a0, a1));
  for (; d < dim; ++d) sum += half_to_float(h[d]) * q[d];
  return sum;
}

__attribute__((target("avx2,fma,f16c"))) inline float dot_uint8_avx2(const uint8_t* row, const float* w, size_t dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  size_t d = 0;
  for (; d + 16 <= dim; d += 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d));
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
    a0 = _mm256_fmadd_ps(lo, _mm256_loadu_ps(w + d), a0);
    a1 = _mm256_fmadd_ps(hi, _mm256_loadu_ps(w + d + 8), a1);
  }
  float sum = hsum8(_mm256_add_ps(a0, a1));
  for (; d < dim; ++d) sum += static_cast<float>(row[d]) * w[d];
  return sum;
}
#endif

inline float dot_row(RerankCodec codec, const uint8_t* row, const float* v, size_t dim, bool simd) {
#if PATCHIFY_X86
  if (simd) return codec == RerankCodec::kFloat16 ? dot_float16_avx2(row, v, dim) : dot_uint8_avx2(row, v, dim);
#else
  (void)simd;
#endif
  return codec == RerankCodec::kFloat16 ? dot_float16(row, v, dim) : dot_uint8(row, v, dim);
}

inline void check_rerank_inputs(const char* caller, RerankCodec codec, size_t dim, const RerankRows& rows,
                                const float* vmin, const float* vdiff) {
  const size_t expected = codec == RerankCodec::kFloat16 ? 2 * dim : dim;
  if (rows.code_size != expected)
    throw std::invalid_argument(std::string(caller) + ": code_size " + std::to_string(rows.code_size) +
                                " for dim " + std::to_string(dim) + " (expected " + std::to_string(expected) + ")");
  if (codec == RerankCodec::kInt8 && (vmin == nullptr || vdiff == nullptr))
    throw std::invalid_argument(std::string(caller) + ": int8 codes need vmin and vdiff");
}

// Scores stored rows against one query: float16 rows by a plain dot product, int8 rows by the per-query weights
// w_d = q_d vdiff_d / 255 and constant sum_d q_d vmin_d + 0.5 sum_d w_d (the file comment).
class RowScorer {
 public:
  RowScorer(RerankCodec codec, size_t dim, const RerankRows& rows, const float* vmin, const float* vdiff, bool simd)
      : codec_(codec), dim_(dim), rows_(rows), vmin_(vmin), vdiff_(vdiff), simd_(simd) {}

  void set_query(const float* q) {
    q_ = q;
    if (codec_ != RerankCodec::kInt8) return;
    weights_.resize(dim_);
    double c = 0.0, wsum = 0.0;
    for (size_t d = 0; d < dim_; ++d) {
      weights_[d] = q[d] * vdiff_[d] / 255.f;
      c += static_cast<double>(q[d]) * vmin_[d];
      wsum += weights_[d];
    }
    constant_ = static_cast<float>(c + 0.5 * wsum);
  }
  // id: checked by the caller (0 <= id < rows.size()).
  float score(int64_t id) const {
    return codec_ == RerankCodec::kFloat16 ? dot_row(codec_, rows_.row(id), q_, dim_, simd_)
                                           : constant_ + dot_row(codec_, rows_.row(id), weights_.data(), dim_, simd_);
  }
  size_t n_rows() const { return rows_.size(); }

 private:
  RerankCodec codec_;
  size_t dim_;
  const RerankRows& rows_;
  const float* vmin_;
  const float* vdiff_;
  bool simd_;
  const float* q_ = nullptr;
  std::vector<float> weights_;
  float constant_ = 0.f;
};

[[noreturn]] inline void fail_index(const char* caller, const std::string& what) {
  throw std::out_of_range(std::string(caller) + ": " + what);
}

inline void check_row_id(const char* caller, int64_t id, size_t n_rows) {
  if (id < 0 || static_cast<size_t>(id) >= n_rows)
    fail_index(caller, "patch id " + std::to_string(id) + " has no stored row (" + std::to_string(n_rows) + ")");
}

// One query's re-rank (scorer set to the query): best[j] / winner[j] for its r candidates (see rerank_max).
// Every index is checked where it is used (only the shortlisted images' entries: checking all of them would cost a
// pass over the whole index per search); a bad one throws, named, instead of reading out of bounds.
inline void rerank_query(const char* caller, const RowScorer& scorer, const int64_t* starts, size_t n_images,
                         const int64_t* patch_ids, size_t n_patch_ids, const int64_t* candidates, size_t r,
                         float* best, int64_t* winner) {
  for (size_t j = 0; j < r; ++j) {
    const int64_t image = candidates[j];
    float top = -std::numeric_limits<float>::infinity();
    int64_t top_id = -1;
    if (image >= static_cast<int64_t>(n_images))
      fail_index(caller, "candidate image id " + std::to_string(image) + " >= " + std::to_string(n_images) +
                             " images");
    if (image >= 0) {
      const int64_t lo = starts[image], hi = starts[image + 1];
      if (lo < 0 || lo > hi || static_cast<size_t>(hi) > n_patch_ids)
        fail_index(caller, "starts of image " + std::to_string(image) + " are not offsets into patch_ids");
      for (int64_t p = lo; p < hi; ++p) {
        const int64_t id = patch_ids[p];
        check_row_id(caller, id, scorer.n_rows());
        const float s = scorer.score(id);
        if (s > top) {
          top = s;
          top_id = id;
        }
      }
    }
    best[j] = top;
    winner[j] = top_id;
  }
}

}  // namespace detail

// queries (nq, dim) float32; candidates (nq, r) image ids, -1 = none; starts (n_images + 1) and patch_ids: image i's
// patch ids are patch_ids[starts[i] .. starts[i+1]). vmin/vdiff (dim each) for kInt8, unused for kFloat16.
// Writes best (nq, r): the max score over the image's patches (-inf for -1 or an image without patches) and
// winner (nq, r): the patch id reaching it first in CSR order (-1 likewise).
// simd: use the AVX2 kernels where the CPU has them (false: the portable loops, for tests).
inline void rerank_max(RerankCodec codec, size_t dim, const RerankRows& rows, const float* vmin, const float* vdiff,
                       const int64_t* starts, size_t n_images, const int64_t* patch_ids, size_t n_patch_ids,
                       const float* queries, size_t nq, const int64_t* candidates, size_t r, float* best,
                       int64_t* winner, int num_threads, bool simd = true) {
  simd = simd && has_avx2_fma_f16c();
  detail::check_rerank_inputs("rerank_max", codec, dim, rows, vmin, vdiff);
  parallel_for(0, nq, num_threads, [&](size_t qi) {
    detail::RowScorer scorer(codec, dim, rows, vmin, vdiff, simd);
    scorer.set_query(queries + qi * dim);
    detail::rerank_query("rerank_max", scorer, starts, n_images, patch_ids, n_patch_ids, candidates + qi * r, r,
                         best + qi * r, winner + qi * r);
  });
}

// Global + patch fusion inside the second stage (patchify.engine on IVFPQ indexes; none when weight is 0): a
// shortlisted image i with a whole-image patch (whole_patch[i] >= 0) scores weight * <q, that row> + (1 - weight) *
// its best patch score; images without one keep the best patch score. whole_patch: n_images entries by image id.
struct GlobalFusion {
  const int64_t* whole_patch = nullptr;
  size_t n_images = 0;
  double weight = 0.0;
};

// The whole second stage of a top-k search: rerank_max over each query's r candidates (fused with each image's
// whole-image score where fusion.weight > 0), then its k best by that score, best first; ties keep the candidates'
// order (what a stable sort gives). Doing the selection here, not in numpy, saves a two-stage query the ~0.1 ms
// that half a dozen numpy calls cost when each runs with cold caches after the scan. candidate_scores (nq, r): the
// first stage's score of each candidate, carried along. Writes (nq, k) each, k <= r: out_first (the carried score),
// out_scores, out_images, out_patches (the winning patch, whatever the fusion); a slot with no image (a -1
// candidate, an image without patches or whose patches all score NaN) holds -inf, -inf, -1, -1 and sorts last.
inline void rerank_top(RerankCodec codec, size_t dim, const RerankRows& rows, const float* vmin, const float* vdiff,
                       const int64_t* starts, size_t n_images, const int64_t* patch_ids, size_t n_patch_ids,
                       const float* queries, size_t nq, const int64_t* candidates, const float* candidate_scores,
                       size_t r, size_t k, const GlobalFusion& fusion, float* out_first, float* out_scores,
                       int64_t* out_images, int64_t* out_patches, int num_threads, bool simd = true) {
  simd = simd && has_avx2_fma_f16c();
  detail::check_rerank_inputs("rerank_top", codec, dim, rows, vmin, vdiff);
  if (k > r)
    throw std::invalid_argument("rerank_top: k " + std::to_string(k) + " > " + std::to_string(r) + " candidates");
  const bool fuse = fusion.weight != 0.0;
  if (fuse && fusion.whole_patch == nullptr) throw std::invalid_argument("rerank_top: fusion without whole_patch");
  // float32 arithmetic, as numpy does with a Python float weight and float32 scores
  const float global_w = static_cast<float>(fusion.weight), patch_w = static_cast<float>(1.0 - fusion.weight);
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  parallel_for(0, nq, num_threads, [&](size_t qi) {
    detail::RowScorer scorer(codec, dim, rows, vmin, vdiff, simd);
    scorer.set_query(queries + qi * dim);
    std::vector<float> best(r);
    std::vector<int64_t> winner(r);
    const int64_t* cand = candidates + qi * r;
    detail::rerank_query("rerank_top", scorer, starts, n_images, patch_ids, n_patch_ids, cand, r, best.data(),
                         winner.data());
    if (fuse)
      for (size_t j = 0; j < r; ++j) {
        if (winner[j] < 0) continue;
        if (static_cast<size_t>(cand[j]) >= fusion.n_images)
          detail::fail_index("rerank_top", "candidate image id " + std::to_string(cand[j]) + " >= " +
                                               std::to_string(fusion.n_images) + " whole_patch entries");
        const int64_t whole = fusion.whole_patch[cand[j]];
        if (whole < 0) continue;
        detail::check_row_id("rerank_top", whole, rows.size());
        best[j] = global_w * scorer.score(whole) + patch_w * best[j];
      }
    std::vector<uint32_t> order;
    // best is never NaN: rerank_query keeps only scores above -inf, and a whole-image row is a stored vector, checked
    // finite when it was added
    top_indices(best.data(), r, k, order);
    for (size_t i = 0; i < k; ++i) {
      const size_t j = order[i], o = qi * k + i;
      const bool found = winner[j] >= 0;  // else best[j] is -inf and winner[j] -1 already
      out_first[o] = found ? candidate_scores[qi * r + j] : kNone;
      out_scores[o] = best[j];
      out_images[o] = found ? cand[j] : -1;
      out_patches[o] = winner[j];
    }
  });
}

}  // namespace patchify
