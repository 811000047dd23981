// Exact ("flat") patch index: every patch vector is compared with every query, and an image scores the max inner
// product over its patches. Header-only, no Python.
//
// Layout. Vectors live in one row-major buffer (float32 or IEEE float16 bits), rows padded to a multiple of 8
// lanes with zeros so the SIMD kernels never need a tail loop. Rows are kept *grouped by image*: all patches of
// one image form one contiguous run (run_begin_). That turns "max over the image's patches" into a running max
// along the scan, with no per-image scratch table and no hash lookups in the hot loop; the rare add() that
// extends an already stored image pays for a regrouping instead.
//
// Search. Rows are processed in small blocks that stay in L1; a register-blocked micro-kernel computes a tile
// of Q queries x R rows of dot products at once (each row load feeds Q FMAs, each query load R FMAs), so batch
// search is compute-bound like a GEMM while batch-1 search streams the vectors once at memory speed. Work is
// split over (query block x database chunk) items, so one query still uses every thread.
//
// SIMD. The AVX2/FMA/F16C kernel carries __attribute__((target(...))) and is picked at run time
// (patchify/cpu_features.h): the same binary runs on any x86-64 (or other CPU) through the portable kernel.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "patchify/cpu_features.h"
#include "patchify/half.h"
#include "patchify/parallel.h"
#include "patchify/topk.h"

#if PATCHIFY_X86
#define PATCHIFY_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#endif

namespace patchify {

namespace flat_detail {

// 64-byte aligned storage so 32-byte SIMD loads of a row never straddle a cache line needlessly.
template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};

template <class T>
using AlignedVector = std::vector<T, AlignedAllocator<T>>;

// ---------------------------------------------------------------------------------------------------------------
// Kernels: out[q * out_stride + r] = <queries[q], rows[r]> for q < nq, r < nr. Rows and queries are padded to
// `stride` (a multiple of 8) with zeros.

// Portable kernel. Eight independent lanes per dot product let the compiler vectorise (SSE2 at least) without
// -ffast-math; float16 rows are widened into a small float buffer first.
inline void dot_block_float(const float* queries, size_t nq, const float* rows, size_t nr, size_t stride,
                            float* out, size_t out_stride) {
  for (size_t q = 0; q < nq; ++q) {
    const float* qv = queries + q * stride;
    for (size_t r = 0; r < nr; ++r) {
      const float* rv = rows + r * stride;
      float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t d = 0; d < stride; d += 8)
        for (int l = 0; l < 8; ++l) lanes[l] += qv[d + l] * rv[d + l];
      out[q * out_stride + r] =
          ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    }
  }
}

inline void dot_block_generic(const float* queries, size_t nq, const float* rows, size_t nr, size_t stride,
                              float* out, size_t out_stride, std::vector<float>& scratch) {
  dot_block_float(queries, nq, rows, nr, stride, out, out_stride);
  (void)scratch;
}

inline void dot_block_generic(const float* queries, size_t nq, const uint16_t* rows, size_t nr, size_t stride,
                              float* out, size_t out_stride, std::vector<float>& scratch) {
  scratch.resize(nr * stride);
  for (size_t i = 0; i < nr * stride; ++i) scratch[i] = patchify::half_to_float(rows[i]);
  dot_block_float(queries, nq, scratch.data(), nr, stride, out, out_stride);
}

#if PATCHIFY_X86
PATCHIFY_AVX2_TARGET inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PATCHIFY_AVX2_TARGET inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PATCHIFY_AVX2_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Q x R register tile: Q*R accumulators stay in ymm registers for the whole dimension; each step loads R row
// vectors (widening float16 once) and reuses them against Q queries.
template <int Q, int R, class T>
PATCHIFY_AVX2_TARGET inline void dot_tile_avx2(const float* queries, const T* rows, size_t stride, float* out,
                                               size_t out_stride) {
  __m256 acc[Q][R];
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) acc[q][r] = _mm256_setzero_ps();
  for (size_t d = 0; d < stride; d += 8) {
    // Hold the smaller side in registers and stream the other one, so Q*R + min(Q,R) + 1 <= 16 ymm (no spills).
    if constexpr (Q < R) {
      __m256 qv[Q];
      for (int q = 0; q < Q; ++q) qv[q] = _mm256_loadu_ps(queries + q * stride + d);
      for (int r = 0; r < R; ++r) {
        const __m256 rv = load8(rows + r * stride + d);
        for (int q = 0; q < Q; ++q) acc[q][r] = _mm256_fmadd_ps(qv[q], rv, acc[q][r]);
      }
    } else {
      __m256 row[R];
      for (int r = 0; r < R; ++r) row[r] = load8(rows + r * stride + d);
      for (int q = 0; q < Q; ++q) {
        const __m256 qv = _mm256_loadu_ps(queries + q * stride + d);
        for (int r = 0; r < R; ++r) acc[q][r] = _mm256_fmadd_ps(qv, row[r], acc[q][r]);
      }
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) out[q * out_stride + r] = hsum(acc[q][r]);
}

