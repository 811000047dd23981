// Bindings of the second-stage re-scorer (cpp/src/patchify/rerank.h). The Python wrapper is
// patchify/index/rerank.py; arrays follow arrays.h (checked, never converted).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>

#include "arrays.h"
#include "patchify/rerank.h"

namespace py = pybind11;
using namespace patchify_bindings;

namespace {

// The arrays both entry points read, checked and unpacked.
struct RerankInputs {
  patchify::RerankCodec codec;
  size_t nq, dim, r, n_images, n_patch_ids;
  patchify::RerankRows rows;
  const float* vmin = nullptr;
  const float* vdiff = nullptr;
  const int64_t* starts;
  const int64_t* patch_ids;
  const float* queries;
  const int64_t* candidates;
};

RerankInputs unpack(const std::string& codec, const py::array& base, const py::array& tail, const py::array& vmin,
                    const py::array& vdiff, const py::array& starts, const py::array& patch_ids,
                    const py::array& queries, const py::array& candidates) {
  RerankInputs in;
  if (codec == "float16") {
    in.codec = patchify::RerankCodec::kFloat16;
  } else if (codec == "int8") {
    in.codec = patchify::RerankCodec::kInt8;
  } else {
    throw std::invalid_argument("codec: expected 'float16' or 'int8', got '" + codec + "'");
  }
  check_array(queries, "queries", {py::dtype::of<float>()}, {"nq", "dim"});
  in.nq = static_cast<size_t>(queries.shape(0));
  in.dim = static_cast<size_t>(queries.shape(1));
  in.queries = static_cast<const float*>(queries.data());
  const size_t code_size = in.codec == patchify::RerankCodec::kFloat16 ? 2 * in.dim : in.dim;
  in.rows.code_size = code_size;
  in.rows.base = array_data<uint8_t>(base, "base", {"n_base", code_size});
  in.rows.n_base = static_cast<size_t>(base.shape(0));
  in.rows.tail = array_data<uint8_t>(tail, "tail", {"n_tail", code_size});
  in.rows.n_tail = static_cast<size_t>(tail.shape(0));
  if (in.codec == patchify::RerankCodec::kInt8) {
    in.vmin = array_data<float>(vmin, "vmin", {in.dim});
    in.vdiff = array_data<float>(vdiff, "vdiff", {in.dim});
  }
  in.starts = array_data<int64_t>(starts, "starts", {"n_images + 1"});
  if (starts.shape(0) < 1) throw std::invalid_argument("starts: expected at least one entry");
  in.n_images = static_cast<size_t>(starts.shape(0)) - 1;
  in.patch_ids = array_data<int64_t>(patch_ids, "patch_ids", {"n"});
  in.n_patch_ids = static_cast<size_t>(patch_ids.shape(0));
  in.candidates = array_data<int64_t>(candidates, "candidates", {in.nq, "r"});
  in.r = static_cast<size_t>(candidates.shape(1));
  return in;
}

py::ssize_t ssize(size_t n) { return static_cast<py::ssize_t>(n); }

auto rerank_max(const std::string& codec, const py::array& base, const py::array& tail, const py::array& vmin,
                const py::array& vdiff, const py::array& starts, const py::array& patch_ids, const py::array& queries,
                const py::array& candidates, int num_threads) {
  const RerankInputs in = unpack(codec, base, tail, vmin, vdiff, starts, patch_ids, queries, candidates);
  py::array_t<float> best({ssize(in.nq), ssize(in.r)});
  py::array_t<int64_t> winner({ssize(in.nq), ssize(in.r)});
  float* b = best.mutable_data();
  int64_t* w = winner.mutable_data();
  {
    py::gil_scoped_release release;
    patchify::rerank_max(in.codec, in.dim, in.rows, in.vmin, in.vdiff, in.starts, in.n_images, in.patch_ids,
                         in.n_patch_ids, in.queries, in.nq, in.candidates, in.r, b, w, num_threads);
  }
  return py::make_tuple(best, winner);
}

auto rerank_top(const std::string& codec, const py::array& base, const py::array& tail, const py::array& vmin,
                const py::array& vdiff, const py::array& starts, const py::array& patch_ids, const py::array& queries,
                const py::array& candidates, const py::array& candidate_scores, int64_t k,
                const py::array& whole_patch, double global_weight, int num_threads) {
  const RerankInputs in = unpack(codec, base, tail, vmin, vdiff, starts, patch_ids, queries, candidates);
  const float* first = array_data<float>(candidate_scores, "candidate_scores", {in.nq, in.r});
  if (!std::isfinite(global_weight) || global_weight < 0.0 || global_weight > 1.0)
    throw std::invalid_argument("global_weight: expected a number in [0, 1], got " + std::to_string(global_weight));
  patchify::GlobalFusion fusion;
  fusion.weight = global_weight;
  if (global_weight > 0.0) {
    fusion.whole_patch = array_data<int64_t>(whole_patch, "whole_patch", {"n_images"});
    fusion.n_images = static_cast<size_t>(whole_patch.shape(0));
  }
  if (k < 0 || static_cast<size_t>(k) > in.r)
    throw std::invalid_argument("k: expected 0 <= k <= " + std::to_string(in.r) + " (the candidates per query), got " +
                                std::to_string(k));
  const size_t kk = static_cast<size_t>(k);
  py::array_t<float> out_first({ssize(in.nq), ssize(kk)}), out_scores({ssize(in.nq), ssize(kk)});
  py::array_t<int64_t> out_images({ssize(in.nq), ssize(kk)}), out_patches({ssize(in.nq), ssize(kk)});
  float* f = out_first.mutable_data();
  float* s = out_scores.mutable_data();
  int64_t* i = out_images.mutable_data();
  int64_t* p = out_patches.mutable_data();
  {
    py::gil_scoped_release release;
    patchify::rerank_top(in.codec, in.dim, in.rows, in.vmin, in.vdiff, in.starts, in.n_images, in.patch_ids,
                         in.n_patch_ids, in.queries, in.nq, in.candidates, first, in.r, kk, fusion, f, s, i, p,
                         num_threads);
  }
  return py::make_tuple(out_first, out_scores, out_images, out_patches);
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
  m.def("rerank_top", &rerank_top, py::arg("codec"), py::arg("base"), py::arg("tail"), py::arg("vmin"),
        py::arg("vdiff"), py::arg("starts"), py::arg("patch_ids"), py::arg("queries"), py::arg("candidates"),
        py::arg("candidate_scores"), py::arg("k"), py::arg("whole_patch"), py::arg("global_weight"),
        py::arg("num_threads") = 0,
        "rerank_max, then each query's k best candidates by that score, best first (ties in candidate order): "
        "the whole second stage of a top-k search. candidate_scores (nq, r) float32: the first stage's scores, "
        "carried along. global_weight in [0, 1] (0: none): an image with a whole-image patch (whole_patch "
        "(n_images,) int64, by image id, -1 for none; read only when global_weight > 0) scores global_weight * "
        "its whole-image score + (1 - global_weight) * its best patch score. Returns (first-stage scores, scores, "
        "image ids, patch ids), (nq, k) each; -inf / -1 where no image.");
}
