// Row normalisations on the CPU, one pass per row (a row of width D stays in L1):
//
//   rms_norm(x, w, eps)            y = w * (x / sqrt(mean(x^2) + eps))                  (new tensor)
//   rms_norm_forward(x, w, eps)    (y, rstd): the same y and each row's 1 / sqrt(mean(x^2) + eps)
//   rms_norm_backward(dy, x, w, rstd)
//                                  (dx, dw): with g = w * dy and xhat = x * rstd,
//                                  dx = rstd * (g - xhat * mean(g * xhat)), dw = sum over rows of dy * xhat
//   layer_norm_gate_(y, w, b, eps, g)
//                                  y = (w * (y - mean) / sqrt(var + eps) + b) [* gelu_tanh(g)]  (in place)
//   layer_norm_gate_forward(y, w, b, eps, g)
//                                  (out, mean, rstd): the same out as a new tensor, and each row's statistics
//   layer_norm_gate_backward(dout, y, w, b, g, mean, rstd)
//                                  (dy, dw, db, dg): with xhat = (y - mean) * rstd, n = w * xhat + b,
//                                  dn = dout * gelu_tanh(g) (dout without a gate), dg = dout * n * gelu_tanh'(g),
//                                  dw = sum over rows of dn * xhat, db = sum of dn,
//                                  dy = rstd * (w dn - mean(w dn) - xhat * mean(w dn * xhat))
//
// The PyTorch compositions they replace (ttt/ops/norm.py) make 4-6 passes over the [rows, D] tensor and
// allocate a full-size tensor for each (and as many again in their autograd backward). No autograd here:
// the Python side wraps the forward / backward pair in an autograd Function. float32 / float64; x, y and
// dy are contiguous [rows, D]; g is a [rows, D] view with unit feature stride and any row stride (a
// column block of the layer's fused projection output).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "scan_kernels.h"  // 64-byte vector helpers and the vectorised tanh-GELU

namespace {

using ttt_scan::hsum;
using ttt_scan::vec_t;
using ttt_scan::vload;
using ttt_scan::vstore;
using ttt_scan::VW;

constexpr int64_t kGrain = 16;  // rows per task

// sum of x[0..n) (sq: of x^2, or of (x - shift)^2 when shifted): four independent vector accumulators (one
// chain of dependent adds would be latency-bound), n a multiple of the vector width
template <typename T, bool SQ>
inline T row_sum(const T* __restrict x, int64_t n, T shift = T(0)) {
  constexpr int W = VW<T>;
  vec_t<T> a[4] = {};
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W)
    for (int u = 0; u < 4; ++u) {
      const vec_t<T> v = vload(x + j + u * W) - shift;
      a[u] += SQ ? v * v : v;
    }
  for (; j < n; j += W) {
    const vec_t<T> v = vload(x + j) - shift;
    a[0] += SQ ? v * v : v;
  }
  return hsum<T>((a[0] + a[1]) + (a[2] + a[3]));
}

// rstd: each row's 1 / rms, or null
template <typename T>
void rms_rows(const T* x, const T* w, T* y, T* rstd, int64_t rows, int64_t D, double eps) {
  constexpr int W = VW<T>;
  const int64_t Dv = D / W * W;
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict xr = x + r * D;
      T* __restrict yr = y + r * D;
      T ss = row_sum<T, true>(xr, Dv);
      int64_t j = Dv;
      for (; j < D; ++j) ss += xr[j] * xr[j];
      const T inv = T(1) / std::sqrt(ss / T(D) + T(eps));
      if (rstd) rstd[r] = inv;
      for (j = 0; j < Dv; j += W) vstore(yr + j, vload(w + j) * (vload(xr + j) * inv));
      for (; j < D; ++j) yr[j] = w[j] * (xr[j] * inv);
    }
  });
}

constexpr int64_t kWeightBlock = 256;  // rows whose d weight is summed together (then blocks in order)

