// Tests of the 4-bit fast-scan path (pq4_fastscan.h, IVFPQScanner with packed4):
//  - the packed layout against faiss's packing algorithm (pq4_pack_codes, bbs = 32) written out here;
//  - the AVX2 kernel against the portable one: the same hits, in the same order, with the same accumulators;
//  - the fused search against a brute-force reference (quantised table sums, max per image, sorted), with both
//    kernels, several thread counts, k in the pruned and in the dense path;
//  - patch scores against the float ADC score within the table quantisation error.
// (The comparison with faiss's own IndexIVFPQFastScan distances is in tests/test_ivfpq.py.)
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "patchify/ivfpq_scan.h"
#include "patchify/pq4_fastscan.h"

namespace {

// faiss's pq4_pack_codes for one list: codes is n x ceil(M/2) bytes (two 4-bit codes per byte, sub-quantiser
// 2i in the low nibble), output whole blocks of 32 vectors.
std::vector<uint8_t> faiss_pack(const std::vector<uint8_t>& codes, size_t n, size_t M) {
  const size_t nsq = patchify::pq4_nsq(M), row = (M + 1) / 2;
  const uint8_t perm0[16] = {0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15};
  std::vector<uint8_t> out(patchify::pq4_list_bytes(n, M), 0);
  uint8_t* dst = out.data();
  for (size_t i0 = 0; i0 < n; i0 += 32) {
    for (size_t sq = 0; sq < nsq; sq += 2) {
      std::array<uint8_t, 32> c{}, c0{}, c1{};
      for (size_t k = 0; k < 32; ++k) c[k] = i0 + k < n ? codes[(i0 + k) * row + sq / 2] : 0;
      for (size_t j = 0; j < 32; ++j) {
        c0[j] = c[j] & 15;
        c1[j] = c[j] >> 4;
      }
      for (size_t j = 0; j < 16; ++j) {
        dst[j] = static_cast<uint8_t>(c0[perm0[j]] | (c0[perm0[j] + 16] << 4));
        dst[j + 16] = static_cast<uint8_t>(c1[perm0[j]] | (c1[perm0[j] + 16] << 4));
      }
      dst += 32;
    }
  }
  return out;
}

struct PackedList {
  std::vector<std::vector<uint8_t>> raw;  // per vector: M codes
  std::vector<uint8_t> packed;
};

PackedList random_list(size_t n, size_t M, std::mt19937& rng) {
  PackedList l;
  const size_t row = (M + 1) / 2;
  std::vector<uint8_t> flat(n * row, 0);
  l.raw.resize(n);
  for (size_t v = 0; v < n; ++v)
    for (size_t m = 0; m < M; ++m) {
      const uint8_t c = static_cast<uint8_t>(rng() % 16);
      l.raw[v].push_back(c);
      flat[v * row + m / 2] |= static_cast<uint8_t>(m % 2 ? c << 4 : c);
    }
  l.packed = faiss_pack(flat, n, M);
  return l;
}

void test_layout() {
  std::mt19937 rng(1);
  for (size_t M : {1, 2, 7, 16, 48}) {
    for (size_t n : {1, 31, 32, 33, 70}) {
      PackedList l = random_list(n, M, rng);
      CHECK(l.packed.size() == patchify::pq4_list_bytes(n, M));
      std::vector<uint8_t> mine(l.packed.size(), 0);
      for (size_t v = 0; v < n; ++v)
        for (size_t m = 0; m < M; ++m) {
          CHECK(patchify::pq4_packed_code(l.packed.data(), M, v, m) == l.raw[v][m]);
          patchify::pq4_set_packed_code(mine.data(), M, v, m, l.raw[v][m]);
        }
      CHECK(mine == l.packed);
    }
  }
}

void random_table(std::vector<float>& table, size_t M, std::mt19937& rng) {
  std::normal_distribution<float> g;
  table.resize(M * 16);
  for (auto& x : table) x = g(rng);
}

// Both kernels see the same threshold schedule (raised by the hits themselves) and must call hit() identically.
void test_kernels_agree() {
  std::mt19937 rng(2);
  for (size_t M : {1, 3, 16, 48, 255}) {
    for (size_t n : {1, 5, 32, 33, 100, 257}) {
      PackedList l = random_list(n, M, rng);
      std::vector<float> table;
      random_table(table, M, rng);
      patchify::Pq4Lut lut;
      lut.quantise(table.data(), M);
      // Every accumulator against the quantised entries summed directly.
      for (bool portable : {true, false}) {
        std::vector<std::pair<size_t, uint32_t>> all;
        patchify::detail::pq4_scan_list(
            l.packed.data(), n, lut, []() { return uint16_t(0); },
            [&](size_t j, uint32_t acc) { all.emplace_back(j, acc); }, portable);
        CHECK(all.size() == n);
        for (size_t j = 0; j < all.size() && j < n; ++j) {
          uint32_t expect = 0;
          for (size_t m = 0; m < M; ++m) expect += lut.packed[(m / 2) * 32 + (m % 2) * 16 + l.raw[j][m]];
          CHECK(all[j].first == j && all[j].second == expect);
        }
      }
      // A rising threshold: each hit raises it to its accumulator minus a little.
      std::vector<std::pair<size_t, uint32_t>> hits[2];
      for (int portable = 0; portable < 2; ++portable) {
        uint32_t floor = 0;
        patchify::detail::pq4_scan_list(
            l.packed.data(), n, lut, [&]() { return static_cast<uint16_t>(floor); },
            [&](size_t j, uint32_t acc) {
              hits[portable].emplace_back(j, acc);
              floor = std::max(floor, acc > 3 ? acc - 3 : 0u);
            },
            portable == 1);
      }
      CHECK(hits[0] == hits[1]);
      CHECK(!hits[0].empty());
    }
  }
}

struct Fixture {
  size_t dim, nlist = 4, M, dsub;
  std::vector<float> coarse, pq;
  std::vector<PackedList> lists;
  std::vector<std::vector<int64_t>> ids;
  std::vector<int32_t> image_of;
  std::vector<int64_t> patch_list, patch_pos;
  size_t n_images;

