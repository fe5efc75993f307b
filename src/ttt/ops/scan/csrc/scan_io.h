// Where the scan reads a mini-batch's inputs and writes its results: the driver (scan_driver.h) is
// generic over an Io policy.
//
// * PlainIo: the scan contract of ttt/ops/scan/__init__.py (contiguous [R, N, b, F] k, q, s; Zbar out);
//   inputs are used in place, nothing is copied.
// * HeadsIo: the layer's own layout (ttt/ops/scan/fused.py): un-rotated projections q, k, v as strided
//   [B, L, NH, F] views, out = q + LN(Zbar) written as [B, L, NH, F]. In the forward the learning rates
//   can also be formed here from the gate's logits (a strided [B, NH, L] view, the column block of the
//   layer's fused projection output): lr = lr_base * sigmoid(logit + lr_bias[h]) / F. Each mini-batch
//   is gathered into a per-thread buffer with the rotary embedding applied (position i inside the mini-batch) and
//   S = ln_b - (v - k) formed; tokens past L are padding (k = q = v = 0, lr = 0). The backward turns
//   dOut into dZbar (the output LayerNorm's backward, from the saved Zbar) and scatters dq, dk, dv
//   (rotated back), dlr, d ln_b. One pass over the data instead of a dozen full-tensor PyTorch ops.
#pragma once

#include <cmath>
#include <cstdint>

#include "scan_kernels.h"

