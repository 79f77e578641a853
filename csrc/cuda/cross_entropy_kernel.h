// Cross-entropy on CUDA: the interface between the operator
// (csrc/cuda/cross_entropy.cpp, which includes torch) and the kernel
// (cross_entropy_kernel.cu, which does not).
#pragma once

#include "../common/cross_entropy_args.h"
#include "device.h"

namespace pyllm::cuda {

// Loss, logsumexp and (when a.grad is set) the gradient of every row.
cudaError_t launch_cross_entropy(const CrossEntropy& a, cudaStream_t stream);

}  // namespace pyllm::cuda
