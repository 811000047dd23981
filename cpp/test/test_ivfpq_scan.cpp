// Unit test of the fused IVFPQ scanner against a brute-force reference written out in full here: decode every
// code, score it as <q, centroid> + <q, decoded residual>, group by image with max, sort.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "patchify/ivfpq_scan.h"

namespace {

struct Fixture {
  size_t dim = 16, nlist = 5, M = 4;
  int nbits;
  size_t ksub, dsub, code_size;
  std::vector<float> coarse, pq;
  std::vector<std::vector<uint8_t>> codes;  // per list
  std::vector<std::vector<int64_t>> ids;    // per list
  std::vector<std::vector<uint32_t>> raw;   // per patch: the sub-quantiser indices
  std::vector<int64_t> patch_list;          // per patch: its list
  std::vector<int32_t> image_of;            // per patch
  size_t n_images = 40, n_patches = 0;  // 280 patches: more than kSmallTopK (the dense path is tested too)

  explicit Fixture(int nbits_, unsigned seed) : nbits(nbits_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g;
    ksub = size_t(1) << nbits;
    dsub = dim / M;
    code_size = (M * nbits + 7) / 8;
    coarse.resize(nlist * dim);
    pq.resize(M * ksub * dsub);
    for (auto& x : coarse) x = g(rng);
    for (auto& x : pq) x = g(rng) * 0.3f;
    codes.resize(nlist);
    ids.resize(nlist);
    // Patch ids deliberately not contiguous per list; several patches per image spread over lists.
    n_patches = n_images * 7;
    image_of.resize(n_patches);
    raw.resize(n_patches);
    patch_list.resize(n_patches);
    for (size_t p = 0; p < n_patches; ++p) {
      image_of[p] = static_cast<int32_t>(p % n_images);
      const size_t l = rng() % nlist;
      patch_list[p] = static_cast<int64_t>(l);
      std::vector<uint8_t> code(code_size, 0);
      size_t bit = 0;
      for (size_t m = 0; m < M; ++m) {
        const uint32_t c = rng() % ksub;
        raw[p].push_back(c);
        for (int b = 0; b < nbits; ++b, ++bit)
          if (c >> b & 1u) code[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
      }
      codes[l].insert(codes[l].end(), code.begin(), code.end());
      ids[l].push_back(static_cast<int64_t>(p));
    }
  }

  double reference_score(const std::vector<float>& q, size_t p) const {
    double s = 0;
    const float* c = coarse.data() + patch_list[p] * dim;
    for (size_t i = 0; i < dim; ++i) s += double(q[i]) * c[i];
    for (size_t m = 0; m < M; ++m)
      for (size_t i = 0; i < dsub; ++i) s += double(q[m * dsub + i]) * pq[(m * ksub + raw[p][m]) * dsub + i];
    return s;
  }
};

void test_scores_and_ranking(int nbits) {
  Fixture f(nbits, 7 + nbits);
  // IVFPQScanner holds a mutex, so it is built in place rather than copied.
  patchify::IVFPQScanner s(f.dim, f.nlist, f.M, f.nbits, f.coarse.data(), f.pq.data());
  for (size_t l = 0; l < f.nlist; ++l) s.set_list(l, f.codes[l].data(), f.ids[l].data(), f.ids[l].size());
  s.set_image_map(f.image_of.data(), f.image_of.size(), f.n_images);

  std::mt19937 rng(3);
  std::normal_distribution<float> g;
  const size_t nq = 3, k = 5;
  std::vector<float> q(nq * f.dim);
  for (auto& x : q) x = g(rng);
  const std::vector<int64_t> probes = {0, 2, 4, /**/ 1, -1, 3, /**/ 4, 3, 2};  // -1 = faiss padding
  const size_t nprobe = 3;

  // Every patch score against the reference.
  std::vector<int64_t> pids;
  std::vector<float> scores;
  for (size_t qi = 0; qi < nq; ++qi) {
    std::vector<float> query(q.begin() + qi * f.dim, q.begin() + (qi + 1) * f.dim);
    s.patch_scores(query.data(), probes.data() + qi * nprobe, nprobe, pids, scores);
    size_t expected = 0;
    for (size_t p = 0; p < nprobe; ++p)
      if (probes[qi * nprobe + p] >= 0) expected += f.ids[probes[qi * nprobe + p]].size();
    CHECK(pids.size() == expected);
    for (size_t j = 0; j < pids.size(); ++j) CHECK_NEAR(scores[j], f.reference_score(query, pids[j]), 1e-4);
  }

  // Image ranking: max over the probed patches, ties by image id; both thread counts agree.
  for (int threads : {1, 3}) {
    std::vector<float> out_s(nq * k);
    std::vector<int64_t> out_i(nq * k), out_p(nq * k);
    s.search(q.data(), nq, probes.data(), nprobe, k, threads, out_s.data(), out_i.data(), out_p.data());
    for (size_t qi = 0; qi < nq; ++qi) {
      std::vector<float> query(q.begin() + qi * f.dim, q.begin() + (qi + 1) * f.dim);
      std::vector<std::pair<double, int64_t>> best(f.n_images, {-1e30, -1});
      for (size_t p = 0; p < nprobe; ++p) {
        const int64_t l = probes[qi * nprobe + p];
        if (l < 0) continue;
        for (int64_t pid : f.ids[l]) {
          const double sc = f.reference_score(query, pid);
          auto& b = best[f.image_of[pid]];
          if (sc > b.first) b = {sc, pid};
        }
      }
      std::vector<int64_t> order(f.n_images);
      for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
      std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return best[a].first > best[b].first; });
      for (size_t j = 0; j < k; ++j) {
        CHECK(out_i[qi * k + j] == order[j]);
        CHECK(out_p[qi * k + j] == best[order[j]].second);
        CHECK_NEAR(out_s[qi * k + j], best[order[j]].first, 1e-4);
      }
    }
  }

