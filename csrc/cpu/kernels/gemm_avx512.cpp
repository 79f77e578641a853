// GEMM kernels built with the avx512 flags (see setup.py).
#define PYLLM_ISA avx512
#include "gemm_kernel.h"
