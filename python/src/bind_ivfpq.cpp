// Bindings of the fused IVFPQ scanner (cpp/src/patchify/ivfpq_scan.h). The Python wrapper is
// patchify/index/ivfpq.py; arrays follow arrays.h (checked, never converted).
//
// The scanner reads faiss's inverted lists and our patch->image map through raw pointers; this wrapper holds
// references to the numpy arrays (views of faiss's memory, and the map) so they outlive the pointers. Python
// must call set_lists again after every faiss add/remove, because faiss may reallocate its lists.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "arrays.h"
#include "patchify/ivfpq_scan.h"

namespace py = pybind11;
using namespace patchify_bindings;

namespace {

struct PyIVFPQScanner {
  std::unique_ptr<patchify::IVFPQScanner> core;
  std::vector<py::object> list_refs;
  py::object map_ref;

  PyIVFPQScanner(const py::array& coarse, const py::array& pq, int nbits, bool packed4) {
    if (nbits < 1 || nbits > 16) throw std::invalid_argument("nbits: expected 1 to 16, got " + std::to_string(nbits));
    const float* c = array_data<float>(coarse, "coarse_centroids", {"nlist", "dim"});
    const py::ssize_t ksub = py::ssize_t(1) << nbits;
    const float* p = array_data<float>(pq, "pq_centroids", {"M", ksub, "dsub"});
    const size_t nlist = coarse.shape(0), dim = coarse.shape(1), M = pq.shape(0), dsub = pq.shape(2);
    if (M * dsub != dim)
      throw std::invalid_argument("pq_centroids: expected shape (M, " + std::to_string(ksub) + ", dsub) with M * dsub = " +
                                  std::to_string(dim) + " (the coarse centroids' dimension), got " + describe(pq));
    core = std::make_unique<patchify::IVFPQScanner>(dim, nlist, M, nbits, c, p, packed4);
  }

  void set_lists(const std::vector<py::array>& codes, const std::vector<py::array>& ids,
                 const std::vector<py::array>& images) {
    const size_t nlist = core->nlist();
    if (codes.size() != nlist || ids.size() != nlist || (!images.empty() && images.size() != nlist))
      throw std::invalid_argument("set_lists: expected one codes and one ids array per inverted list (" +
                                  std::to_string(nlist) + "), and images empty or one per list too; got " +
                                  std::to_string(codes.size()) + " codes, " + std::to_string(ids.size()) + " ids, " +
                                  std::to_string(images.size()) + " images");
    std::vector<py::object> refs;
    refs.reserve(3 * nlist);
    for (size_t l = 0; l < nlist; ++l) {
      const std::string at = "[" + std::to_string(l) + "]";
      const int64_t* id_ptr = array_data<int64_t>(ids[l], "ids" + at, {"n"});
      const size_t n = static_cast<size_t>(ids[l].shape(0));
      check_array(codes[l], "codes" + at, {py::dtype::of<uint8_t>()}, {"code_bytes"});
      const size_t expected = core->list_code_bytes(n);
      if (static_cast<size_t>(codes[l].shape(0)) != expected)
        throw std::invalid_argument("codes" + at + ": list " + std::to_string(l) + " has " +
                                    std::to_string(codes[l].shape(0)) + " code bytes for " + std::to_string(n) +
                                    " ids, expected " + std::to_string(expected) +
                                    (core->packed4() ? " (fast-scan blocks of 32 vectors)"
                                                     : " (code_size " + std::to_string(core->code_size()) + ")"));
      const int32_t* img_ptr = nullptr;
      if (!images.empty()) {
        img_ptr = array_data<int32_t>(images[l], "images" + at, {n});
        refs.push_back(images[l]);
      }
      core->set_list(l, static_cast<const uint8_t*>(codes[l].data()), id_ptr, n, img_ptr);
      refs.push_back(codes[l]);
      refs.push_back(ids[l]);
    }
    list_refs.swap(refs);
  }

  void set_image_map(const py::array& map, size_t num_images) {
    const int32_t* data = array_data<int32_t>(map, "patch_to_image", {"n_patches"});
    core->set_image_map(data, static_cast<size_t>(map.shape(0)), num_images);
    map_ref = map;
  }

  // Outputs are (nq, min(k, num_images)): a huge k costs nothing; queries that reach fewer images are padded.
  auto search(const py::array& queries, const int64_t* probes, size_t nprobe, size_t k, int num_threads) {
    const float* q = static_cast<const float*>(queries.data());
    const size_t nq = static_cast<size_t>(queries.shape(0));
    const size_t kk = core->result_width(k);
    SearchResults out(nq, kk);
    float* s = out.score_data();
    int64_t* im = out.image_data();
    int64_t* pa = out.patch_data();
    {
      py::gil_scoped_release release;
      core->search(q, nq, probes, nprobe, kk, num_threads, s, im, pa);
    }
    return out.tuple();
  }
};

}  // namespace

