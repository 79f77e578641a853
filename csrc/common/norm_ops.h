// The six norm operators (rms_norm, add_rms_norm, rms_norm_backward,
// layer_norm, add_layer_norm, layer_norm_backward) written once over a
// device's two entry points, which the CPU and CUDA operator files define:
//   Forward(op, rms, x, residual, weight, bias, eps) -> {y, sum, mean, rstd}
//   Backward(op, rms, grad_y, x, mean, rstd, weight, grad_sum, mask)
//       -> {grad_x, grad_weight, grad_bias}
// (undefined tensors where an output does not apply or was not asked for).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace pyllm {

template <auto Forward, auto Backward>
struct NormOps {
  using T = at::Tensor;
  using OptT = c10::optional<at::Tensor>;

  static std::tuple<T, T> rms_norm(const T& x, const OptT& weight, double eps) {
    auto out = Forward("rms_norm", true, x, c10::nullopt, weight, c10::nullopt, eps);
    return {out[0], out[3]};
  }
  static std::tuple<T, T, T> add_rms_norm(const T& x, const T& residual, const OptT& weight,
                                          double eps) {
    auto out = Forward("add_rms_norm", true, x, residual, weight, c10::nullopt, eps);
    return {out[0], out[1], out[3]};
  }
  static std::tuple<T, T> rms_norm_backward(const T& grad_y, const T& x, const T& rstd,
                                            const OptT& weight, const OptT& grad_sum,
                                            std::array<bool, 2> mask) {
    auto out = Backward("rms_norm_backward", true, grad_y, x, T(), rstd, weight, grad_sum,
                        std::array<bool, 3>{mask[0], mask[1], false});
    return {out[0], out[1]};
  }
  static std::tuple<T, T, T> layer_norm(const T& x, const OptT& weight, const OptT& bias,
                                        double eps) {
    auto out = Forward("layer_norm", false, x, c10::nullopt, weight, bias, eps);
    return {out[0], out[2], out[3]};
  }
  static std::tuple<T, T, T, T> add_layer_norm(const T& x, const T& residual, const OptT& weight,
                                               const OptT& bias, double eps) {
    auto out = Forward("add_layer_norm", false, x, residual, weight, bias, eps);
    return {out[0], out[1], out[2], out[3]};
  }
  static std::tuple<T, T, T> layer_norm_backward(const T& grad_y, const T& x, const T& mean,
                                                 const T& rstd, const OptT& weight,
                                                 const OptT& grad_sum, std::array<bool, 3> mask) {
    auto out = Backward("layer_norm_backward", false, grad_y, x, mean, rstd, weight, grad_sum,
                        mask);
    return {out[0], out[1], out[2]};
  }

  // Registers the six for the dispatch key of `m` (a TORCH_LIBRARY_IMPL block).
  static void register_all(torch::Library& m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("add_rms_norm", &add_rms_norm);
    m.impl("rms_norm_backward", &rms_norm_backward);
    m.impl("layer_norm", &layer_norm);
    m.impl("add_layer_norm", &add_layer_norm);
    m.impl("layer_norm_backward", &layer_norm_backward);
  }
};

}  // namespace pyllm
