// The extension module patchify._core: one PYBIND11_MODULE that registers each component's bindings
// (bind_tiler.cpp, bind_flat.cpp, bind_ivfpq.cpp, bind_rerank.cpp) and the module's one exception policy. The
// binding files only check arrays (arrays.h), convert them to raw pointers and release the GIL around the C++ core
// (cpp/src/patchify/*.h); no logic lives here.
#include <pybind11/gil_safe_call_once.h>
#include <pybind11/pybind11.h>

#include <exception>
#include <new>

#include "patchify/parallel.h"

namespace py = pybind11;

#ifndef PATCHIFY_VERSION
#define PATCHIFY_VERSION "dev"
#endif

void bind_tiler(py::module_& m);
void bind_flat(py::module_& m);
void bind_ivfpq(py::module_& m);
void bind_rerank(py::module_& m);

namespace {

// patchify.errors.CoreError, looked up once at import (errors.py imports nothing, so this cannot cycle).
PYBIND11_CONSTINIT py::gil_safe_call_once_and_store<py::object> core_error;

// One exception type across the module: every C++ exception that escapes (std::invalid_argument for bad
// arguments, std::out_of_range, std::runtime_error, any std::exception) becomes patchify.errors.CoreError, a
// PatchifyError and a ValueError, with the C++ message. Left to pybind11's defaults: std::bad_alloc (MemoryError)
// and pybind11's own exceptions (a Python error raised inside a call, argument conversion errors), whose Python
// type is already right. Module-local, so it never rewrites exceptions of other pybind11 extensions.
void translate_exception(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const py::error_already_set&) {
    throw;
  } catch (const py::builtin_exception&) {
    throw;
  } catch (const std::exception& e) {
    py::set_error(core_error.get_stored(), e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "Patchify C++ core: patch tiler, flat max-over-patches index, fused IVFPQ scanner, re-rank scorer";
  m.attr("__version__") = PATCHIFY_VERSION;
  core_error.call_once_and_store_result(
      []() { return py::module_::import("patchify.errors").attr("CoreError"); });
  py::register_local_exception_translator(&translate_exception);
  m.def("hardware_threads", []() { return patchify::resolve_num_threads(0); },
        "Number of threads used when num_threads <= 0.");
  bind_tiler(m);
  bind_flat(m);
  bind_ivfpq(m);
  bind_rerank(m);
}
