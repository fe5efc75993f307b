// A/B timing of two builds of the compiled scan's fused forward in one process (see README.md).
//
//   scan_ab lin|mlp [threads] [rounds]       HUGE=1: inputs and outputs on 2 MiB pages (as the layer's
//                                            inference scratch), HUGE=0 (default): plain allocations
//
// The 2k-token layer shape: 12 heads of 64, mini-batch 16, batch 1, the projections interleaved as the
// layer's fused GEMM writes them. Calls alternate A, B (B, A in odd rounds); prints each build's median
// time, the median of the per-round ratios B / A and the largest difference between their outputs.
#include <ATen/Parallel.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define DECLARE(NS, FN)                                                                                        \
  namespace NS {                                                                                               \
  void FN(bool, const float*, long, long, long, long, const float*, const float*, const float*, const float*, \
          const float*, const float*, float*, const int64_t*, std::vector<const float*>, std::vector<float*>);  \
  }
DECLARE(scan_a, forward_a)
DECLARE(scan_b, forward_b)

namespace {

float* buffer(size_t n, bool huge) {
  const size_t align = size_t(2) << 20, bytes = (n * sizeof(float) + align - 1) / align * align;
  float* p = static_cast<float*>(std::aligned_alloc(align, bytes));
  if (!p) std::abort();
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);
  std::fill(p, p + bytes / sizeof(float), 0.f);
  return p;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const bool mlp = argc > 1 && argv[1][0] == 'm';
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 30;
  const bool huge = std::getenv("HUGE") && std::atoi(std::getenv("HUGE")) != 0;
  at::set_num_threads(threads);
  const long L = 2048, NH = 12, F = 64, b = 16, H = mlp ? 4 * F : F, N = L / b, row = 3 * NH * F + NH;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  float* proj = buffer(L * row, huge);
  float* out_a = buffer(L * NH * F, huge);
  float* out_b = buffer(L * NH * F, huge);
  for (long i = 0; i < L * row; ++i) proj[i] = normal(gen);
  std::vector<float> lr(NH * L), coef(b), lnw(NH * F), lnb(NH * F), cf(b * F), sf(b * F);
  for (auto& x : lr) x = 0.01f * std::abs(normal(gen));
  for (long i = 0; i < b; ++i) coef[i] = 1.f / (i + 1);
  for (auto& x : lnw) x = 1.f + 0.1f * normal(gen);
  for (auto& x : lnb) x = 0.1f * normal(gen);
  for (long i = 0; i < b; ++i)  // the rotary table of positions 0..b-1, as ttt/ops/scan/fused.py builds it
    for (long j = 0; j < F; j += 2) {
      const float th = i * std::pow(10000.f, -float(j) / F);
      cf[i * F + j] = cf[i * F + j + 1] = std::cos(th);
      sf[i * F + j] = -std::sin(th);
      sf[i * F + j + 1] = std::sin(th);
    }
  std::vector<int64_t> n_complete(NH, N);
  const std::vector<long> sizes = mlp ? std::vector<long>{F * H, H, H * F, F} : std::vector<long>{F * F, F};
  std::vector<std::vector<float>> init, fin;
  for (int half = 0; half < 2; ++half)  // weights, then their (zero) accumulators
    for (long s : sizes) {
      std::vector<float> v(NH * s, 0.f);
      if (!half)
        for (auto& x : v) x = 0.02f * normal(gen);
      init.push_back(v);
      fin.emplace_back(NH * s);
    }
  std::vector<const float*> init_p;
  std::vector<float*> fin_p;
  for (auto& v : init) init_p.push_back(v.data());
  for (auto& v : fin) fin_p.push_back(v.data());
  auto run = [&](bool a) {
    (a ? scan_a::forward_a : scan_b::forward_b)(mlp, proj, L, NH, F, b, lr.data(), coef.data(), lnw.data(),
                                                lnb.data(), cf.data(), sf.data(), a ? out_a : out_b,
                                                n_complete.data(), init_p, fin_p);
  };
  for (int i = 0; i < 3; ++i) {
    run(true);
    run(false);
  }
  double diff = 0, scale = 0;
  for (long i = 0; i < L * NH * F; ++i) {
    diff = std::max(diff, double(std::abs(out_a[i] - out_b[i])));
    scale = std::max(scale, double(std::abs(out_a[i])));
  }
  std::vector<double> ta, tb, ratio;
  for (int r = 0; r < rounds; ++r) {
    double t[2];
    for (int k = 0; k < 2; ++k) {
      const bool a = (k == 0) == (r % 2 == 0);
      const auto t0 = std::chrono::steady_clock::now();
      run(a);
      t[a ? 0 : 1] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    }
    ta.push_back(t[0]);
    tb.push_back(t[1]);
    ratio.push_back(t[1] / t[0]);
  }
  std::printf("%s, %d thread(s), %s pages, %d rounds: A %.3f ms, B %.3f ms, B/A median %.3f "
              "(max |out A - out B| %.2g, max |out A| %.2g)\n",
              mlp ? "TTT-MLP" : "TTT-Linear", threads, huge ? "2 MiB" : "4 KiB", rounds, median(ta), median(tb),
              median(ratio), diff, scale);
  return 0;
}