// dx per row; dw: the rows' sum of dy * xhat, summed per block of kWeightBlock rows into part [blocks, D] and
// then over the blocks in order (the same result for any thread count)
template <typename T>
void rms_rows_backward(const T* dy, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows, int64_t D) {
  constexpr int W = VW<T>;
  const int64_t Dv = D / W * W;
  const int64_t blocks = (rows + kWeightBlock - 1) / kWeightBlock;
  std::vector<T> part(blocks * D, T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bl = b0; bl < b1; ++bl) {
      T* __restrict pw = part.data() + bl * D;
      for (int64_t r = bl * kWeightBlock; r < std::min(rows, (bl + 1) * kWeightBlock); ++r) {
        const T* __restrict xr = x + r * D;
        const T* __restrict gr = dy + r * D;
        T* __restrict dr = dx + r * D;
        const T rs = rstd[r];
        // mean(g * xhat) = rstd * sum(w * dy * x) / D
        vec_t<T> a[2] = {};
        int64_t j = 0;
        for (; j + 2 * W <= Dv; j += 2 * W)
          for (int u = 0; u < 2; ++u) a[u] += vload(w + j + u * W) * vload(gr + j + u * W) * vload(xr + j + u * W);
        for (; j < Dv; j += W) a[0] += vload(w + j) * vload(gr + j) * vload(xr + j);
        T s = hsum<T>(a[0] + a[1]);
        for (j = Dv; j < D; ++j) s += w[j] * gr[j] * xr[j];
        const T c = s * rs * rs / T(D);  // mean(g * xhat) / rstd
        for (j = 0; j < Dv; j += W) {
          const vec_t<T> xv = vload(xr + j), gv = vload(gr + j);
          vstore(dr + j, rs * (vload(w + j) * gv - xv * c));
          vstore(pw + j, vload(pw + j) + gv * (xv * rs));
        }
        for (; j < D; ++j) {
          dr[j] = rs * (w[j] * gr[j] - xr[j] * c);
          pw[j] += gr[j] * (xr[j] * rs);
        }
      }
    }
  });
  std::fill(dw, dw + D, T(0));
  for (int64_t bl = 0; bl < blocks; ++bl)
    for (int64_t j = 0; j < D; ++j) dw[j] += part[bl * D + j];
}

// out may be y (in place); mean / rstd: each row's statistics, or null
template <typename T>
void ln_gate_rows(T* y, const T* w, const T* b, const T* g, int64_t gs, int64_t rows, int64_t D, double eps,
                  T* out = nullptr, T* mean = nullptr, T* rstd_out = nullptr) {
  if (!out) out = y;
  constexpr int W = VW<T>;
  const int64_t Dv = D / W * W;
  const T c = T(ttt_scan::GELU_C), a = T(ttt_scan::GELU_A);
  at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* __restrict yr = y + r * D;
      T s = row_sum<T, false>(yr, Dv);
      int64_t j = Dv;
      for (; j < D; ++j) s += yr[j];
      const T mu = s / T(D);
      T var = row_sum<T, true>(yr, Dv, mu);
      for (j = Dv; j < D; ++j) var += (yr[j] - mu) * (yr[j] - mu);
      const T rstd = T(1) / std::sqrt(var / T(D) + T(eps));
      if (mean) {
        mean[r] = mu;
        rstd_out[r] = rstd;
      }
      const T* __restrict gr = g ? g + r * gs : nullptr;
      T* __restrict orow = out + r * D;
      for (j = 0; j < Dv; j += W) {
        vec_t<T> o = (vload(yr + j) - mu) * rstd * vload(w + j) + vload(b + j);
        if (gr) {
          const vec_t<T> v = vload(gr + j);
          o *= T(0.5) * v * (T(1) + ttt_scan::vtanh<T>(c * (v + a * v * (v * v))));
        }
        vstore(orow + j, o);
      }
      for (; j < D; ++j) {
        T o = (yr[j] - mu) * rstd * w[j] + b[j];
        if (gr) {
          const T v = gr[j];
          o *= T(0.5) * v * (T(1) + std::tanh(c * (v + a * v * (v * v))));
        }
        orow[j] = o;
      }
    }
  });
}

