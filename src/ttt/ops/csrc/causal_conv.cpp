// Depthwise causal 1-D convolution on channels-last [B, L, D] tensors, forward and backward, with a
// carried state of the previous K-1 inputs. One pass over the sequence, no concatenation, no
// transposes; parallel over (batch, channel blocks) with ATen's thread pool.
//
//   y[b, t, d] = bias[d] + sum_j w[d, j] * xp[b, t + j, d]
//   xp[b, i, d] = state[b, d, i] for i < K-1, else x[b, i - (K-1), d]
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;  // channels per task: contiguous, vectorisable inner loop

template <typename scalar_t>
void forward_kernel(const scalar_t* x, int64_t sxb, int64_t sxl, const scalar_t* state, const scalar_t* w,
                    const scalar_t* bias, scalar_t* y, int64_t B, int64_t L, int64_t D, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  // tasks: (batch row, chunk of kChunk tokens), token outer and channels inner, so the K rows of x a
  // token reads stream from memory in order (x may be a column block of a wider tensor: walking all L
  // rows for one block of channels at a time would touch a new page every row)
  constexpr int64_t kChunk = 64;
  const int64_t nchunk = (L + kChunk - 1) / kChunk;
  const int64_t Dv = D / kBlock * kBlock;  // whole blocks take the fast path
  at::parallel_for(0, B * nchunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> wt(K * D), bl(D);  // weights tap-major [K, D], bias
    for (int64_t j = 0; j < K; ++j)
      for (int64_t c = 0; c < D; ++c) wt[j * D + c] = static_cast<acc_t>(w[c * K + j]);
    for (int64_t c = 0; c < D; ++c) bl[c] = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nchunk, t0 = (task % nchunk) * kChunk, t1 = std::min(L, t0 + kChunk);
      const scalar_t* xb = x + b * sxb;
      scalar_t* yb = y + b * L * D;
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* yr = yb + t * D;
        int64_t c0 = 0;
        if (t >= K - 1) {  // every tap reads x: whole blocks with compile-time width (registers)
          for (; c0 < Dv; c0 += kBlock) {
            acc_t a[kBlock];
            for (int64_t c = 0; c < kBlock; ++c) a[c] = bl[c0 + c];
            for (int64_t j = 0; j < K; ++j) {
              const scalar_t* __restrict xr = xb + (t + j - (K - 1)) * sxl + c0;
              const acc_t* __restrict wj = wt.data() + j * D + c0;
              for (int64_t c = 0; c < kBlock; ++c) a[c] += wj[c] * static_cast<acc_t>(xr[c]);
            }
            for (int64_t c = 0; c < kBlock; ++c) yr[c0 + c] = static_cast<scalar_t>(a[c]);
          }
        }
        for (int64_t c = c0; c < D; ++c) {  // the rest: taps on the state, a partial block
          acc_t a = bl[c];
          for (int64_t j = 0; j < K; ++j) {
            const int64_t i = t + j - (K - 1);  // index into x; < 0 reads the state
            if (i >= 0)
              a += wt[j * D + c] * static_cast<acc_t>(xb[i * sxl + c]);
            else if (state)
              a += wt[j * D + c] * static_cast<acc_t>(state[(b * D + c) * (K - 1) + (t + j)]);
          }
          yr[c] = static_cast<scalar_t>(a);
        }
      }
    }
  });
}