// All rows of the block against Q queries: full tiles of R rows, then single rows.
template <int Q, int R, class T>
PATCHIFY_AVX2_TARGET inline void dot_rows_avx2(const float* queries, const T* rows, size_t nr, size_t stride,
                                               float* out, size_t out_stride) {
  size_t r = 0;
  for (; r + R <= nr; r += R) dot_tile_avx2<Q, R>(queries, rows + r * stride, stride, out + r, out_stride);
  for (; r < nr; ++r) dot_tile_avx2<Q, 1>(queries, rows + r * stride, stride, out + r, out_stride);
}

// One query against rows read strictly one after another: a single sequential memory stream, which the
// hardware prefetchers follow best (batch-1 search is bound by memory bandwidth, not by FMAs). Eight
// accumulators over the dimension hide the FMA latency.
template <class T>
PATCHIFY_AVX2_TARGET inline void dot_rows_sequential_avx2(const float* query, const T* rows, size_t nr,
                                                          size_t stride, float* out) {
  for (size_t r = 0; r < nr; ++r) {
    const T* row = rows + r * stride;
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    size_t d = 0;
    for (; d + 64 <= stride; d += 64)
      for (int j = 0; j < 8; ++j)
        acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8 * j), load8(row + d + 8 * j), acc[j]);
    for (int j = 0; d < stride; d += 8, ++j)
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), load8(row + d), acc[j]);
    const __m256 s0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    const __m256 s1 = _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7]));
    out[r] = hsum(_mm256_add_ps(s0, s1));
  }
}

// Tile shapes keep 8-12 accumulators in flight (FMA latency x throughput) within the 16 ymm registers.
template <class T>
PATCHIFY_AVX2_TARGET void dot_block_avx2(const float* queries, size_t nq, const T* rows, size_t nr, size_t stride,
                                         float* out, size_t out_stride) {
  size_t q = 0;
  for (; q + 4 <= nq; q += 4) dot_rows_avx2<4, 3>(queries + q * stride, rows, nr, stride, out + q * out_stride, out_stride);
  const float* qs = queries + q * stride;
  float* o = out + q * out_stride;
  switch (nq - q) {
    case 3: dot_rows_avx2<3, 3>(qs, rows, nr, stride, o, out_stride); break;
    case 2: dot_rows_avx2<2, 4>(qs, rows, nr, stride, o, out_stride); break;
    case 1:
      if (nq == 1) dot_rows_sequential_avx2(qs, rows, nr, stride, o);
      else dot_rows_avx2<1, 6>(qs, rows, nr, stride, o, out_stride);
      break;
    default: break;
  }
}
#endif

}  // namespace flat_detail

class FlatPatchIndex {
 public:
  // float16: store vectors as IEEE half (half the memory traffic); queries and arithmetic stay float32.
  FlatPatchIndex(size_t dim, bool float16)
      : dim_(dim), stride_((dim + 7) / 8 * 8), float16_(float16), simd_(has_avx2_fma_f16c()) {
    if (dim == 0) throw std::invalid_argument("dim must be >= 1");
    run_begin_.push_back(0);
  }

