// The one pybind11 file: converts numpy arrays to raw pointers, releases the GIL around the C++ core
// (cpp/src/patchify/*.h) and maps C++ exceptions to Python ones. No logic lives here.
//
// std::invalid_argument -> ValueError (pybind11 default), std::runtime_error -> RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "patchify/parallel.h"
#include "patchify/topk.h"
// ==== includes: tiler (owned by the tiler work) ====
// ==== includes: flat index (owned by the flat-index work) ====
// ==== includes: ivfpq scanner (owned by the ivfpq work) ====
#include "patchify/ivfpq_scan.h"

namespace py = pybind11;

#ifndef PATCHIFY_VERSION
#define PATCHIFY_VERSION "dev"
#endif

// ==== helpers: tiler ====
// ==== helpers: flat index ====
// ==== helpers: ivfpq scanner ====
// The scanner reads faiss's inverted lists and our patch->image map through raw pointers; this wrapper holds
// references to the numpy arrays (views of faiss's memory, and the map) so they outlive the pointers. Python
// must call set_lists again after every faiss add/remove, because faiss may reallocate its lists.
namespace {
using F32C = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I64C = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

struct PyIVFPQScanner {
  std::unique_ptr<patchify::IVFPQScanner> core;
  std::vector<py::object> list_refs;
  py::object map_ref;

  PyIVFPQScanner(F32C coarse, F32C pq, int nbits) {
    if (coarse.ndim() != 2) throw std::invalid_argument("coarse centroids must be (nlist, dim)");
    if (pq.ndim() != 3) throw std::invalid_argument("pq centroids must be (M, ksub, dsub)");
    const size_t nlist = coarse.shape(0), dim = coarse.shape(1), M = pq.shape(0);
    if (nbits < 1 || nbits > 16 || static_cast<size_t>(pq.shape(1)) != (size_t(1) << nbits) ||
        static_cast<size_t>(pq.shape(2)) * M != dim)
      throw std::invalid_argument("pq centroids shape does not match (M, 2^nbits, dim / M)");
    core = std::make_unique<patchify::IVFPQScanner>(dim, nlist, M, nbits, coarse.data(), pq.data());
  }

  void set_lists(const std::vector<py::array>& codes, const std::vector<py::array>& ids,
                 const std::vector<py::array>& images) {
    if (codes.size() != core->nlist() || ids.size() != core->nlist() ||
        (!images.empty() && images.size() != core->nlist()))
      throw std::invalid_argument("set_lists: need one codes and one ids array per inverted list");
    std::vector<py::object> refs;
    refs.reserve(2 * codes.size());
    for (size_t l = 0; l < codes.size(); ++l) {
      auto c = py::array_t<uint8_t, py::array::c_style>::ensure(codes[l]);
      auto i = py::array_t<int64_t, py::array::c_style>::ensure(ids[l]);
      if (!c || !i) throw std::invalid_argument("set_lists: codes must be uint8 and ids int64 C-contiguous arrays");
      const size_t n = static_cast<size_t>(i.size());
      if (static_cast<size_t>(c.size()) != n * core->code_size())
        throw std::invalid_argument("set_lists: list " + std::to_string(l) + " has " + std::to_string(c.size()) +
                                    " code bytes for " + std::to_string(n) + " ids");
      const int32_t* img_ptr = nullptr;
      if (!images.empty()) {
        auto im = py::array_t<int32_t, py::array::c_style>::ensure(images[l]);
        if (!im || static_cast<size_t>(im.size()) != n)
          throw std::invalid_argument("set_lists: images must be int32 arrays as long as the ids");
        img_ptr = im.data();
        refs.push_back(im);
      }
      core->set_list(l, c.data(), i.data(), n, img_ptr);
      refs.push_back(c);
      refs.push_back(i);
    }
    list_refs.swap(refs);
  }

  void set_image_map(py::array_t<int32_t, py::array::c_style> map, size_t num_images) {
    core->set_image_map(map.data(), static_cast<size_t>(map.size()), num_images);
    map_ref = map;
  }

