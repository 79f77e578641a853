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

}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
#if defined(__linux__)
  if (bytes >= kHugePage) {
    // A fresh anonymous mapping one huge page longer than needed, its ends
    // trimmed to 2 MiB boundaries, so that every page of the tensor can be
    // a huge page; untouched until the packing writes it.
    const size_t length = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    char* raw = static_cast<char*>(mmap(nullptr, length + kHugePage, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (raw != MAP_FAILED) {
      const size_t head = (kHugePage - reinterpret_cast<uintptr_t>(raw) % kHugePage) % kHugePage;
      char* base = raw + head;
      if (head > 0) munmap(raw, head);
      munmap(base + length, kHugePage - head);  // the rest past the tensor's pages
      madvise(base, length, MADV_HUGEPAGE);  // a hint: refused or not, the memory is good
      return at::from_blob(
          base, sizes, [length](void* p) { munmap(p, length); }, options.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace pyllm::cpu
