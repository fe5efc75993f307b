// y = x W^T with W packed once, through MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute).
//
// A GEMM copies blocks of both operands into its inner kernel's order on every call; for a weight used
// unchanged call after call, the copy of W can be made once. PyTorch's x86 builds link MKL and export
// its CBLAS symbols; they are referenced weakly here, so this library also loads where they are absent
// (other platforms, other BLAS): available() then says false and the Python side uses torch.matmul.
//
//   available()                       the packed routines are present in this process
//   pack(w [N, K] f32, rows) -> bytes  W packed for inputs of `rows` rows (MKL chooses its blocking by
//                                      the whole shape, so a packing serves one row count)
//   linear_out(x [rows, K], packed, out [rows, N])   out = x W^T
//
// The packed tensor starts with a 64-byte header of ours (magic, rows, N, K, its own address), checked by
// linear_out, so a packing cannot be used with a shape it was not made for; MKL's own data follows it.
// MKL's packed data is tied to the address it was packed at (a byte-for-byte copy elsewhere gives wrong
// products or crashes), so a copy of the tensor (clone, pickle, a move to other memory) is refused
// rather than used: pack the weight again. MKL's LP64 interface (32-bit integers) is the one PyTorch
// links: every dimension and leading dimension must fit.
//
// The packing is read whole on every call, often after other work has pushed it out of the caches and
// TLBs. On Linux the packing of a weight of kHugeMin bytes or more lives on its own 2 MiB-aligned
// allocation advised for transparent huge pages (one TLB entry per 2 MiB instead of 512, where the
// kernel grants them); the rest in ATen's memory. MKL writes its data in a few runs spread over the
// buffer it asks for: huge pages make the 2 MiB regions those runs touch resident (measured: 10 MiB for
// the 7 MiB weight of a 768-wide layer's fused input projections, 7 MiB with 4 KiB pages; 6 MiB for a
// 2.3 MiB 768 x 768 weight, which gained nothing measurable from them, hence the threshold).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__ELF__)
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
#define TTT_PACKED_GEMM_LINKABLE 1
#endif

namespace {

// CBLAS enumerators (fixed by the CBLAS / MKL ABI)
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
constexpr int64_t kHeader = 64;  // bytes; keeps MKL's part 64-byte aligned
constexpr int64_t kMagic = 0x7474745f67656d6dLL;

bool available() {
#ifdef TTT_PACKED_GEMM_LINKABLE
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
#else
  return false;
#endif
}

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

struct Header {
  int64_t magic, rows, n, k;
  uint64_t addr;  // where the tensor's data was when packed
};
static_assert(sizeof(Header) <= kHeader, "the header must fit before MKL's data");

constexpr int64_t kHugeMin = int64_t(4) << 20;  // weight bytes from which a packing gets huge pages

// `bytes` of uninitialised CPU memory as a uint8 tensor, on huge pages where `huge` and Linux
at::Tensor alloc_bytes(int64_t bytes, bool huge, const at::TensorOptions& opts) {
#if defined(__linux__)
  constexpr size_t kHuge = size_t(1) << 21;
  const size_t rounded = (size_t(bytes) + kHuge - 1) / kHuge * kHuge;
  void* p = nullptr;
  if (huge && posix_memalign(&p, kHuge, rounded) == 0) {
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without THP (or refused) the pages stay 4 KiB
    return at::from_blob(p, {bytes}, [](void* q) { std::free(q); }, opts);
  }
#else
  (void)huge;
#endif
  return at::empty({bytes}, opts);
}

Header header_of(const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous() &&
                  packed.numel() > kHeader,
              "ttt_gemm: not a packed weight (expected the uint8 tensor made by ttt_gemm.pack)");
  Header h;
  std::memcpy(&h, packed.data_ptr<uint8_t>(), sizeof(h));
  TORCH_CHECK(h.magic == kMagic, "ttt_gemm: not a packed weight (bad header)");
  TORCH_CHECK(h.addr == reinterpret_cast<uintptr_t>(packed.data_ptr()),
              "ttt_gemm: this packed weight was copied or moved from where it was packed (MKL's packing is "
              "tied to its address): pack the weight again");
  return h;
}

at::Tensor pack(const at::Tensor& w, int64_t rows) {
  TORCH_CHECK(available(), "ttt_gemm.pack: MKL's packed GEMM is not available in this PyTorch build");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.dim() == 2,
              "ttt_gemm.pack: expected a float32 CPU matrix [N, K], got ", w.scalar_type(), " ", w.sizes());
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(rows > 0 && n > 0 && k > 0 && fits_int(rows) && fits_int(n) && fits_int(k),
              "ttt_gemm.pack: sizes out of range (rows ", rows, ", N ", n, ", K ", k, ")");
  const at::Tensor wc = w.contiguous();
#ifdef TTT_PACKED_GEMM_LINKABLE
  // y [rows, N] = x [rows, K] B with B = W^T (W stored [N, K] row-major: op(B) = trans)
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(rows), int(n), int(k));
  at::Tensor out = alloc_bytes(kHeader + int64_t(bytes), n * k * int64_t(sizeof(float)) >= kHugeMin,
                               w.options().dtype(at::kByte));
  uint8_t* base = out.data_ptr<uint8_t>();
  const Header h{kMagic, rows, n, k, reinterpret_cast<uintptr_t>(base)};
  std::memset(base, 0, kHeader);
  std::memcpy(base, &h, sizeof(h));
  cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, int(rows), int(n), int(k), 1.0f, wc.data_ptr<float>(), int(k),
                   reinterpret_cast<float*>(base + kHeader));
  return out;
#else
  return at::Tensor();
#endif
}

at::Tensor& linear_out(const at::Tensor& x, const at::Tensor& packed, at::Tensor& out) {
  TORCH_CHECK(available(), "ttt_gemm.linear_out: MKL's packed GEMM is not available in this PyTorch build");
  const Header h = header_of(packed);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(0) == h.rows &&
                  x.size(1) == h.k,
              "ttt_gemm.linear_out: x must be float32 [", h.rows, ", ", h.k, "] (the packed shape), got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 2 &&
                  out.size(0) == h.rows && out.size(1) == h.n,
              "ttt_gemm.linear_out: out must be float32 [", h.rows, ", ", h.n, "], got ", out.scalar_type(), " ",
              out.sizes());
  TORCH_CHECK(x.stride(1) == 1 && x.stride(0) >= h.k && fits_int(x.stride(0)),
              "ttt_gemm.linear_out: x needs unit-stride rows, got strides ", x.strides());
  TORCH_CHECK(out.stride(1) == 1 && out.stride(0) >= h.n && fits_int(out.stride(0)),
              "ttt_gemm.linear_out: out needs unit-stride rows, got strides ", out.strides());
#ifdef TTT_PACKED_GEMM_LINKABLE
  const float* b = reinterpret_cast<const float*>(packed.data_ptr<uint8_t>() + kHeader);
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(h.rows), int(h.n), int(h.k), x.data_ptr<float>(),
                      int(x.stride(0)), b, int(h.k), 0.0f, out.data_ptr<float>(), int(out.stride(0)));
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY(ttt_gemm, m) {
  m.def("available() -> bool", &available);  // no tensor arguments: one kernel for every backend
  m.def("pack(Tensor w, int rows) -> Tensor");
  m.def("linear_out(Tensor x, Tensor packed, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(ttt_gemm, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear_out", &linear_out);
}
