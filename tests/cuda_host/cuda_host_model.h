// A small model of the CUDA execution model on the host, so that pyllm's CUDA
// kernel sources (csrc/cuda/*_kernel.cu) compile as plain C++ and run in the
// tests. Test-only: nothing here ships in a wheel.
//
// What it models
//   - the grid: CTAs run one after another (blockIdx/gridDim);
//   - a CTA: one cooperating host thread (a fiber with its own stack) per
//     CUDA thread (threadIdx/blockDim); each runs until it reaches a barrier
//     or exits; __syncthreads releases the CTA's threads once every thread
//     still running has reached it. The order threads run in between
//     barriers changes from CTA to CTA, so a missing barrier shows up as a
//     read of poison or of a stale value; threads that wait at different
//     barriers are reported as a deadlock instead of hanging;
//   - a warp: 32 consecutive threads; shuffles and the warp-wide
//     tensor-core operations (ldmatrix, mma.sync, see csrc/cuda/ptx.h)
//     exchange values through a per-warp barrier, with each lane holding
//     exactly the fragment elements the PTX ISA gives it;
//   - __shared__ variables (one CTA runs at a time, so a static is per CTA)
//     and dynamic shared memory, poisoned with 0xFF bytes (NaN in every float
//     type) before each CTA so that a read of an unwritten slot shows up;
//   - cp.async: a copy reads global memory when issued; it lands in shared
//     memory either at once (eager) or only when a cp.async.wait_group
//     releases its group (lazy), the two ends of what the hardware allows: a
//     missing wait reads poison under lazy landing, a missing barrier before
//     a buffer is refilled is overwritten under eager landing;
//   - fp16/bf16 with round-to-nearest-even conversions.
// What it does not model (stated, not hidden): CTAs running at the same time
// (a kernel whose CTAs depend on each other, or race on global memory, is not
// caught); memory ordering weaker than program order (the GPU's relaxed
// model, fences, volatile); the hardware's fp32 accumulation order inside a
// tensor-core instruction (the model sums in k order); partial-warp shuffle
// masks (only the full mask is accepted); out-of-bounds shared-memory
// accesses within the CTA's own arrays; bank conflicts, occupancy, register
// limits and timing. Out-of-bounds global accesses are caught by the tests'
// guard regions, not here.
#pragma once

#include <algorithm>
#include <ucontext.h>

#include <functional>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#define PYLLM_CUDA_HOST_MODEL 1

// ---- runtime types --------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// Set by the scheduler before it resumes a thread.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace pyllm_host {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda host model: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

constexpr size_t kMaxDynamicShared = 227 * 1024;  // sm_90's per-block limit
constexpr size_t kStackBytes = 256 * 1024;

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
  int size;
};

// One CUDA thread: a fiber with its own stack and cp.async state.
struct Thread {
  enum State { runnable, at_cta_barrier, at_warp_barrier, done } state = runnable;
  ucontext_t context{};
  dim3 index;
  int linear = 0;
  std::vector<std::vector<PendingCopy>> cp_async_groups;  // committed, oldest first
  std::vector<PendingCopy> cp_async_open;                 // not yet committed
};

struct Warp {
  uint64_t slots[32][6];  // per lane: up to 48 bytes of exchanged values
};

// The running CTA: its threads, warps' exchange slots, dynamic shared memory.
struct Cta {
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<unsigned char> dynamic;
  ucontext_t scheduler{};
  Thread* current = nullptr;
};

inline Cta* cta = nullptr;  // one CTA runs at a time
inline bool eager_copies = false;
inline std::vector<std::unique_ptr<char[]>> stacks;
inline unsigned long launches = 0;

inline Thread& self() { return *cta->current; }
inline int linear_thread() { return self().linear; }
inline int lane() { return linear_thread() % 32; }
inline Warp& warp() { return cta->warps[linear_thread() / 32]; }

// Suspends the calling thread in `state` until the scheduler releases it.
inline void block(Thread::State state) {
  Thread& t = self();
  t.state = state;
  swapcontext(&t.context, &cta->scheduler);
}

inline void sync_threads() { block(Thread::at_cta_barrier); }
inline void sync_warp() { block(Thread::at_warp_barrier); }

// Every lane posts a value; after construction each lane can read every
// lane's post through read(lane); the destructor is the closing barrier.
class WarpExchange {
 public:
  template <class T>
  explicit WarpExchange(const T& mine) : w_(warp()) {
    static_assert(sizeof(T) <= sizeof(w_.slots[0]));
    std::memcpy(w_.slots[lane()], &mine, sizeof(T));
    sync_warp();
  }
  template <class T>
  T read(int from) const {
    T v;
    std::memcpy(&v, w_.slots[from], sizeof(T));
    return v;
  }
  ~WarpExchange() { sync_warp(); }

