// LayerNorm / RMSNorm CUDA kernels: the interface between the operators
// (csrc/cuda/norms.cpp, which includes torch) and the kernels
// (norm_kernel.cu, which does not, so it compiles in seconds). Raw pointers
// and sizes; rows are contiguous, the caller checked shapes and types.
#pragma once

#include <cstdint>

#include "../common/dtype.h"
#include "../common/norm_args.h"
#include "device.h"

namespace pyllm::cuda {

using pyllm::NormBackward;
using pyllm::NormForward;

cudaError_t launch_norm_forward(const NormForward& args, cudaStream_t stream);
cudaError_t launch_norm_backward(const NormBackward& args, cudaStream_t stream);
// Rows of the backward's partial-sum buffers; depends on the shape only, so
// the parameter gradients are bit-for-bit the same from run to run.
int64_t norm_backward_chunks(int64_t rows, int64_t n);
// out[j] = sum over c of partial[c * n + j], in order of c.
cudaError_t launch_column_sum(const float* partial, int64_t chunks, int64_t n, float* out,
                              cudaStream_t stream);

}  // namespace pyllm::cuda