void bind_ivfpq(py::module_& m) {
  py::class_<PyIVFPQScanner>(m, "IVFPQScanner",
                             "Fused max-over-patches ADC scanner over a faiss IndexIVFPQ's "
                             "or IndexIVFPQFastScan's inverted lists (inner product, by_residual). Built by "
                             "patchify.index.ivfpq.")
      .def(py::init<const py::array&, const py::array&, int, bool>(), py::arg("coarse_centroids"),
           py::arg("pq_centroids"), py::arg("nbits"), py::arg("packed4") = false,
           "coarse_centroids (nlist, dim) and pq_centroids (M, 2^nbits, dim / M), float32 C-contiguous (copied). "
           "packed4: the lists hold 4-bit codes in faiss's fast-scan blocks of 32 vectors, scanned with uint8 "
           "tables in SIMD registers (scores quantised as faiss's fast-scan search quantises them).")
      .def("set_lists", &PyIVFPQScanner::set_lists, py::arg("codes"), py::arg("ids"),
           py::arg("images") = std::vector<py::array>{},
           "One uint8 code array (n * code_size bytes, or whole fast-scan blocks) and one int64 id array per "
           "inverted list (views of faiss's memory), and "
           "optionally each list's int32 image ids in list order (saves a map lookup per scanned code).")
      .def("set_image_map", &PyIVFPQScanner::set_image_map, py::arg("patch_to_image"), py::arg("num_images"),
           "int32 array indexed by patch id giving the image id (-1: removed); image ids are < num_images.")
      .def(
          "search",
          [](PyIVFPQScanner& self, const py::array& queries, const py::array& probes, py::ssize_t k,
             int num_threads) {
            const size_t k_asked = check_k(k);
            array_data<float>(queries, "queries", {"nq", self.core->dim()});
            const int64_t* p = array_data<int64_t>(probes, "probes", {queries.shape(0), "nprobe"});
            return self.search(queries, p, static_cast<size_t>(probes.shape(1)), k_asked, num_threads);
          },
          py::arg("queries"), py::arg("probes"), py::arg("k"), py::arg("num_threads") = 0,
          "Top-k images per query: (scores, image_ids, patch_ids), each (nq, min(k, num_images)), padded with "
          "-inf / -1 where a query reaches fewer images.")
      .def(
          "search_native",
          [](PyIVFPQScanner& self, const py::array& queries, py::ssize_t nprobe, py::ssize_t k, int num_threads) {
            const size_t k_asked = check_k(k);
            if (nprobe < 1) throw std::invalid_argument("nprobe: expected an integer >= 1, got " + std::to_string(nprobe));
            array_data<float>(queries, "queries", {"nq", self.core->dim()});
            return self.search(queries, nullptr, static_cast<size_t>(nprobe), k_asked, num_threads);
          },
          py::arg("queries"), py::arg("nprobe"), py::arg("k"), py::arg("num_threads") = 0,
          "As search, with the coarse search (top-nprobe centroids by inner product) done in C++ too.")
      .def(
          "coarse_probe",
          [](PyIVFPQScanner& self, const py::array& query, size_t nprobe) {
            const float* q = array_data<float>(query, "query", {self.core->dim()});
            std::vector<float> scratch(self.core->nlist());
            py::array_t<int64_t> probes(static_cast<py::ssize_t>(nprobe));
            self.core->coarse_probe(q, nprobe, scratch.data(), probes.mutable_data());
            return probes;
          },
          py::arg("query"), py::arg("nprobe"), "The native coarse search's probed lists for one query.");
  m.def(
      "ivfpq_patch_scores",
      [](PyIVFPQScanner& self, const py::array& query, const py::array& probes) {
        const float* q = array_data<float>(query, "query", {self.core->dim()});
        const int64_t* p = array_data<int64_t>(probes, "probes", {"nprobe"});
        const size_t nprobe = static_cast<size_t>(probes.shape(0));
        std::vector<int64_t> ids;
        std::vector<float> scores;
        {
          py::gil_scoped_release release;
          self.core->patch_scores(q, p, nprobe, ids, scores);
        }
        return py::make_tuple(py::array_t<int64_t>(static_cast<py::ssize_t>(ids.size()), ids.data()),
                              py::array_t<float>(static_cast<py::ssize_t>(scores.size()), scores.data()));
      },
      py::arg("scanner"), py::arg("query"), py::arg("probes"),
      "Test hook: every (patch id, score) the scanner computes for one query over the probed lists.");
}
