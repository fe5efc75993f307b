// torch.ops.ttt_scan.{forward, backward}: argument checks, output allocation, dtype dispatch.
// Layout and semantics: ttt/ops/scan/__init__.py (the same contract as the PyTorch backend).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "scan_api.h"
#include "scan_driver.h"

namespace ttt_scan {
namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "ttt_scan: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "ttt_scan: ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "ttt_scan: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "ttt_scan: ", name, " must be contiguous");
}

// validates the common inputs and the state shapes; returns the dimensions
Dims check_inputs(const at::Tensor& k, const at::Tensor& q, const at::Tensor& s, const at::Tensor& lr,
                  const at::Tensor& coef, const std::optional<at::Tensor>& ln_w, const at::Tensor& n_complete,
                  const std::vector<at::Tensor>& state, int64_t group, long lead) {
  TORCH_CHECK(k.dim() == 4, "ttt_scan: k must be [R, N, b, F], got ", k.sizes());
  TORCH_CHECK(state.size() == 4 || state.size() == 8, "ttt_scan: the state must hold 4 or 8 tensors, got ",
              state.size());
  TORCH_CHECK(group >= 1, "ttt_scan: group must be >= 1, got ", group);
  const auto dt = k.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "ttt_scan: dtype must be float32 or float64, got ", dt);
  const int64_t R = k.size(0), N = k.size(1), b = k.size(2), F = k.size(3);
  TORCH_CHECK(b >= 1 && F >= 1, "ttt_scan: empty mini-batch or head dim: ", k.sizes());
  check_tensor(k, "k", dt, k.sizes());
  check_tensor(q, "q", dt, k.sizes());
  check_tensor(s, "s", dt, k.sizes());
  check_tensor(lr, "lr", dt, {R, N, b});
  check_tensor(coef, "coef", dt, {b});
  if (ln_w) check_tensor(*ln_w, "ln_w", dt, {R, F});
  check_tensor(n_complete, "n_complete", at::kLong, {R});
  const bool mlp = state.size() == 8;
  TORCH_CHECK(ln_w || !mlp, "ttt_scan: TTT-MLP needs the inner LayerNorm weight");
  TORCH_CHECK(state[0].dim() == 3 + lead, "ttt_scan: state[0] must be [R, ", lead ? "G, " : "", "F, H], got ",
              state[0].sizes());
  const int64_t H = state[0].size(2 + lead);
  std::vector<int64_t> pre = {R};
  if (lead) pre.push_back(state[0].size(1));
  auto shp = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> v = pre;
    v.insert(v.end(), tail);
    return v;
  };
  const std::vector<std::vector<int64_t>> want =
      mlp ? std::vector<std::vector<int64_t>>{shp({F, H}), shp({1, H}), shp({H, F}), shp({1, F})}
          : std::vector<std::vector<int64_t>>{shp({F, F}), shp({1, F})};
  const size_t half = state.size() / 2;
  for (size_t i = 0; i < state.size(); ++i) {
    const std::string name = "state[" + std::to_string(i) + "]";
    check_tensor(state[i], name.c_str(), dt, want[i % half]);
  }
  return Dims{R, N, b, F, H, ln_w.has_value()};
}

template <typename T> std::vector<const T*> cptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<T>());
  return out;
}
template <typename T> std::vector<T*> ptrs(std::vector<at::Tensor>& ts) {
  std::vector<T*> out;
  for (auto& t : ts) out.push_back(t.data_ptr<T>());
  return out;
}

