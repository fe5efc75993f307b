// TTT-MLP: one mini-batch forward (tape + state update) and backward, on one row.
// Same formulas as mlp_step / mlp_step_backward in ttt/ops/scan/torch_scan.py.
#include "scan_api.h"
#include "scan_driver.h"

namespace ttt_scan {
namespace {

template <typename T> struct Mlp {
  static constexpr int NS = 8;  // W1 [F x H], b1 [H], W2 [H x F], b2 [F], gW1, gb1, gW2, gb2
  static void sizes(const Dims& d, long* sz) {
    sz[0] = sz[2] = sz[4] = sz[6] = d.F * d.H;
    sz[1] = sz[5] = d.H;
    sz[3] = sz[7] = d.F;
  }
  // tape: X2, Xbar2, (room for dP in the backward) (adjacent: one product for dW2), gelu'(Z1),
  // gelu''(Z1), P = G2 W2^T, G1, gelu'(Zbar1) [b x H]; xhat, gy, G2 [b x F]; rstd [b];
  // Q K^T, Xbar2 X2^T [b x b]
  static long tape_size(const Dims& d) { return 8 * d.b * d.H + 3 * d.b * d.F + d.b + 2 * d.b * d.b; }
  static long scratch_size(const Dims& d) {
    return 16 * d.b * d.H + 10 * d.b * d.F + 6 * d.b * d.b + 4 * d.F + 4 * d.H;
  }

  struct Tape {
    T *x2, *xb2, *dp, *dg1, *d2g1, *p, *G1, *dgb, *xhat, *gy, *G2, *rstd, *qk, *xx;
    Tape(const Dims& d, T* ptr) {
      const long bh = d.b * d.H, bf = d.b * d.F;
      x2 = ptr;
      xb2 = x2 + bh;
      dp = xb2 + bh;
      dg1 = dp + bh;
      d2g1 = dg1 + bh;
      p = d2g1 + bh;
      G1 = p + bh;
      dgb = G1 + bh;
      xhat = dgb + bh;
      gy = xhat + bf;
      G2 = gy + bf;
      rstd = G2 + bf;
      qk = rstd + d.b;
      xx = qk + d.b * d.b;
    }
  };

  static void add_rows(long b, long n, const T* v, T* x, T alpha = T(1)) {
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < n; ++j) x[i * n + j] += alpha * v[j];
  }
  // x[i, :] -= c_i * (Y gW + gb)[i, :]
  static void first_term(long b, long n, long kdim, const T* coef, const T* Y, const T* gW, const T* gb, T* x,
                         T* tmp) {
    mm_nn<T>(b, n, kdim, Y, gW, tmp);
    add_rows(b, n, gb, tmp);
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < n; ++j) x[i * n + j] -= coef[i] * tmp[i * n + j];
  }