 private:
  Warp& w_;
};

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp masks are modelled");
}

template <class T>
T shuffle(unsigned mask, T v, int from) {
  check_mask(mask);
  WarpExchange ex(v);
  return ex.read<T>(from);
}

// How the scheduler picks the next thread; it changes from CTA to CTA so
// that a read of shared memory that another thread writes without a barrier
// in between sees the write under one schedule and not under another.
//   round robin: every runnable thread runs once per pass (threads advance
//     together), in ascending or shuffled order;
//   greedy: the first runnable thread in ascending or descending order, with
//     a warp released as soon as its last lane arrives, so one warp runs as
//     far ahead of the others as barriers allow; its cp.async copies land at
//     once (eager), so a buffer refilled too early is overwritten under the
//     slower warps. Round-robin CTAs land copies at the wait (lazy).
struct Schedule {
  std::vector<int> order;
  bool greedy;
  bool eager_copies;  // cp.async lands at issue, not at the wait
};

inline Schedule schedule_for(int threads, unsigned long seed) {
  const bool greedy = seed % 4 == 1 || seed % 4 == 2;
  Schedule s{std::vector<int>(threads), greedy, greedy};
  for (int i = 0; i < threads; ++i) s.order[i] = i;
  if (seed % 4 == 2) std::reverse(s.order.begin(), s.order.end());
  if (seed % 4 == 3) {
    for (int i = threads - 1; i > 0; --i) {
      seed = seed * 6364136223846793005ul + 1442695040888963407ul;
      std::swap(s.order[i], s.order[(seed >> 33) % (i + 1)]);
    }
  }
  return s;
}

// Releases warp w's lanes if every lane still running waits at its barrier.
inline void release_warp_if_complete(int w) {
  const int n = static_cast<int>(cta->threads.size());
  const int first = 32 * w, last = std::min(n, first + 32);
  int waiting = 0, running = 0;
  for (int i = first; i < last; ++i) {
    running += cta->threads[i].state != Thread::done;
    waiting += cta->threads[i].state == Thread::at_warp_barrier;
  }
  if (waiting == 0 || waiting != running) return;
  for (int i = first; i < last; ++i)
    if (cta->threads[i].state == Thread::at_warp_barrier) cta->threads[i].state = Thread::runnable;
}

// Runs the CTA's threads until all are done: a barrier releases its threads
// when every thread still running has reached it (exited threads no longer
// count, as on the GPU).
inline void run_cta(const Schedule& schedule) {
  int live = static_cast<int>(cta->threads.size());
  auto run = [&](int i) {
    Thread& t = cta->threads[i];
    cta->current = &t;
    threadIdx = t.index;
    swapcontext(&cta->scheduler, &t.context);
    if (t.state == Thread::done) --live;
    release_warp_if_complete(i / 32);
  };
  while (live > 0) {
    bool ran = false;
    for (int i : schedule.order) {
      if (cta->threads[i].state != Thread::runnable) continue;
      run(i);
      ran = true;
      if (schedule.greedy) break;
    }
    if (ran) continue;
    int at_barrier = 0;
    for (const Thread& t : cta->threads) at_barrier += t.state == Thread::at_cta_barrier;
    if (at_barrier != live)
      fail("deadlock: threads wait at different barriers (a __syncthreads or warp-wide "
           "operation that not every thread reaches)");
    for (Thread& t : cta->threads)
      if (t.state == Thread::at_cta_barrier) t.state = Thread::runnable;
  }
}

inline std::function<void()> kernel_body;  // the launch's kernel with its arguments

inline void thread_entry() {
  kernel_body();  // copies still pending at exit never reach shared memory
  Thread& t = self();
  t.state = Thread::done;
  swapcontext(&t.context, &cta->scheduler);
}

// Launch: the grid's CTAs one after another, each CTA's threads as fibers.
template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_bytes,
                   cudaStream_t, A&&... args) {
  const long threads = static_cast<long>(block.x) * block.y * block.z;
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535)
    return cudaErrorInvalidConfiguration;
  if (dynamic_bytes > kMaxDynamicShared) return cudaErrorInvalidValue;
  std::tuple<P...> params(static_cast<P>(args)...);
  kernel_body = [&] { std::apply(kernel, params); };
  while (static_cast<long>(stacks.size()) < threads)
    stacks.push_back(std::make_unique<char[]>(kStackBytes));
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        Cta state;
        state.threads.resize(threads);
        state.warps.resize((threads + 31) / 32);
        state.dynamic.assign(dynamic_bytes + 16, 0xFF);
        cta = &state;
        for (long i = 0; i < threads; ++i) {
          Thread& t = state.threads[i];
          t.linear = static_cast<int>(i);
          t.index = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          getcontext(&t.context);
          t.context.uc_stack.ss_sp = stacks[i].get();
          t.context.uc_stack.ss_size = kStackBytes;
          t.context.uc_link = nullptr;
          makecontext(&t.context, thread_entry, 0);
        }
        const Schedule schedule = schedule_for(static_cast<int>(threads), launches++);
        eager_copies = schedule.eager_copies;
        run_cta(schedule);
        cta = nullptr;
      }
  kernel_body = nullptr;
  return cudaSuccess;
}