std::vector<at::Tensor> scan_forward(const at::Tensor& k, const at::Tensor& q, const at::Tensor& s,
                                     const at::Tensor& lr, const at::Tensor& coef,
                                     const std::optional<at::Tensor>& ln_w, const at::Tensor& n_complete,
                                     std::vector<at::Tensor> state, int64_t group, bool save) {
  const Dims d = check_inputs(k, q, s, lr, coef, ln_w, n_complete, state, group, 0);
  const long n_groups = (d.N + group - 1) / group;
  at::Tensor zbar = at::empty_like(k);
  std::vector<at::Tensor> fin, ckpt;
  for (const auto& t : state) {
    fin.push_back(at::empty_like(t));
    if (save) {
      std::vector<int64_t> shape = {d.R, n_groups};
      shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
      ckpt.push_back(at::empty(shape, t.options()));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "ttt_scan_forward", [&] {
    using T = scalar_t;
    const T* lnw = ln_w ? ln_w->data_ptr<T>() : nullptr;
    auto f = state.size() == 8 ? &mlp_forward<T> : &linear_forward<T>;
    f(d, k.data_ptr<T>(), q.data_ptr<T>(), s.data_ptr<T>(), lr.data_ptr<T>(), coef.data_ptr<T>(), lnw,
      n_complete.data_ptr<int64_t>(), cptrs<T>(state), ptrs<T>(fin), ptrs<T>(ckpt), group, zbar.data_ptr<T>());
  });
  std::vector<at::Tensor> out = {zbar};
  out.insert(out.end(), fin.begin(), fin.end());
  out.insert(out.end(), ckpt.begin(), ckpt.end());
  return out;
}

std::vector<at::Tensor> scan_backward(const at::Tensor& k, const at::Tensor& q, const at::Tensor& s,
                                      const at::Tensor& lr, const at::Tensor& coef,
                                      const std::optional<at::Tensor>& ln_w, const at::Tensor& n_complete,
                                      std::vector<at::Tensor> saved, int64_t group, const at::Tensor& d_zbar,
                                      std::vector<at::Tensor> d_final) {
  const Dims d = check_inputs(k, q, s, lr, coef, ln_w, n_complete, d_final, group, 0);
  check_inputs(k, q, s, lr, coef, ln_w, n_complete, saved, group, 1);
  const long n_groups = (d.N + group - 1) / group;
  TORCH_CHECK(saved[0].size(1) == n_groups, "ttt_scan: ", saved[0].size(1), " checkpoints for ", d.N,
              " mini-batches in groups of ", group, " (expected ", n_groups, ")");
  TORCH_CHECK(saved.size() == d_final.size(), "ttt_scan: checkpoints and state gradients differ in length");
  check_tensor(d_zbar, "d_zbar", k.scalar_type(), k.sizes());
  at::Tensor dk = at::empty_like(k), dq = at::empty_like(q), ds = at::empty_like(s), dlr = at::empty_like(lr);
  at::Tensor dcoef = at::empty({d.R, d.b}, k.options());
  at::Tensor dlnw = ln_w ? at::empty_like(*ln_w) : at::empty({0}, k.options());
  std::vector<at::Tensor> d_init;
  for (const auto& t : d_final) d_init.push_back(at::empty_like(t));
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "ttt_scan_backward", [&] {
    using T = scalar_t;
    const T* lnw = ln_w ? ln_w->data_ptr<T>() : nullptr;
    auto f = d_final.size() == 8 ? &mlp_backward<T> : &linear_backward<T>;
    f(d, k.data_ptr<T>(), q.data_ptr<T>(), s.data_ptr<T>(), lr.data_ptr<T>(), coef.data_ptr<T>(), lnw,
      n_complete.data_ptr<int64_t>(), cptrs<T>(saved), group, d_zbar.data_ptr<T>(), cptrs<T>(d_final),
      dk.data_ptr<T>(), dq.data_ptr<T>(), ds.data_ptr<T>(), dlr.data_ptr<T>(), dcoef.data_ptr<T>(),
      ln_w ? dlnw.data_ptr<T>() : nullptr, ptrs<T>(d_init));
  });
  std::vector<at::Tensor> out = {dk, dq, ds, dlr, dcoef, dlnw};
  out.insert(out.end(), d_init.begin(), d_init.end());
  return out;
}

}  // namespace
}  // namespace ttt_scan

TORCH_LIBRARY(ttt_scan, m) {
  m.def("forward(Tensor k, Tensor q, Tensor s, Tensor lr, Tensor coef, Tensor? ln_w, Tensor n_complete, "
        "Tensor[] state, int group, bool save) -> Tensor[]",
        &ttt_scan::scan_forward);
  m.def("backward(Tensor k, Tensor q, Tensor s, Tensor lr, Tensor coef, Tensor? ln_w, Tensor n_complete, "
        "Tensor[] saved, int group, Tensor d_zbar, Tensor[] d_final) -> Tensor[]",
        &ttt_scan::scan_backward);
}
