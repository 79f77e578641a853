// Memory for tensors that are streamed whole again and again (pre-packed
// weights): on 2 MiB pages where the system grants them.
#pragma once

#include <ATen/core/Tensor.h>

namespace pyllm::cpu {

// An uninitialised CPU tensor whose memory is asked to live on transparent
// huge pages (Linux madvise(MADV_HUGEPAGE) on a 2 MiB-aligned fresh mapping,
// before the first touch). A decode step reads every weight once: with 4 KiB
// pages that is a TLB miss and a stop of the hardware prefetchers every 4 KiB;
// on the Zen 4 machine this project is measured on, a bf16 GEMV over packed
// weights read 10-25% faster from huge pages (same process, interleaved).
// Tensors under 2 MiB, other systems, and a refused mapping get at::empty.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace pyllm::cpu
