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

namespace py = pybind11;

#ifndef PATCHIFY_VERSION
#define PATCHIFY_VERSION "dev"
#endif

// ==== helpers: tiler ====
// ==== helpers: flat index ====
// ==== helpers: ivfpq scanner ====

PYBIND11_MODULE(_core, m) {
  m.doc() = "Patchify C++ core: patch tiler, flat max-over-patches index, fused IVFPQ scanner";
  m.attr("__version__") = PATCHIFY_VERSION;
  m.def("hardware_threads", []() { return patchify::resolve_num_threads(0); },
        "Number of threads used when num_threads <= 0.");

  // ==== bindings: tiler ====
  // ==== bindings: flat index ====
  // ==== bindings: ivfpq scanner ====
}
