// TTT-Linear: one mini-batch forward (tape + state update) and backward, on one row.
// Same formulas as linear_step / linear_step_backward in ttt/ops/scan/torch_scan.py.
#include "scan_api.h"
#include "scan_driver.h"

namespace ttt_scan {
namespace {

template <typename T> struct Linear {
  static constexpr int NS = 4;  // W [F x F], b [F], gW, gb
  static void sizes(const Dims& d, long* sz) {
    sz[0] = sz[2] = d.F * d.F;
    sz[1] = sz[3] = d.F;
  }
  // tape: xhat (or Z), gy, G [b x F]; rstd [b]; QK^T [b x b]
  static long tape_size(const Dims& d) { return 3 * d.b * d.F + d.b + d.b * d.b; }
  static long scratch_size(const Dims& d) { return 12 * d.b * d.F + 4 * d.b * d.b + 4 * d.F; }

  struct Tape {
    T *xhat, *gy, *G, *rstd, *qk;
    Tape(const Dims& d, T* p) {
      const long bf = d.b * d.F;
      xhat = p;
      gy = p + bf;
      G = p + 2 * bf;
      rstd = p + 3 * bf;
      qk = rstd + d.b;
    }
  };

  static void add_rows(long b, long F, const T* v, T* x, T alpha = T(1)) {
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < F; ++j) x[i * F + j] += alpha * v[j];
  }

  static void tape(const Dims& d, T* const* st, bool acc_nz, const Mb<T>& mb, T* tp, T* scratch, T* zbar,
                   bool /*full*/) {
    const long b = d.b, F = d.F;
    const T *W = st[0], *bias = st[1], *gW = st[2], *gb = st[3];
    Tape t(d, tp);
    T* KT = scratch;
    T* A = KT + F * b;
    T* tmp = A + b * b;
    T* z = tmp + b * F;
    // Z = K W + bias; G = grad of the inner loss at Z
    mm_nn<T>(b, F, F, mb.K, W, z);
    add_rows(b, F, bias, z);
    if (d.has_ln) {
      ln_grad<T>(b, F, z, mb.S, mb.lnw, t.xhat, t.rstd, t.gy, t.G);
    } else {
      for (long i = 0; i < b * F; ++i) t.G[i] = z[i] + mb.S[i];
    }
    transpose<T>(b, F, mb.K, KT);
    mm_nn<T>(b, b, F, mb.Q, KT, t.qk);
    if (!zbar) return;
    // Zbar = Q W + bias - A G [- coef * (Q gW + gb) in the first mini-batch]
    tril_e_mul<T>(b, mb.coef, mb.lr, t.qk, A);
    mm_nn<T>(b, F, F, mb.Q, W, zbar);
    add_rows(b, F, bias, zbar);
    mm_nn<T>(b, F, b, A, t.G, zbar, T(-1), true);
    if (mb.first && acc_nz) {
      mm_nn<T>(b, F, F, mb.Q, gW, tmp);
      add_rows(b, F, gb, tmp);
      for (long i = 0; i < b; ++i)
        for (long j = 0; j < F; ++j) zbar[i * F + j] -= mb.coef[i] * tmp[i * F + j];
    }
  }

  // state after the mini-batch: src -> dst (may be the same); writes dst's weights, and its accumulators
  // when they stay live (acc_nz on return)
  static void update(const Dims& d, const T* const* src, T* const* dst, bool& acc_nz, const Mb<T>& mb,
                     const T* tp, T* scratch) {
    const long b = d.b, F = d.F;
    Tape t(d, const_cast<T*>(tp));
    T* lg = scratch;
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < F; ++j) lg[i * F + j] = mb.lr[i] * t.G[i * F + j];
    if (mb.complete) {
      const T cl = mb.coef[b - 1];
      const T *W = src[0], *bias = src[1];
      if (acc_nz) {  // fold the carried accumulators in first
        for (long i = 0; i < F * F; ++i) dst[0][i] = src[0][i] - cl * src[2][i];
        for (long i = 0; i < F; ++i) dst[1][i] = src[1][i] - cl * src[3][i];
        W = dst[0];
        bias = dst[1];
        acc_nz = false;  // the accumulators' memory is stale from here on (see scan_driver.h)
      }
      mm_tn<T>(F, F, b, mb.K, lg, dst[0], -cl, true, W);
      copy_to(bias, dst[1], F);
      colsum<T>(b, F, lg, dst[1], -cl, true);
    } else {
      copy_to(src[0], dst[0], F * F);
      copy_to(src[1], dst[1], F);
      mm_tn<T>(F, F, b, mb.K, lg, dst[2], T(1), acc_nz, src[2]);
      if (acc_nz) copy_to(src[3], dst[3], F);
      colsum<T>(b, F, lg, dst[3], T(1), acc_nz);
      acc_nz = true;
    }
  }

