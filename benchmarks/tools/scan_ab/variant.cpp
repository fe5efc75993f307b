// One build of the compiled scan's fused forward (HeadsIo layout), compiled twice by build.sh: once with
// -Dttt_scan=scan_a -DVARIANT_FN=forward_a against one source folder, once with scan_b / forward_b against
// another, so both builds live in one process under different namespaces.
#include "scan_linear.cpp"
#include "scan_mlp.cpp"

namespace ttt_scan {

void VARIANT_FN(bool mlp, const float* proj, long L, long NH, long F, long b, const float* lr, const float* coef,
                const float* lnw, const float* lnb, const float* cf, const float* sf, float* out,
                const int64_t* n_complete, std::vector<const float*> init, std::vector<float*> fin) {
  const long row = 3 * NH * F + NH;  // q, k, v and the learning-rate gate of a token, as the layer's GEMM
  HeadsIo<float> io{L, NH, {proj, L * row, row, F}, {proj + NH * F, L * row, row, F},
                    {proj + 2 * NH * F, L * row, row, F}, lr, coef, lnw, lnb, cf, sf,
                    {out, L * NH * F, NH * F, F}, nullptr};
  Dims d{NH, (L + b - 1) / b, b, F, mlp ? 4 * F : F, true};
  if (mlp)
    mlp_forward<float, HeadsIo<float>>(d, io, n_complete, init, fin, {}, 1);
  else
    linear_forward<float, HeadsIo<float>>(d, io, n_complete, init, fin, {}, 1);
}

}  // namespace ttt_scan
