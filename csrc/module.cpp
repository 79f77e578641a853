// The Python module object of pyllm._C, written with pybind11 (torch ships
// its headers). The operators register themselves with the dispatcher when
// the library loads (static initialisers), so the module exposes only what
// the dispatcher can't: which CPU instruction set the kernels chose at run
// time, the batch-invariant flag, the CPU output cache (and allocation from it, for the Python
// faces' own large CPU outputs), and the direct entry points of small inference calls
// (direct_calls.cpp).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <exception>
#include <string>

#include "common/batch_invariant.h"
#include "cpu/isa.h"
#include "cpu/output.h"
#include "decoder_direct.h"
#include "direct_calls.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyllm C++ operators (CPU kernels and schemas).";
  m.def(
      "cpu_isa",
      []() -> std::string {
        try {
          return pyllm::cpu::isa_name(pyllm::cpu::active_isa());
        } catch (const std::exception& e) {
          throw py::value_error(e.what());  // a bad PYLLM_CPU_ISA
        }
      },
      "The instruction set the CPU kernels use (after PYLLM_CPU_ISA).");
  m.def(
      "cpu_isa_detected",
      []() -> std::string { return pyllm::cpu::isa_name(pyllm::cpu::detected_isa()); },
      "The best instruction set this CPU and OS support.");
  m.def("cpu_amx", &pyllm::cpu::amx_usable,
        "Whether the bf16 GEMM uses AMX tiles (CPU, OS and PYLLM_CPU_AMX allow).");
  m.def("set_batch_invariant", &pyllm::set_batch_invariant,
        "Turns batch-invariant mode on or off for the C++ kernels of this module.");
  m.def("batch_invariant", &pyllm::batch_invariant,
        "Whether batch-invariant mode is on for the C++ kernels of this module.");
  m.def("empty_cache", &pyllm::cpu::empty_output_cache,
        "Frees the CPU output cache; returns the bytes released.");
  m.def("cache_bytes", &pyllm::cpu::output_cache_bytes, "Bytes held by the CPU output cache.");
  m.def(
      "empty_output",
      [](const std::vector<int64_t>& sizes, at::ScalarType dtype) {
        return pyllm::cpu::empty_output(sizes, at::TensorOptions().dtype(dtype));
      },
      "An uninitialised CPU tensor from the output cache (outputs of 1 MiB or more).");
  pyllm::bind_direct_calls(m);
  pyllm::bind_decoder_direct(m);
}