// the backward of ln_gate_rows (see the top of the file); g and dg contiguous [rows, D] or null; dw / db summed
// per block of kWeightBlock rows, then over the blocks in order
template <typename T>
void ln_gate_rows_backward(const T* dout, const T* y, const T* w, const T* b, const T* g, const T* mean,
                           const T* rstd, T* dy, T* dw, T* db, T* dg, int64_t rows, int64_t D) {
  constexpr int W = VW<T>;
  typedef vec_t<T> V;
  const int64_t Dv = D / W * W;
  const T c = T(ttt_scan::GELU_C), a = T(ttt_scan::GELU_A);
  const int64_t blocks = (rows + kWeightBlock - 1) / kWeightBlock;
  std::vector<T> part(blocks * 2 * D, T(0));  // [blocks, (dw, db)]
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> dnv(D);  // this row's w * dn
    T* __restrict wdn = dnv.data();
    for (int64_t bl = b0; bl < b1; ++bl) {
      T* __restrict pw = part.data() + bl * 2 * D;
      T* __restrict pb = pw + D;
      for (int64_t r = bl * kWeightBlock; r < std::min(rows, (bl + 1) * kWeightBlock); ++r) {
        const T* __restrict yr = y + r * D;
        const T* __restrict dr = dout + r * D;
        const T* __restrict gr = g ? g + r * D : nullptr;
        T* __restrict dgr = g ? dg + r * D : nullptr;
        T* __restrict dyr = dy + r * D;
        const T mu = mean[r], rs = rstd[r];
        // pass 1: dn, d gate, the weight sums, and the row sums of w dn and w dn * xhat
        V s1 = {}, s2 = {};
        int64_t j = 0;
        for (; j < Dv; j += W) {
          const V xh = (vload(yr + j) - mu) * rs;
          V dn = vload(dr + j);
          if (gr) {
            const V v = vload(gr + j), v2 = v * v;
            const V t = ttt_scan::vtanh<T>(c * (v + a * v * v2));
            const V n = xh * vload(w + j) + vload(b + j);
            const V d1 = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * c * (T(1) + T(3) * a * v2);
            vstore(dgr + j, dn * n * d1);
            dn = dn * (T(0.5) * v * (T(1) + t));
          }
          vstore(pw + j, vload(pw + j) + dn * xh);
          vstore(pb + j, vload(pb + j) + dn);
          const V wd = dn * vload(w + j);
          vstore(wdn + j, wd);
          s1 += wd;
          s2 += wd * xh;
        }
        T m1 = hsum<T>(s1), m2 = hsum<T>(s2);
        for (; j < D; ++j) {
          const T xh = (yr[j] - mu) * rs;
          T dn = dr[j];
          if (gr) {
            const T v = gr[j], v2 = v * v;
            const T t = std::tanh(c * (v + a * v * v2));
            const T n = xh * w[j] + b[j];
            dgr[j] = dn * n * (T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * c * (T(1) + T(3) * a * v2));
            dn = dn * (T(0.5) * v * (T(1) + t));
          }
          pw[j] += dn * xh;
          pb[j] += dn;
          wdn[j] = dn * w[j];
          m1 += wdn[j];
          m2 += wdn[j] * xh;
        }
        m1 /= T(D);
        m2 /= T(D);
        // pass 2: dy
        for (j = 0; j < Dv; j += W) {
          const V xh = (vload(yr + j) - mu) * rs;
          vstore(dyr + j, rs * (vload(wdn + j) - m1 - xh * m2));
        }
        for (; j < D; ++j) dyr[j] = rs * (wdn[j] - m1 - (yr[j] - mu) * rs * m2);
      }
    }
  });
  std::fill(dw, dw + D, T(0));
  std::fill(db, db + D, T(0));
  for (int64_t bl = 0; bl < blocks; ++bl)
    for (int64_t j = 0; j < D; ++j) {
      dw[j] += part[bl * 2 * D + j];
      db[j] += part[bl * 2 * D + D + j];
    }
}

