// Batch-invariant mode (pyllm.batch_invariant()): while it is on, every
// kernel gives each row, token or sequence the same bits whatever else is in
// the batch, wherever the row sits in it, and whether its token comes in a
// prefill or a decode step. The kernels then make no choice that depends on
// the number of rows (M) or of queries: one GEMM path for every M, no
// split-KV decode, and key blocks aligned to multiples of the block size so
// that a query's keys fall into the same blocks in every call.
//
// One process-wide flag per extension module (pyllm._C and pyllm._C_cuda
// each hold one; pyllm/batch_invariant.py sets both), read when an operator
// is called. Header-only: each module that includes it owns its copy.
#pragma once

#include <atomic>

namespace pyllm {

inline std::atomic<bool>& batch_invariant_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

// Whether batch-invariant mode is on.
inline bool batch_invariant() { return batch_invariant_flag().load(std::memory_order_relaxed); }

inline void set_batch_invariant(bool on) {
  batch_invariant_flag().store(on, std::memory_order_relaxed);
}

}  // namespace pyllm
