// The decoder-stack entry point of pyllm._C (csrc/decoder_direct.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace pyllm {

// Adds decoder_layers_direct to the module.
void bind_decoder_direct(pybind11::module& m);

}  // namespace pyllm
