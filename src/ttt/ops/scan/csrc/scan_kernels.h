// Small dense kernels for the compiled TTT scan: register-blocked matmul on raw pointers, LayerNorm
// helpers, a vectorisable tanh-GELU. Everything works on one row (one batch*head) at a time; the
// caller parallelises over rows. Written with GCC/Clang vector extensions (64-byte vectors, split by the
// compiler into whatever the target has), so no intrinsics and no OpenMP.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace ttt_scan {

template <typename T> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t itype __attribute__((vector_size(64)));
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t itype __attribute__((vector_size(64)));
};
template <typename T> using vec_t = typename VecOf<T>::type;
template <typename T> using ivec_t = typename VecOf<T>::itype;
template <typename T> constexpr int VW = 64 / sizeof(T);

template <typename T> inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> inline void vstore(T* p, vec_t<T> v) { std::memcpy(p, &v, sizeof(v)); }
// every lane = a (written lane by lane: `vec_t<T>{} + a` would turn -0.0 into +0.0)
template <typename T> inline vec_t<T> vsplat(T a) {
  vec_t<T> v;
  for (int i = 0; i < VW<T>; ++i) v[i] = a;
  return v;
}
// horizontal sum: fold the 64-byte vector in halves (vector adds), then add the last 16 bytes' lanes in
// order; with register shuffles where the compiler has them (no trip through memory)
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define TTT_HAVE_SHUFFLEVECTOR 1
#endif
#endif
template <typename T> inline T hsum(vec_t<T> v) {
#ifdef TTT_HAVE_SHUFFLEVECTOR
  if constexpr (sizeof(T) == 4) {
    const auto h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const auto q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return ((q[0] + q[1]) + q[2]) + q[3];
  } else {
    const auto h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    const auto q = __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
    return q[0] + q[1];
  }
#else
  typedef T H __attribute__((vector_size(32)));
  typedef T Q __attribute__((vector_size(16)));
  H lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  const H h = lo + hi;
  Q ql, qh;
  std::memcpy(&ql, &h, 16);
  std::memcpy(&qh, reinterpret_cast<const char*>(&h) + 16, 16);
  const Q q = ql + qh;
  T s = q[0];
  for (int i = 1; i < int(16 / sizeof(T)); ++i) s += q[i];
  return s;
#endif
}

// Horizontal sums of W vectors at once: lane i of the result = the sum of v[i]'s lanes (v is overwritten).
// Per-row statistics (LayerNorm over a token's features) computed one row at a time each end in a
// horizontal sum, a chain of shuffles and scalar adds whose latency the core cannot hide when every row
// waits on its own; folding W rows' partial-sum vectors together (log2 W butterfly stages, pairs of
// two-source permutes) gives all W sums in one vector for about the cost of two chains.
#if defined(__GNUC__) && !defined(__clang__)
template <typename T, int H> inline void fold_lanes(vec_t<T>* r) {
  typedef ivec_t<T> IV;
  constexpr int W = VW<T>;
  IV lo, hi;  // within each 2H-lane block: first half from r[q]'s halves, second from r[q + H]'s
  for (int j = 0; j < W; ++j) {
    const int blk = j / H, base = (blk % 2 ? W : 0) + (blk / 2) * 2 * H + j % H;
    lo[j] = base;
    hi[j] = base + H;
  }
  for (int q = 0; q < H; ++q)
    r[q] = __builtin_shuffle(r[q], r[q + H], lo) + __builtin_shuffle(r[q], r[q + H], hi);
  if constexpr (H > 1) fold_lanes<T, H / 2>(r);
}
template <typename T> inline vec_t<T> sum_lanes(vec_t<T>* v) {
  fold_lanes<T, VW<T> / 2>(v);
  return v[0];
}
#else
template <typename T> inline vec_t<T> sum_lanes(vec_t<T>* v) {
  vec_t<T> s;
  for (int i = 0; i < VW<T>; ++i) s[i] = hsum<T>(v[i]);
  return s;
}
#endif

