// Allocation of the CPU kernels' outputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyllm::cpu {

// at::empty, and for large outputs a request for transparent huge pages
// before the first touch: a fresh multi-megabyte output otherwise costs one
// page fault per 4 KiB when the kernel first writes it, which on this class
// of machine is several times the cost of the kernel itself.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace pyllm::cpu