  static void backward(const Dims& d, T* const* st, bool acc_nz, const Mb<T>& mb, const T* tp, const T* dzb,
                       T* const* dst, const MbGrad<T>& gr, T* scratch) {
    const long b = d.b, F = d.F, bf = b * F;
    const T *W = st[0], *gW = st[2], *gb = st[3];
    T *dW = dst[0], *db = dst[1], *dgW = dst[2], *dgb = dst[3];
    Tape t(d, const_cast<T*>(tp));
    T* lg = scratch;
    T* dlg = lg + bf;
    T* dg = dlg + bf;
    T* tT = dg + bf;  // transposes [F x b]
    T* qk_stack = tT + bf;     // [Q; K] (2b x F)
    T* dd_stack = qk_stack + 2 * bf;  // [dZbar; dZ] (2b x F): dW += Q^T dZbar + K^T dZ in one product
    T* dz = dd_stack + bf;
    T* cz = dz + bf;
    T* tmp = cz + bf;
    T* da = tmp + bf;  // [b x b]
    T* A = da + b * b;
    T* deb = A + b * b;
    T* lns = deb + b * b;  // 2F
    const T cl = mb.coef[b - 1];
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < F; ++j) lg[i * F + j] = mb.lr[i] * t.G[i * F + j];
    // end of the mini-batch: W' = W - cl * acc (complete) else acc' = acc, acc = gW + K^T lg
    if (mb.complete) {
      mm_nn<T>(b, F, F, mb.K, dW, dlg);  // P = K dW + db
      add_rows(b, F, db, dlg);
      T dcl = -vdot(lg, dlg, bf);
      if (acc_nz) dcl -= vdot(gW, dW, F * F) + vdot(gb, db, F);
      gr.dcoef[b - 1] += dcl;
      // d acc = -cl * dW. Written only in the first mini-batch (the last one run backwards): otherwise the
      // next one run (m - 1, complete as well) overwrites it unread; here it is read as -cl * dW.
      if (mb.first) {
        for (long i = 0; i < F * F; ++i) dgW[i] = -cl * dW[i];
        for (long i = 0; i < F; ++i) dgb[i] = -cl * db[i];
      }
      for (long i = 0; i < bf; ++i) dlg[i] *= -cl;
    } else {
      mm_nn<T>(b, F, F, mb.K, dgW, dlg);
      add_rows(b, F, dgb, dlg);
    }
    // acc = gW + K^T (lr * G)
    transpose<T>(b, F, lg, tT);
    mm_nt<T>(b, F, F, tT, mb.complete ? dW : dgW, gr.dk, mb.complete ? -cl : T(1));
    for (long i = 0; i < b; ++i) {
      gr.dlr[i] = vdot(t.G + i * F, dlg + i * F, F);
      for (long j = 0; j < F; ++j) dg[i * F + j] = mb.lr[i] * dlg[i * F + j];
    }
    // Zbar = Q W + bias - A G [- c (Q gW + gb)]
    colsum<T>(b, F, dzb, db, T(1), true);
    transpose<T>(b, F, dzb, tT);
    mm_nt<T>(b, F, F, tT, W, gr.dq);
    transpose<T>(b, F, t.G, tT);
    mm_nn<T>(b, b, F, dzb, tT, da, T(-1));
    tril_e_mul<T>(b, mb.coef, mb.lr, t.qk, A);
    mm_tn<T>(b, F, b, A, dzb, dg, T(-1), true);
    if (mb.first) {
      for (long i = 0; i < b; ++i)
        for (long j = 0; j < F; ++j) cz[i * F + j] = mb.coef[i] * dzb[i * F + j];
      mm_tn<T>(F, F, b, mb.Q, cz, dgW, T(-1), true);
      colsum<T>(b, F, cz, dgb, T(-1), true);
      if (acc_nz) {
        transpose<T>(b, F, cz, tT);
        mm_nt<T>(b, F, F, tT, gW, gr.dq, T(-1), true);
        mm_nn<T>(b, F, F, mb.Q, gW, tmp);
        add_rows(b, F, gb, tmp);
        for (long i = 0; i < b; ++i) gr.dcoef[i] -= vdot(tmp + i * F, dzb + i * F, F);
      }
    }
    // A = E * (Q K^T + 1), E[i, j] = coef_i lr_j (j <= i)
    for (long i = 0; i < b; ++i)
      for (long j = 0; j < b; ++j) {
        const T dij = j <= i ? da[i * b + j] : T(0);
        A[i * b + j] = dij * mb.coef[i] * mb.lr[j];              // d(Q K^T)
        const T de = dij * (t.qk[i * b + j] + T(1));             // dE
        gr.dcoef[i] += de * mb.lr[j];
        deb[i * b + j] = de * mb.coef[i];
      }
    for (long j = 0; j < b; ++j) {
      T acc = 0;
      for (long i = j; i < b; ++i) acc += deb[i * b + j];
      gr.dlr[j] += acc;
    }
    mm_nn<T>(b, F, b, A, mb.K, gr.dq, T(1), true);
    mm_tn<T>(b, F, b, A, mb.Q, gr.dk, T(1), true);
    // G = grad of the inner loss at Z = K W + bias
    if (d.has_ln) {
      ln_grad_backward<T>(b, F, dg, t.G, t.gy, t.xhat, t.rstd, mb.S, mb.lnw, dz, gr.ds, gr.dlnw, lns);
    } else {
      std::copy(dg, dg + bf, dz);
      std::copy(dg, dg + bf, gr.ds);
    }
    transpose<T>(b, F, dz, tT);
    mm_nt<T>(b, F, F, tT, W, gr.dk, T(1), true);
    std::copy(mb.Q, mb.Q + bf, qk_stack);
    std::copy(mb.K, mb.K + bf, qk_stack + bf);
    std::copy(dzb, dzb + bf, dd_stack);
    mm_tn<T>(F, F, 2 * b, qk_stack, dd_stack, dW, T(1), true);
    colsum<T>(b, F, dz, db, T(1), true);
  }
};

}  // namespace