  // Per-list image arrays (the map in list order) give the same results as map lookups.
  {
    std::vector<float> a_s(nq * k), b_s(nq * k);
    std::vector<int64_t> a_i(nq * k), a_p(nq * k), b_i(nq * k), b_p(nq * k);
    s.search(q.data(), nq, probes.data(), nprobe, k, 1, a_s.data(), a_i.data(), a_p.data());
    std::vector<std::vector<int32_t>> list_images(f.nlist);
    for (size_t l = 0; l < f.nlist; ++l) {
      for (int64_t pid : f.ids[l]) list_images[l].push_back(f.image_of[pid]);
      s.set_list(l, f.codes[l].data(), f.ids[l].data(), f.ids[l].size(), list_images[l].data());
    }
    s.search(q.data(), nq, probes.data(), nprobe, k, 2, b_s.data(), b_i.data(), b_p.data());
    CHECK(a_s == b_s && a_i == b_i && a_p == b_p);
    // Native coarse search (probes == nullptr) visits the top-nprobe centroids by inner product.
    std::vector<float> scratch(f.nlist);
    std::vector<int64_t> native(2);
    s.coarse_probe(q.data(), 2, scratch.data(), native.data());
    for (size_t l = 0; l < f.nlist; ++l)
      if (l != static_cast<size_t>(native[0]) && l != static_cast<size_t>(native[1])) {
        CHECK(scratch[l] <= scratch[native[1]]);
      }
    CHECK(scratch[native[0]] >= scratch[native[1]]);
    for (size_t l = 0; l < f.nlist; ++l) s.set_list(l, f.codes[l].data(), f.ids[l].data(), f.ids[l].size());
  }

  // Removing an image through the map (-1) drops it from the results; k larger than the hits pads.
  std::vector<int32_t> map = f.image_of;
  for (auto& img : map)
    if (img != 0) img = -1;
  s.set_image_map(map.data(), map.size(), f.n_images);
  std::vector<float> out_s(k);
  std::vector<int64_t> out_i(k), out_p(k);
  const std::vector<int64_t> all = {0, 1, 2, 3, 4};
  s.search(q.data(), 1, all.data(), all.size(), k, 1, out_s.data(), out_i.data(), out_p.data());
  CHECK(out_i[0] == 0);
  CHECK(out_i[1] == -1 && out_p[1] == -1 && std::isinf(out_s[1]));

  CHECK_THROWS(s.set_list(f.nlist, nullptr, nullptr, 0), std::out_of_range);
  const std::vector<int64_t> bad = {static_cast<int64_t>(f.nlist)};
  CHECK_THROWS(s.patch_scores(q.data(), bad.data(), 1, pids, scores), std::out_of_range);
}

