// The PTX instructions pyllm's CUDA kernels use, each behind one small device
// function: cp.async (asynchronous global->shared copies), ldmatrix (shared
// memory -> tensor-core fragments) and mma.sync m16n8k16 (fp16/bf16 inputs,
// fp32 accumulators). The host-model build of the tests gives each function
// a host body with the same per-lane semantics (tests/cuda_host/).
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"): with g = lane / 4 and
// t = lane % 4, a lane holds
//   A (16x16, row-major)  a[0] = A[g][2t..2t+1]      a[1] = A[g+8][2t..2t+1]
//                         a[2] = A[g][2t+8..2t+9]    a[3] = A[g+8][2t+8..2t+9]
//   B (16x8, k by n)      b[0] = B[2t..2t+1][g]      b[1] = B[2t+8..2t+9][g]
//   C, D (16x8, fp32)     c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
#pragma once

#include <cstdint>

#include "device.h"

namespace pyllm::cuda {

#if defined(PYLLM_CUDA_HOST_MODEL_BUILD)

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  pyllm_host::cp_async(smem, gmem, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { pyllm_host::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  pyllm_host::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  pyllm_host::ldmatrix_x4(r, row, false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  pyllm_host::ldmatrix_x4(r, row, true);
}
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  pyllm_host::mma_16816<T>(d, a, b);
}

#else

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// sm_80 brought cp.async and mma.m16n8k16; for sm_75 (TORCH_CUDA_ARCH_LIST
// may name it) the copies are synchronous and m16n8k16 is two m16n8k8. bf16
// tensor cores need sm_80: the launchers refuse bf16 below it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define PYLLM_SM75 1
#endif

// Copies 16 bytes global -> shared; bytes past src_bytes (0..16) are zeroed,
// so src_bytes = 0 fills the slot with zeros without reading global memory.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(PYLLM_SM75)
  if (src_bytes == 16) {
    *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
  } else {
    unsigned char* d = static_cast<unsigned char*>(smem);
    const unsigned char* g = static_cast<const unsigned char*>(gmem);
    for (int i = 0; i < 16; ++i) d[i] = i < src_bytes ? g[i] : 0;
  }
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if !defined(PYLLM_SM75)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if !defined(PYLLM_SM75)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// Four 8x8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row))
               : "memory");
}
// d += a * b on the tensor cores.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
#if defined(PYLLM_SM75)
  for (int half = 0; half < 2; ++half)  // k 0-7 then k 8-15
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6},"
        " {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[2 * half]), "r"(a[2 * half + 1]), "r"(b[half]));
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7},"
      " {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
#if defined(PYLLM_SM75)
  __trap();  // unreachable: bf16 is refused below sm_80 before launch
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7},"
      " {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

#endif

}  // namespace pyllm::cuda