  static void tape(const Dims& d, T* const* st, bool acc_nz, const Mb<T>& mb, T* tp, T* scratch, T* zbar,
                   bool full) {
    const long b = d.b, F = d.F, H = d.H;
    const T *W1 = st[0], *b1 = st[1], *W2 = st[2], *b2 = st[3];
    const T *gW1 = st[4], *gb1 = st[5], *gW2 = st[6], *gb2 = st[7];
    Tape t(d, tp);
    T* tT = scratch;  // [max(F, H) x b]
    T* A = tT + b * std::max(F, H);
    T* tmp = A + b * b;
    // Z1 = K W1 + b1, X2 = gelu(Z1)
    // [Z1; Zbar1] = [K; Q] W1 + b1 in one product where the caller keeps K and Q adjacent (W1 is read
    // once); Zbar1 gets its - A1 G1 below
    const bool kq = mb.Q == mb.K + b * F;
    mm_nn<T>(kq ? 2 * b : b, H, F, mb.K, W1, t.x2);
    add_rows(kq ? 2 * b : b, H, b1, t.x2);
    gelu<T>(b * H, t.x2, t.x2, t.dg1, full ? t.d2g1 : nullptr);
    // Z2 = X2 W2 + b2, G2 = grad of the inner loss at Z2, G1 = (G2 W2^T) * gelu'(Z1)
    T* z2 = tmp + b * H;
    mm_nn<T>(b, F, H, t.x2, W2, z2);
    add_rows(b, F, b2, z2);
    ln_grad<T>(b, F, z2, mb.S, mb.lnw, t.xhat, t.rstd, t.gy, t.G2);
    transpose<T>(b, F, t.G2, tT);
    mm_nt<T>(b, H, F, tT, W2, t.p);
    for (long i = 0; i < b * H; ++i) t.G1[i] = t.p[i] * t.dg1[i];
    // Zbar1 = Q W1 + b1 - A1 G1 [- c (Q gW1 + gb1)], Xbar2 = gelu(Zbar1)
    transpose<T>(b, F, mb.K, tT);
    mm_nn<T>(b, b, F, mb.Q, tT, t.qk);
    tril_e_mul<T>(b, mb.coef, mb.lr, t.qk, A);
    if (!kq) {
      mm_nn<T>(b, H, F, mb.Q, W1, t.xb2);
      add_rows(b, H, b1, t.xb2);
    }
    mm_nn<T>(b, H, b, A, t.G1, t.xb2, T(-1), true);
    if (mb.first && acc_nz) first_term(b, H, F, mb.coef, mb.Q, gW1, gb1, t.xb2, tmp);
    gelu<T>(b * H, t.xb2, t.xb2, full ? t.dgb : nullptr, nullptr);
    // A2 = E * (Xbar2 X2^T + 1); Zbar2 = Xbar2 W2 + b2 - A2 G2 [- c (Xbar2 gW2 + gb2)]
    transpose<T>(b, H, t.x2, tT);
    mm_nn<T>(b, b, H, t.xb2, tT, t.xx);
    if (!zbar) return;
    tril_e_mul<T>(b, mb.coef, mb.lr, t.xx, A);
    mm_nn<T>(b, F, H, t.xb2, W2, zbar);
    add_rows(b, F, b2, zbar);
    mm_nn<T>(b, F, b, A, t.G2, zbar, T(-1), true);
    if (mb.first && acc_nz) first_term(b, F, H, mb.coef, t.xb2, gW2, gb2, zbar, tmp);
  }

  // state after the mini-batch: src -> dst (may be the same); writes dst's weights, and its accumulators
  // when they stay live (acc_nz on return)
  static void update(const Dims& d, const T* const* src, T* const* dst, bool& acc_nz, const Mb<T>& mb,
                     const T* tp, T* scratch) {
    const long b = d.b, F = d.F, H = d.H;
    const long n[4] = {F * H, H, H * F, F};
    Tape t(d, const_cast<T*>(tp));
    T* lg1 = scratch;
    T* lg2 = lg1 + b * H;
    for (long i = 0; i < b; ++i) {
      for (long j = 0; j < H; ++j) lg1[i * H + j] = mb.lr[i] * t.G1[i * H + j];
      for (long j = 0; j < F; ++j) lg2[i * F + j] = mb.lr[i] * t.G2[i * F + j];
    }
    if (mb.complete) {
      const T cl = mb.coef[b - 1];
      const T* w[4] = {src[0], src[1], src[2], src[3]};
      if (acc_nz) {  // fold the carried accumulators in first
        for (int s = 0; s < 4; ++s) {
          for (long i = 0; i < n[s]; ++i) dst[s][i] = src[s][i] - cl * src[s + 4][i];
          w[s] = dst[s];
        }
        acc_nz = false;  // the accumulators' memory is stale from here on (see scan_driver.h)
      }
      mm_tn<T>(F, H, b, mb.K, lg1, dst[0], -cl, true, w[0]);
      copy_to(w[1], dst[1], H);
      colsum<T>(b, H, lg1, dst[1], -cl, true);
      mm_tn<T>(H, F, b, t.x2, lg2, dst[2], -cl, true, w[2]);
      copy_to(w[3], dst[3], F);
      colsum<T>(b, F, lg2, dst[3], -cl, true);
    } else {
      for (int s = 0; s < 4; ++s) copy_to(src[s], dst[s], n[s]);
      mm_tn<T>(F, H, b, mb.K, lg1, dst[4], T(1), acc_nz, src[4]);
      if (acc_nz) copy_to(src[5], dst[5], H);
      colsum<T>(b, H, lg1, dst[5], T(1), acc_nz);
      mm_tn<T>(H, F, b, t.x2, lg2, dst[6], T(1), acc_nz, src[6]);
      if (acc_nz) copy_to(src[7], dst[7], F);
      colsum<T>(b, F, lg2, dst[7], T(1), acc_nz);
      acc_nz = true;
    }
  }