// A huge k allocates nothing big: outputs are sized with result_width(k) = min(k, num_images) and the search's
// heaps never exceed the images either. A query that reaches fewer images than that is padded.
void test_huge_k_is_bounded_by_images() {
  Fixture f(8, 21);
  patchify::IVFPQScanner s(f.dim, f.nlist, f.M, f.nbits, f.coarse.data(), f.pq.data());
  for (size_t l = 0; l < f.nlist; ++l) s.set_list(l, f.codes[l].data(), f.ids[l].data(), f.ids[l].size());
  CHECK(s.result_width(size_t(1) << 62) == 0);  // no image map yet: nothing can be reported
  s.set_image_map(f.image_of.data(), f.image_of.size(), f.n_images);
  const size_t kk = s.result_width(size_t(1) << 62);
  CHECK(kk == f.n_images && s.result_width(4) == 4);
  std::mt19937 rng(5);
  std::normal_distribution<float> g;
  std::vector<float> q(f.dim);
  for (auto& x : q) x = g(rng);
  // All lists probed: every image is reached, no padding; the first k equal a k = 4 search.
  const std::vector<int64_t> all = {0, 1, 2, 3, 4};
  std::vector<float> out_s(kk), small_s(4);
  std::vector<int64_t> out_i(kk), out_p(kk), small_i(4), small_p(4);
  s.search(q.data(), 1, all.data(), all.size(), kk, 2, out_s.data(), out_i.data(), out_p.data());
  s.search(q.data(), 1, all.data(), all.size(), 4, 2, small_s.data(), small_i.data(), small_p.data());
  std::vector<int64_t> seen(out_i.begin(), out_i.end());
  std::sort(seen.begin(), seen.end());
  for (size_t i = 0; i < kk; ++i) CHECK(seen[i] == static_cast<int64_t>(i));
  for (size_t j = 0; j < 4; ++j) CHECK(out_i[j] == small_i[j] && out_p[j] == small_p[j] && out_s[j] == small_s[j]);
  // One list probed: fewer images than kk are reached, the rest is padding.
  const int64_t one = 0;
  std::vector<bool> reached(f.n_images, false);
  for (int64_t pid : f.ids[0]) reached[f.image_of[pid]] = true;
  const size_t n_reached = static_cast<size_t>(std::count(reached.begin(), reached.end(), true));
  CHECK(n_reached < kk);
  s.search(q.data(), 1, &one, 1, kk, 1, out_s.data(), out_i.data(), out_p.data());
  for (size_t j = 0; j < kk; ++j) CHECK((j < n_reached) == (out_i[j] >= 0 && reached[out_i[j]]));
  CHECK(out_i[kk - 1] == -1 && out_p[kk - 1] == -1 && std::isinf(out_s[kk - 1]));
  // The same through the dense per-image path (k above kSmallTopK): more images than kSmallTopK.
  std::vector<int32_t> spread(f.image_of.size());
  for (size_t p = 0; p < spread.size(); ++p) spread[p] = static_cast<int32_t>(p);  // one image per patch
  s.set_image_map(spread.data(), spread.size(), spread.size());
  const size_t wide = s.result_width(size_t(1) << 62);
  CHECK(wide == f.n_patches && wide > patchify::IVFPQScanner::kSmallTopK);
  std::vector<float> w_s(wide);
  std::vector<int64_t> w_i(wide), w_p(wide);
  s.search(q.data(), 1, all.data(), all.size(), wide, 1, w_s.data(), w_i.data(), w_p.data());
  for (size_t j = 0; j < wide; ++j) CHECK(w_i[j] == w_p[j] && w_i[j] >= 0);
  for (size_t j = 1; j < wide; ++j) CHECK(w_s[j - 1] >= w_s[j]);
  // k = 0 writes nothing.
  w_i[0] = 42;
  s.search(q.data(), 1, all.data(), all.size(), 0, 1, w_s.data(), w_i.data(), w_p.data());
  CHECK(w_i[0] == 42);
}

