// pyllm::rotary on the CPU: each token's heads of q and k rotated in place
// by the angles of its position, in float32, rounded once. Memory-bound and
// simple: plain loops over the pairs, which the compiler vectorises for the
// float32 tables; tokens are spread over threads.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "kernels/scalar.h"
#include "../common/rotary_args.h"
#include "../common/tensor_args.h"

namespace pyllm::cpu {
namespace {

template <typename T>
void rotate_heads(const Rotary& r, const RotaryTensor& x, int64_t b, int64_t s, const float* cos,
                  const float* sin) {
  const float sign = r.conjugate ? -1.f : 1.f;
  T* base = static_cast<T*>(x.data) + b * x.batch_stride + s * x.seq_stride;
  for (int64_t h = 0; h < x.heads; ++h) {
    T* head = base + h * x.head_stride;
    for (int64_t i = 0; i < r.half; ++i) {
      T* p1 = head + rotary_first(r, i);
      T* p2 = head + rotary_second(r, i);
      const float x1 = to_f32(*p1), x2 = to_f32(*p2);
      const float c = cos[i], sn = sign * sin[i];
      *p1 = from_f32<T>(x1 * c - x2 * sn);
      *p2 = from_f32<T>(x2 * c + x1 * sn);
    }
  }
}

template <typename T>
void rotate(const Rotary& r) {
  // A position outside the tables rotates by NaN (never a read outside them);
  // the operator raises before it gets here.
  at::parallel_for(0, r.batch * r.seq, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> bad;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / r.seq, s = t % r.seq;
      const int64_t pos = r.positions[t];
      const float* cos = r.cos + pos * r.half;
      const float* sin = r.sin + pos * r.half;
      if (pos < 0 || pos >= r.max_positions) {
        bad.assign(r.half, std::numeric_limits<float>::quiet_NaN());
        cos = sin = bad.data();
      }
      rotate_heads<T>(r, r.q, b, s, cos, sin);
      rotate_heads<T>(r, r.k, b, s, cos, sin);
    }
  });
}

void rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
            const at::Tensor& positions, bool interleaved, bool conjugate) {
  const Rotary r = check_rotary_args(q, k, cos, sin, positions, interleaved, conjugate,
                                     c10::DeviceType::CPU);
  for (int64_t t = 0; t < r.batch * r.seq; ++t) {
    TORCH_CHECK_VALUE(r.positions[t] >= 0 && r.positions[t] < r.max_positions,
                      "pyllm.rotary: positions must lie in [0, ", r.max_positions,
                      ") (the rows of cos/sin), got ", r.positions[t]);
  }
  switch (r.type) {
    case DType::f32: rotate<float>(r); break;
    case DType::bf16: rotate<bf16>(r); break;
    case DType::f16: rotate<f16>(r); break;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(pyllm, CPU, m) { m.impl("rotary", &rotary); }

}  // namespace pyllm::cpu
