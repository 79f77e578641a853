// Rotary position embedding on CUDA: the interface between the operator
// (csrc/cuda/rotary.cpp, which includes torch) and the kernel
// (rotary_kernel.cu, which does not).
#pragma once

#include "../common/rotary_args.h"
#include "device.h"

namespace pyllm::cuda {

// Rotates q and k in place (arguments as pyllm::Rotary).
cudaError_t launch_rotary(const Rotary& r, cudaStream_t stream);

}  // namespace pyllm::cuda
