// Bindings of the patch tiler (cpp/src/patchify/tiler.h). The Python wrapper is patchify/tiling.py; arrays follow
// arrays.h (checked, never converted). The one exception to "C-contiguous" is the input images, read in place
// through their strides (a crop, a flipped or a channel-last view of a bigger buffer costs no copy).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <string>
#include <vector>

#include "arrays.h"
#include "patchify/tiler.h"

namespace py = pybind11;
using namespace patchify_bindings;

namespace {

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

// A view of images[i] without copying: any strides, but it must be an HxWx3 uint8 array.
patchify::ImageView image_view(const py::handle& item, size_t i, std::vector<py::array>& keep) {
  const std::string name = "images[" + std::to_string(i) + "]";
  if (!py::isinstance<py::array>(item))
    throw std::invalid_argument(name + ": expected a numpy uint8 array of shape (H, W, 3), got " +
                                py::str(py::type::of(item)).cast<std::string>());
  py::array a = py::reinterpret_borrow<py::array>(item);
  check_array(a, name, {py::dtype::of<uint8_t>()}, {"H", "W", 3}, Layout::any_strides);
  if (a.shape(0) < 1 || a.shape(1) < 1)
    throw std::invalid_argument(name + ": image is empty, " + describe(a, Layout::any_strides));
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
  if (input_size < 1) throw std::invalid_argument("input_size: expected >= 1, got " + std::to_string(input_size));
  format.input_size = input_size;
  format.interpolation = patchify::parse_interpolation(interpolation);
  format.mean = mean;
  format.std = std;
  check_array(out, "out", {py::dtype::of<float>(), float16_dtype()}, {"N", 3, input_size, input_size},
              Layout::c_contiguous, Access::write);
  format.output = same_dtype(out, py::dtype::of<float>()) ? patchify::OutputType::float32
                                                          : patchify::OutputType::float16;
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

}  // namespace

void bind_tiler(py::module_& m) {
  m.attr("MAX_GRID") = patchify::kMaxGrid;
  m.def(
      "patch_boxes",
      [](int64_t height, int64_t width, const std::vector<int>& grids, double overlap) {
        const auto boxes = patchify::patch_boxes(height, width, grids, overlap);
        return patch_arrays(
            boxes, [](const patchify::PatchBox& b, int32_t&) -> const patchify::PatchBox& { return b; }, false);
      },
      py::arg("height"), py::arg("width"), py::arg("grids"), py::arg("overlap") = 0.0,
      "Patch boxes of one image: (boxes int32 (P, 4) x0 y0 x1 y1, grid int32 (P,), cell int32 (P,)).");
  m.def("tile_images", &tile_images, py::arg("images"), py::arg("grids"), py::arg("input_size"), py::arg("mean"),
        py::arg("std"), py::arg("interpolation"), py::arg("overlap"), py::arg("out"), py::arg("num_threads") = 0,
        "Tiles HxWx3 uint8 images (any strides) into grid patches, resized (Pillow-exact) and normalised into "
        "`out` (N, 3, s, s) float32/float16, C-contiguous, in place. Returns (boxes (P, 4), image (P,), grid (P,), "
        "cell (P,)) int32.");
}