// dx[b, s, d] = sum_j w[d, j] dy[b, s + K-1 - j, d];  dstate[b, d, i] = sum_{j <= i} w[d, j] dy[b, i - j, d]
// dw[d, j] = sum_{b, t} xp[b, t + j, d] dy[b, t, d];  dbias[d] = sum_{b, t} dy[b, t, d]
template <typename scalar_t>
void backward_kernel(const scalar_t* x, const scalar_t* state, const scalar_t* w, const scalar_t* dy,
                     scalar_t* dx, scalar_t* dstate, scalar_t* dw, scalar_t* dbias, int64_t B, int64_t L,
                     int64_t D, int64_t K) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nblk = (D + kBlock - 1) / kBlock;
  // parallel over channel blocks only, so the weight/bias reductions over (b, t) need no atomics
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kBlock), gw(kBlock * K), gb(kBlock), wl(kBlock * K);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t d0 = blk * kBlock, nd = std::min(kBlock, D - d0);
      for (int64_t j = 0; j < K; ++j)
        for (int64_t c = 0; c < nd; ++c) wl[j * kBlock + c] = static_cast<acc_t>(w[(d0 + c) * K + j]);
      std::fill(gw.begin(), gw.end(), acc_t(0));
      std::fill(gb.begin(), gb.end(), acc_t(0));
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* xb = x + b * L * D + d0;
        const scalar_t* gyb = dy + b * L * D + d0;
        scalar_t* dxb = dx + b * L * D + d0;
        for (int64_t s = 0; s < L; ++s) {
          for (int64_t c = 0; c < nd; ++c) acc[c] = acc_t(0);
          const scalar_t* xr = xb + s * D;
          for (int64_t j = 0; j < K; ++j) {
            const int64_t t = s + (K - 1) - j;  // output that reads x[s] through tap j
            if (t < L) {
              const scalar_t* gr = gyb + t * D;
              acc_t* gwj = gw.data() + j * kBlock;
              const acc_t* wj = wl.data() + j * kBlock;
              for (int64_t c = 0; c < nd; ++c) {
                const acc_t g = static_cast<acc_t>(gr[c]);
                acc[c] += wj[c] * g;
                gwj[c] += static_cast<acc_t>(xr[c]) * g;
              }
            }
          }
          scalar_t* dxr = dxb + s * D;
          for (int64_t c = 0; c < nd; ++c) dxr[c] = static_cast<scalar_t>(acc[c]);
          const scalar_t* gr = gyb + s * D;
          for (int64_t c = 0; c < nd; ++c) gb[c] += static_cast<acc_t>(gr[c]);
        }
        // taps that read the carried state: xp index i < K-1 feeds outputs t = i - j >= 0
        for (int64_t i = 0; i < K - 1; ++i) {
          for (int64_t c = 0; c < nd; ++c) {
            acc_t a = 0;
            const acc_t sv = state ? static_cast<acc_t>(state[(b * D + d0 + c) * (K - 1) + i]) : acc_t(0);
            for (int64_t j = 0; j <= i && j < K; ++j) {
              const int64_t t = i - j;
              if (t >= L) continue;
              const acc_t g = static_cast<acc_t>(gyb[t * D + c]);
              a += static_cast<acc_t>(w[(d0 + c) * K + j]) * g;
              gw[j * kBlock + c] += sv * g;
            }
            if (dstate) dstate[(b * D + d0 + c) * (K - 1) + i] = static_cast<scalar_t>(a);
          }
        }
      }
      for (int64_t c = 0; c < nd; ++c) {
        for (int64_t j = 0; j < K; ++j) dw[(d0 + c) * K + j] = static_cast<scalar_t>(gw[j * kBlock + c]);
        if (dbias) dbias[d0 + c] = static_cast<scalar_t>(gb[c]);
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& w, bool strided = false) {
  TORCH_CHECK(x.dim() == 3 && (strided ? x.stride(2) == 1 : x.is_contiguous()), "causal_conv: x must be a ",
              strided ? "[B, L, D] tensor with unit channel stride" : "contiguous [B, L, D] tensor");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(0) == x.size(2),
              "causal_conv: weight must be a contiguous [D, K] tensor");
  TORCH_CHECK(x.device().is_cpu(), "causal_conv: CPU tensors only");
}

}  // namespace

at::Tensor causal_conv_forward(const at::Tensor& x, const std::optional<at::Tensor>& state,
                               const at::Tensor& w, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& out) {
  check(x, w, true);  // x may be a column block of a wider [B, L, *] tensor (the layer's fused projections)
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = w.size(1);
  at::Tensor y;
  if (out) {  // the caller's buffer (e.g. reused scratch memory at inference)
    y = *out;
    TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.device().is_cpu() &&
                    y.is_contiguous(),
                "causal_conv: out must be a contiguous CPU tensor shaped and typed like x, got ", y.sizes());
  } else {
    y = at::empty({B, L, D}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_conv_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), state ? state->data_ptr<scalar_t>() : nullptr,
                             w.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
                             y.data_ptr<scalar_t>(), B, L, D, K);
  });
  return y;
}

std::vector<at::Tensor> causal_conv_backward(const at::Tensor& x, const std::optional<at::Tensor>& state,
                                             const at::Tensor& w, const at::Tensor& dy_in, bool has_bias) {
  check(x, w);
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = w.size(1);
  const at::Tensor dy = dy_in.contiguous();
  auto dx = at::empty_like(x);
  auto dstate = at::empty({B, D, K - 1}, x.options());
  auto dw = at::empty_like(w);
  auto dbias = at::empty({has_bias ? D : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_conv_backward", [&] {
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), state ? state->data_ptr<scalar_t>() : nullptr,
                              w.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                              dstate.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                              has_bias ? dbias.data_ptr<scalar_t>() : nullptr, B, L, D, K);
  });
  return {dx, dstate, dw, dbias};
}

TORCH_LIBRARY(ttt_conv, m) {
  m.def("forward(Tensor x, Tensor? state, Tensor w, Tensor? bias, Tensor? out=None) -> Tensor",
        &causal_conv_forward);
  m.def("backward(Tensor x, Tensor? state, Tensor w, Tensor dy, bool has_bias) -> Tensor[]",
        &causal_conv_backward);
}
