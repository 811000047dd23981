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
#include "patchify/flat_index.h"
// ==== includes: ivfpq scanner (owned by the ivfpq work) ====

namespace py = pybind11;

#ifndef PATCHIFY_VERSION
#define PATCHIFY_VERSION "dev"
#endif

// ==== helpers: tiler ====
// ==== helpers: flat index ====
namespace flat_bindings {
// The Python wrapper (patchify/index/flat.py) converts and validates with friendly messages; these checks
// make the raw _core API safe too. Arrays are never copied here: a mismatch is an error, not a conversion.
inline void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be C-contiguous");
}

inline const int64_t* id_array(const py::array& a, const char* name, size_t n) {
  if (!a.dtype().is(py::dtype::of<int64_t>()))
    throw std::invalid_argument(std::string(name) + " must be int64, got " + std::string(py::str(a.dtype())));
  if (a.ndim() != 1 || static_cast<size_t>(a.shape(0)) != n)
    throw std::invalid_argument(std::string(name) + " must be 1-D with one id per vector (" + std::to_string(n) + ")");
  require_c_contiguous(a, name);
  return static_cast<const int64_t*>(a.data());
}

inline void require_matrix(const py::array& a, const char* name, size_t dim) {
  if (a.ndim() != 2) throw std::invalid_argument(std::string(name) + " must be 2-D (n, dim)");
  if (static_cast<size_t>(a.shape(1)) != dim)
    throw std::invalid_argument(std::string(name) + " have dimension " + std::to_string(a.shape(1)) +
                                ", the index holds " + std::to_string(dim));
  require_c_contiguous(a, name);
}

// A read-only numpy view of index memory, kept alive by `owner` (the index object).
inline py::array view(py::dtype dtype, std::vector<py::ssize_t> shape, std::vector<py::ssize_t> strides,
                      const void* data, py::handle owner) {
  py::array out(dtype, shape, strides, data, owner);
  py::detail::array_proxy(out.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return out;
}
}  // namespace flat_bindings
// ==== helpers: ivfpq scanner ====

