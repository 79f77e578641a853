// The paged-KV append on CUDA: the interface between the operator
// (csrc/cuda/paged_kv.cpp, which includes torch) and the kernel
// (paged_kv_kernel.cu, which does not).
#pragma once

#include "../common/paged_kv_args.h"
#include "device.h"

namespace pyllm::cuda {

// Writes the new keys (rotated when a.cos is set) and values into their slots.
cudaError_t launch_paged_kv_append(const PagedKvAppend& a, cudaStream_t stream);

}  // namespace pyllm::cuda
