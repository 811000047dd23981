// Minimal thread pool-free parallel loop. std::thread (not OpenMP) so that the extension never fights
// faiss's or onnxruntime's own OpenMP runtimes over the same cores.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace patchify {

// num_threads <= 0 means "all hardware threads".
inline int resolve_num_threads(int num_threads) {
  if (num_threads > 0) return num_threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Calls fn(i) for every i in [begin, end) on up to num_threads threads. Work is handed out in chunks
// through an atomic counter so uneven items (large vs small images, long vs short inverted lists)
// still balance. The first exception thrown by any fn is rethrown on the calling thread.
template <class Fn>
void parallel_for(size_t begin, size_t end, int num_threads, Fn&& fn, size_t chunk = 1) {
  if (end <= begin) return;
  const size_t n = end - begin;
  chunk = std::max<size_t>(1, chunk);
  const size_t n_chunks = (n + chunk - 1) / chunk;
  const size_t workers = std::min<size_t>(static_cast<size_t>(resolve_num_threads(num_threads)), n_chunks);
  if (workers <= 1) {
    for (size_t i = begin; i < end; ++i) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&]() {
    while (true) {
      const size_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= n_chunks) return;
      const size_t lo = begin + c * chunk;
      const size_t hi = std::min(end, lo + chunk);
      try {
        for (size_t i = lo; i < hi; ++i) fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        next.store(n_chunks);  // stop handing out work
        return;
      }
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (size_t t = 0; t + 1 < workers; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace patchify