// The batched native coarse search (centroids walked in cache-sized chunks, queries in blocks) must pick exactly
// the lists the one-query and the exhaustive searches pick, through the int8 prefilter (AVX2 and portable) and the
// fp32 path: sizes chosen so that both the centroid chunks (dim 1024 -> 48 fp32 / 32 int8 rows per chunk) and the
// query blocks (16) split, with a partial last chunk and block; dim 1026 adds a scalar tail (1026 % 8 = 2,
// % 16 = 2), chunks of 47 rows (odd: a leftover row per kernel pass) and 39 queries (a leftover trio). Query 5
// is zero (no int8 bound: the fp32 path inside an int8 block, shifting the four-query groups after it).
void test_batched_coarse_probe(size_t dim, size_t M, size_t nq) {
  const size_t nlist = 100, nprobe = 7;
  std::mt19937 rng(9);
  std::normal_distribution<float> g;
  std::vector<float> coarse(nlist * dim), pq(M * 256 * (dim / M)), q(nq * dim);
  for (auto& x : coarse) x = g(rng);
  for (auto& x : pq) x = g(rng);
  for (auto& x : q) x = g(rng);
  std::fill(q.begin() + 5 * dim, q.begin() + 6 * dim, 0.f);
  patchify::IVFPQScanner s(dim, nlist, M, 8, coarse.data(), pq.data());
  for (bool portable : {false, true})
    for (int threads : {1, 2}) {
      s.set_portable_kernels(portable);
      std::vector<int64_t> batch(nq * nprobe);
      s.coarse_probe_batch(q.data(), nq, nprobe, threads, batch.data());
      std::vector<float> scratch(nlist);
      std::vector<int64_t> one(nprobe), exact(nprobe);
      for (size_t qi = 0; qi < nq; ++qi) {
        s.coarse_probe(q.data() + qi * dim, nprobe, scratch.data(), one.data());
        s.coarse_probe_exhaustive(q.data() + qi * dim, nprobe, scratch.data(), exact.data());
        for (size_t j = 0; j < nprobe; ++j) CHECK(batch[qi * nprobe + j] == one[j] && one[j] == exact[j]);
      }
    }
  s.set_portable_kernels(false);
  // nprobe > nlist pads with -1 like faiss.
  std::vector<int64_t> padded(2 * (nlist + 3));
  s.coarse_probe_batch(q.data(), 2, nlist + 3, 1, padded.data());
  CHECK(padded[nlist] == -1 && padded[nlist + 2] == -1 && padded[nlist - 1] >= 0);
}

// SmallTopImages (linear up to kLinear entries, hashed with an indexed heap beyond) keeps exactly the k best
// distinct images of a stream of patch offers, with their best scores and smallest-id best patches: against a
// per-image max over the whole stream, for k on both sides of kLinear, scores with many ties (a tenth of a unit
// on 0..100), images revisited often (500 images, 5000 offers), and offers gated by the threshold as the scan
// gates them.
void test_small_top_images() {
  std::mt19937 rng(17);
  std::uniform_int_distribution<int> image_of(0, 499), tenths(0, 1000);
  for (size_t k : {size_t(1), size_t(5), size_t(32), size_t(33), size_t(40), size_t(200), size_t(600)}) {
    for (int trial = 0; trial < 20; ++trial) {
      patchify::detail::SmallTopImages top(k);
      std::vector<patchify::ImageHit> best(500, patchify::ImageHit{-1.f, -1, -1});
      for (int64_t patch = 0; patch < 5000; ++patch) {
        const int64_t image = image_of(rng);
        const float score = tenths(rng) / 10.f;
        patchify::ImageHit& b = best[static_cast<size_t>(image)];
        if (b.image < 0 || score > b.score || (score == b.score && patch < b.patch)) b = {score, image, patch};
        if (score >= top.threshold()) top.offer(score, image, patch);
      }
      std::vector<patchify::ImageHit> expected;
      for (const auto& b : best)
        if (b.image >= 0) expected.push_back(b);
      std::sort(expected.begin(), expected.end(), patchify::better);
      expected.resize(std::min(k, expected.size()));
      const std::vector<patchify::ImageHit> got = top.take_sorted();
      CHECK(got.size() == expected.size());
      for (size_t j = 0; j < std::min(got.size(), expected.size()); ++j)
        CHECK(got[j].image == expected[j].image && got[j].score == expected[j].score &&
              got[j].patch == expected[j].patch);
    }
  }
}

