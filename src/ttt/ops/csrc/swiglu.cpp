// The SwiGLU gate of the model's feed-forward network on the CPU, one pass over the tensors:
//
//   forward(gate, up, out?)        h = silu(gate) * up, silu(g) = g * sigmoid(g)      (into out, or new)
//   backward(dh, gate, up)         (d gate, d up): with s = sigmoid(gate),
//                                  d up = dh * gate * s, d gate = dh * up * s * (1 + gate * (1 - s))
//
// PyTorch's composition (silu, then a product) allocates and passes over a full [rows, FFN] tensor per
// op, and its autograd backward three more; here each direction reads its inputs once and writes its
// outputs once. No autograd: the Python side (ttt/ops/swiglu.py) wraps the pair in an autograd Function.
// float32 / float64, contiguous tensors of one shape; out may be gate itself (elementwise).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "scan_kernels.h"  // 64-byte vector helpers and the vectorised exp

namespace {

using ttt_scan::ivec_t;
using ttt_scan::vec_t;
using ttt_scan::vload;
using ttt_scan::vsplat;
using ttt_scan::vstore;
using ttt_scan::VW;

constexpr int64_t kGrain = 1 << 14;  // elements per task

// sigmoid(g) from e = exp(-|g|) in (0, 1] (no overflow for any g): 1 / (1 + e) for g >= 0, e / (1 + e) below
template <typename T> inline vec_t<T> vsigmoid(vec_t<T> g) {
  typedef vec_t<T> V;
  typedef ivec_t<T> IV;
  const V e = ttt_scan::vexp_neg<T>((V)((IV)g | ttt_scan::sign_bits<T>()));  // exp(-|g|)
  const V r = T(1) / (T(1) + e);
  const IV neg = g < vsplat<T>(T(0));  // all ones in the lanes where g < 0
  return (V)((neg & (IV)(e * r)) | (~neg & (IV)r));
}

template <typename T> inline T sigmoid(T g) {
  const T e = std::exp(-std::abs(g));
  return g >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T> void forward_kernel(const T* g, const T* u, T* h, int64_t n) {
  constexpr int W = VW<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      const vec_t<T> gv = vload(g + i);
      vstore(h + i, gv * vsigmoid<T>(gv) * vload(u + i));
    }
    for (; i < i1; ++i) h[i] = g[i] * sigmoid(g[i]) * u[i];
  });
}

template <typename T> void backward_kernel(const T* dh, const T* g, const T* u, T* dg, T* du, int64_t n) {
  constexpr int W = VW<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    for (; i + W <= i1; i += W) {
      const vec_t<T> gv = vload(g + i), dv = vload(dh + i), s = vsigmoid<T>(gv);
      vstore(du + i, dv * gv * s);
      vstore(dg + i, dv * vload(u + i) * s * (T(1) + gv * (T(1) - s)));
    }
    for (; i < i1; ++i) {
      const T s = sigmoid(g[i]);
      du[i] = dh[i] * g[i] * s;
      dg[i] = dh[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
    }
  });
}

void check_like(const at::Tensor& ref, const at::Tensor& t, const char* what, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == ref.scalar_type() && t.sizes() == ref.sizes() &&
                  t.is_contiguous(),
              what, ": ", name, " must be a contiguous CPU ", ref.scalar_type(), " tensor of shape ", ref.sizes(),
              ", got ", t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

void check_gate(const at::Tensor& gate, const char* what) {
  TORCH_CHECK(gate.device().is_cpu() && gate.is_contiguous() &&
                  (gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kDouble),
              what, ": gate must be a contiguous CPU float32/float64 tensor, got ", gate.scalar_type(),
              gate.is_contiguous() ? "" : " (not contiguous)");
}

at::Tensor forward(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& out) {
  check_gate(gate, "ttt_swiglu.forward");
  check_like(gate, up, "ttt_swiglu.forward", "up");
  at::Tensor h = out.has_value() ? out.value() : at::empty_like(gate);
  if (out.has_value()) check_like(gate, h, "ttt_swiglu.forward", "out");
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "ttt_swiglu.forward", [&] {
    forward_kernel<scalar_t>(gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                             gate.numel());
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& dh, const at::Tensor& gate, const at::Tensor& up) {
  check_gate(gate, "ttt_swiglu.backward");
  check_like(gate, up, "ttt_swiglu.backward", "up");
  check_like(gate, dh, "ttt_swiglu.backward", "dh");
  at::Tensor dg = at::empty_like(gate), du = at::empty_like(gate);
  AT_DISPATCH_FLOATING_TYPES(gate.scalar_type(), "ttt_swiglu.backward", [&] {
    backward_kernel<scalar_t>(dh.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), up.data_ptr<scalar_t>(),
                              dg.data_ptr<scalar_t>(), du.data_ptr<scalar_t>(), gate.numel());
  });
  return {dg, du};
}

}  // namespace

TORCH_LIBRARY(ttt_swiglu, m) {
  m.def("forward(Tensor gate, Tensor up, Tensor? out=None) -> Tensor");
  m.def("backward(Tensor dh, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ttt_swiglu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