// lane i = the sum of row i of z (k <= W rows of F elements, F a multiple of W); lanes from k on are 0
template <typename T> inline vec_t<T> row_sums(long k, long F, const T* z) {
  constexpr int W = VW<T>;
  vec_t<T> acc[W];
  for (long i = 0; i < W; ++i) {
    vec_t<T> a = {};
    if (i < k)
      for (long j = 0; j < F; j += W) a += vload(z + i * F + j);
    acc[i] = a;
  }
  return sum_lanes<T>(acc);
}

// lane i = sum_j (z[i, j] - mu[i])^2 over the same rows; the centred values go to xc where given
template <typename T> inline vec_t<T> row_sq_devs(long k, long F, const T* z, const T* mu, T* xc) {
  constexpr int W = VW<T>;
  vec_t<T> acc[W];
  for (long i = 0; i < W; ++i) {
    vec_t<T> a = {};
    if (i < k)
      for (long j = 0; j < F; j += W) {
        const vec_t<T> x = vload(z + i * F + j) - mu[i];
        if (xc) vstore(xc + i * F + j, x);
        a += x * x;
      }
    acc[i] = a;
  }
  return sum_lanes<T>(acc);
}

// ------------------------------------------------------------------------------------------------
// matmul: C (M x N) = beta * D + alpha * A (M x K) B (K x N), D = C unless given (same layout as C)
//   A(i, k) = A[i * ars + k * acs] (any strides: transposed operands are free)
//   B(k, j) = B[k * ldb + j]       (rows contiguous)
//   C(i, j) = C[i * crs + j * ccs] (ccs != 1 writes a transposed result)
// ------------------------------------------------------------------------------------------------

#if defined(__GNUC__) && !defined(__clang__)
// In-register transpose of a W x W tile (W vectors), one butterfly stage per call: rows r and r + H
// exchange H-wide blocks (log2 W stages, 2 two-source permutes per row pair each). A transposed
// store (mm_nt) then writes whole vectors instead of W scalars per vector, whose lane extracts
// compete with the FMAs for the same port.
template <typename T, int H> inline void transpose_tile(vec_t<T>* r) {
  typedef ivec_t<T> IV;
  constexpr int W = VW<T>;
  IV lo, hi;
  for (int j = 0; j < W; ++j) {
    const int blk = j / H, base = (blk % 2 ? W : 0) + (blk / 2) * 2 * H + j % H;
    lo[j] = base;
    hi[j] = base + H;
  }
  for (int r0 = 0; r0 < W; r0 += 2 * H)
    for (int q = r0; q < r0 + H; ++q) {
      const vec_t<T> a = r[q], b = r[q + H];
      r[q] = __builtin_shuffle(a, b, lo);
      r[q + H] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (H > 1) transpose_tile<T, H / 2>(r);
}
#endif

// One MR x (NV * W) tile of C, accumulated in registers over the whole K. TR: transposed store (ccs != 1),
// a separate instance so the plain one keeps its accumulators in registers (one generic body spilled all
// of them to the stack and back, for K = 16 products a third of the call); always inlined (no call or
// PLT hop per tile: these products are small).
template <typename T, int MR, int NV, bool TR>
__attribute__((always_inline)) inline void mm_block(long K, const T* __restrict A, long ars, long acs,
                                                    const T* __restrict B, long ldb, T* C, long crs, long ccs,
                                                    T alpha, bool beta, const T* D) {
  typedef vec_t<T> V;
  constexpr int W = VW<T>;
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  for (long k = 0; k < K; ++k) {
    const T* b = B + k * ldb;
    // software prefetch of B a few rows ahead: B's rows are ldb apart (a weight matrix walked panel by
    // panel), which the hardware prefetcher follows late; ~5-7% of the TTT-MLP scan (1 thread)
    if (K > 8) {
      __builtin_prefetch(b + 6 * ldb);
      if (NV > 1) __builtin_prefetch(b + 6 * ldb + W);
    }
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + v * W);
    const T* a = A + k * acs;
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * ars];
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bv[v];
    }
  }
#if defined(__GNUC__) && !defined(__clang__)
  if constexpr (TR && MR == W) {
    if (crs == 1) {  // transposed store of a square tile: transpose in registers, store whole rows of C
      for (int v = 0; v < NV; ++v) {
        V t[W];
        for (int i = 0; i < W; ++i) t[i] = alpha * acc[i][v];
        transpose_tile<T, W / 2>(t);
        for (int l = 0; l < W; ++l) {
          const long o = (v * W + l) * ccs;
          vstore(C + o, beta ? t[l] + vload(D + o) : t[l]);
        }
      }
      return;
    }
  }