  void check_queries(const F32C& q, const I64C& probes) const {
    if (q.ndim() != 2 || static_cast<size_t>(q.shape(1)) != core->dim())
      throw std::invalid_argument("queries must be (nq, " + std::to_string(core->dim()) + ") float32");
    if (probes.ndim() != 2 || probes.shape(0) != q.shape(0))
      throw std::invalid_argument("probes must be (nq, nprobe) int64");
  }
};
}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Patchify C++ core: patch tiler, flat max-over-patches index, fused IVFPQ scanner";
  m.attr("__version__") = PATCHIFY_VERSION;
  m.def("hardware_threads", []() { return patchify::resolve_num_threads(0); },
        "Number of threads used when num_threads <= 0.");

  // ==== bindings: tiler ====
  // ==== bindings: flat index ====
  // ==== bindings: ivfpq scanner ====
  py::class_<PyIVFPQScanner>(m, "IVFPQScanner",
                             "Fused max-over-patches ADC scanner over a faiss IndexIVFPQ's inverted lists "
                             "(inner product, by_residual). Built by patchify.index.ivfpq.")
      .def(py::init<F32C, F32C, int>(), py::arg("coarse_centroids"), py::arg("pq_centroids"), py::arg("nbits"))
      .def("set_lists", &PyIVFPQScanner::set_lists, py::arg("codes"), py::arg("ids"),
           py::arg("images") = std::vector<py::array>{},
           "One uint8 code array and one int64 id array per inverted list (views of faiss's memory), and "
           "optionally each list's int32 image ids in list order (saves a map lookup per scanned code).")
      .def("set_image_map", &PyIVFPQScanner::set_image_map, py::arg("patch_to_image"), py::arg("num_images"),
           "int32 array indexed by patch id giving the image id (-1: removed).")
      .def(
          "search",
          [](PyIVFPQScanner& self, F32C queries, I64C probes, size_t k, int num_threads) {
            self.check_queries(queries, probes);
            const size_t nq = queries.shape(0), nprobe = probes.shape(1);
            py::array_t<float> scores({nq, k});
            py::array_t<int64_t> images({nq, k});
            py::array_t<int64_t> patches({nq, k});
            {
              py::gil_scoped_release release;
              self.core->search(queries.data(), nq, probes.data(), nprobe, k, num_threads, scores.mutable_data(),
                                images.mutable_data(), patches.mutable_data());
            }
            return py::make_tuple(scores, images, patches);
          },
          py::arg("queries"), py::arg("probes"), py::arg("k"), py::arg("num_threads") = 0,
          "Top-k images per query: (scores, image_ids, patch_ids), each (nq, k), padded with -inf / -1.")
      .def(
          "search_native",
          [](PyIVFPQScanner& self, F32C queries, size_t nprobe, size_t k, int num_threads) {
            if (queries.ndim() != 2 || static_cast<size_t>(queries.shape(1)) != self.core->dim())
              throw std::invalid_argument("queries must be (nq, " + std::to_string(self.core->dim()) + ") float32");
            if (nprobe < 1) throw std::invalid_argument("nprobe must be >= 1");
            const size_t nq = queries.shape(0);
            py::array_t<float> scores({nq, k});
            py::array_t<int64_t> images({nq, k});
            py::array_t<int64_t> patches({nq, k});
            {
              py::gil_scoped_release release;
              self.core->search(queries.data(), nq, nullptr, nprobe, k, num_threads, scores.mutable_data(),
                                images.mutable_data(), patches.mutable_data());
            }
            return py::make_tuple(scores, images, patches);
          },
          py::arg("queries"), py::arg("nprobe"), py::arg("k"), py::arg("num_threads") = 0,
          "As search, with the coarse search (top-nprobe centroids by inner product) done in C++ too.")
      .def(
          "coarse_probe",
          [](PyIVFPQScanner& self, F32C query, size_t nprobe) {
            if (query.ndim() != 1 || static_cast<size_t>(query.shape(0)) != self.core->dim())
              throw std::invalid_argument("query must be a 1-D float32 vector of the index dimension");
            std::vector<float> scratch(self.core->nlist());
            py::array_t<int64_t> probes(nprobe);
            self.core->coarse_probe(query.data(), nprobe, scratch.data(), probes.mutable_data());
            return probes;
          },
          py::arg("query"), py::arg("nprobe"), "The native coarse search's probed lists for one query.");
  m.def(
      "ivfpq_patch_scores",
      [](PyIVFPQScanner& self, F32C query, I64C probes) {
        if (query.ndim() != 1 || static_cast<size_t>(query.shape(0)) != self.core->dim())
          throw std::invalid_argument("query must be a 1-D float32 vector of the index dimension");
        std::vector<int64_t> ids;
        std::vector<float> scores;
        {
          py::gil_scoped_release release;
          self.core->patch_scores(query.data(), probes.data(), static_cast<size_t>(probes.size()), ids, scores);
        }
        return py::make_tuple(py::array_t<int64_t>(ids.size(), ids.data()),
                              py::array_t<float>(scores.size(), scores.data()));
      },
      py::arg("scanner"), py::arg("query"), py::arg("probes"),
      "Test hook: every (patch id, score) the scanner computes for one query over the probed lists.");
}
