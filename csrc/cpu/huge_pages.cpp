#include "huge_pages.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyllm::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

#if defined(__linux__)
void unmap(void* base, size_t length) { munmap(base, length); }
#endif

}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
#if defined(__linux__)
  if (bytes >= kHugePage) {
    // A fresh anonymous mapping one huge page longer than needed, trimmed to
    // a 2 MiB boundary at both ends, so that every page of the tensor can be
    // a huge page; untouched until the packing writes it.
    const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* raw = mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const auto start = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
      if (aligned > start) munmap(raw, aligned - start);
      const uintptr_t end = start + length + kHugePage;
      if (end > aligned + length) munmap(reinterpret_cast<void*>(aligned + length),
                                         end - (aligned + length));
      void* base = reinterpret_cast<void*>(aligned);
      madvise(base, length, MADV_HUGEPAGE);  // a hint: refused or not, the memory is good
      return at::from_blob(
          base, sizes, [length](void* p) { unmap(p, length); },
          options.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace pyllm::cpu