#endif
  for (int i = 0; i < MR; ++i) {
    T* c = C + i * crs;
    const T* dd = D + i * crs;
    for (int v = 0; v < NV; ++v) {
      V r = alpha * acc[i][v];
      if constexpr (!TR) {
        if (beta) r += vload(dd + v * W);
        vstore(c + v * W, r);
      } else {  // scatter through a small buffer
        T tmp[W];
        vstore(tmp, r);
        T* cv = c + v * W * ccs;
        const T* dv = dd + v * W * ccs;
        for (int j = 0; j < W; ++j) cv[j * ccs] = beta ? dv[j * ccs] + tmp[j] : tmp[j];
      }
    }
  }
}

// the last n < W columns (scalar accumulators, the compiler vectorises what it can)
template <typename T>
inline void mm_tail(long M, long n, long K, const T* A, long ars, long acs, const T* B, long ldb, T* C,
                    long crs, long ccs, T alpha, bool beta, const T* D) {
  constexpr int W = VW<T>;
  for (long i = 0; i < M; ++i) {
    T acc[W] = {};
    for (long k = 0; k < K; ++k) {
      const T ai = A[i * ars + k * acs];
      const T* b = B + k * ldb;
      for (long j = 0; j < n; ++j) acc[j] += ai * b[j];
    }
    for (long j = 0; j < n; ++j) {
      T* c = C + i * crs + j * ccs;
      const T* dd = D + i * crs + j * ccs;
      *c = beta ? *dd + alpha * acc[j] : alpha * acc[j];
    }
  }
}

template <typename T, int MR, int NV, bool TR>
inline void mm_panel(long M, long K, const T* A, long ars, long acs, const T* B, long ldb, T* C, long crs,
                     long ccs, T alpha, bool beta, const T* D) {
  long i = 0;
  for (; i + MR <= M; i += MR)
    mm_block<T, MR, NV, TR>(K, A + i * ars, ars, acs, B, ldb, C + i * crs, crs, ccs, alpha, beta, D + i * crs);
  if constexpr (MR > 1) {
    if (i < M)
      mm_panel<T, MR / 2, NV, TR>(M - i, K, A + i * ars, ars, acs, B, ldb, C + i * crs, crs, ccs, alpha, beta,
                                  D + i * crs);
  }
}

template <typename T, bool TR>
void mm_impl(long M, long N, long K, const T* A, long ars, long acs, const T* B, long ldb, T* C, long crs,
             long ccs, T alpha, bool beta, const T* D) {
  constexpr int W = VW<T>;
  long j = 0;
  for (; j + 2 * W <= N; j += 2 * W)
    mm_panel<T, 8, 2, TR>(M, K, A, ars, acs, B + j, ldb, C + j * ccs, crs, ccs, alpha, beta, D + j * ccs);
  for (; j + W <= N; j += W)
    mm_panel<T, 16, 1, TR>(M, K, A, ars, acs, B + j, ldb, C + j * ccs, crs, ccs, alpha, beta, D + j * ccs);
  if (j < N) mm_tail<T>(M, N - j, K, A, ars, acs, B + j, ldb, C + j * ccs, crs, ccs, alpha, beta, D + j * ccs);
}

template <typename T>
inline void mm(long M, long N, long K, const T* A, long ars, long acs, const T* B, long ldb, T* C, long crs,
               long ccs, T alpha = T(1), bool beta = false, const T* D = nullptr) {
  if (!D) D = C;
  if (ccs == 1)
    mm_impl<T, false>(M, N, K, A, ars, acs, B, ldb, C, crs, ccs, alpha, beta, D);
  else
    mm_impl<T, true>(M, N, K, A, ars, acs, B, ldb, C, crs, ccs, alpha, beta, D);
}