template <typename T, typename Io>
void linear_forward(const Dims& d, const Io& io, const int64_t* nc, std::vector<const T*> init,
                    std::vector<T*> fin, std::vector<T*> ckpt, long group) {
  scan_forward_impl<T, Linear<T>, Io>(d, io, nc, init, fin, ckpt, group);
}

template <typename T, typename Io>
void linear_backward(const Dims& d, const Io& io, const int64_t* nc, std::vector<const T*> ckpt, long group,
                     std::vector<const T*> d_final, T* dcoef, T* dlnw, std::vector<T*> d_init) {
  scan_backward_impl<T, Linear<T>, Io>(d, io, nc, ckpt, group, d_final, dcoef, dlnw, d_init);
}

#define TTT_INSTANTIATE(T, IO)                                                                               \
  template void linear_forward<T, IO>(const Dims&, const IO&, const int64_t*, std::vector<const T*>,         \
                                     std::vector<T*>, std::vector<T*>, long);                               \
  template void linear_backward<T, IO>(const Dims&, const IO&, const int64_t*, std::vector<const T*>, long,   \
                                      std::vector<const T*>, T*, T*, std::vector<T*>);
TTT_FOR_EACH_IO(TTT_INSTANTIATE)
#undef TTT_INSTANTIATE

}  // namespace ttt_scan