  static void backward(const Dims& d, T* const* st, bool acc_nz, const Mb<T>& mb, const T* tp, const T* dzb,
                       T* const* dst, const MbGrad<T>& gr, T* scratch) {
    const long b = d.b, F = d.F, H = d.H, bh = b * H, bf = b * F;
    const T *W1 = st[0], *W2 = st[2];
    const T *gW1 = st[4], *gb1 = st[5], *gW2 = st[6], *gb2 = st[7];
    T *dW1 = dst[0], *db1 = dst[1], *dW2 = dst[2], *db2 = dst[3];
    T *dgW1 = dst[4], *dgb1 = dst[5], *dgW2 = dst[6], *dgb2 = dst[7];
    Tape t(d, const_cast<T*>(tp));
    T* lg1 = scratch;
    T* dlg1 = lg1 + bh;
    T* dg1 = dlg1 + bh;
    T* tT = dg1 + bh;
    T* dx2 = tT + bh + bf;
    T* dz1 = dx2 + bh;  // [dZ1; dZbar1] (2b x H) for dW1
    T* dxb2 = dz1 + bh;  // becomes dZbar1
    T* cz = dxb2 + bh;
    T* tmp = cz + bh;
    T* lg2 = tmp + bh;
    T* dlg2 = lg2 + bf;
    T* dg2 = dlg2 + bf;
    T* bstack = dg2 + bf;  // [dZ2; dZbar2; G2] (3b x F) for dW2
    T* dz2 = bstack;
    T* kq_stack = bstack + 3 * bf;  // [K; Q] (2b x F) for dW1, where the caller's are not adjacent
    T* da = kq_stack + 2 * bf;
    T* A = da + b * b;
    T* de = A + b * b;
    T* lns = de + b * b;
    T* dp = t.dp;
    const T cl = mb.coef[b - 1];
    for (long i = 0; i < b; ++i) {
      for (long j = 0; j < H; ++j) lg1[i * H + j] = mb.lr[i] * t.G1[i * H + j];
      for (long j = 0; j < F; ++j) lg2[i * F + j] = mb.lr[i] * t.G2[i * F + j];
    }
    // end of the mini-batch
    if (mb.complete) {
      mm_nn<T>(b, H, F, mb.K, dW1, dlg1);  // P1 = K dW1 + db1
      add_rows(b, H, db1, dlg1);
      mm_nn<T>(b, F, H, t.x2, dW2, dlg2);  // P2 = X2 dW2 + db2
      add_rows(b, F, db2, dlg2);
      T dcl = -vdot(lg1, dlg1, bh) - vdot(lg2, dlg2, bf);
      if (acc_nz)
        dcl -= vdot(gW1, dW1, F * H) + vdot(gb1, db1, H) + vdot(gW2, dW2, F * H) + vdot(gb2, db2, F);
      gr.dcoef[b - 1] += dcl;
      // d acc = -cl * dW. Written only in the first mini-batch (the last one run backwards): otherwise the
      // next one run (m - 1, complete as well) overwrites it unread; here it is read as -cl * dW.
      if (mb.first)
        for (int s = 0; s < 4; ++s) {
          const long n = s % 2 ? (s == 1 ? H : F) : F * H;
          for (long i = 0; i < n; ++i) dst[s + 4][i] = -cl * dst[s][i];
        }
      for (long i = 0; i < bh; ++i) dlg1[i] *= -cl;
      for (long i = 0; i < bf; ++i) dlg2[i] *= -cl;
    } else {
      mm_nn<T>(b, H, F, mb.K, dgW1, dlg1);
      add_rows(b, H, dgb1, dlg1);
      mm_nn<T>(b, F, H, t.x2, dgW2, dlg2);
      add_rows(b, F, dgb2, dlg2);
    }
    // accumulators: acc1 = gW1 + K^T (lr G1), acc2 = gW2 + X2^T (lr G2)
    const T ag = mb.complete ? -cl : T(1);  // d acc = ag * (complete ? dW : dgW)
    transpose<T>(b, H, lg1, tT);
    mm_nt<T>(b, F, H, tT, mb.complete ? dW1 : dgW1, gr.dk, ag);
    transpose<T>(b, F, lg2, tT);
    mm_nt<T>(b, H, F, tT, mb.complete ? dW2 : dgW2, dx2, ag);
    for (long i = 0; i < b; ++i) {
      gr.dlr[i] = vdot(t.G1 + i * H, dlg1 + i * H, H) + vdot(t.G2 + i * F, dlg2 + i * F, F);
      for (long j = 0; j < H; ++j) dg1[i * H + j] = mb.lr[i] * dlg1[i * H + j];
      for (long j = 0; j < F; ++j) dg2[i * F + j] = mb.lr[i] * dlg2[i * F + j];
    }
    // second layer: Zbar2 = Xbar2 W2 + b2 - A2 G2 [- c (Xbar2 gW2 + gb2)]
    colsum<T>(b, F, dzb, db2, T(1), true);
    transpose<T>(b, F, dzb, tT);
    mm_nt<T>(b, H, F, tT, W2, dxb2);
    transpose<T>(b, F, t.G2, tT);
    mm_nn<T>(b, b, F, dzb, tT, da, T(-1));
    tril_e_mul<T>(b, mb.coef, mb.lr, t.xx, A);
    mm_tn<T>(b, F, b, A, dzb, dg2, T(-1), true);
    if (mb.first) {
      for (long i = 0; i < b; ++i)
        for (long j = 0; j < F; ++j) cz[i * F + j] = mb.coef[i] * dzb[i * F + j];
      mm_tn<T>(H, F, b, t.xb2, cz, dgW2, T(-1), true);
      colsum<T>(b, F, cz, dgb2, T(-1), true);
      if (acc_nz) {
        transpose<T>(b, F, cz, tT);
        mm_nt<T>(b, H, F, tT, gW2, dxb2, T(-1), true);
        mm_nn<T>(b, F, H, t.xb2, gW2, tmp);
        add_rows(b, F, gb2, tmp);
        for (long i = 0; i < b; ++i) gr.dcoef[i] -= vdot(tmp + i * F, dzb + i * F, F);
      }
    }
    // A2 = E * (Xbar2 X2^T + 1)
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < b; ++j) {
        const T dij = j <= i ? da[i * b + j] : T(0);
        A[i * b + j] = dij * mb.coef[i] * mb.lr[j];
        de[i * b + j] = dij * (t.xx[i * b + j] + T(1));
      }
    mm_nn<T>(b, H, b, A, t.x2, dxb2, T(1), true);
    mm_tn<T>(b, H, b, A, t.xb2, dx2, T(1), true);
    // first layer: Zbar1 = Q W1 + b1 - A1 G1 [- c (Q gW1 + gb1)]
    T* dzb1 = dxb2;
    for (long i = 0; i < bh; ++i) dzb1[i] = dxb2[i] * t.dgb[i];
    colsum<T>(b, H, dzb1, db1, T(1), true);
    transpose<T>(b, H, dzb1, tT);
    mm_nt<T>(b, F, H, tT, W1, gr.dq);
    transpose<T>(b, H, t.G1, tT);
    mm_nn<T>(b, b, H, dzb1, tT, da, T(-1));
    tril_e_mul<T>(b, mb.coef, mb.lr, t.qk, A);
    mm_tn<T>(b, H, b, A, dzb1, dg1, T(-1), true);
    if (mb.first) {
      for (long i = 0; i < b; ++i)
        for (long j = 0; j < H; ++j) cz[i * H + j] = mb.coef[i] * dzb1[i * H + j];
      mm_tn<T>(F, H, b, mb.Q, cz, dgW1, T(-1), true);
      colsum<T>(b, H, cz, dgb1, T(-1), true);
      if (acc_nz) {
        transpose<T>(b, H, cz, tT);
        mm_nt<T>(b, F, H, tT, gW1, gr.dq, T(-1), true);
        mm_nn<T>(b, H, F, mb.Q, gW1, tmp);
        add_rows(b, H, gb1, tmp);
        for (long i = 0; i < b; ++i) gr.dcoef[i] -= vdot(tmp + i * H, dzb1 + i * H, H);
      }
    }
    // A1 = E * (Q K^T + 1); dE from both layers -> d coef, d lr
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < b; ++j) {
        const T dij = j <= i ? da[i * b + j] : T(0);
        A[i * b + j] = dij * mb.coef[i] * mb.lr[j];
        de[i * b + j] += dij * (t.qk[i * b + j] + T(1));
      }
    for (long i = 0; i < b; ++i)
      for (long j = 0; j <= i; ++j) {
        gr.dcoef[i] += de[i * b + j] * mb.lr[j];
        gr.dlr[j] += de[i * b + j] * mb.coef[i];
      }
    mm_nn<T>(b, F, b, A, mb.K, gr.dq, T(1), true);
    mm_tn<T>(b, F, b, A, mb.Q, gr.dk, T(1), true);
    // G1 = (G2 W2^T) * gelu'(Z1)
    for (long i = 0; i < bh; ++i) {
      dp[i] = dg1[i] * t.dg1[i];
      dz1[i] = dg1[i] * t.p[i] * t.d2g1[i];
    }
    mm_nn<T>(b, F, H, dp, W2, dg2, T(1), true);
    // G2 = grad of the inner loss at Z2 = X2 W2 + b2
    ln_grad_backward<T>(b, F, dg2, t.G2, t.gy, t.xhat, t.rstd, mb.S, mb.lnw, dz2, gr.ds, gr.dlnw, lns);
    transpose<T>(b, F, dz2, tT);
    mm_nt<T>(b, H, F, tT, W2, dx2, T(1), true);
    std::copy(dzb, dzb + bf, bstack + bf);
    std::copy(t.G2, t.G2 + bf, bstack + 2 * bf);
    mm_tn<T>(H, F, 3 * b, t.x2, bstack, dW2, T(1), true);  // X2^T dZ2 + Xbar2^T dZbar2 + dP^T G2
    colsum<T>(b, F, dz2, db2, T(1), true);
    // X2 = gelu(Z1), Z1 = K W1 + b1
    for (long i = 0; i < bh; ++i) dz1[i] += dx2[i] * t.dg1[i];
    transpose<T>(b, H, dz1, tT);
    mm_nt<T>(b, F, H, tT, W1, gr.dk, T(1), true);
    const T* kq = mb.K;
    if (mb.Q != mb.K + bf) {
      std::copy(mb.K, mb.K + bf, kq_stack);
      std::copy(mb.Q, mb.Q + bf, kq_stack + bf);
      kq = kq_stack;
    }
    mm_tn<T>(F, H, 2 * b, kq, dz1, dW1, T(1), true);  // K^T dZ1 + Q^T dZbar1
    colsum<T>(b, H, dz1, db1, T(1), true);
  }
};

}  // namespace

