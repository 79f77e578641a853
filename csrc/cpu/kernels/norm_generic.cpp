// LayerNorm / RMSNorm kernels built with the generic flags (see setup.py).
#define PYLLM_ISA generic
#include "norm_kernel.h"