namespace ttt_scan {

struct Dims {
  long R, N, b, F, H;  // rows, mini-batches, mini-batch size, head dim, hidden dim of the inner model
  bool has_ln;         // inner LayerNorm (always for TTT-MLP)
};

// the inputs of one mini-batch of one row
template <typename T> struct Mb {
  const T* K;
  const T* Q;
  const T* S;
  const T* lr;
  const T* coef;
  const T* lnw;
  bool first, complete;
};

// per-mini-batch gradient outputs of one row
template <typename T> struct MbGrad {
  T* dk;
  T* dq;
  T* ds;
  T* dlr;
  T* dcoef;  // [b], accumulated (per row)
  T* dlnw;   // [F], accumulated (per row); unused without LayerNorm
};

template <typename T> struct PlainIo {
  const T *k, *q, *s, *lr, *coef, *lnw;  // lnw [R, F] or null
  T* zbar;
  const T* dzbar = nullptr;  // backward only
  T *dk = nullptr, *dq = nullptr, *ds = nullptr, *dlr = nullptr;

  static long buf_size(const Dims&) { return 0; }
  void begin_row(const Dims&, long) const {}
  Mb<T> load(const Dims& d, long r, long m, T*) const {
    const long o = (r * d.N + m) * d.b * d.F;
    return Mb<T>{k + o, q + o, s + o, lr + (r * d.N + m) * d.b, coef, lnw ? lnw + r * d.F : nullptr, false, false};
  }
  T* zbar_out(const Dims& d, long r, long m, T*) const { return zbar + (r * d.N + m) * d.b * d.F; }
  void emit(const Dims&, long, long, const Mb<T>&, const T*, T*) const {}
  const T* dzbar_of(const Dims& d, long r, long m, const Mb<T>&, T*, T*) const {
    return dzbar + (r * d.N + m) * d.b * d.F;
  }
  MbGrad<T> grads(const Dims& d, long r, long m, T*, T* dc, T* dl) const {
    const long o = (r * d.N + m) * d.b * d.F;
    return MbGrad<T>{dk + o, dq + o, ds + o, dlr + (r * d.N + m) * d.b, dc, dl};
  }
  void emit_grads(const Dims&, long, long, const Mb<T>&, const MbGrad<T>&, T*) const {}
};

// a [B, L, NH, F] tensor with unit feature stride
template <typename T> struct Strided {
  T* p;
  long sB, sL, sH;
  T* at(long bi, long t, long h) const { return p + bi * sB + t * sL + h * sH; }
};

template <typename T> struct HeadsIo {
  long L, NH;                     // tokens, heads (rows are batch-major: r = bi * NH + h)
  Strided<const T> xq, xk, xv;    // un-rotated projections
  const T *lr, *coef, *lnw, *lnb;  // lr [R, L]; coef [b]; ln_w, ln_b [NH, F]
  const T *cf, *sf;               // rotary table [b, F]: (c0, c0, c1, c1, ...), (-s0, s0, -s1, s1, ...)
  Strided<T> out;                 // q + LN(Zbar)
  T* zsave;                       // [R, N, b, F] Zbar for the backward, or null
  // forward only: with lr_bias [NH] given, lr holds the gate's logits (see above), read with these
  // strides ([B, NH, L]); otherwise lr is the contiguous [R, L] learning rates
  long lr_sB = 0, lr_sH = 0, lr_sL = 0;
  const T* lr_bias = nullptr;
  T lr_base = T(1);
  // backward only
  Strided<const T> dout{nullptr, 0, 0, 0};
  Strided<T> dxq{nullptr, 0, 0, 0}, dxk{nullptr, 0, 0, 0}, dxv{nullptr, 0, 0, 0};
  T *dlr = nullptr, *dlnb = nullptr;  // dlr [R, L]; d ln_b [R, F] per row

  // buffer: K, Q, S, Z (or dOut), dZbar, dk, dq, ds [b x F]; lr, dlr, mean, rstd [b]
  static long buf_size(const Dims& d) { return 8 * d.b * d.F + 4 * d.b; }

  void begin_row(const Dims& d, long r) const { std::fill(dlnb + r * d.F, dlnb + (r + 1) * d.F, T(0)); }

  // dst = x rotated by position i's angles (forward) or by their negatives (inv):
  // dst[j] = x[j] * cf[j] +- x[j ^ 1] * sf[j]
  void rope(long F, long i, const T* __restrict x, T* __restrict dst, bool inv) const {
    const T* __restrict c = cf + i * F;
    const T* __restrict s = sf + i * F;
    const T sg = inv ? T(-1) : T(1);
    for (long j = 0; j < F; j += 2) {  // pairs: the compiler swaps lanes in-register (x[j ^ 1] gathers)
      const T x0 = x[j], x1 = x[j + 1];
      dst[j] = x0 * c[j] + sg * (x1 * s[j]);
      dst[j + 1] = x1 * c[j + 1] + sg * (x0 * s[j + 1]);
    }
  }

  // Software prefetch of token t's slices (q, k, v, and out for writing) for this row's next mini-batch:
  // the driver visits it after the other rows of this thread (tens of microseconds later, so it waits
  // in L2). Each token's head slice is a few lines in a different page (rows are L * NH * F apart),
  // which the hardware prefetchers do not follow. One token's worth per token loaded, spread through
  // the loads rather than in one burst, which left the loads waiting behind the prefetches.
  void prefetch(long bi, long t, long h, long F) const {
    constexpr long LINE = 64 / sizeof(T);
    for (long j = 0; j < F; j += LINE) {
      __builtin_prefetch(xq.at(bi, t, h) + j);
      __builtin_prefetch(xk.at(bi, t, h) + j);
      __builtin_prefetch(xv.at(bi, t, h) + j);
      if (out.p) __builtin_prefetch(out.at(bi, t, h) + j, 1);
    }
  }

  Mb<T> load(const Dims& d, long r, long m, T* buf) const {
    const long b = d.b, F = d.F, bi = r / NH, h = r % NH, bf = b * F;
    T *K = buf, *Q = buf + bf, *S = buf + 2 * bf, *LR = buf + 8 * bf;
    const T* lb = lnb + h * F;
    for (long i = 0; i < b; ++i) {
      const long t = m * b + i;
      T *ki = K + i * F, *qi = Q + i * F, *si = S + i * F;
      if (t >= L) {
        std::fill(ki, ki + F, T(0));
        std::fill(qi, qi + F, T(0));
        std::copy(lb, lb + F, si);
        LR[i] = T(0);
        continue;
      }
      if (t + b < L) prefetch(bi, t + b, h, F);
      const T g = lr_bias ? lr[bi * lr_sB + h * lr_sH + t * lr_sL] : lr[r * L + t];
      rope(F, i, xk.at(bi, t, h), ki, false);
      rope(F, i, xq.at(bi, t, h), qi, false);
      const T* __restrict vi = xv.at(bi, t, h);
      const T* __restrict kr = ki;
      T* __restrict sr = si;
      for (long j = 0; j < F; ++j) sr[j] = lb[j] - (vi[j] - kr[j]);
      // (the same steps as the PyTorch expression lr_base * sigmoid(logit + bias) / F)
      LR[i] = lr_bias ? lr_base * (T(1) / (T(1) + std::exp(-(g + lr_bias[h])))) / T(F) : g;
    }
    return Mb<T>{K, Q, S, LR, coef, lnw + h * F, false, false};
  }

  T* zbar_out(const Dims& d, long r, long m, T* buf) const {
    return zsave ? zsave + (r * d.N + m) * d.b * d.F : buf + 3 * d.b * d.F;
  }

  // out = Q + ln_w * xhat(Zbar) + ln_b for the real tokens
  void emit(const Dims& d, long r, long m, const Mb<T>& mb, const T* z, T* buf) const {
    const long b = d.b, F = d.F, bi = r / NH, h = r % NH;
    const T* __restrict w = lnw + h * F;
    const T* __restrict lb = lnb + h * F;
    const long n = std::min(b, L - m * b);  // real tokens
    T* mu = buf + 8 * b * F + 2 * b;        // [b] each
    T* rs = mu + b;
    ln_stats_rows(n, F, z, mu, rs);
    for (long i = 0; i < n; ++i) {
      const T* __restrict zi = z + i * F;
      const T* __restrict qi = mb.Q + i * F;
      T* __restrict o = out.at(bi, m * b + i, h);
      for (long j = 0; j < F; ++j) o[j] = qi[j] + ((zi[j] - mu[i]) * rs[i] * w[j] + lb[j]);
    }
  }

  // dZbar from dOut through the output LayerNorm; accumulates d ln_w (dl) and d ln_b
  const T* dzbar_of(const Dims& d, long r, long m, const Mb<T>&, T* buf, T* dl) const {
    const long b = d.b, F = d.F, bi = r / NH, h = r % NH, bf = b * F;
    T *DO = buf + 3 * bf, *DZ = buf + 4 * bf;
    T* __restrict xh = buf + 5 * bf;  // one row of scratch (dk's slot, written later by the scan)
    const T* __restrict w = lnw + h * F;
    T* __restrict db = dlnb + r * F;
    T* __restrict dlw = dl;
    const T* z = zsave + (r * d.N + m) * bf;
    for (long i = 0; i < b; ++i) {
      const long t = m * b + i;
      T* __restrict doi = DO + i * F;
      T* __restrict dzi = DZ + i * F;
      if (t >= L) {
        std::fill(doi, doi + F, T(0));
        std::fill(dzi, dzi + F, T(0));
        continue;
      }
      std::copy(dout.at(bi, t, h), dout.at(bi, t, h) + F, doi);
      const T* __restrict zi = z + i * F;
      T mu, rs;
      ln_stats(F, zi, mu, rs);
      for (long j = 0; j < F; ++j) {
        xh[j] = (zi[j] - mu) * rs;
        dlw[j] += doi[j] * xh[j];
        db[j] += doi[j];
        dzi[j] = doi[j] * w[j];
      }
      const T m1 = vsum(dzi, F) / T(F), m2 = vdot(dzi, xh, F) / T(F);
      for (long j = 0; j < F; ++j) dzi[j] = rs * (dzi[j] - m1 - xh[j] * m2);
    }
    return DZ;
  }

  MbGrad<T> grads(const Dims& d, long, long, T* buf, T* dc, T* dl) const {
    const long bf = d.b * d.F;
    return MbGrad<T>{buf + 5 * bf, buf + 6 * bf, buf + 7 * bf, buf + 8 * bf + d.b, dc, dl};
  }

  // dq += dOut (residual), dk += dS, dv = -dS, d ln_b += dS; rotate back and scatter
  void emit_grads(const Dims& d, long r, long m, const Mb<T>&, const MbGrad<T>& gr, T* buf) const {
    const long b = d.b, F = d.F, bi = r / NH, h = r % NH;
    const T* DO = buf + 3 * b * F;
    T* __restrict db = dlnb + r * F;
    for (long i = 0; i < b; ++i) {
      const long t = m * b + i;
      T* __restrict dki = gr.dk + i * F;
      T* __restrict dqi = gr.dq + i * F;
      const T* __restrict dsi = gr.ds + i * F;
      const T* __restrict doi = DO + i * F;
      for (long j = 0; j < F; ++j) db[j] += dsi[j];
      if (t >= L) continue;
      T* __restrict dv = dxv.at(bi, t, h);
      for (long j = 0; j < F; ++j) {
        dqi[j] += doi[j];
        dki[j] += dsi[j];
        dv[j] = -dsi[j];
      }
      rope(F, i, dqi, dxq.at(bi, t, h), true);
      rope(F, i, dki, dxk.at(bi, t, h), true);
      dlr[r * L + t] = gr.dlr[i];
    }
  }
};

}  // namespace ttt_scan