template <typename T, typename Io>
void mlp_forward(const Dims& d, const Io& io, const int64_t* nc, std::vector<const T*> init,
                    std::vector<T*> fin, std::vector<T*> ckpt, long group) {
  scan_forward_impl<T, Mlp<T>, Io>(d, io, nc, init, fin, ckpt, group);
}

template <typename T, typename Io>
void mlp_backward(const Dims& d, const Io& io, const int64_t* nc, std::vector<const T*> ckpt, long group,
                     std::vector<const T*> d_final, T* dcoef, T* dlnw, std::vector<T*> d_init) {
  scan_backward_impl<T, Mlp<T>, Io>(d, io, nc, ckpt, group, d_final, dcoef, dlnw, d_init);
}

#define TTT_INSTANTIATE(T, IO)                                                                               \
  template void mlp_forward<T, IO>(const Dims&, const IO&, const int64_t*, std::vector<const T*>,         \
                                     std::vector<T*>, std::vector<T*>, long);                               \
  template void mlp_backward<T, IO>(const Dims&, const IO&, const int64_t*, std::vector<const T*>, long,   \
                                      std::vector<const T*>, T*, T*, std::vector<T*>);
TTT_FOR_EACH_IO(TTT_INSTANTIATE)
#undef TTT_INSTANTIATE

}  // namespace ttt_scan