  size_t dim() const { return dim_; }
  size_t stride() const { return stride_; }  // padded row length in elements
  bool float16() const { return float16_; }
  size_t ntotal() const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return patch_ids_.size();
  }
  size_t n_images() const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return run_image_.size();
  }

  // Which kernel search uses: "avx2" (AVX2+FMA+F16C, when the CPU has them) or "generic". Tests switch to the
  // portable kernel to check both on one machine.
  std::string kernel() const { return simd_ ? "avx2" : "generic"; }
  void set_kernel(const std::string& name) {
    if (name == "generic") {
      simd_ = false;
    } else if (name == "avx2") {
      if (!has_avx2_fma_f16c()) throw std::invalid_argument("this CPU lacks AVX2/FMA/F16C");
      simd_ = true;
    } else {
      throw std::invalid_argument("kernel must be 'avx2' or 'generic', got '" + name + "'");
    }
  }

  // Appends n vectors (row-major, n x dim, contiguous) with their patch and image ids. Either float32 input
  // (converted when the index stores float16) or float16 bits (only into a float16 index). Vectors must be
  // finite, ids >= 0. All-or-nothing: the index is unchanged when it throws.
  void add(const float* vectors, size_t n, const int64_t* patch_ids, const int64_t* image_ids) {
    add_impl(vectors, n, patch_ids, image_ids);
  }
  void add_float16(const uint16_t* vectors, size_t n, const int64_t* patch_ids, const int64_t* image_ids) {
    if (!float16_) throw std::invalid_argument("float16 vectors can only be added to a float16 index");
    add_impl(vectors, n, patch_ids, image_ids);
  }

  // Removes every patch of the given images; returns the number of patches removed. Unknown ids are ignored.
  size_t remove_images(const int64_t* image_ids, size_t n) {
    std::unique_lock<std::shared_mutex> lock(mutex_);
    std::unordered_set<int64_t> doomed(image_ids, image_ids + n);
    size_t removed = 0, out_row = 0, out_run = 0;
    const size_t elem = float16_ ? 2 : 4;
    for (size_t run = 0; run < run_image_.size(); ++run) {
      const size_t b = run_begin_[run], e = run_begin_[run + 1];
      if (doomed.count(run_image_[run])) {
        removed += e - b;
        image_run_.erase(run_image_[run]);
        continue;
      }
      if (out_row != b) {  // compact in place, preserving order
        std::memmove(raw_row(out_row), raw_row(b), (e - b) * stride_ * elem);
        std::memmove(&patch_ids_[out_row], &patch_ids_[b], (e - b) * sizeof(int64_t));
      }
      run_image_[out_run] = run_image_[run];
      image_run_[run_image_[run]] = out_run;
      run_begin_[out_run] = out_row;
      out_row += e - b;
      ++out_run;
    }
    run_image_.resize(out_run);
    run_begin_.resize(out_run + 1);
    run_begin_[out_run] = out_row;
    patch_ids_.resize(out_row);
    if (float16_) f16_.resize(out_row * stride_); else f32_.resize(out_row * stride_);
    return removed;
  }

  // Output columns worth allocating for a top-k search: no query can rank more images than are stored, so
  // callers size their outputs nq x result_width(k) and memory stays bounded by the index, whatever k is.
  size_t result_width(size_t k) const { return std::min(k, n_images()); }

  // Top-k images for nq queries (nq x dim, contiguous float32): writes nq x k scores (best first), image ids
  // and winning patch ids; columns beyond the images stored (k from result_width() before a concurrent remove)
  // are padded with -inf / -1. k = 0 writes nothing. Internal buffers hold at most min(k, images) hits per query
  // and database chunk. Ties: larger score first, then the smaller image id; within an image the smaller patch
  // id wins a tie.
  void search(const float* queries, size_t nq, size_t k, int num_threads, float* scores, int64_t* images,
              int64_t* patches) const {
    for (size_t i = 0; i < nq * dim_; ++i)
      if (!std::isfinite(queries[i]))
        throw std::invalid_argument("query " + std::to_string(i / dim_) + " contains NaN or infinity");
    std::shared_lock<std::shared_mutex> lock(mutex_);
    if (nq == 0 || k == 0) return;
    // Pad queries to the row stride with zeros so that kernels never need a tail loop.
    std::vector<float, flat_detail::AlignedAllocator<float>> padded(nq * stride_, 0.0f);
    for (size_t q = 0; q < nq; ++q) std::memcpy(&padded[q * stride_], queries + q * dim_, dim_ * sizeof(float));

    const size_t n_runs = run_image_.size();
    const size_t threads = static_cast<size_t>(resolve_num_threads(num_threads));
    // Query blocks of <= 64 (they stay in L2 while the database streams past), database chunks so that there
    // are a few work items per thread, but each chunk still a few thousand rows.
    const size_t q_block = 64;
    const size_t n_qblocks = (nq + q_block - 1) / q_block;
    const size_t rows = patch_ids_.size();
    size_t n_chunks = 1;
    if (threads > 1 && n_runs > 1) {
      const size_t wanted = (4 * threads + n_qblocks - 1) / n_qblocks;
      n_chunks = std::max<size_t>(1, std::min({wanted, rows / 4096 + 1, n_runs}));
    }
    std::vector<size_t> chunk_runs(n_chunks + 1, 0);  // chunk c covers runs [chunk_runs[c], chunk_runs[c+1])
    for (size_t c = 1; c < n_chunks; ++c) {
      const size_t target_row = rows * c / n_chunks;
      chunk_runs[c] = static_cast<size_t>(std::upper_bound(run_begin_.begin(), run_begin_.end() - 1, target_row) -
                                          run_begin_.begin()) - 1;
      chunk_runs[c] = std::max(chunk_runs[c], chunk_runs[c - 1]);
    }
    chunk_runs[n_chunks] = n_runs;

    // partial[item][q - q0]: each item's own top-k, merged below (no locks in the scan).
    std::vector<std::vector<std::vector<ImageHit>>> partial(n_qblocks * n_chunks);
    parallel_for(0, partial.size(), num_threads, [&](size_t item) {
      const size_t qb = item / n_chunks, c = item % n_chunks;
      const size_t q0 = qb * q_block, q1 = std::min(nq, q0 + q_block);
      // No chunk can contribute more than its images: keeps a huge k from reserving huge heaps.
      const size_t chunk_k = std::min(k, chunk_runs[c + 1] - chunk_runs[c]);
      partial[item] = scan(padded.data() + q0 * stride_, q1 - q0, chunk_runs[c], chunk_runs[c + 1], chunk_k);
    });
    parallel_for(0, nq, num_threads, [&](size_t q) {
      const size_t qb = q / q_block;
      std::vector<ImageHit> merged;
      for (size_t c = 0; c < n_chunks; ++c) {
        const auto& hits = partial[qb * n_chunks + c][q - qb * q_block];
        merged.insert(merged.end(), hits.begin(), hits.end());
      }
      const size_t keep = std::min(k, merged.size());
      std::partial_sort(merged.begin(), merged.begin() + keep, merged.end(), better);
      merged.resize(keep);
      write_hits(merged, k, scores + q * k, images + q * k, patches + q * k);
    }, 16);
  }

  // Memory held: vectors (with padding), ids, the run table and the image -> run map (approximate).
  size_t nbytes() const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    return f32_.capacity() * sizeof(float) + f16_.capacity() * sizeof(uint16_t) +
           patch_ids_.capacity() * sizeof(int64_t) + run_begin_.capacity() * sizeof(size_t) +
           run_image_.capacity() * sizeof(int64_t) + image_run_.size() * (sizeof(int64_t) + sizeof(size_t) + 16);
  }

  // Raw access for saving and zero-copy views (grouped by image). Not synchronised with add/remove: callers
  // must not mutate the index while they hold these pointers.
  const void* raw_vectors() const { return float16_ ? static_cast<const void*>(f16_.data()) : f32_.data(); }
  const int64_t* raw_patch_ids() const { return patch_ids_.data(); }
  // Image id per row, expanded from the run table.
  std::vector<int64_t> row_image_ids() const {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    std::vector<int64_t> out(patch_ids_.size());
    for (size_t run = 0; run < run_image_.size(); ++run)
      std::fill(out.begin() + run_begin_[run], out.begin() + run_begin_[run + 1], run_image_[run]);
    return out;
  }

 private:
  void* raw_row(size_t row) {
    return float16_ ? static_cast<void*>(f16_.data() + row * stride_) : static_cast<void*>(f32_.data() + row * stride_);
  }

  template <class In>
  void add_impl(const In* vectors, size_t n, const int64_t* patch_ids, const int64_t* image_ids) {
    // Validate everything before touching the index.
    for (size_t i = 0; i < n; ++i) {
      if (image_ids[i] < 0) throw std::invalid_argument("image ids must be >= 0, got " + std::to_string(image_ids[i]));
      if (patch_ids[i] < 0) throw std::invalid_argument("patch ids must be >= 0, got " + std::to_string(patch_ids[i]));
    }
    for (size_t i = 0; i < n * dim_; ++i) {
      const float v = to_float(vectors[i]);
      if (!std::isfinite(v))
        throw std::invalid_argument("vector " + std::to_string(i / dim_) + " contains NaN or infinity");
      if (float16_ && std::fabs(v) > 65504.0f)
        throw std::invalid_argument("vector " + std::to_string(i / dim_) + " is out of float16 range");
    }
    std::unique_lock<std::shared_mutex> lock(mutex_);
    const size_t old_rows = patch_ids_.size();
    // Append rows in input order, extending the run table; remember whether an image was split into two runs.
    bool regroup = false;
    if (float16_) f16_.resize((old_rows + n) * stride_, 0); else f32_.resize((old_rows + n) * stride_, 0.0f);
    for (size_t i = 0; i < n; ++i) {
      store_row(old_rows + i, vectors + i * dim_);
      if (i == 0 && !run_image_.empty() && run_image_.back() == image_ids[0]) {
        // This batch continues the last stored image: extend its run (set just below), no regrouping.
      } else if (i == 0 || image_ids[i] != image_ids[i - 1]) {
        const auto found = image_run_.find(image_ids[i]);
        if (found != image_run_.end()) {
          regroup = true;  // image already stored (earlier batch, or earlier in this batch)
        } else {
          image_run_.emplace(image_ids[i], run_image_.size());
        }
        run_image_.push_back(image_ids[i]);
        run_begin_.push_back(old_rows + i + 1);  // placeholder end, fixed below
      }
      run_begin_.back() = old_rows + i + 1;
    }
    patch_ids_.insert(patch_ids_.end(), patch_ids, patch_ids + n);
    if (regroup) regroup_runs();
  }

  // Rebuilds the grouping after an image's patches arrived in more than one piece: a stable reorder of rows
  // so each image is one run again, images in order of first appearance. O(total size); the engine never
  // triggers it (it adds each image once).
  void regroup_runs() {
    std::unordered_map<int64_t, size_t> first;  // image -> new run index
    std::vector<int64_t> images;
    std::vector<size_t> count;
    for (size_t run = 0; run < run_image_.size(); ++run) {
      auto it = first.find(run_image_[run]);
      if (it == first.end()) {
        it = first.emplace(run_image_[run], images.size()).first;
        images.push_back(run_image_[run]);
        count.push_back(0);
      }
      count[it->second] += run_begin_[run + 1] - run_begin_[run];
    }
    std::vector<size_t> begin(images.size() + 1, 0);
    for (size_t i = 0; i < images.size(); ++i) begin[i + 1] = begin[i] + count[i];
    std::vector<size_t> fill(begin.begin(), begin.end() - 1);
    std::vector<size_t> dest(patch_ids_.size());
    for (size_t run = 0; run < run_image_.size(); ++run) {
      size_t& next = fill[first[run_image_[run]]];
      for (size_t row = run_begin_[run]; row < run_begin_[run + 1]; ++row) dest[row] = next++;
    }
    std::vector<int64_t> new_pids(patch_ids_.size());
    for (size_t row = 0; row < dest.size(); ++row) new_pids[dest[row]] = patch_ids_[row];
    if (float16_) permute_rows(f16_, dest); else permute_rows(f32_, dest);
    patch_ids_.swap(new_pids);
    run_image_ = images;
    run_begin_ = begin;
    image_run_.clear();
    for (size_t i = 0; i < images.size(); ++i) image_run_[images[i]] = i;
  }

  template <class T>
  void permute_rows(flat_detail::AlignedVector<T>& data, const std::vector<size_t>& dest) const {
    flat_detail::AlignedVector<T> out(data.size());
    for (size_t row = 0; row < dest.size(); ++row)
      std::memcpy(&out[dest[row] * stride_], &data[row * stride_], stride_ * sizeof(T));
    data.swap(out);
  }

  static float to_float(float v) { return v; }
  static float to_float(uint16_t v) { return patchify::half_to_float(v); }

  void store_row(size_t row, const float* v) {
    if (float16_) {
      uint16_t* out = &f16_[row * stride_];
      for (size_t d = 0; d < dim_; ++d) out[d] = patchify::float_to_half(v[d]);
    } else {
      std::memcpy(&f32_[row * stride_], v, dim_ * sizeof(float));
    }
  }
  void store_row(size_t row, const uint16_t* v) { std::memcpy(&f16_[row * stride_], v, dim_ * sizeof(uint16_t)); }

  template <class T>
  void dot_block(const float* queries, size_t nq, const T* rows, size_t nr, float* out, size_t out_stride,
                 std::vector<float>& scratch) const {
#if PATCHIFY_X86
    if (simd_) {
      flat_detail::dot_block_avx2(queries, nq, rows, nr, stride_, out, out_stride);
      return;
    }
#endif
    flat_detail::dot_block_generic(queries, nq, rows, nr, stride_, out, out_stride, scratch);
  }

  // Scans runs [run0, run1) for nq queries; returns each query's top-k over those images.
  std::vector<std::vector<ImageHit>> scan(const float* queries, size_t nq, size_t run0, size_t run1, size_t k) const {
    if (float16_) return scan_typed(f16_.data(), queries, nq, run0, run1, k);
    return scan_typed(f32_.data(), queries, nq, run0, run1, k);
  }

  template <class T>
  std::vector<std::vector<ImageHit>> scan_typed(const T* data, const float* queries, size_t nq, size_t run0,
                                                size_t run1, size_t k) const {
    std::vector<TopKCollector> top(nq, TopKCollector(k));
    // Rows per block: the block (and a tile of queries) stays in L1 while every query tile passes over it.
    // Multiples of 12 rows keep every tile shape (3, 4 or 6 rows) full; batch-1 has no reuse, so it only needs
    // blocks big enough to amortise the fold.
    const size_t row_bytes = stride_ * sizeof(T);
    const size_t budget = nq <= 2 ? 65536 : 20480;
    const size_t block = std::max<size_t>(1, std::min<size_t>(512, budget / row_bytes / 12)) * 12;
    std::vector<float> dots(nq * block);
    std::vector<float> scratch;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    std::vector<float> best(nq, neg_inf);  // running max of the current image, per query
    std::vector<size_t> best_row(nq, run_begin_[run0]);
    const size_t row_end = run_begin_[run1];
    size_t run = run0;
    for (size_t b = run_begin_[run0]; b < row_end; b += block) {
      const size_t nb = std::min(block, row_end - b);
      dot_block(queries, nq, data + b * stride_, nb, dots.data(), block, scratch);
      // Fold the block into per-image maxima; an image that ends here is offered to the query's top-k.
      size_t r = b;
      while (r < b + nb) {
        const size_t run_end = run_begin_[run + 1];
        const size_t seg_end = std::min(run_end, b + nb);
        for (size_t q = 0; q < nq; ++q) {
          const float* s = dots.data() + q * block - b;
          float m = best[q];
          size_t arg = best_row[q];
          for (size_t i = r; i < seg_end; ++i) {
            if (s[i] > m || (s[i] == m && patch_ids_[i] < patch_ids_[arg])) {
              m = s[i];
              arg = i;
            }
          }
          best[q] = m;
          best_row[q] = arg;
        }
        r = seg_end;
        if (r == run_end) {
          for (size_t q = 0; q < nq; ++q) {
            if (best[q] >= top[q].threshold()) top[q].push({best[q], run_image_[run], patch_ids_[best_row[q]]});
            best[q] = neg_inf;
            best_row[q] = r;  // first row of the next image: the initial "best" compared on ties
          }
          ++run;
        }
      }
    }
    std::vector<std::vector<ImageHit>> out(nq);
    for (size_t q = 0; q < nq; ++q) out[q] = top[q].take_sorted();
    return out;
  }

  size_t dim_, stride_;
  bool float16_;
  bool simd_;
  flat_detail::AlignedVector<float> f32_;     // rows x stride, when !float16_
  flat_detail::AlignedVector<uint16_t> f16_;  // rows x stride, when float16_
  std::vector<int64_t> patch_ids_;            // per row
  std::vector<size_t> run_begin_;             // run r = rows [run_begin_[r], run_begin_[r+1]); one run per image
  std::vector<int64_t> run_image_;            // image id per run
  std::unordered_map<int64_t, size_t> image_run_;  // image id -> run
  mutable std::shared_mutex mutex_;           // search shares, add/remove exclude (the GIL is released)
};

}  // namespace patchify
