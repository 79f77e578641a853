// Dispatcher-free entry points of pyllm._C (csrc/direct_calls.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace pyllm {

// Adds the direct entry points (norm_direct) to the module.
void bind_direct_calls(pybind11::module& m);

}  // namespace pyllm
