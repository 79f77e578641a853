// Attention kernels built with the generic flags (see setup.py).
#define PYLLM_ISA generic
#include "attention_kernel.h"
