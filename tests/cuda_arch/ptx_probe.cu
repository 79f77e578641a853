// Every PTX wrapper of csrc/cuda/ptx.h in one small kernel per element type,
// so that tests/test_cuda_archs.py can assemble them for each architecture
// TORCH_CUDA_ARCH_LIST may name (the kernels reach PTX only through ptx.h).

#include "cuda/ptx.h"

using namespace pyllm::cuda;

template <class T>
__global__ void ptx_probe(const T* global, float* out) {
  __shared__ __align__(16) T tile[32 * 8];
  const int lane = threadIdx.x % 32;
  cp_async_16(tile + 8 * lane, global + 8 * lane, lane % 2 ? 16 : 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], t[4];
  ldmatrix_x4(a, tile + 8 * lane);
  ldmatrix_x4_trans(t, tile + 8 * lane);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t b[2] = {t[0], t[1]};
  mma_16816<T>(d, a, b);
  out[threadIdx.x] = d[0] + d[1] + d[2] + d[3];
}

template __global__ void ptx_probe<__half>(const __half*, float*);
template __global__ void ptx_probe<__nv_bfloat16>(const __nv_bfloat16*, float*);
