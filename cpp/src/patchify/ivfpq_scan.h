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

#include "patchify/coarse_kernels.h"
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

  // Tests only: run the portable fast-scan kernel (the two must agree bit for bit) and the portable int8
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
  // Returns how many lists were scored exactly: nlist for the exhaustive fp32 search, fewer when the int8
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
    std::vector<int64_t> order;  // filled by top_indices
    top_indices(scores_scratch, nlist_, n, order);
    for (size_t j = 0; j < nprobe; ++j) probes[j] = j < n ? order[j] : -1;
  }

  // Native coarse search for a batch: probes[qi * nprobe ...] for every query, the same lists as coarse_probe
  // (both are exactly the exhaustive search's). With the int8 prefilter, blocks of queries are scored against the
  // int8 centroids four at a time (each row widened once for four queries), then each query's bound and exact
  // rescoring as in coarse_probe_int8 (measured at 4096 x 384 on one core, per query: the fp32 batch path below
  // ~84 us, the int8 one ~46 with its selection). Without it (or for a query whose bound cannot be trusted), fp32: the
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
          select_int8(queries + qi * dim_, qz[qi - q0], acc.data() + u * nlist_, n, approx.data(),
                      probes + qi * nprobe);
          for (size_t j = n; j < nprobe; ++j) probes[qi * nprobe + j] = -1;
        }
      } else {
        for (size_t qi = q0; qi < q1; ++qi) exact.push_back(qi);
      }
      if (!exact.empty()) coarse_probe_fp32_block(queries, exact, n, nprobe, probes);
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
    // Fast-scan hits wait in a small buffer with their map entry prefetched: the fast-scan lists carry no image ids
    // in list order (that would cost 4 B/patch more), so each hit looks its patch up in the patch -> image map, a
    // cache miss at millions of patches; buffered, the misses overlap instead of stalling the scan one by one.
    // Visiting late only lags the threshold (more codes pass the SIMD test); every hit is still visited.
    constexpr size_t kPending = 16;
    std::pair<int64_t, float> pending[kPending];
    size_t n_pending = 0;
    auto flush = [&]() {
      for (size_t i = 0; i < n_pending; ++i)
        visit(pending[i].first, image_of_patch(pending[i].first), pending[i].second);
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
  // A query's int16 codes and the terms of its error bound (see coarse_probe_int8).
  struct Int8Query {
    std::vector<int16_t> codes;
    float t = 0;                 // query scale: q^ = t codes
    float A = 0, B = 0, c0 = 0;  // e_j = A |c_j| + B |c_j - c^_j| + c0
  };

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
    std::vector<int64_t> order;  // filled by top_indices, reused across the block
    for (size_t u = 0; u < m; ++u) {
      top_indices(scores.data() + u * nlist_, nlist_, n, order);
      for (size_t j = 0; j < nprobe; ++j) probes[which[u] * nprobe + j] = j < n ? order[j] : -1;
    }
  }

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
        const double code =
            scale > 0 ? std::clamp(round_nearest(static_cast<double>(c[i]) / scale), -127.0, 127.0) : 0.0;
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
