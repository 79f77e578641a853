// pyllm::cross_entropy on the CPU: the arguments checked (tensor_args.h),
// every target checked against the vocabulary, then rows spread over threads,
// each range computed by the ISA variant of kernels/cross_entropy_kernel.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "isa.h"
#include "output.h"
#include "../common/cross_entropy_args.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {

using CrossEntropyFn = void (*)(const CrossEntropy&, int64_t begin, int64_t end);
PYLLM_DECLARE_ISA_VARIANTS(void cross_entropy(const CrossEntropy&, int64_t, int64_t))

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, bool want_grad) {
  at::Tensor loss, lse, grad;
  const CrossEntropy a =
      check_cross_entropy_args(logits, target, ignore_index, label_smoothing, z_loss, softcap,
                               want_grad, c10::DeviceType::CPU, loss, lse, grad, &empty_output);
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t t = a.target[r];
    TORCH_CHECK_VALUE(t == ignore_index || (t >= 0 && t < a.vocab),
                      "pyllm.cross_entropy: target must be in [0, ", a.vocab, ") or ignore_index ",
                      ignore_index, ", got ", t);
  }
  static const CrossEntropyFn kernel = pick_isa<CrossEntropyFn>(
      generic::cross_entropy, avx2::cross_entropy, avx512::cross_entropy,
      avx512_bf16::cross_entropy);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(a.vocab, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return {loss, lse, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("cross_entropy", &cross_entropy); }

}  // namespace pyllm::cpu
