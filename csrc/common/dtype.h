// The element types pyllm's C++ and CUDA kernels take, shared by both so that
// the operator files map a torch dtype once. No torch here.
#pragma once

// Members callable from host and device code (the argument structs' helpers).
#ifndef PYLLM_HOST_DEVICE
#if defined(__CUDACC__)
#define PYLLM_HOST_DEVICE __host__ __device__
#else
#define PYLLM_HOST_DEVICE
#endif
#endif

namespace pyllm {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

}  // namespace pyllm
