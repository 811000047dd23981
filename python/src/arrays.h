// The one array policy of the bindings: an argument is read (or written) in place, never converted. A numpy
// array of the wrong dtype (byte order included), shape or layout raises std::invalid_argument (CoreError in
// Python) that names the argument, says what was expected and what was given:
//
//   queries: expected a C-contiguous float32 array of shape (nq, 8), got a float64 array of shape (3, 8)
//
// Why no conversion: a silent copy (py::array::forcecast, or array_t's implicit cast) hides a dtype mistake,
// costs a full copy of what may be gigabytes, and for the arrays the core keeps pointers to (the IVFPQ scanner's
// inverted lists and image map) it would keep a private copy that no longer follows the caller's array. The
// Python wrappers (patchify.index.*, patchify.tiling) validate and convert with friendly messages first; these
// checks make the raw _core API safe on its own.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace patchify_bindings {

namespace py = pybind11;

// One expected dimension: a fixed size, or any size shown by a name ("nq", "n").
struct Dim {
  template <class Int, std::enable_if_t<std::is_integral<Int>::value, int> = 0>
  Dim(Int n) : size(static_cast<py::ssize_t>(n)) {}  // NOLINT: implicit on purpose, {"nq", dim} reads well
  Dim(const char* label_) : label(label_) {}          // NOLINT
  py::ssize_t size = -1;
  const char* label = nullptr;
};

// Layout: c_contiguous (what the core reads through one pointer), or any_strides for the few inputs read through
// their strides (the tiler's images: a crop or a flipped view is read in place).
enum class Layout { c_contiguous, any_strides };
enum class Access { read, write };

inline std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

inline std::string shape_text(const std::vector<Dim>& shape) {
  std::string s = "(";
  for (size_t d = 0; d < shape.size(); ++d)
    s += (d ? ", " : "") + (shape[d].size >= 0 ? std::to_string(shape[d].size) : std::string(shape[d].label));
  return s + (shape.size() == 1 ? ",)" : ")");
}

inline std::string dtype_text(const py::dtype& dt) { return py::str(dt).cast<std::string>(); }

inline bool is_c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

// "a float64 array of shape (3, 8)", with "non-C-contiguous" / "read-only" when that is what is wrong.
inline std::string describe(const py::array& a, Layout layout = Layout::c_contiguous, Access access = Access::read) {
  std::string what;
  if (access == Access::write && !a.writeable()) what += "read-only ";
  if (layout == Layout::c_contiguous && !is_c_contiguous(a)) what += "non-C-contiguous ";
  what += dtype_text(a.dtype());
  const char c = what[0];
  const bool vowel = c == 'a' || c == 'e' || c == 'i' || c == 'o';  // "an int64", "a uint8"
  return std::string(vowel ? "an " : "a ") + what + " array of shape " + shape_text(a);
}

// Same dtype, byte order included (numpy's PyArray_EquivTypes, as pybind11's array_t::check_ uses).
inline bool same_dtype(const py::array& a, const py::dtype& dt) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), dt.ptr());
}

inline py::dtype float16_dtype() { return py::dtype("float16"); }

// Throws unless `a` is one of `dtypes`, has `shape` (and the layout / writeability asked for).
inline void check_array(const py::array& a, const std::string& name, const std::vector<py::dtype>& dtypes,
                        const std::vector<Dim>& shape, Layout layout = Layout::c_contiguous,
                        Access access = Access::read) {
  bool ok = false;
  for (const auto& dt : dtypes) ok = ok || same_dtype(a, dt);
  ok = ok && a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d].size < 0 || a.shape(d) == shape[d].size;
  ok = ok && (layout == Layout::any_strides || is_c_contiguous(a));
  ok = ok && (access == Access::read || a.writeable());
  if (ok) return;
  std::string expected = access == Access::write ? "a writeable " : "a ";
  if (layout == Layout::c_contiguous) expected += "C-contiguous ";
  for (size_t i = 0; i < dtypes.size(); ++i) expected += (i ? " or " : "") + dtype_text(dtypes[i]);
  expected += " array of shape " + shape_text(shape);
  if (layout == Layout::any_strides) expected += " (any strides)";
  throw std::invalid_argument(name + ": expected " + expected + ", got " + describe(a, layout, access));
}

// The data pointer of a C-contiguous T array of the given shape (checked as above).
template <class T>
const T* array_data(const py::array& a, const std::string& name, const std::vector<Dim>& shape) {
  check_array(a, name, {py::dtype::of<T>()}, shape);
  return static_cast<const T*>(a.data());
}

// k as given to a search: an integer >= 1 (the result width is then min(k, images in the index)).
inline size_t check_k(py::ssize_t k) {
  if (k < 1) throw std::invalid_argument("k: expected an integer >= 1, got " + std::to_string(k));
  return static_cast<size_t>(k);
}

// The three (nq, kk) result arrays every search returns, allocated with the GIL held; the core fills them through
// the raw pointers while the GIL is released.
struct SearchResults {
  py::array_t<float> scores;
  py::array_t<int64_t> images, patches;
  SearchResults(size_t nq, size_t kk)
      : scores(shape(nq, kk)), images(shape(nq, kk)), patches(shape(nq, kk)) {}
  float* score_data() { return scores.mutable_data(); }
  int64_t* image_data() { return images.mutable_data(); }
  int64_t* patch_data() { return patches.mutable_data(); }
  py::tuple tuple() const { return py::make_tuple(scores, images, patches); }

 private:
  static std::vector<py::ssize_t> shape(size_t nq, size_t kk) {
    return {static_cast<py::ssize_t>(nq), static_cast<py::ssize_t>(kk)};
  }
};

}  // namespace patchify_bindings