// round_nearest (patchify/round.h) equals std::nearbyint (default rounding mode: ties to even) over the ranges its
// callers use: ties, near-ties and random values, float and double, both signs.
void test_round_nearest() {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(-40000.0, 40000.0);
  for (int k = -70000; k <= 70000; ++k) {
    const double tie = k + 0.5;
    CHECK(patchify::round_nearest(tie) == std::nearbyint(tie));
    CHECK(patchify::round_nearest(static_cast<float>(tie)) == std::nearbyint(static_cast<float>(tie)));
    const double near = std::nextafter(tie, 0.0);
    CHECK(patchify::round_nearest(near) == std::nearbyint(near));
  }
  for (int i = 0; i < 200000; ++i) {
    const double x = u(rng);
    CHECK(patchify::round_nearest(x) == std::nearbyint(x));
    CHECK(patchify::round_nearest(static_cast<float>(x / 100)) == std::nearbyint(static_cast<float>(x / 100)));
  }
  CHECK(patchify::round_nearest(-0.4) == 0.0 && patchify::round_nearest(0.4f) == 0.f);
}

// The int8 coarse kernels (portable, AVX2, AVX-512 BW+VNNI; one query and four at a time) give the same integer
// sums, including at the extremes the query code limit allows (every product at its largest magnitude, all one
// sign: the largest sum the kernels may meet), with dims that leave a tail after the 16- and 32-wide loops and a
// row count that leaves rows after the four-row groups.
void test_int8_kernels() {
  std::mt19937 rng(33);
  for (size_t d : {size_t(13), size_t(16), size_t(48), size_t(384), size_t(385), size_t(1026)}) {
    const size_t n = 37;
    const int32_t limit = patchify::detail::int8_query_limit(d);
    std::uniform_int_distribution<int> code(-127, 127), qcode(-limit, limit);
    for (int extreme = 0; extreme < 2; ++extreme) {
      std::vector<int8_t> rows(n * d);
      std::vector<int16_t> q(4 * d);
      for (auto& x : rows) x = static_cast<int8_t>(extreme ? 127 : code(rng));
      for (auto& x : q) x = static_cast<int16_t>(extreme ? -limit : qcode(rng));
      std::vector<int32_t> ref(4 * n), got(4 * n);
      for (size_t t = 0; t < 4; ++t)  // the reference shares no code with the kernels
        for (size_t j = 0; j < n; ++j) {
          int64_t sum = 0;
          for (size_t i = 0; i < d; ++i) sum += int64_t(q[t * d + i]) * rows[j * d + i];
          ref[t * n + j] = static_cast<int32_t>(sum);
        }
      if (extreme) CHECK(ref[0] == -int64_t(limit) * 127 * int64_t(d));
      const int16_t* qs[4] = {q.data(), q.data() + d, q.data() + 2 * d, q.data() + 3 * d};
      int32_t* outs[4] = {got.data(), got.data() + n, got.data() + 2 * n, got.data() + 3 * n};
      // Every kernel this CPU can run: portable, AVX2, AVX-512; one query at a time and four.
      using One = void (*)(const int16_t*, const int8_t*, size_t, size_t, int32_t*);
      using Four = void (*)(const int16_t* const*, const int8_t*, size_t, size_t, int32_t* const*);
      std::vector<std::pair<One, Four>> kernels = {{patchify::detail::dots_to_int8_rows_generic, nullptr}};
#if PATCHIFY_X86
      if (patchify::has_avx2())
        kernels.emplace_back(patchify::detail::dots_to_int8_rows_avx2, patchify::detail::dots_4q_int8_rows_avx2);
      if (patchify::has_avx512_vnni())
        kernels.emplace_back(patchify::detail::dots_to_int8_rows_avx512, patchify::detail::dots_4q_int8_rows_avx512);
#endif
      for (const auto& [one, four] : kernels) {
        std::fill(got.begin(), got.end(), 0);
        for (size_t t = 0; t < 4; ++t) one(qs[t], rows.data(), n, d, outs[t]);
        CHECK(got == ref);
        if (four == nullptr) continue;
        std::fill(got.begin(), got.end(), 0);
        four(qs, rows.data(), n, d, outs);
        CHECK(got == ref);
      }
      // The dispatchers, portable and not.
      for (bool portable : {false, true}) {
        std::fill(got.begin(), got.end(), 0);
        if (!patchify::detail::dots_4q_int8_rows(qs, rows.data(), n, d, outs, portable))
          for (size_t t = 0; t < 4; ++t)
            patchify::detail::dots_to_int8_rows(qs[t], rows.data(), n, d, outs[t], portable);
        CHECK(got == ref);
      }
    }
  }
}

