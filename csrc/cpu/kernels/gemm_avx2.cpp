// GEMM kernels built with the avx2 flags (see setup.py).
#define PYLLM_ISA avx2
#include "gemm_kernel.h"
