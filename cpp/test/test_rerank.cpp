// The re-rank scorer (patchify/rerank.h) against a reference that decodes every row first (float16 with
// half_to_float, int8 with faiss's QT_8bit formula written out) and takes the max per image in plain loops; rows
// split between a base and a tail segment; -1 candidates; bad ids rejected. rerank_top against rerank_max and a
// stable sort.
#include "patchify/rerank.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"

using patchify::RerankCodec;
using patchify::RerankRows;

namespace {

struct Data {
  size_t dim = 37, n_images = 50;
  std::vector<int64_t> starts, patch_ids;
  std::vector<uint8_t> codes16, codes8;  // rows by patch id
  std::vector<float> vmin, vdiff, queries;
  std::vector<int64_t> candidates;
  size_t nq = 5, r = 7, n_rows = 0;
};

Data make() {
  Data d;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::uniform_int_distribution<int> count(0, 6);  // some images have no patches
  d.starts.push_back(0);
  std::vector<int64_t> owners;
  for (size_t i = 0; i < d.n_images; ++i) {
    const int c = count(rng);
    for (int j = 0; j < c; ++j) owners.push_back(static_cast<int64_t>(i));
    d.starts.push_back(static_cast<int64_t>(owners.size()));
  }
  d.n_rows = owners.size() + 10;  // rows of removed patches exist too
  // patch ids: a permutation, so an image's patches are not contiguous rows
  std::vector<int64_t> perm(d.n_rows);
  for (size_t i = 0; i < d.n_rows; ++i) perm[i] = static_cast<int64_t>(i);
  std::shuffle(perm.begin(), perm.end(), rng);
  d.patch_ids.assign(perm.begin(), perm.begin() + static_cast<long>(owners.size()));
  d.codes16.resize(d.n_rows * 2 * d.dim);
  d.codes8.resize(d.n_rows * d.dim);
  for (size_t i = 0; i < d.n_rows * d.dim; ++i) {
    const uint16_t h = patchify::float_to_half(u(rng));
    std::memcpy(&d.codes16[2 * i], &h, 2);
    d.codes8[i] = static_cast<uint8_t>(rng() & 0xFF);
  }
  for (size_t k = 0; k < d.dim; ++k) {
    d.vmin.push_back(u(rng) - 1.f);
    d.vdiff.push_back(std::fabs(u(rng)) + 0.1f);
  }
  for (size_t i = 0; i < d.nq * d.dim; ++i) d.queries.push_back(u(rng));
  std::uniform_int_distribution<int> img(-1, static_cast<int>(d.n_images) - 1);
  for (size_t i = 0; i < d.nq * d.r; ++i) d.candidates.push_back(img(rng));
  return d;
}

float reference_row(const Data& d, RerankCodec codec, int64_t id, const float* q) {
  double s = 0.0;
  for (size_t k = 0; k < d.dim; ++k) {
    float x;
    if (codec == RerankCodec::kFloat16) {
      uint16_t h;
      std::memcpy(&h, &d.codes16[(static_cast<size_t>(id) * d.dim + k) * 2], 2);
      x = patchify::half_to_float(h);
    } else {
      x = d.vmin[k] + (d.codes8[static_cast<size_t>(id) * d.dim + k] + 0.5f) / 255.f * d.vdiff[k];
    }
    s += static_cast<double>(x) * q[k];
  }
  return static_cast<float>(s);
}

void check_codec(const Data& d, RerankCodec codec, size_t split, int threads, bool simd) {
  const size_t cs = codec == RerankCodec::kFloat16 ? 2 * d.dim : d.dim;
  const uint8_t* all = codec == RerankCodec::kFloat16 ? d.codes16.data() : d.codes8.data();
  RerankRows rows{all, split, all + split * cs, d.n_rows - split, cs};
  std::vector<float> best(d.nq * d.r);
  std::vector<int64_t> winner(d.nq * d.r);
  patchify::rerank_max(codec, d.dim, rows, d.vmin.data(), d.vdiff.data(), d.starts.data(), d.n_images,
                       d.patch_ids.data(), d.patch_ids.size(), d.queries.data(), d.nq, d.candidates.data(), d.r,
                       best.data(), winner.data(), threads, simd);
  for (size_t qi = 0; qi < d.nq; ++qi) {
    for (size_t j = 0; j < d.r; ++j) {
      const int64_t image = d.candidates[qi * d.r + j];
      float top = -std::numeric_limits<float>::infinity();
      int64_t top_id = -1;
      if (image >= 0)
        for (int64_t p = d.starts[image]; p < d.starts[image + 1]; ++p) {
          const float s = reference_row(d, codec, d.patch_ids[p], &d.queries[qi * d.dim]);
          if (s > top) top = s, top_id = d.patch_ids[p];
        }
      if (top_id < 0) {
        CHECK(std::isinf(best[qi * d.r + j]) && best[qi * d.r + j] < 0 && winner[qi * d.r + j] == -1);
      } else {
        CHECK_NEAR(best[qi * d.r + j], top, 1e-4 * (1.0 + std::fabs(top)));
        // the winner scores the max too (near-ties may pick either row)
        const float won = reference_row(d, codec, winner[qi * d.r + j], &d.queries[qi * d.dim]);
        CHECK_NEAR(won, top, 1e-4 * (1.0 + std::fabs(top)));
      }
    }
  }
}

// rerank_top against rerank_max + a stable sort by score written here: same slots, same order (ties in candidate
// order), the carried first-stage scores follow their images, empty slots last as -inf / -1. weight > 0: each image's
// score fused with its whole-image row (every third image has none), the reference row decoded and summed here.
void check_top(const Data& d, RerankCodec codec, size_t k, int threads, double weight) {
  const size_t cs = codec == RerankCodec::kFloat16 ? 2 * d.dim : d.dim;
  const uint8_t* all = codec == RerankCodec::kFloat16 ? d.codes16.data() : d.codes8.data();
  RerankRows rows{all, d.n_rows, nullptr, 0, cs};
  std::vector<float> best(d.nq * d.r), first(d.nq * d.r);
  std::vector<int64_t> winner(d.nq * d.r);
  for (size_t i = 0; i < first.size(); ++i) first[i] = 100.f + static_cast<float>(i);  // traceable
  patchify::rerank_max(codec, d.dim, rows, d.vmin.data(), d.vdiff.data(), d.starts.data(), d.n_images,
                       d.patch_ids.data(), d.patch_ids.size(), d.queries.data(), d.nq, d.candidates.data(), d.r,
                       best.data(), winner.data(), 1);
  std::vector<int64_t> whole(d.n_images);
  for (size_t i = 0; i < d.n_images; ++i) whole[i] = i % 3 == 0 ? -1 : static_cast<int64_t>((7 * i) % d.n_rows);
  std::vector<float> expected = best;  // the score each candidate is ranked by
  for (size_t qi = 0; qi < d.nq && weight > 0; ++qi)
    for (size_t j = 0; j < d.r; ++j) {
      const size_t c = qi * d.r + j;
      if (winner[c] < 0 || whole[d.candidates[c]] < 0) continue;
      const float g = reference_row(d, codec, whole[d.candidates[c]], &d.queries[qi * d.dim]);
      expected[c] = static_cast<float>(weight) * g + static_cast<float>(1.0 - weight) * best[c];
    }
  std::vector<float> top_first(d.nq * k), top_scores(d.nq * k);
  std::vector<int64_t> top_images(d.nq * k), top_patches(d.nq * k);
  const patchify::GlobalFusion fusion{whole.data(), whole.size(), weight};
  patchify::rerank_top(codec, d.dim, rows, d.vmin.data(), d.vdiff.data(), d.starts.data(), d.n_images,
                       d.patch_ids.data(), d.patch_ids.size(), d.queries.data(), d.nq, d.candidates.data(),
                       first.data(), d.r, k, fusion, top_first.data(), top_scores.data(), top_images.data(),
                       top_patches.data(), threads);
  for (size_t qi = 0; qi < d.nq; ++qi) {
    std::vector<size_t> order(d.r);
    for (size_t j = 0; j < d.r; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return expected[qi * d.r + a] > expected[qi * d.r + b]; });
    for (size_t i = 0; i < k; ++i) {
      const size_t j = qi * d.r + order[i], o = qi * k + i;
      const bool found = winner[j] >= 0;
      if (weight > 0 && found)
        CHECK_NEAR(top_scores[o], expected[j], 1e-4 * (1.0 + std::fabs(expected[j])));
      else
        CHECK(top_scores[o] == expected[j]);
      CHECK(top_images[o] == (found ? d.candidates[j] : -1));
      CHECK(top_patches[o] == winner[j]);
      CHECK(found ? top_first[o] == first[j] : (std::isinf(top_first[o]) && top_first[o] < 0));
    }
  }
}

}  // namespace