  Fixture(size_t dim_, size_t M_, size_t n_patches, size_t n_images_, unsigned seed)
      : dim(dim_), M(M_), dsub(dim_ / M_), n_images(n_images_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g;
    coarse.resize(nlist * dim);
    pq.resize(M * 16 * dsub);
    for (auto& x : coarse) x = g(rng) * 0.5f;
    for (auto& x : pq) x = g(rng) * 0.3f;
    std::vector<size_t> sizes(nlist, 0);
    patch_list.resize(n_patches);
    patch_pos.resize(n_patches);
    image_of.resize(n_patches);
    for (size_t p = 0; p < n_patches; ++p) {
      patch_list[p] = static_cast<int64_t>(rng() % nlist);
      patch_pos[p] = static_cast<int64_t>(sizes[patch_list[p]]++);
      image_of[p] = static_cast<int32_t>(rng() % n_images);
    }
    ids.resize(nlist);
    for (size_t l = 0; l < nlist; ++l) {
      lists.push_back(random_list(sizes[l], M, rng));
      ids[l].resize(sizes[l]);
    }
    for (size_t p = 0; p < n_patches; ++p) ids[patch_list[p]][patch_pos[p]] = static_cast<int64_t>(p);
  }

  const std::vector<uint8_t>& codes_of(size_t p) const { return lists[patch_list[p]].raw[patch_pos[p]]; }
};

double dot(const float* a, const float* b, size_t d) {
  double s = 0;
  for (size_t i = 0; i < d; ++i) s += double(a[i]) * b[i];
  return s;
}

void test_search(size_t dim, size_t M, size_t n_patches, size_t n_images, unsigned seed) {
  Fixture f(dim, M, n_patches, n_images, seed);
  patchify::IVFPQScanner s(f.dim, f.nlist, f.M, 4, f.coarse.data(), f.pq.data(), true);
  CHECK(s.packed4() && s.list_code_bytes(33) == 2 * patchify::pq4_block_bytes(M));
  for (size_t l = 0; l < f.nlist; ++l)
    s.set_list(l, f.lists[l].packed.data(), f.ids[l].data(), f.ids[l].size());
  s.set_image_map(f.image_of.data(), f.image_of.size(), f.n_images);

  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> g;
  const size_t nq = 4;
  std::vector<float> q(nq * f.dim);
  for (auto& x : q) x = g(rng);
  const std::vector<int64_t> probes = {0, 2, -1, /**/ 1, 3, 0, /**/ 3, 2, 1, /**/ 0, 1, 2};
  const size_t nprobe = 3;

  for (size_t qi = 0; qi < nq; ++qi) {
    const float* query = q.data() + qi * f.dim;
    // The reference: the float table (checked against the codebooks here), quantised as Pq4Lut does, summed per
    // patch. The scanner's own table is used so that the comparison of scores can be exact.
    std::vector<float> table(f.M * 16);
    s.compute_table(query, table.data());
    for (size_t m = 0; m < f.M; ++m)
      for (size_t c = 0; c < 16; ++c)
        CHECK_NEAR(table[m * 16 + c], dot(query + m * f.dsub, f.pq.data() + (m * 16 + c) * f.dsub, f.dsub), 1e-4);
    patchify::Pq4Lut lut;
    lut.quantise(table.data(), f.M);
    std::vector<float> ref(n_patches, -INFINITY);
    std::vector<double> exact(n_patches, 0);
    for (size_t pr = 0; pr < nprobe; ++pr) {
      const int64_t l = probes[qi * nprobe + pr];
      if (l < 0) continue;
      const float dis0 = static_cast<float>(patchify::detail::dot(query, f.coarse.data() + l * f.dim, f.dim));
      for (int64_t pid : f.ids[l]) {
        uint32_t acc = 0;
        double ex = dis0;
        for (size_t m = 0; m < f.M; ++m) {
          const uint8_t c = f.codes_of(pid)[m];
          acc += lut.packed[(m / 2) * 32 + (m % 2) * 16 + c];
          ex += table[m * 16 + c];
        }
        ref[pid] = lut.score(dis0, acc);
        exact[pid] = ex;
      }
    }
    // Patch scores: the quantised reference exactly, the float ADC score within the rounding of M entries.
    std::vector<int64_t> pids;
    std::vector<float> scores;
    s.patch_scores(query, probes.data() + qi * nprobe, nprobe, pids, scores);
    size_t reached = 0;
    for (float r : ref) reached += std::isfinite(r) ? 1 : 0;
    CHECK(pids.size() == reached);
    const double bound = 0.5 * f.M / lut.scale + 1e-4;
    for (size_t j = 0; j < pids.size(); ++j) {
      CHECK_NEAR(scores[j], ref[pids[j]], 1e-5);
      CHECK_NEAR(scores[j], exact[pids[j]], bound);
    }
    // Top-k images: best patch per image (ties -> smaller patch id), images by score (ties -> smaller id).
    std::vector<std::pair<float, int64_t>> best(f.n_images, {-INFINITY, -1});
    for (size_t p = 0; p < n_patches; ++p) {
      if (!std::isfinite(ref[p])) continue;
      auto& b = best[f.image_of[p]];
      if (ref[p] > b.first || (ref[p] == b.first && static_cast<int64_t>(p) < b.second)) b = {ref[p], p};
    }
    std::vector<int64_t> order;
    for (size_t i = 0; i < f.n_images; ++i)
      if (best[i].second >= 0) order.push_back(static_cast<int64_t>(i));
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return best[a].first > best[b].first || (best[a].first == best[b].first && a < b);
    });
    for (size_t k : {size_t(1), size_t(5), f.n_images}) {
      for (bool portable : {false, true}) {
        s.set_portable_kernels(portable);
        for (int threads : {1, 2}) {
          std::vector<float> out_s(k);
          std::vector<int64_t> out_i(k), out_p(k);
          s.search(query, 1, probes.data() + qi * nprobe, nprobe, k, threads, out_s.data(), out_i.data(),
                   out_p.data());
          for (size_t j = 0; j < k; ++j) {
            if (j < order.size()) {
              CHECK(out_i[j] == order[j]);
              CHECK(out_p[j] == best[order[j]].second);
              CHECK(out_s[j] == best[order[j]].first);
            } else {
              CHECK(out_i[j] == -1 && out_p[j] == -1);
            }
          }
        }
      }
      s.set_portable_kernels(false);
    }
  }
  // Batched native coarse search gives the same images as one query at a time.
  std::vector<float> a_s(nq * 3), b_s(3);
  std::vector<int64_t> a_i(nq * 3), a_p(nq * 3), b_i(3), b_p(3);
  s.search(q.data(), nq, nullptr, 2, 3, 2, a_s.data(), a_i.data(), a_p.data());
  for (size_t qi = 0; qi < nq; ++qi) {
    s.search(q.data() + qi * f.dim, 1, nullptr, 2, 3, 1, b_s.data(), b_i.data(), b_p.data());
    for (size_t j = 0; j < 3; ++j) CHECK(a_i[qi * 3 + j] == b_i[j] && a_s[qi * 3 + j] == b_s[j]);
  }
}

}  // namespace

int main() {
  test_layout();
  test_kernels_agree();
  test_search(24, 12, 400, 30, 11);
  test_search(21, 7, 150, 30, 12);     // M odd: a padded sub-quantiser
  test_search(48, 48, 1000, 300, 13);  // k = 300 > kSmallTopK: the dense per-image path
  CHECK_THROWS(patchify::IVFPQScanner(16, 2, 4, 8, nullptr, nullptr, true), std::invalid_argument);
  return TEST_MAIN_RESULT();
}
