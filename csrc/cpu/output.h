// Allocation of the CPU kernels' outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace pyllm::cpu {

// An uninitialised CPU tensor for a kernel's output. Outputs of 1 MiB or more
// come from a cache of freed outputs (see output.cpp), so that a repeated op
// reuses mapped memory instead of faulting in fresh pages: on this class of
// machine, first-touch page faults cost several times the kernel itself.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Returns the cached memory to the system; returns the number of bytes freed.
size_t empty_output_cache();

// Bytes held by the cache (freed outputs kept for reuse).
size_t output_cache_bytes();

}  // namespace pyllm::cpu
