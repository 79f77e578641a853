// LayerNorm / RMSNorm kernels built with the avx512 flags (see setup.py).
#define PYLLM_ISA avx512
#include "norm_kernel.h"
