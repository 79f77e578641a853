// GEMM kernels built with the avx512 + avx512bf16 flags (see setup.py).
#define PYLLM_ISA avx512_bf16
#include "gemm_kernel.h"