void check_rows(const at::Tensor& x, const at::Tensor& w, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, what,
              ": float32/float64 only, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), what, ": weight dtype ", w.scalar_type(),
              " differs from the input's ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), what, ": weight of shape ", w.sizes(),
              " does not fit input of shape ", x.sizes());
  TORCH_CHECK(w.is_contiguous(), what, ": weight must be contiguous");
}

// the bias (and a contiguous gate of y's shape, when given) of a gated LayerNorm
void check_affine(const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                  const std::optional<at::Tensor>& gate, const char* what) {
  TORCH_CHECK(bias.sizes() == weight.sizes() && bias.scalar_type() == weight.scalar_type() && bias.is_contiguous() &&
                  bias.device().is_cpu(),
              what, ": bias must match the weight");
  if (gate.has_value())
    TORCH_CHECK(gate->sizes() == y.sizes() && gate->is_contiguous() && gate->scalar_type() == y.scalar_type() &&
                    gate->device().is_cpu(),
                what, ": gate must be contiguous, of the input's shape ", y.sizes(), " and dtype ", y.scalar_type(),
                ", got ", gate->sizes(), " ", gate->scalar_type());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "ttt_norm.rms_norm_forward");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t D = x.size(-1), rows = D ? xc.numel() / D : 0;
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ttt_norm.rms_norm_forward", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                       rstd.data_ptr<scalar_t>(), rows, D, eps);
  });
  return {y, rstd};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "ttt_norm.rms_norm");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t D = x.size(-1), rows = D ? xc.numel() / D : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ttt_norm.rms_norm", [&] {
    rms_rows<scalar_t>(xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), nullptr,
                       rows, D, eps);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_rows(x, weight, "ttt_norm.rms_norm_backward");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device().is_cpu(),
              "ttt_norm.rms_norm_backward: dy of shape ", dy.sizes(), " and dtype ", dy.scalar_type(),
              " does not match x of shape ", x.sizes(), " and dtype ", x.scalar_type());
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  TORCH_CHECK(rstd.numel() == rows && rstd.scalar_type() == x.scalar_type() && rstd.is_contiguous(),
              "ttt_norm.rms_norm_backward: rstd must hold one ", x.scalar_type(), " per row (", rows, "), got ",
              rstd.sizes(), " ", rstd.scalar_type());
  const at::Tensor xc = x.contiguous(), dyc = dy.contiguous();
  at::Tensor dx = at::empty_like(xc);
  at::Tensor dw = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ttt_norm.rms_norm_backward", [&] {
    rms_rows_backward<scalar_t>(dyc.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                rstd.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), rows,
                                D);
  });
  return {dx, dw};
}