// C (M x N, row-major) (+)= alpha * A (M x K, row-major) B (K x N, row-major)
template <typename T>
inline void mm_nn(long M, long N, long K, const T* A, const T* B, T* C, T alpha = T(1), bool beta = false) {
  mm<T>(M, N, K, A, K, 1, B, N, C, N, 1, alpha, beta);
}
// C (M x N) (+)= alpha * A^T B with A stored (K x M) row-major; with D given: C = D + alpha * A^T B
template <typename T>
inline void mm_tn(long M, long N, long K, const T* A, const T* B, T* C, T alpha = T(1), bool beta = false,
                  const T* D = nullptr) {
  mm<T>(M, N, K, A, 1, M, B, N, C, N, 1, alpha, beta, D);
}
// C (M x N) (+)= alpha * A B^T with A (M x K) small and B (N x K) large: computed as C^T = B A^T with
// At = A^T (K x M, row-major, prepared by the caller) and a transposed store.
template <typename T>
inline void mm_nt(long M, long N, long K, const T* At, const T* B, T* C, T alpha = T(1), bool beta = false) {
  mm<T>(N, M, K, B, K, 1, At, M, C, 1, N, alpha, beta);
}

template <typename T> inline void transpose(long rows, long cols, const T* src, T* dst) {
  constexpr int W = VW<T>;
#if defined(__GNUC__) && !defined(__clang__)
  if (rows % W == 0 && cols % W == 0) {  // whole W x W tiles, transposed in registers
    for (long i0 = 0; i0 < rows; i0 += W)
      for (long j0 = 0; j0 < cols; j0 += W) {
        vec_t<T> t[W];
        for (int i = 0; i < W; ++i) t[i] = vload(src + (i0 + i) * cols + j0);
        transpose_tile<T, W / 2>(t);
        for (int j = 0; j < W; ++j) vstore(dst + (j0 + j) * rows + i0, t[j]);
      }
    return;
  }
#endif
  for (long i = 0; i < rows; ++i)
    for (long j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

// ------------------------------------------------------------------------------------------------
// reductions and row helpers
// ------------------------------------------------------------------------------------------------

template <typename T> inline T vsum(const T* x, long n) {
  constexpr int W = VW<T>;
  vec_t<T> a = {}, b = {};
  long i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a += vload(x + i);
    b += vload(x + i + W);
  }
  for (; i + W <= n; i += W) a += vload(x + i);
  T s = hsum<T>(a + b);
  for (; i < n; ++i) s += x[i];
  return s;
}

template <typename T> inline T vdot(const T* x, const T* y, long n) {
  constexpr int W = VW<T>;
  vec_t<T> a = {}, b = {};
  long i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    a += vload(x + i) * vload(y + i);
    b += vload(x + i + W) * vload(y + i + W);
  }
  for (; i + W <= n; i += W) a += vload(x + i) * vload(y + i);
  T s = hsum<T>(a + b);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

template <typename T> inline void copy_to(const T* src, T* dst, long n) {
  if (src != dst) std::copy(src, src + n, dst);
}

// out[j] (+)= sum_i x[i, j] over rows of a (rows x cols) matrix
// (explicit vectors: written as a plain double loop, the compiler cannot rule out out aliasing x)
template <typename T> inline void colsum(long rows, long cols, const T* x, T* out, T alpha, bool beta) {
  constexpr int W = VW<T>;
  if (!beta) std::fill(out, out + cols, T(0));
  long j = 0;
  for (; j + W <= cols; j += W) {
    vec_t<T> a = vload(out + j);
    for (long i = 0; i < rows; ++i) a += alpha * vload(x + i * cols + j);
    vstore(out + j, a);
  }
  for (; j < cols; ++j) {
    T a = out[j];
    for (long i = 0; i < rows; ++i) a += alpha * x[i * cols + j];
    out[j] = a;
  }
}

// ------------------------------------------------------------------------------------------------
// tanh-GELU with a vectorised tanh (exp by range reduction and a Taylor polynomial)
// ------------------------------------------------------------------------------------------------

constexpr double GELU_C = 0.79788456080286535587989211986876;  // sqrt(2 / pi)
constexpr double GELU_A = 0.044715;

// exp(x) for x in [-80, 0] (clamped below), vectorised
template <typename T> inline vec_t<T> vexp_neg(vec_t<T> x) {
  typedef vec_t<T> V;
  typedef ivec_t<T> IV;
  constexpr bool F32 = std::is_same<T, float>::value;
  const V lo = vsplat<T>(T(-80));
  IV m = x < lo;
  x = (V)((m & (IV)lo) | (~m & (IV)x));
  const T magic = F32 ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^23 / 1.5 * 2^52
  V t = x * T(1.4426950408889634074) + magic;
  V n = t - magic;
  IV ni = (IV)t - (IV)vsplat<T>(magic);
  V f = x - n * T(0.693145751953125) - n * T(1.42860682030941723212e-6);
  constexpr int DEG = F32 ? 7 : 13;
  V p = vsplat<T>(T(1));
  // Horner on sum_{k<=DEG} f^k / k!
  for (int k = DEG; k >= 1; --k) p = p * f * (T(1) / T(k)) + T(1);
  IV sb = (ni + (F32 ? 127 : 1023)) << (F32 ? 23 : 52);
  return p * (V)sb;
}

// every lane: the sign bit only
template <typename T> inline ivec_t<T> sign_bits() {
  typedef typename std::conditional<sizeof(T) == 4, int32_t, int64_t>::type I;
  ivec_t<T> sign;
  for (int i = 0; i < VW<T>; ++i) sign[i] = std::numeric_limits<I>::min();
  return sign;
}

// tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2 |u|) in (0, 1]: no overflow for any u
template <typename T> inline vec_t<T> vtanh(vec_t<T> u) {
  typedef vec_t<T> V;
  typedef ivec_t<T> IV;
  const IV sign = sign_bits<T>();
  V a = (V)((IV)u & ~sign);
  V e = vexp_neg<T>(a * T(-2));
  V t = (T(1) - e) / (T(1) + e);
  return (V)((IV)t | ((IV)u & sign));
}

// For z[0..n): x = gelu(z); d1 = gelu'(z) and d2 = gelu''(z) where the pointers are non-null.
template <typename T> void gelu(long n, const T* z, T* x, T* d1, T* d2) {
  typedef vec_t<T> V;
  constexpr int W = VW<T>;
  const T c = T(GELU_C), a3 = T(GELU_A), a33 = T(3 * GELU_A);
  long i = 0;
  for (; i + W <= n; i += W) {
    V v = vload(z + i);
    V v2 = v * v;
    V t = vtanh<T>(c * (v + a3 * v * v2));
    if (x) vstore(x + i, T(0.5) * v * (T(1) + t));
    if (d1 || d2) {
      V du = c * (T(1) + a33 * v2);
      V s = T(1) - t * t;
      if (d1) vstore(d1 + i, T(0.5) * (T(1) + t) + T(0.5) * v * s * du);
      if (d2) vstore(d2 + i, s * (du + a33 * c * v2 - v * t * du * du));
    }
  }
  for (; i < n; ++i) {
    T v = z[i], v2 = v * v;
    T t = std::tanh(c * (v + a3 * v * v2));
    if (x) x[i] = T(0.5) * v * (T(1) + t);
    T du = c * (T(1) + a33 * v2), s = T(1) - t * t;
    if (d1) d1[i] = T(0.5) * (T(1) + t) + T(0.5) * v * s * du;
    if (d2) d2[i] = s * (du + a33 * c * v2 - v * t * du * du);
  }
}

// ------------------------------------------------------------------------------------------------
// the inner LayerNorm: G = d/dZ 0.5 ||ln_w * xhat + s||^2 (s = ln_b - target), fused per token
// ------------------------------------------------------------------------------------------------

constexpr double LN_EPS = 1e-6;

// z [b x F] -> xhat [b x F], rstd [b], gy [b x F] (= ln_w * (ln_w * xhat + s)), G [b x F]; no aliasing
template <typename T>
void ln_grad(long b, long F, const T* __restrict z, const T* __restrict s, const T* __restrict lnw,
             T* __restrict xhat, T* __restrict rstd, T* __restrict gy, T* __restrict G) {
  const T invf = T(1) / T(F);
  constexpr int W = VW<T>;
  typedef vec_t<T> V;
  if (F % W == 0) {  // whole vectors, W rows at a time (their sums folded together: sum_lanes)
    alignas(64) T mu[W], r[W], m1[W], m2[W];
    V acc[W], acc2[W];
    for (long i0 = 0; i0 < b; i0 += W) {
      const long n = std::min<long>(W, b - i0);
      vstore(mu, row_sums<T>(n, F, z + i0 * F) * invf);
      const V var = row_sq_devs<T>(n, F, z + i0 * F, mu, xhat + i0 * F) * invf;
      for (int l = 0; l < W; ++l) r[l] = T(1) / std::sqrt(var[l] + T(LN_EPS));
      for (long i = 0; i < W; ++i) {
        V a = {}, c = {};
        if (i < n)
          for (long j = 0; j < F; j += W) {
            const long o = (i0 + i) * F + j;
            const V x = vload(xhat + o) * r[i];
            const V w = vload(lnw + j);
            const V y = w * (w * x + vload(s + o));
            vstore(xhat + o, x);
            vstore(gy + o, y);
            a += y;
            c += y * x;
          }
        acc[i] = a;
        acc2[i] = c;
      }
      vstore(m1, sum_lanes<T>(acc) * invf);
      vstore(m2, sum_lanes<T>(acc2) * invf);
      for (long i = 0; i < n; ++i) {
        rstd[i0 + i] = r[i];
        for (long j = 0; j < F; j += W) {
          const long o = (i0 + i) * F + j;
          vstore(G + o, r[i] * (vload(gy + o) - m1[i] - vload(xhat + o) * m2[i]));
        }
      }
    }
    return;
  }
  for (long i = 0; i < b; ++i) {
    const T* zi = z + i * F;
    const T* si = s + i * F;
    T* xi = xhat + i * F;
    T* yi = gy + i * F;
    T* gi = G + i * F;
    const T mu = vsum(zi, F) * invf;
    for (long j = 0; j < F; ++j) xi[j] = zi[j] - mu;
    const T r = T(1) / std::sqrt(vdot(xi, xi, F) * invf + T(LN_EPS));
    rstd[i] = r;
    for (long j = 0; j < F; ++j) {
      xi[j] *= r;
      yi[j] = lnw[j] * (lnw[j] * xi[j] + si[j]);
    }
    const T m1 = vsum(yi, F) * invf, m2 = vdot(yi, xi, F) * invf;
    for (long j = 0; j < F; ++j) gi[j] = r * (yi[j] - m1 - xi[j] * m2);
  }
}

// Backward of ln_grad: dG -> dZ (written to dz), dS (written to ds), d ln_w accumulated into dlnw.
// scratch: 2 * F elements.
template <typename T>
void ln_grad_backward(long b, long F, const T* __restrict dg, const T* __restrict G, const T* __restrict gy,
                      const T* __restrict xhat, const T* __restrict rstd, const T* __restrict s,
                      const T* __restrict lnw, T* __restrict dz, T* __restrict ds, T* __restrict dlnw,
                      T* __restrict scratch) {
  const T invf = T(1) / T(F);
  T* dgy = scratch;
  T* dxh = scratch + F;
  constexpr int W = VW<T>;
  typedef vec_t<T> V;
  if (F % W == 0) {  // whole vectors
    for (long i = 0; i < b; ++i) {
      const T* dgi = dg + i * F;
      const T* gi = G + i * F;
      const T* yi = gy + i * F;
      const T* xi = xhat + i * F;
      const T* si = s + i * F;
      const T r = rstd[i];
      V a = {}, a_x = {}, y_x = {}, a_g = {};
      for (long j = 0; j < F; j += W) {
        const V d = vload(dgi + j), x = vload(xi + j);
        a += d;
        a_x += d * x;
        y_x += vload(yi + j) * x;
        a_g += d * vload(gi + j);
      }
      const T mdg = hsum<T>(a) * invf, mdgx = hsum<T>(a_x) * invf, s2 = hsum<T>(y_x) * invf;
      const T drstd = hsum<T>(a_g) / r;
      V e = {}, f = {};
      for (long j = 0; j < F; j += W) {
        const V d = vload(dgi + j), x = vload(xi + j), w = vload(lnw + j);
        const V u = r * (d - mdg - x * mdgx);
        const V h = -r * (d * s2 + vload(yi + j) * mdgx) + w * w * u;
        vstore(dgy + j, u);
        vstore(dxh + j, h);
        e += h;
        f += h * x;
      }
      const T m1 = hsum<T>(e) * invf, m2 = hsum<T>(f) * invf;
      const T k = r * r * drstd * invf;
      for (long j = 0; j < F; j += W) {
        const V x = vload(xi + j), w = vload(lnw + j), u = vload(dgy + j);
        vstore(dz + i * F + j, r * (vload(dxh + j) - m1 - x * m2) - k * x);
        vstore(ds + i * F + j, w * u);
        vstore(dlnw + j, vload(dlnw + j) + u * (T(2) * w * x + vload(si + j)));
      }
    }
    return;
  }
  for (long i = 0; i < b; ++i) {
    const T* dgi = dg + i * F;
    const T* gi = G + i * F;
    const T* yi = gy + i * F;
    const T* xi = xhat + i * F;
    const T* si = s + i * F;
    const T r = rstd[i];
    const T mdg = vsum(dgi, F) * invf, mdgx = vdot(dgi, xi, F) * invf;
    const T s2 = vdot(yi, xi, F) * invf;
    const T drstd = vdot(dgi, gi, F) / r;
    for (long j = 0; j < F; ++j) {
      dgy[j] = r * (dgi[j] - mdg - xi[j] * mdgx);
      dxh[j] = -r * (dgi[j] * s2 + yi[j] * mdgx) + lnw[j] * lnw[j] * dgy[j];
    }
    const T m1 = vsum(dxh, F) * invf, m2 = vdot(dxh, xi, F) * invf;
    const T k = r * r * drstd * invf;
    T* dzi = dz + i * F;
    T* dsi = ds + i * F;
    for (long j = 0; j < F; ++j) {
      dzi[j] = r * (dxh[j] - m1 - xi[j] * m2) - k * xi[j];
      dsi[j] = lnw[j] * dgy[j];
      dlnw[j] += dgy[j] * (T(2) * lnw[j] * xi[j] + si[j]);
    }
  }
}

// mean and 1 / sqrt(var + eps) of one row z[0..F)
template <typename T> inline void ln_stats(long F, const T* z, T& mu, T& rstd) {
  constexpr int W = VW<T>;
  mu = vsum(z, F) / T(F);
  vec_t<T> a = {};
  long j = 0;
  for (; j + W <= F; j += W) {
    const vec_t<T> x = vload(z + j) - mu;
    a += x * x;
  }
  T var = hsum<T>(a);
  for (; j < F; ++j) var += (z[j] - mu) * (z[j] - mu);
  rstd = T(1) / std::sqrt(var / T(F) + T(LN_EPS));
}

// ln_stats of n rows z[i * F .. (i + 1) * F) at once (F a multiple of W: W rows' sums folded together);
// other widths row by row
template <typename T> inline void ln_stats_rows(long n, long F, const T* z, T* mu, T* rstd) {
  constexpr int W = VW<T>;
  typedef vec_t<T> V;
  if (F % W != 0) {
    for (long i = 0; i < n; ++i) ln_stats(F, z + i * F, mu[i], rstd[i]);
    return;
  }
  const T invf = T(1) / T(F);
  alignas(64) T m[W];
  for (long i0 = 0; i0 < n; i0 += W) {
    const long k = std::min<long>(W, n - i0);
    vstore(m, row_sums<T>(k, F, z + i0 * F) * invf);
    const V var = row_sq_devs<T>(k, F, z + i0 * F, m, static_cast<T*>(nullptr)) * invf;
    for (long i = 0; i < k; ++i) {
      mu[i0 + i] = m[i];
      rstd[i0 + i] = T(1) / std::sqrt(var[i] + T(LN_EPS));
    }
  }
}

// E[i, j] = coef_i * lr_j for j <= i, else 0; out[i, j] = E[i, j] * (x[i, j] + 1) (x may equal out)
template <typename T> inline void tril_e_mul(long b, const T* coef, const T* lr, const T* x, T* out) {
  for (long i = 0; i < b; ++i)
    for (long j = 0; j < b; ++j) out[i * b + j] = j <= i ? coef[i] * lr[j] * (x[i * b + j] + T(1)) : T(0);
}

}  // namespace ttt_scan