PYBIND11_MODULE(_core, m) {
  m.doc() = "Patchify C++ core: patch tiler, flat max-over-patches index, fused IVFPQ scanner";
  m.attr("__version__") = PATCHIFY_VERSION;
  m.def("hardware_threads", []() { return patchify::resolve_num_threads(0); },
        "Number of threads used when num_threads <= 0.");

  // ==== bindings: tiler ====
  // ==== bindings: flat index ====
  {
    using patchify::FlatPatchIndex;
    py::class_<FlatPatchIndex>(m, "FlatPatchIndex",
                               "Exact max-over-patches index (float32 or float16 storage). Use patchify.index.FlatIndex.")
        .def(py::init<size_t, bool>(), py::arg("dim"), py::arg("float16") = false)
        .def_property_readonly("dim", &FlatPatchIndex::dim)
        .def_property_readonly("float16", &FlatPatchIndex::float16)
        .def_property_readonly("ntotal", &FlatPatchIndex::ntotal)
        .def_property_readonly("n_images", &FlatPatchIndex::n_images)
        .def_property("kernel", &FlatPatchIndex::kernel, &FlatPatchIndex::set_kernel,
                      "'avx2' (AVX2+FMA+F16C) or 'generic'; settable, for tests and benchmarks")
        .def("add",
             [](FlatPatchIndex& self, const py::array& vectors, const py::array& patch_ids, const py::array& image_ids) {
               flat_bindings::require_matrix(vectors, "vectors", self.dim());
               const size_t n = static_cast<size_t>(vectors.shape(0));
               const int64_t* pids = flat_bindings::id_array(patch_ids, "patch_ids", n);
               const int64_t* iids = flat_bindings::id_array(image_ids, "image_ids", n);
               if (vectors.dtype().is(py::dtype::of<float>())) {
                 const float* v = static_cast<const float*>(vectors.data());
                 py::gil_scoped_release release;
                 self.add(v, n, pids, iids);
               } else if (vectors.dtype().is(py::dtype("float16"))) {
                 const uint16_t* v = static_cast<const uint16_t*>(vectors.data());
                 py::gil_scoped_release release;
                 self.add_float16(v, n, pids, iids);
               } else {
                 throw std::invalid_argument("vectors must be float32 or float16, got " +
                                             std::string(py::str(vectors.dtype())));
               }
             },
             py::arg("vectors"), py::arg("patch_ids"), py::arg("image_ids"))
        .def("remove_images",
             [](FlatPatchIndex& self, const py::array& image_ids) {
               if (image_ids.ndim() != 1) throw std::invalid_argument("image_ids must be 1-D");
               const int64_t* ids = flat_bindings::id_array(image_ids, "image_ids", static_cast<size_t>(image_ids.shape(0)));
               py::gil_scoped_release release;
               return self.remove_images(ids, static_cast<size_t>(image_ids.shape(0)));
             },
             py::arg("image_ids"))
        .def("search",
             [](const FlatPatchIndex& self, const py::array& queries, py::ssize_t k, int num_threads) {
               if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
               if (!queries.dtype().is(py::dtype::of<float>()))
                 throw std::invalid_argument("queries must be float32, got " + std::string(py::str(queries.dtype())));
               flat_bindings::require_matrix(queries, "queries", self.dim());
               const size_t nq = static_cast<size_t>(queries.shape(0));
               py::array_t<float> scores({static_cast<py::ssize_t>(nq), k});
               py::array_t<int64_t> images({static_cast<py::ssize_t>(nq), k});
               py::array_t<int64_t> patches({static_cast<py::ssize_t>(nq), k});
               const float* q = static_cast<const float*>(queries.data());
               float* s = scores.mutable_data();
               int64_t* im = images.mutable_data();
               int64_t* pa = patches.mutable_data();
               {
                 py::gil_scoped_release release;
                 self.search(q, nq, static_cast<size_t>(k), num_threads, s, im, pa);
               }
               return py::make_tuple(scores, images, patches);
             },
             py::arg("queries"), py::arg("k"), py::arg("num_threads") = 0,
             "(nq, dim) float32 C-contiguous queries -> (scores, image ids, patch ids), each (nq, k)")
        .def("nbytes", &FlatPatchIndex::nbytes)
        .def("vectors_view",
             [](py::object self_obj) {
               const auto& self = self_obj.cast<const FlatPatchIndex&>();
               const py::ssize_t elem = self.float16() ? 2 : 4;
               return flat_bindings::view(self.float16() ? py::dtype("float16") : py::dtype::of<float>(),
                                          {static_cast<py::ssize_t>(self.ntotal()), static_cast<py::ssize_t>(self.dim())},
                                          {static_cast<py::ssize_t>(self.stride()) * elem, elem}, self.raw_vectors(),
                                          self_obj);
             },
             "Read-only view of the stored vectors (rows grouped by image); invalid after add/remove_images")
        .def("patch_ids_view",
             [](py::object self_obj) {
               const auto& self = self_obj.cast<const FlatPatchIndex&>();
               return flat_bindings::view(py::dtype::of<int64_t>(), {static_cast<py::ssize_t>(self.ntotal())},
                                          {8}, self.raw_patch_ids(), self_obj);
             },
             "Read-only view of the patch id of each stored row; invalid after add/remove_images")
        .def("row_image_ids",
             [](const FlatPatchIndex& self) {
               std::vector<int64_t> ids = self.row_image_ids();
               py::array_t<int64_t> out(static_cast<py::ssize_t>(ids.size()));
               std::copy(ids.begin(), ids.end(), out.mutable_data());
               return out;
             },
             "Image id of each stored row (a copy)");
  }
  // ==== bindings: ivfpq scanner ====
}
