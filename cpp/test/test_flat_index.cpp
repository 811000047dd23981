// FlatPatchIndex against a brute-force definition, on both kernels and both storage types: per-image max,
// tie-breaking, add in pieces (regrouping), removal, validation, and result width bounded by the images stored.
// (float16 conversion itself: test_half.cpp.)
#include "patchify/flat_index.h"

#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "check.h"

using patchify::FlatPatchIndex;
using patchify::ImageHit;

namespace {

struct Database {
  size_t dim;
  std::vector<float> vectors;
  std::vector<int64_t> patch_ids, image_ids;
};

Database random_database(size_t n_images, size_t dim, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> patches(1, 14);
  Database db{dim, {}, {}, {}};
  int64_t next_patch = 1000000;
  for (size_t i = 0; i < n_images; ++i) {
    const int count = patches(rng);
    for (int p = 0; p < count; ++p) {
      float norm = 0;
      std::vector<float> v(dim);
      for (auto& x : v) {
        x = normal(rng);
        norm += x * x;
      }
      for (auto& x : v) db.vectors.push_back(x / std::sqrt(norm));
      db.patch_ids.push_back(next_patch--);  // decreasing: patch order differs from row order
      db.image_ids.push_back(static_cast<int64_t>(3 * i + 1));
    }
  }
  return db;
}

// The definition: per image the best patch (smaller patch id on ties), then (-score, image id) order.
std::vector<ImageHit> brute_force(const Database& db, const float* query, size_t k, bool float16) {
  std::map<int64_t, ImageHit> best;
  const size_t n = db.patch_ids.size();
  for (size_t row = 0; row < n; ++row) {
    double s = 0;
    for (size_t d = 0; d < db.dim; ++d) {
      float v = db.vectors[row * db.dim + d];
      if (float16) v = patchify::half_to_float(patchify::float_to_half(v));
      s += static_cast<double>(v) * query[d];
    }
    const ImageHit hit{static_cast<float>(s), db.image_ids[row], db.patch_ids[row]};
    auto it = best.find(hit.image);
    if (it == best.end() || hit.score > it->second.score ||
        (hit.score == it->second.score && hit.patch < it->second.patch))
      best[hit.image] = hit;
  }
  std::vector<ImageHit> hits;
  for (const auto& kv : best) hits.push_back(kv.second);
  std::sort(hits.begin(), hits.end(), patchify::better);
  if (hits.size() > k) hits.resize(k);
  return hits;
}

void check_against_brute_force(const std::string& kernel, bool float16, size_t dim, size_t nq, int threads) {
  const Database db = random_database(400, dim, static_cast<unsigned>(dim + nq));
  FlatPatchIndex index(dim, float16);
  if (kernel == "avx2" && index.kernel() != "avx2") return;  // CPU without AVX2: nothing to compare
  index.set_kernel(kernel);
  index.add(db.vectors.data(), db.patch_ids.size(), db.patch_ids.data(), db.image_ids.data());
  CHECK(index.ntotal() == db.patch_ids.size());
  const size_t k = 15;
  const Database queries = random_database(nq, dim, 99);  // first nq vectors serve as queries
  std::vector<float> scores(nq * k);
  std::vector<int64_t> images(nq * k), patches(nq * k);
  index.search(queries.vectors.data(), nq, k, threads, scores.data(), images.data(), patches.data());
  for (size_t q = 0; q < nq; ++q) {
    const auto expected = brute_force(db, &queries.vectors[q * dim], k, float16);
    for (size_t j = 0; j < k; ++j) {
      CHECK_NEAR(scores[q * k + j], expected[j].score, 1e-5);
      // Images within rounding of each other may swap; with random data they practically never are.
      if (images[q * k + j] != expected[j].image) {
        CHECK(std::fabs(scores[q * k + j] - expected[j].score) < 1e-5);
      } else {
        CHECK(patches[q * k + j] == expected[j].patch);
      }
    }
  }
}

void test_ties() {
  // Images 9, 6, 4 share the best vector; inside image 4 patches 30 and 12 tie.
  const size_t dim = 16;
  std::vector<float> a(dim, 0.0f), b(dim, 0.0f);
  a[0] = 1.0f;
  b[1] = 1.0f;
  std::vector<float> vectors;
  for (const auto* v : {&b, &a, &b, &a, &a, &a, &b}) vectors.insert(vectors.end(), v->begin(), v->end());
  const std::vector<int64_t> images = {9, 9, 6, 6, 4, 4, 4}, patches = {1, 2, 3, 5, 30, 12, 40};
  for (const char* kernel : {"generic", "avx2"}) {
    FlatPatchIndex index(dim, false);
    if (std::string(kernel) == "avx2" && index.kernel() != "avx2") continue;
    index.set_kernel(kernel);
    index.add(vectors.data(), 7, patches.data(), images.data());
    float s[4];
    int64_t im[4], pa[4];
    index.search(a.data(), 1, 4, 1, s, im, pa);
    CHECK(im[0] == 4 && im[1] == 6 && im[2] == 9 && im[3] == -1);
    CHECK(pa[0] == 12 && pa[1] == 5 && pa[2] == 2 && pa[3] == -1);
    CHECK(s[0] == 1.0f && std::isinf(s[3]) && s[3] < 0);
  }
}

void test_add_in_pieces_and_remove() {
  const size_t dim = 8;
  const Database db = random_database(50, dim, 5);
  const size_t n = db.patch_ids.size();
  FlatPatchIndex whole(dim, false), pieces(dim, false);
  whole.add(db.vectors.data(), n, db.patch_ids.data(), db.image_ids.data());
  // Odd rows first, then even rows: every multi-patch image arrives split and interleaved.
  for (size_t parity = 0; parity < 2; ++parity) {
    std::vector<float> v;
    std::vector<int64_t> p, im;
    for (size_t row = 1 - parity; row < n; row += 2) {
      v.insert(v.end(), &db.vectors[row * dim], &db.vectors[(row + 1) * dim]);
      p.push_back(db.patch_ids[row]);
      im.push_back(db.image_ids[row]);
    }
    pieces.add(v.data(), p.size(), p.data(), im.data());
  }
  CHECK(pieces.ntotal() == n && pieces.n_images() == 50);
  const size_t k = 50;
  std::vector<float> s1(k), s2(k);
  std::vector<int64_t> i1(k), i2(k), p1(k), p2(k);
  whole.search(&db.vectors[0], 1, k, 2, s1.data(), i1.data(), p1.data());
  pieces.search(&db.vectors[0], 1, k, 2, s2.data(), i2.data(), p2.data());
  CHECK(i1 == i2 && p1 == p2 && s1 == s2);

  const std::vector<int64_t> doomed = {1, 4, 12345};  // images 3*0+1 and 3*1+1; 12345 is unknown
  size_t expected_removed = 0;
  for (int64_t image : db.image_ids) expected_removed += (image == 1 || image == 4);
  CHECK(pieces.remove_images(doomed.data(), doomed.size()) == expected_removed);
  CHECK(pieces.ntotal() == n - expected_removed && pieces.n_images() == 48);
  pieces.search(&db.vectors[0], 1, k, 2, s2.data(), i2.data(), p2.data());
  for (size_t j = 0; j < k; ++j) CHECK(i2[j] != 1 && i2[j] != 4);
  CHECK(i2[48] == -1);
}

void test_validation() {
  FlatPatchIndex index(4, true);
  const float nan = std::nanf("");
  const std::vector<float> bad = {1, 2, nan, 4}, huge = {1e6f, 0, 0, 0}, good = {1, 0, 0, 0};
  const int64_t id = 0, negative = -1;
  CHECK_THROWS(index.add(bad.data(), 1, &id, &id), std::invalid_argument);
  CHECK_THROWS(index.add(huge.data(), 1, &id, &id), std::invalid_argument);  // beyond float16
  CHECK_THROWS(index.add(good.data(), 1, &id, &negative), std::invalid_argument);
  CHECK(index.ntotal() == 0);
  index.add(good.data(), 1, &id, &id);
  float s;
  int64_t im, pa;
  CHECK_THROWS(index.search(bad.data(), 1, 1, 1, &s, &im, &pa), std::invalid_argument);
  s = 7.0f;
  index.search(good.data(), 1, 0, 1, &s, &im, &pa);  // k = 0: nothing to write
  CHECK(s == 7.0f);
  CHECK_THROWS(FlatPatchIndex(0, false), std::invalid_argument);
  FlatPatchIndex f32(4, false);
  const uint16_t half[4] = {0, 0, 0, 0};
  CHECK_THROWS(f32.add_float16(half, 1, &id, &id), std::invalid_argument);
  CHECK_THROWS(f32.set_kernel("sse9"), std::invalid_argument);
}

// A huge k costs no memory: callers size outputs with result_width(k) = min(k, images stored), and the search's
// own heaps never exceed the images either. An empty index gives zero columns.
void test_huge_k_is_bounded_by_images() {
  const Database db = random_database(7, 16, 11);
  FlatPatchIndex index(16, false);
  CHECK(index.result_width(size_t(1) << 62) == 0);
  index.add(db.vectors.data(), db.patch_ids.size(), db.patch_ids.data(), db.image_ids.data());
  const size_t huge = size_t(1) << 62;
  const size_t kk = index.result_width(huge);
  CHECK(kk == 7 && index.result_width(3) == 3);
  const size_t nq = 3;
  std::vector<float> s(nq * kk);
  std::vector<int64_t> im(nq * kk), pa(nq * kk);
  index.search(db.vectors.data(), nq, kk, 2, s.data(), im.data(), pa.data());
  for (size_t q = 0; q < nq; ++q) {
    const auto expected = brute_force(db, &db.vectors[q * 16], huge, false);
    CHECK(expected.size() == kk);
    for (size_t j = 0; j < kk; ++j) CHECK(im[q * kk + j] == expected[j].image && pa[q * kk + j] == expected[j].patch);
  }
}

}  // namespace

int main() {
  for (const char* kernel : {"generic", "avx2"}) {
    for (bool float16 : {false, true}) {
      check_against_brute_force(kernel, float16, 384, 1, 2);
      check_against_brute_force(kernel, float16, 384, 9, 3);
      check_against_brute_force(kernel, float16, 20, 70, 2);
      check_against_brute_force(kernel, float16, 5, 3, 1);
    }
  }
  test_ties();
  test_add_in_pieces_and_remove();
  test_validation();
  test_huge_k_is_bounded_by_images();
  return TEST_MAIN_RESULT();
}
