// What pyllm's CUDA kernel sources (csrc/cuda/*_kernel.cu) take from the CUDA
// toolkit, in one place. Built by nvcc this is the toolkit itself. The tests
// also compile the same kernel sources as plain C++ with
// PYLLM_CUDA_HOST_MODEL_BUILD defined, against a model of the CUDA execution
// model that lives with the tests (tests/cuda_host/); that branch never
// reaches a wheel.
//
// Kernel sources launch with PYLLM_LAUNCH(kernel, grid, block, shared_bytes,
// stream, args...), which returns the launch's cudaError_t, and reach dynamic
// shared memory through PYLLM_DYNAMIC_SHARED(type, name).
#pragma once

#if defined(PYLLM_CUDA_HOST_MODEL_BUILD)

#include "cuda_host_model.h"

#define PYLLM_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  pyllm_host::launch(kernel, grid, block, shared_bytes, stream, __VA_ARGS__)
#define PYLLM_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(pyllm_host::dynamic_shared())
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int value) {
  return value <= static_cast<int>(pyllm_host::kMaxDynamicShared) ? cudaSuccess
                                                                   : cudaErrorInvalidValue;
}

#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#define PYLLM_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ((kernel)<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__), cudaGetLastError())
#define PYLLM_DYNAMIC_SHARED(type, name)                                   \
  extern __shared__ __align__(16) unsigned char pyllm_dynamic_shared_[]; \
  type* name = reinterpret_cast<type*>(pyllm_dynamic_shared_)

#endif
