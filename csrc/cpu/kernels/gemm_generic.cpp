// GEMM kernels built with the generic flags (see setup.py).
#define PYLLM_ISA generic
#include "gemm_kernel.h"