// The one-query coarse search's int8 prefilter must pick exactly the exhaustive fp32 search's lists, in the same
// order, with both the AVX2 and the portable approximate kernels: on random centroids, on tight clusters (many
// centroids within the int8 error of each other, so the bound, not luck, decides), on exact duplicates (ties broken
// by the smaller id), on tiny, zero and lopsided rows (one large coordinate: the others round to code 0), and on
// dims with a scalar tail. Returns the most lists any query scored exactly.
size_t check_int8_probes(const std::vector<float>& coarse, size_t dim, const std::vector<float>& queries,
                         size_t nprobe, bool expect_prefilter) {
  const size_t nlist = coarse.size() / dim, M = 1;
  std::vector<float> pq(M * 256 * dim, 0.f);
  patchify::IVFPQScanner s(dim, nlist, M, 8, coarse.data(), pq.data());
  std::vector<float> scratch(nlist);
  std::vector<int64_t> fast(nprobe), exact(nprobe);
  size_t most = 0;
  for (bool portable : {false, true}) {
    s.set_portable_kernels(portable);
    for (size_t qi = 0; qi * dim < queries.size(); ++qi) {
      const float* q = queries.data() + qi * dim;
      const size_t scored = s.coarse_probe(q, nprobe, scratch.data(), fast.data());
      s.coarse_probe_exhaustive(q, nprobe, scratch.data(), exact.data());
      for (size_t j = 0; j < nprobe; ++j) CHECK(fast[j] == exact[j]);
      if (expect_prefilter && (portable || patchify::has_avx2())) {
        CHECK(scored < nlist);
        CHECK(scored >= std::min(nprobe, nlist));
      } else {
        CHECK(scored == nlist);
      }
      most = std::max(most, scored);
    }
  }
  return most;
}

