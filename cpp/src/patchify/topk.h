// Top-k selection shared by the flat and IVFPQ indexes, and SmallTopImages (the IVFPQ scan's top-k of distinct
// images). Ties are broken by the smaller id so that results are deterministic and comparable with a numpy
// reference (np.lexsort on (-score, id)).
#pragma once

#include <algorithm>
#include <cstddef>
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

// order[0..k) = the indices of the k largest of scores[0..n), best first; ties -> the smaller index (what a stable
// sort by descending score gives). order is resized to n; k <= n.
template <class Index>
inline void top_indices(const float* scores, size_t n, size_t k, std::vector<Index>& order) {
  order.resize(n);
  for (size_t j = 0; j < n; ++j) order[j] = static_cast<Index>(j);
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(), [&](Index a, Index b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  });
}

// The hits best first, moved out (the collectors below are left empty).
inline std::vector<ImageHit> take_sorted_hits(std::vector<ImageHit>& hits) {
  std::sort(hits.begin(), hits.end(), better);
  std::vector<ImageHit> out;
  out.swap(hits);
  return out;
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
    return take_sorted_hits(heap_);
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

namespace detail {

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
    return take_sorted_hits(hits_);
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
      if (hits_.size() == k_) refresh_worst();
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

}  // namespace patchify
