// pyllm::rotary on the CPU: the arguments checked (tensor_args.h), every
// position checked against the tables, then tokens spread over threads, each
// range rotated by the ISA variant of kernels/rotary_kernel.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "isa.h"
#include "rotary_op.h"
#include "../common/rotary_args.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {

using RotaryFn = void (*)(const Rotary&, int64_t begin, int64_t end);
PYLLM_DECLARE_ISA_VARIANTS(void rotary(const Rotary&, int64_t, int64_t))

void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& positions, bool interleaved, bool conjugate) {
  const Rotary r = check_rotary_args(q, k, cos, sin, positions, interleaved, conjugate,
                                     c10::DeviceType::CPU);
  const int64_t tokens = r.batch * r.seq;
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_VALUE(r.positions[t] >= 0 && r.positions[t] < r.max_positions,
                      "pyllm.rotary: positions must lie in [0, ", r.max_positions,
                      ") (the rows of cos/sin), got ", r.positions[t]);
  }
  static const RotaryFn kernel =
      pick_isa<RotaryFn>(generic::rotary, avx2::rotary, avx512::rotary, avx512_bf16::rotary);
  const int64_t per_token = (r.q.heads + r.k.heads) * r.half;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(per_token, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) { kernel(r, begin, end); });
}

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("rotary", &rotary); }

}  // namespace pyllm::cpu
