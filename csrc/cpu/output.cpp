#include "output.h"

#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyllm::cpu {

namespace {
constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
constexpr int64_t kHugeOutputBytes = int64_t{4} << 20;
}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = out.numel() * out.element_size();
  if (bytes >= kHugeOutputBytes) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
    // Advice only: where huge pages are off or the range is not eligible, it
    // changes nothing and the error is irrelevant.
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace pyllm::cpu