at::Tensor layer_norm_gate_(at::Tensor y, const at::Tensor& weight, const at::Tensor& bias, double eps,
                            const std::optional<at::Tensor>& gate) {
  check_rows(y, weight, "ttt_norm.layer_norm_gate_");
  TORCH_CHECK(y.is_contiguous(), "ttt_norm.layer_norm_gate_: the normalised tensor must be contiguous");
  check_affine(y, weight, bias, std::nullopt, "ttt_norm.layer_norm_gate_");  // its gate may be strided: below
  const int64_t D = y.size(-1), rows = D ? y.numel() / D : 0;
  const at::Tensor* g = gate.has_value() ? &gate.value() : nullptr;
  int64_t gs = 0;
  if (g) {
    TORCH_CHECK(g->dim() == 2 && g->size(0) == rows && g->size(1) == D && g->stride(1) == 1 &&
                    g->scalar_type() == y.scalar_type() && g->device().is_cpu(),
                "ttt_norm.layer_norm_gate_: gate must be [", rows, ", ", D, "] with unit feature stride and the "
                "same dtype, got ", g->sizes(), " strides ", g->strides(), " ", g->scalar_type());
    gs = g->stride(0);
  }
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "ttt_norm.layer_norm_gate_", [&] {
    ln_gate_rows<scalar_t>(y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                           g ? g->data_ptr<scalar_t>() : nullptr, gs, rows, D, eps);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_gate_forward(const at::Tensor& y, const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps,
                                                                       const std::optional<at::Tensor>& gate) {
  check_rows(y, weight, "ttt_norm.layer_norm_gate_forward");
  TORCH_CHECK(y.is_contiguous(), "ttt_norm.layer_norm_gate_forward: the normalised tensor must be contiguous");
  check_affine(y, weight, bias, gate, "ttt_norm.layer_norm_gate_forward");
  const int64_t D = y.size(-1), rows = D ? y.numel() / D : 0;
  at::Tensor out = at::empty_like(y);
  at::Tensor mean = at::empty(y.sizes().slice(0, y.dim() - 1), y.options());
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "ttt_norm.layer_norm_gate_forward", [&] {
    ln_gate_rows<scalar_t>(y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                           gate.has_value() ? gate->data_ptr<scalar_t>() : nullptr, D, rows, D, eps,
                           out.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>> layer_norm_gate_backward(
    const at::Tensor& dout, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& gate, const at::Tensor& mean, const at::Tensor& rstd) {
  check_rows(y, weight, "ttt_norm.layer_norm_gate_backward");
  check_affine(y, weight, bias, gate, "ttt_norm.layer_norm_gate_backward");
  TORCH_CHECK(y.is_contiguous() && dout.is_contiguous() && dout.sizes() == y.sizes() &&
                  dout.scalar_type() == y.scalar_type() && dout.device().is_cpu(),
              "ttt_norm.layer_norm_gate_backward: dout of shape ", dout.sizes(), " and dtype ", dout.scalar_type(),
              " does not match the contiguous input of shape ", y.sizes(), " and dtype ", y.scalar_type());
  const int64_t D = y.size(-1), rows = D ? y.numel() / D : 0;
  TORCH_CHECK(mean.numel() == rows && rstd.numel() == rows && mean.scalar_type() == y.scalar_type() &&
                  rstd.scalar_type() == y.scalar_type() && mean.is_contiguous() && rstd.is_contiguous(),
              "ttt_norm.layer_norm_gate_backward: mean and rstd must hold one ", y.scalar_type(), " per row (",
              rows, ")");
  at::Tensor dy = at::empty_like(y), dw = at::empty_like(weight), db = at::empty_like(bias);
  std::optional<at::Tensor> dg;
  if (gate.has_value()) dg = at::empty_like(*gate);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "ttt_norm.layer_norm_gate_backward", [&] {
    ln_gate_rows_backward<scalar_t>(
        dout.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
        gate.has_value() ? gate->data_ptr<scalar_t>() : nullptr, mean.data_ptr<scalar_t>(),
        rstd.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), db.data_ptr<scalar_t>(),
        dg.has_value() ? dg->data_ptr<scalar_t>() : nullptr, rows, D);
  });
  return {dy, dw, db, dg};
}

}  // namespace

TORCH_LIBRARY(ttt_norm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("layer_norm_gate_(Tensor(a!) y, Tensor weight, Tensor bias, float eps, Tensor? gate) -> Tensor(a!)");
  m.def("layer_norm_gate_forward(Tensor y, Tensor weight, Tensor bias, float eps, Tensor? gate) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("layer_norm_gate_backward(Tensor dout, Tensor y, Tensor weight, Tensor bias, Tensor? gate, Tensor mean, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor?)");
}

TORCH_LIBRARY_IMPL(ttt_norm, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("layer_norm_gate_", &layer_norm_gate_);
  m.impl("layer_norm_gate_forward", &layer_norm_gate_forward);
  m.impl("layer_norm_gate_backward", &layer_norm_gate_backward);
}
