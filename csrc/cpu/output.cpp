#include "output.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace pyllm::cpu {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kHugePage = 2 * kMiB;
// Outputs at least this large come from the cache (smaller ones stay in
// malloc's own heap, where they are reused without page faults anyway).
constexpr size_t kCachedBytes = 1 * kMiB;
constexpr size_t kGranule = 64 * 1024;

size_t default_limit() {
  size_t limit = 4096 * kMiB;  // without a better idea: 4 GiB
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) limit = static_cast<size_t>(pages) * static_cast<size_t>(page) / 8;
#endif
  if (const char* mb = std::getenv("PYLLM_CPU_CACHE_MB")) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(mb, &end, 10);
    if (end != mb) limit = static_cast<size_t>(v) * kMiB;
  }
  return limit;
}

// Keeps freed large outputs for reuse, by size (rounded up to 64 KiB): a
// repeated op gets back memory whose pages are already mapped, instead of
// fresh pages that fault in one by one at first write. A request takes the
// smallest cached block that fits with at most a quarter to spare, so that
// outputs of varying sizes (a growing KV cache, ragged batches) share blocks
// instead of each leaving one behind. Blocks are 2 MiB aligned and advised to
// use transparent huge pages. The cached total is capped (PYLLM_CPU_CACHE_MB,
// default 1/8 of RAM): past it, the blocks freed longest ago go back to the
// system. pyllm.empty_cache() releases everything cached.
class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kCachedBytes) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    size_t size = (bytes + kGranule - 1) / kGranule * kGranule;
    void* p = take(size);  // may enlarge `size` to the cached block's
    if (p == nullptr) p = fresh(size);
    return {p, new Block{this, p, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t empty_cache() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t released = 0;
    for (auto& [size, entry] : free_) {
      std::free(entry.ptr);
      released += size;
    }
    free_.clear();
    cached_ = 0;
    return released;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  struct Block {
    OutputAllocator* owner;
    void* ptr;
    size_t size;
  };

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    block->owner->give_back(block->ptr, block->size);
    delete block;
  }

  struct Entry {
    void* ptr;
    uint64_t freed_at;  // give_back's count when it came back
  };

  // The smallest cached block of at least `size` bytes and at most a quarter
  // more; `size` becomes its size.
  void* take(size_t& size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(size);
    if (it == free_.end() || it->first > size + size / 4) return nullptr;
    size = it->first;
    void* p = it->second.ptr;
    free_.erase(it);
    cached_ -= size;
    return p;
  }

  void give_back(void* p, size_t size) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (size > limit_) {
        evicted.push_back(p);
      } else {
        free_.emplace(size, Entry{p, ++clock_});
        cached_ += size;
        while (cached_ > limit_) {  // the oldest go (a scan: a few thousand blocks at most)
          auto oldest = free_.begin();
          for (auto it = free_.begin(); it != free_.end(); ++it)
            if (it->second.freed_at < oldest->second.freed_at) oldest = it;
          evicted.push_back(oldest->second.ptr);
          cached_ -= oldest->first;
          free_.erase(oldest);
        }
      }
    }
    for (void* q : evicted) std::free(q);
  }

  static void* fresh(size_t size) {
    const size_t rounded = (size + kHugePage - 1) / kHugePage * kHugePage;
    void* p = std::aligned_alloc(kHugePage, rounded);
    if (p == nullptr) {
      // Free what the cache holds and try once more before giving up.
      instance().empty_cache();
      p = std::aligned_alloc(kHugePage, rounded);
    }
    TORCH_CHECK(p != nullptr, "pyllm: out of memory allocating ", size, " bytes for an output");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(p, rounded, MADV_HUGEPAGE);  // advice only; harmless where THP is off
#endif
    return p;
  }

  std::mutex mutex_;
  std::multimap<size_t, Entry> free_;  // by size
  size_t cached_ = 0;
  uint64_t clock_ = 0;
  const size_t limit_ = default_limit();

 public:
  static OutputAllocator& instance() {
    static auto* allocator = new OutputAllocator();  // never destroyed: outputs may outlive statics
    return *allocator;
  }
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::detail::empty_generic(sizes, &OutputAllocator::instance(),
                                             c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             options.dtype().toScalarType(), c10::nullopt);
  // As at::empty does: with deterministic algorithms on, fresh memory is
  // filled (NaN for floating types) so that unwritten elements show.
  auto& context = at::globalContext();
  if (out.is_floating_point() && context.deterministicAlgorithms() &&
      context.deterministicFillUninitializedMemory()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

size_t empty_output_cache() { return OutputAllocator::instance().empty_cache(); }

size_t output_cache_bytes() { return OutputAllocator::instance().cached_bytes(); }

}  // namespace pyllm::cpu