inline unsigned char* dynamic_shared() {
  auto addr = reinterpret_cast<uintptr_t>(cta->dynamic.data());
  return cta->dynamic.data() + ((16 - addr % 16) % 16);
}

}  // namespace pyllm_host

// ---- device built-ins -------------------------------------------------------
inline void __syncthreads() { pyllm_host::sync_threads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  pyllm_host::check_mask(mask);
  pyllm_host::sync_warp();
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = pyllm_host::lane();
  return pyllm_host::shuffle(mask, v, (lane / width) * width + src % width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = pyllm_host::lane();
  const int src = lane ^ lane_mask;
  return pyllm_host::shuffle(mask, v, src / width == lane / width ? src : lane);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = pyllm_host::lane();
  const int src = lane + static_cast<int>(delta);
  return pyllm_host::shuffle(mask, v, src / width == lane / width ? src : lane);
}

inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
inline float __expf(float v) { return std::exp(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float v) { return 1.f / v; }
// expf, exp2f, logf, tanhf, erff, fmaxf, fminf: the C library's, via <cmath>.

// ---- fp16 / bf16 --------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}

// ---- PTX bodies for csrc/cuda/ptx.h -------------------------------------------
namespace pyllm_host {

inline void cp_async(void* smem, const void* gmem, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async: src_bytes outside 0..16");
  if (reinterpret_cast<uintptr_t>(smem) % 16 || (src_bytes && reinterpret_cast<uintptr_t>(gmem) % 16))
    fail("cp.async: 16-byte copy from or to an unaligned address");
  PendingCopy c{smem, {}, 16};
  std::memset(c.bytes, 0, 16);
  if (src_bytes) std::memcpy(c.bytes, gmem, src_bytes);  // read at issue
  if (eager_copies) {
    std::memcpy(smem, c.bytes, 16);
    return;
  }
  self().cp_async_open.push_back(c);
}
inline void cp_async_commit() {
  Thread& t = self();
  t.cp_async_groups.push_back(std::move(t.cp_async_open));
  t.cp_async_open.clear();
}
// Lands every committed group but the newest `pending` in shared memory.
inline void cp_async_wait(int pending) {
  auto& groups = self().cp_async_groups;
  while (static_cast<int>(groups.size()) > pending) {
    for (const PendingCopy& c : groups.front()) std::memcpy(c.dst, c.bytes, c.size);
    groups.erase(groups.begin());
  }
}

inline uint16_t load_b16(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16) fail("ldmatrix: row address not 16-byte aligned");
  WarpExchange ex(row);
  const int l = lane(), g = l / 4, t = l % 4;
  for (int j = 0; j < 4; ++j) {
    if (!trans) {
      const auto* p = ex.read<const unsigned char*>(8 * j + g) + 4 * t;
      std::memcpy(&r[j], p, 4);
    } else {
      const uint16_t lo = load_b16(ex.read<const unsigned char*>(8 * j + 2 * t) + 2 * g);
      const uint16_t hi = load_b16(ex.read<const unsigned char*>(8 * j + 2 * t + 1) + 2 * g);
      r[j] = lo | static_cast<uint32_t>(hi) << 16;
    }
  }
}

template <class T>
float b16_to_float(uint16_t bits) {
  T v;
  v.bits = bits;
  if constexpr (sizeof(T) == 2 && std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// d += A * B for one warp, each lane holding its fragments (see ptx.h).
template <class T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Fragments {
    uint32_t a[4], b[2];
  } mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  WarpExchange ex(mine);
  auto half_of = [](uint32_t reg, int which) { return static_cast<uint16_t>(reg >> (16 * which)); };
  auto A = [&](int row, int col) {  // 16x16
    const Fragments f = ex.read<Fragments>((row % 8) * 4 + (col % 8) / 2);
    return b16_to_float<T>(half_of(f.a[(row >= 8) + 2 * (col >= 8)], col % 2));
  };
  auto B = [&](int k, int n) {  // 16x8
    const Fragments f = ex.read<Fragments>(n * 4 + (k % 8) / 2);
    return b16_to_float<T>(half_of(f.b[k >= 8], k % 2));
  };
  const int l = lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);  // products are exact in fp32
    d[i] = acc;
  }
}

}  // namespace pyllm_host