int main() {
  const Data d = make();
  for (RerankCodec codec : {RerankCodec::kFloat16, RerankCodec::kInt8})
    for (size_t split : {size_t{0}, d.n_rows / 3, d.n_rows})
      for (int threads : {1, 3})
        for (bool simd : {false, true}) check_codec(d, codec, split, threads, simd);  // portable and AVX2
  const Data ties = [] {  // every query's candidates: the same images twice, and -1s, so ties and blanks are sorted
    Data t = make();
    for (size_t qi = 0; qi < t.nq; ++qi)
      for (size_t j = 0; j < t.r; ++j) t.candidates[qi * t.r + j] = t.candidates[qi * t.r + j / 2];
    return t;
  }();
  for (const Data* data : {&d, &ties})
    for (RerankCodec codec : {RerankCodec::kFloat16, RerankCodec::kInt8})
      for (size_t k : {size_t{0}, size_t{1}, size_t{3}, d.r})
        for (int threads : {1, 3})
          for (double weight : {0.0, 0.25}) check_top(*data, codec, k, threads, weight);

  // Bad input is refused, not read out of bounds.
  RerankRows rows{d.codes8.data(), d.n_rows, nullptr, 0, d.dim};
  std::vector<float> best(1);
  std::vector<int64_t> winner(1);
  const int64_t too_big = static_cast<int64_t>(d.n_images);
  CHECK_THROWS(patchify::rerank_max(RerankCodec::kInt8, d.dim, rows, d.vmin.data(), d.vdiff.data(), d.starts.data(),
                                    d.n_images, d.patch_ids.data(), d.patch_ids.size(), d.queries.data(), 1,
                                    &too_big, 1, best.data(), winner.data(), 1),
               std::out_of_range);
  // float16 codes claimed with the int8 row size
  CHECK_THROWS(patchify::rerank_max(RerankCodec::kFloat16, d.dim, rows, nullptr, nullptr, d.starts.data(),
                                    d.n_images, d.patch_ids.data(), d.patch_ids.size(), d.queries.data(), 1,
                                    d.candidates.data(), 1, best.data(), winner.data(), 1),
               std::invalid_argument);
  std::vector<float> first(d.r), out(d.r + 1);  // more results than candidates
  std::vector<int64_t> ids(d.r + 1);
  CHECK_THROWS(patchify::rerank_top(RerankCodec::kInt8, d.dim, rows, d.vmin.data(), d.vdiff.data(), d.starts.data(),
                                    d.n_images, d.patch_ids.data(), d.patch_ids.size(), d.queries.data(), 1,
                                    d.candidates.data(), first.data(), d.r, d.r + 1, {}, out.data(), out.data(),
                                    ids.data(), ids.data(), 1),
               std::invalid_argument);
  // fusion: a whole_patch table shorter than the candidates' image ids, and a whole-image patch with no row
  std::vector<int64_t> short_whole(1, 0), bad_whole(d.n_images, static_cast<int64_t>(d.n_rows));
  std::vector<float> firsts(d.nq * d.r), outs(d.nq);
  std::vector<int64_t> out_ids(d.nq);
  for (const auto& w : {short_whole, bad_whole}) {
    const patchify::GlobalFusion fusion{w.data(), w.size(), 0.5};
    CHECK_THROWS(patchify::rerank_top(RerankCodec::kInt8, d.dim, rows, d.vmin.data(), d.vdiff.data(),
                                      d.starts.data(), d.n_images, d.patch_ids.data(), d.patch_ids.size(),
                                      d.queries.data(), d.nq, d.candidates.data(), firsts.data(), d.r, 1, fusion,
                                      outs.data(), outs.data(), out_ids.data(), out_ids.data(), 1),
                 std::out_of_range);
  }
  std::printf("re-rank scorer checked against decode-then-dot for float16 and int8 rows\n");
  return TEST_MAIN_RESULT();
}
