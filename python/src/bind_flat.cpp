// Bindings of the flat max-over-patches index (cpp/src/patchify/flat_index.h). The Python wrapper is
// patchify/index/flat.py; arrays follow arrays.h (checked, never converted).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>
#include <vector>

#include "arrays.h"
#include "patchify/flat_index.h"

namespace py = pybind11;
using namespace patchify_bindings;
using patchify::FlatPatchIndex;

namespace {

// A read-only numpy view of index memory, kept alive by `owner` (the index object).
py::array view(py::dtype dtype, std::vector<py::ssize_t> shape, std::vector<py::ssize_t> strides, const void* data,
               py::handle owner) {
  py::array out(dtype, shape, strides, data, owner);
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}

void add(FlatPatchIndex& self, const py::array& vectors, const py::array& patch_ids, const py::array& image_ids) {
  check_array(vectors, "vectors", {py::dtype::of<float>(), float16_dtype()}, {"n", self.dim()});
  const size_t n = static_cast<size_t>(vectors.shape(0));
  const int64_t* pids = array_data<int64_t>(patch_ids, "patch_ids", {n});
  const int64_t* iids = array_data<int64_t>(image_ids, "image_ids", {n});
  if (same_dtype(vectors, py::dtype::of<float>())) {
    const float* v = static_cast<const float*>(vectors.data());
    py::gil_scoped_release release;
    self.add(v, n, pids, iids);
  } else {  // float16 bits; the core refuses them unless the index stores float16
    const uint16_t* v = static_cast<const uint16_t*>(vectors.data());
    py::gil_scoped_release release;
    self.add_float16(v, n, pids, iids);
  }
}

size_t remove_images(FlatPatchIndex& self, const py::array& image_ids) {
  const int64_t* ids = array_data<int64_t>(image_ids, "image_ids", {"n"});
  const size_t n = static_cast<size_t>(image_ids.shape(0));
  py::gil_scoped_release release;
  return self.remove_images(ids, n);
}

// Outputs are (nq, min(k, images stored)): a huge k costs nothing (no padding up to k).
auto search(const FlatPatchIndex& self, const py::array& queries, py::ssize_t k, int num_threads) {
  const size_t k_asked = check_k(k);
  const float* q = array_data<float>(queries, "queries", {"nq", self.dim()});
  const size_t nq = static_cast<size_t>(queries.shape(0));
  const size_t kk = self.result_width(k_asked);
  SearchResults out(nq, kk);
  float* s = out.score_data();
  int64_t* im = out.image_data();
  int64_t* pa = out.patch_data();
  {
    py::gil_scoped_release release;
    self.search(q, nq, kk, num_threads, s, im, pa);
  }
  return out.tuple();
}

}  // namespace

void bind_flat(py::module_& m) {
  py::class_<FlatPatchIndex>(m, "FlatPatchIndex",
                             "Exact max-over-patches index (float32 or float16 storage). Use patchify.index.FlatIndex.")
      .def(py::init<size_t, bool>(), py::arg("dim"), py::arg("float16") = false)
      .def_property_readonly("dim", &FlatPatchIndex::dim)
      .def_property_readonly("float16", &FlatPatchIndex::float16)
      .def_property_readonly("ntotal", &FlatPatchIndex::ntotal)
      .def_property_readonly("n_images", &FlatPatchIndex::n_images)
      .def_property("kernel", &FlatPatchIndex::kernel, &FlatPatchIndex::set_kernel,
                    "'avx2' (AVX2+FMA+F16C) or 'generic'; settable, for tests and benchmarks")
      .def("add", &add, py::arg("vectors"), py::arg("patch_ids"), py::arg("image_ids"),
           "(n, dim) float32 (or float16 into a float16 index) vectors with (n,) int64 patch and image ids, all "
           "C-contiguous; all-or-nothing")
      .def("remove_images", &remove_images, py::arg("image_ids"),
           "Removes every patch of these (n,) int64 image ids; returns the number of patches removed")
      .def("search", &search, py::arg("queries"), py::arg("k"), py::arg("num_threads") = 0,
           "(nq, dim) float32 C-contiguous queries -> (scores, image ids, patch ids), each (nq, min(k, n_images)), "
           "best first")
      .def("nbytes", &FlatPatchIndex::nbytes)
      .def(
          "vectors_view",
          [](py::object self_obj) {
            const auto& self = self_obj.cast<const FlatPatchIndex&>();
            const py::ssize_t elem = self.float16() ? 2 : 4;
            return view(self.float16() ? float16_dtype() : py::dtype::of<float>(),
                        {static_cast<py::ssize_t>(self.ntotal()), static_cast<py::ssize_t>(self.dim())},
                        {static_cast<py::ssize_t>(self.stride()) * elem, elem}, self.raw_vectors(), self_obj);
          },
          "Read-only view of the stored vectors (rows grouped by image); invalid after add/remove_images")
      .def(
          "patch_ids_view",
          [](py::object self_obj) {
            const auto& self = self_obj.cast<const FlatPatchIndex&>();
            return view(py::dtype::of<int64_t>(), {static_cast<py::ssize_t>(self.ntotal())}, {8},
                        self.raw_patch_ids(), self_obj);
          },
          "Read-only view of the patch id of each stored row; invalid after add/remove_images")
      .def(
          "row_image_ids",
          [](const FlatPatchIndex& self) {
            std::vector<int64_t> ids = self.row_image_ids();
            py::array_t<int64_t> out(static_cast<py::ssize_t>(ids.size()));
            std::copy(ids.begin(), ids.end(), out.mutable_data());
            return out;
          },
          "Image id of each stored row (a copy)");
}
