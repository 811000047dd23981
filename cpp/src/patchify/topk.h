// Top-k selection shared by the flat and IVFPQ indexes. Ties are broken by the smaller id so that
// results are deterministic and comparable with a numpy reference (np.lexsort on (-score, id)).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace patchify {

struct ImageHit {
  float score;
  int64_t image;  // image id
  int64_t patch;  // winning patch id
};

inline bool better(const ImageHit& a, const ImageHit& b) {
  return a.score > b.score || (a.score == b.score && a.image < b.image);
}

// Keeps the k best hits seen so far (a min-heap on "better"), for scans that see candidates one by one.
// Reserves k entries up front: callers pass k bounded by the candidates they can see (min(k, images)), never a
// user's k as is, so a huge k cannot allocate.
class TopKCollector {
 public:
  explicit TopKCollector(size_t k) : k_(k) { heap_.reserve(k); }

  // Score that a candidate must beat to enter (lowest float while not full).
  float threshold() const {
    return heap_.size() < k_ ? -std::numeric_limits<float>::infinity() : heap_.front().score;
  }

  void push(const ImageHit& hit) {
    if (k_ == 0) return;
    auto worse_first = [](const ImageHit& a, const ImageHit& b) { return better(a, b); };
    if (heap_.size() < k_) {
      heap_.push_back(hit);
      std::push_heap(heap_.begin(), heap_.end(), worse_first);
    } else if (better(hit, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), worse_first);
      heap_.back() = hit;
      std::push_heap(heap_.begin(), heap_.end(), worse_first);
    }
  }

  // Best first. Leaves the collector empty.
  std::vector<ImageHit> take_sorted() {
    std::sort(heap_.begin(), heap_.end(), better);
    std::vector<ImageHit> out;
    out.swap(heap_);
    return out;
  }

 private:
  size_t k_;
  std::vector<ImageHit> heap_;
};

// Writes up to k hits into row outputs, padding with score -inf and ids -1 when fewer exist.
inline void write_hits(const std::vector<ImageHit>& hits, size_t k, float* scores, int64_t* images,
                       int64_t* patches) {
  for (size_t j = 0; j < k; ++j) {
    if (j < hits.size()) {
      scores[j] = hits[j].score;
      images[j] = hits[j].image;
      patches[j] = hits[j].patch;
    } else {
      scores[j] = -std::numeric_limits<float>::infinity();
      images[j] = -1;
      patches[j] = -1;
    }
  }
}

}  // namespace patchify
