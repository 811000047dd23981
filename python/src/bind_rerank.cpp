// Bindings of the second-stage re-scorer (cpp/src/patchify/rerank.h). The Python wrapper is
// patchify/index/rerank.py; arrays follow arrays.h (checked, never converted).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "arrays.h"
#include "patchify/rerank.h"

namespace py = pybind11;
using namespace patchify_bindings;

namespace {

auto rerank_max(const std::string& codec, const py::array& base, const py::array& tail, const py::array& vmin,
                const py::array& vdiff, const py::array& starts, const py::array& patch_ids, const py::array& queries,
                const py::array& candidates, int num_threads) {
  patchify::RerankCodec kind;
  if (codec == "float16") {
    kind = patchify::RerankCodec::kFloat16;
  } else if (codec == "int8") {
    kind = patchify::RerankCodec::kInt8;
  } else {
    throw std::invalid_argument("codec: expected 'float16' or 'int8', got '" + codec + "'");
  }
  check_array(queries, "queries", {py::dtype::of<float>()}, {"nq", "dim"});
  const size_t nq = static_cast<size_t>(queries.shape(0)), dim = static_cast<size_t>(queries.shape(1));
  const size_t code_size = kind == patchify::RerankCodec::kFloat16 ? 2 * dim : dim;
  patchify::RerankRows rows;
  rows.code_size = code_size;
  rows.base = array_data<uint8_t>(base, "base", {"n_base", code_size});
  rows.n_base = static_cast<size_t>(base.shape(0));
  rows.tail = array_data<uint8_t>(tail, "tail", {"n_tail", code_size});
  rows.n_tail = static_cast<size_t>(tail.shape(0));
  const float* vmin_p = nullptr;
  const float* vdiff_p = nullptr;
  if (kind == patchify::RerankCodec::kInt8) {
    vmin_p = array_data<float>(vmin, "vmin", {dim});
    vdiff_p = array_data<float>(vdiff, "vdiff", {dim});
  }
  const int64_t* st = array_data<int64_t>(starts, "starts", {"n_images + 1"});
  if (starts.shape(0) < 1) throw std::invalid_argument("starts: expected at least one entry");
  const size_t n_images = static_cast<size_t>(starts.shape(0)) - 1;
  const int64_t* pid = array_data<int64_t>(patch_ids, "patch_ids", {"n"});
  const size_t n_pid = static_cast<size_t>(patch_ids.shape(0));
  const int64_t* cand = array_data<int64_t>(candidates, "candidates", {nq, "r"});
  const size_t r = static_cast<size_t>(candidates.shape(1));
  py::array_t<float> best({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(r)});
  py::array_t<int64_t> winner({static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(r)});
  float* b = best.mutable_data();
  int64_t* w = winner.mutable_data();
  const float* q = static_cast<const float*>(queries.data());
  {
    py::gil_scoped_release release;
    patchify::rerank_max(kind, dim, rows, vmin_p, vdiff_p, st, n_images, pid, n_pid, q, nq, cand, r, b, w,
                         num_threads);
  }
  return py::make_tuple(best, winner);
}

}  // namespace

void bind_rerank(py::module_& m) {
  m.def("rerank_max", &rerank_max, py::arg("codec"), py::arg("base"), py::arg("tail"), py::arg("vmin"),
        py::arg("vdiff"), py::arg("starts"), py::arg("patch_ids"), py::arg("queries"), py::arg("candidates"),
        py::arg("num_threads") = 0,
        "Second stage of a compressed search: for candidates (nq, r) image ids (-1 = none), the max inner product "
        "over every patch of each image (image i's patch ids: patch_ids[starts[i]:starts[i+1]]), read from uint8 "
        "code rows indexed by patch id (rows [0, len(base)) in base, the rest in tail): float16 (2*dim bytes) or "
        "faiss QT_8bit (dim bytes; vmin, vdiff float32 (dim,)). Returns (best (nq, r) float32, -inf for none; "
        "winner (nq, r) int64 patch ids, -1 for none).");
}
