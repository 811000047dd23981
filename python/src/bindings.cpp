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
#include <string>
#include <vector>

#include "patchify/tiler.h"
// ==== includes: flat index (owned by the flat-index work) ====
#include "patchify/flat_index.h"
// ==== includes: ivfpq scanner (owned by the ivfpq work) ====
#include "patchify/ivfpq_scan.h"

namespace py = pybind11;

#ifndef PATCHIFY_VERSION
#define PATCHIFY_VERSION "dev"
#endif

// ==== helpers: tiler ====
namespace tiler_bindings {

// (boxes int32 (P, 4), grid int32 (P,), cell int32 (P,)) [+ image int32 (P,)] from tiled patches.
template <class Item, class GetBox>
py::tuple patch_arrays(const std::vector<Item>& items, GetBox&& get, bool with_image) {
  const py::ssize_t n = static_cast<py::ssize_t>(items.size());
  py::array_t<int32_t> boxes({n, py::ssize_t{4}}), grid(n), cell(n), image(n);
  auto b = boxes.mutable_unchecked<2>();
  auto g = grid.mutable_unchecked<1>();
  auto c = cell.mutable_unchecked<1>();
  auto im = image.mutable_unchecked<1>();
  for (py::ssize_t i = 0; i < n; ++i) {
    int32_t image_index = 0;
    const patchify::PatchBox& box = get(items[static_cast<size_t>(i)], image_index);
    b(i, 0) = box.x0;
    b(i, 1) = box.y0;
    b(i, 2) = box.x1;
    b(i, 3) = box.y1;
    g(i) = box.grid;
    c(i) = box.cell;
    im(i) = image_index;
  }
  if (with_image) return py::make_tuple(boxes, image, grid, cell);
  return py::make_tuple(boxes, grid, cell);
}

std::string describe(const py::array& a) {
  std::string shape = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) shape += (d ? ", " : "") + std::to_string(a.shape(d));
  if (a.ndim() == 1) shape += ",";
  return "dtype " + py::str(a.dtype()).cast<std::string>() + ", shape " + shape + ")";
}

// A view of images[i] without copying: any strides, but it must be an HxWx3 uint8 array.
patchify::ImageView image_view(const py::handle& item, size_t i, std::vector<py::array>& keep) {
  if (!py::isinstance<py::array>(item))
    throw py::value_error("images[" + std::to_string(i) + "]: expected a numpy uint8 array (H, W, 3), got " +
                          py::str(py::type::of(item)).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(item);
  if (a.ndim() != 3 || a.shape(2) != 3 || a.dtype().kind() != 'u' || a.dtype().itemsize() != 1)
    throw py::value_error("images[" + std::to_string(i) + "]: expected an RGB uint8 array of shape (H, W, 3), got " +
                          describe(a));
  if (a.shape(0) < 1 || a.shape(1) < 1)
    throw py::value_error("images[" + std::to_string(i) + "]: image is empty, " + describe(a));
  keep.push_back(a);
  patchify::ImageView v;
  v.data = static_cast<const uint8_t*>(a.data());
  v.height = a.shape(0);
  v.width = a.shape(1);
  v.row_stride = a.strides(0);
  v.col_stride = a.strides(1);
  v.channel_stride = a.strides(2);
  return v;
}

py::tuple tile_images(const py::sequence& images, const std::vector<int>& grids, int input_size,
                      const std::array<float, 3>& mean, const std::array<float, 3>& std, const std::string& interpolation,
                      double overlap, py::array out, int num_threads) {
  patchify::PatchFormat format;
  if (input_size < 1) throw py::value_error("input_size must be >= 1, got " + std::to_string(input_size));
  format.input_size = input_size;
  format.interpolation = patchify::parse_interpolation(interpolation);
  format.mean = mean;
  format.std = std;
  const py::dtype dt = out.dtype();
  const bool native = dt.attr("isnative").cast<bool>();
  if (dt.kind() == 'f' && dt.itemsize() == 4 && native) {
    format.output = patchify::OutputType::float32;
  } else if (dt.kind() == 'f' && dt.itemsize() == 2 && native) {
    format.output = patchify::OutputType::float16;
  } else {
    throw py::value_error("out must be a float32 or float16 array, got " + describe(out));
  }
  if (out.ndim() != 4 || out.shape(1) != 3 || out.shape(2) != input_size || out.shape(3) != input_size)
    throw py::value_error("out must have shape (N, 3, " + std::to_string(input_size) + ", " +
                          std::to_string(input_size) + "), got " + describe(out));
  if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous, got " + describe(out));
  if (!out.writeable()) throw py::value_error("out must be writeable");
  std::vector<py::array> keep;  // holds the arrays while the GIL is released
  std::vector<patchify::ImageView> views;
  const size_t n_images = py::len(images);
  keep.reserve(n_images);
  views.reserve(n_images);
  for (size_t i = 0; i < n_images; ++i) views.push_back(image_view(images[i], i, keep));
  void* data = out.mutable_data();
  const size_t capacity = static_cast<size_t>(out.shape(0));
  std::vector<patchify::TiledPatch> patches;
  {
    py::gil_scoped_release release;
    patches = patchify::tile_images(views, grids, format, overlap, data, capacity, num_threads);
  }
  return patch_arrays(
      patches,
      [](const patchify::TiledPatch& p, int32_t& image) -> const patchify::PatchBox& {
        image = p.image;
        return p.box;
      },
      true);
}

}  // namespace tiler_bindings
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
  m.attr("MAX_GRID") = patchify::kMaxGrid;
  m.def(
      "patch_boxes",
      [](int64_t height, int64_t width, const std::vector<int>& grids, double overlap) {
        const auto boxes = patchify::patch_boxes(height, width, grids, overlap);
        return tiler_bindings::patch_arrays(
            boxes, [](const patchify::PatchBox& b, int32_t&) -> const patchify::PatchBox& { return b; }, false);
      },
      py::arg("height"), py::arg("width"), py::arg("grids"), py::arg("overlap") = 0.0,
      "Patch boxes of one image: (boxes int32 (P, 4) x0 y0 x1 y1, grid int32 (P,), cell int32 (P,)).");
  m.def("tile_images", &tiler_bindings::tile_images, py::arg("images"), py::arg("grids"), py::arg("input_size"),
        py::arg("mean"), py::arg("std"), py::arg("interpolation"), py::arg("overlap"), py::arg("out"),
        py::arg("num_threads") = 0,
        "Tiles HxWx3 uint8 images into grid patches, resized (Pillow-exact) and normalised into `out` "
        "(N, 3, s, s) float32/float16 in place. Returns (boxes (P, 4), image (P,), grid (P,), cell (P,)) int32.");
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