void test_int8_coarse_probe() {
  std::mt19937 rng(21);
  std::normal_distribution<float> g;
  auto gauss = [&](size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = g(rng) * scale;
    return v;
  };
  for (size_t dim : {size_t(384), size_t(1026), size_t(13)}) {
    const size_t nlist = 600;
    const std::vector<float> coarse = gauss(nlist * dim, 1.f / std::sqrt(float(dim)));
    const std::vector<float> queries = gauss(20 * dim, 1.f);
    for (size_t nprobe : {size_t(1), size_t(16), size_t(100)}) {
      const size_t most = check_int8_probes(coarse, dim, queries, nprobe, true);
      if (dim == 384 && nprobe == 16) CHECK(most < 64);  // random centroids: the shortlist stays short
    }
    // nprobe >= nlist: every list, then -1 padding (the exhaustive path).
    check_int8_probes(coarse, dim, queries, nlist + 2, false);
  }
  // Clusters: 8 centres, each with 50 copies moved by 1e-4 relative (far below int8's ~2^-8 resolution): the int8
  // copies of a cluster tie or nearly so and only the exact rescoring can order them.
  {
    const size_t dim = 64, centres = 8, per = 50;
    const std::vector<float> base = gauss(centres * dim, 1.f);
    std::vector<float> coarse;
    for (size_t c = 0; c < centres; ++c)
      for (size_t k = 0; k < per; ++k)
        for (size_t i = 0; i < dim; ++i) coarse.push_back(base[c * dim + i] * (1.f + 1e-4f * g(rng)));
    std::vector<float> queries = gauss(10 * dim, 1.f);
    queries.insert(queries.end(), base.begin(), base.begin() + dim);  // a query on a centre
    check_int8_probes(coarse, dim, queries, 16, true);
    check_int8_probes(coarse, dim, queries, 75, true);  // the boundary inside a cluster
  }
  // Exact duplicates: groups of identical rows, so the nprobe boundary falls inside a tie.
  {
    const size_t dim = 32, distinct = 20, copies = 7;
    const std::vector<float> base = gauss(distinct * dim, 1.f);
    std::vector<float> coarse;
    for (size_t k = 0; k < copies; ++k) coarse.insert(coarse.end(), base.begin(), base.end());
    check_int8_probes(coarse, dim, gauss(10 * dim, 1.f), 10, true);
  }
  // Magnitudes: tiny rows (scales near float's subnormal range), zero rows, lopsided rows (one coordinate 1e4
  // times the rest, which all round to code 0), values beyond float16's range; and tiny or lopsided queries.
  {
    const size_t dim = 48;
    check_int8_probes(gauss(200 * dim, 1e-30f), dim, gauss(10 * dim, 1.f), 5, true);
    std::vector<float> coarse = gauss(300 * dim, 1.f);
    for (size_t j = 0; j < 300; j += 3) coarse[j * dim + j % dim] *= 1e4f;
    for (size_t i = 0; i < dim; ++i) coarse[7 * dim + i] = coarse[8 * dim + i] = 0.f;
    for (size_t i = 0; i < 10; ++i) coarse[20 * dim + i] = 1e5f;
    std::vector<float> queries = gauss(10 * dim, 1.f);
    std::vector<float> tiny = gauss(dim, 1e-20f), lopsided = gauss(dim, 1e-3f);
    lopsided[5] = 1e3f;
    queries.insert(queries.end(), tiny.begin(), tiny.end());
    queries.insert(queries.end(), lopsided.begin(), lopsided.end());
    check_int8_probes(coarse, dim, queries, 5, true);
    check_int8_probes(coarse, dim, queries, 40, true);
  }
  // The query code limit keeps every int32 sum exact (127 L d <= INT32_MAX), as large as int16 allows.
  for (size_t d : {size_t(1), size_t(384), size_t(1024), size_t(4096), size_t(20000)}) {
    const int64_t limit = patchify::detail::int8_query_limit(d);
    CHECK(limit * 127 * int64_t(d) <= std::numeric_limits<int32_t>::max());
    CHECK(limit == 32767 || (limit + 1) * 127 * int64_t(d) > std::numeric_limits<int32_t>::max());
  }
  // No trustworthy int8 copy or bound: a non-finite coordinate, a dimension too large for enough query levels
  // (20000: limit 845 < 1024), a query with a NaN, a huge query, a zero query.
  {
    std::vector<float> coarse = gauss(100 * 16, 1.f);
    coarse[37] = std::numeric_limits<float>::infinity();
    check_int8_probes(coarse, 16, gauss(4 * 16, 1.f), 5, false);
    check_int8_probes(gauss(12 * 20000, 1.f), 20000, gauss(2 * 20000, 1.f), 3, false);
    std::vector<float> q = gauss(16, 1.f);
    q[3] = std::numeric_limits<float>::quiet_NaN();
    patchify::IVFPQScanner s(16, 100, 1, 8, gauss(100 * 16, 1.f).data(), std::vector<float>(256 * 16).data());
    std::vector<float> scratch(100);
    std::vector<int64_t> probes(5);
    CHECK(s.coarse_probe(q.data(), 5, scratch.data(), probes.data()) == 100);
    q[3] = 1e37f;  // |q| |c| beyond the no-overflow margin
    CHECK(s.coarse_probe(q.data(), 5, scratch.data(), probes.data()) == 100);
    std::fill(q.begin(), q.end(), 0.f);
    CHECK(s.coarse_probe(q.data(), 5, scratch.data(), probes.data()) == 100);
  }
}

}  // namespace

int main() {
  test_small_top_images();
  test_round_nearest();
  test_int8_kernels();
  test_int8_coarse_probe();
  test_batched_coarse_probe(1024, 8, 40);
  test_batched_coarse_probe(1026, 6, 39);
  test_scores_and_ranking(8);
  test_scores_and_ranking(5);  // bit-packed codes, the generic decoder
  test_huge_k_is_bounded_by_images();
  CHECK_THROWS(patchify::IVFPQScanner(10, 1, 3, 8, nullptr, nullptr), std::invalid_argument);
  return TEST_MAIN_RESULT();
}
