// RMSNorm kernels built with the generic flags (see setup.py).
#define PYLLM_ISA generic
#include "rms_norm_kernel.h"
