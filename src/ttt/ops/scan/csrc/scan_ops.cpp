// torch.ops.ttt_scan.{forward, backward} (the scan contract of ttt/ops/scan/__init__.py, shared with the
// PyTorch backend) and {heads_forward, heads_backward} (the layer's layout, ttt/ops/scan/fused.py):
// argument checks, output allocation, dtype dispatch.
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

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape,
                  bool contiguous = true) {
  TORCH_CHECK(t.device().is_cpu(), "ttt_scan: ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "ttt_scan: ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "ttt_scan: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(!contiguous || t.is_contiguous(), "ttt_scan: ", name, " must be contiguous");
}

// validates the state tensors ([R, (G,) ...] each, lead = 1 with a checkpoint axis); returns the
// inner model's hidden size
int64_t check_state(const std::vector<at::Tensor>& state, at::ScalarType dt, int64_t R, int64_t F, long lead,
                    bool has_ln) {
  TORCH_CHECK(state.size() == 4 || state.size() == 8, "ttt_scan: the state must hold 4 or 8 tensors, got ",
              state.size());
  const bool mlp = state.size() == 8;
  TORCH_CHECK(has_ln || !mlp, "ttt_scan: TTT-MLP needs the inner LayerNorm weight");
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
  return H;
}

void check_dtype(at::ScalarType dt) {
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "ttt_scan: dtype must be float32 or float64, got ", dt);
}

// validates the common inputs of the plain layout and the state shapes; returns the dimensions
Dims check_inputs(const at::Tensor& k, const at::Tensor& q, const at::Tensor& s, const at::Tensor& lr,
                  const at::Tensor& coef, const std::optional<at::Tensor>& ln_w, const at::Tensor& n_complete,
                  const std::vector<at::Tensor>& state, int64_t group, long lead) {
  TORCH_CHECK(k.dim() == 4, "ttt_scan: k must be [R, N, b, F], got ", k.sizes());
  TORCH_CHECK(group >= 1, "ttt_scan: group must be >= 1, got ", group);
  const auto dt = k.scalar_type();
  check_dtype(dt);
  const int64_t R = k.size(0), N = k.size(1), b = k.size(2), F = k.size(3);
  TORCH_CHECK(b >= 1 && F >= 1, "ttt_scan: empty mini-batch or head dim: ", k.sizes());
  check_tensor(k, "k", dt, k.sizes());
  check_tensor(q, "q", dt, k.sizes());
  check_tensor(s, "s", dt, k.sizes());
  check_tensor(lr, "lr", dt, {R, N, b});
  check_tensor(coef, "coef", dt, {b});
  if (ln_w) check_tensor(*ln_w, "ln_w", dt, {R, F});
  check_tensor(n_complete, "n_complete", at::kLong, {R});
  const int64_t H = check_state(state, dt, R, F, lead, ln_w.has_value());
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
    const PlainIo<T> io{k.data_ptr<T>(), q.data_ptr<T>(), s.data_ptr<T>(), lr.data_ptr<T>(), coef.data_ptr<T>(),
                        lnw, zbar.data_ptr<T>()};
    auto f = state.size() == 8 ? &mlp_forward<T, PlainIo<T>> : &linear_forward<T, PlainIo<T>>;
    f(d, io, n_complete.data_ptr<int64_t>(), cptrs<T>(state), ptrs<T>(fin), ptrs<T>(ckpt), group);
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
    PlainIo<T> io{k.data_ptr<T>(), q.data_ptr<T>(), s.data_ptr<T>(), lr.data_ptr<T>(), coef.data_ptr<T>(),
                  lnw, nullptr};
    io.dzbar = d_zbar.data_ptr<T>();
    io.dk = dk.data_ptr<T>();
    io.dq = dq.data_ptr<T>();
    io.ds = ds.data_ptr<T>();
    io.dlr = dlr.data_ptr<T>();
    auto f = d_final.size() == 8 ? &mlp_backward<T, PlainIo<T>> : &linear_backward<T, PlainIo<T>>;
    f(d, io, n_complete.data_ptr<int64_t>(), cptrs<T>(saved), group, cptrs<T>(d_final), dcoef.data_ptr<T>(),
      ln_w ? dlnw.data_ptr<T>() : nullptr, ptrs<T>(d_init));
  });
  std::vector<at::Tensor> out = {dk, dq, ds, dlr, dcoef, dlnw};
  out.insert(out.end(), d_init.begin(), d_init.end());
  return out;
}

// ---- the layer's layout (HeadsIo): strided [B, L, NH, F] projections in, q + LN(Zbar) out ----

struct HeadsDims {
  Dims d;
  int64_t B, L, NH;
};

HeadsDims check_heads(const at::Tensor& xq, const at::Tensor& xk, const at::Tensor& xv, const at::Tensor& lr,
                      const at::Tensor& coef, const at::Tensor& ln_w, const at::Tensor& ln_b,
                      const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& n_complete,
                      const std::vector<at::Tensor>& state, int64_t group, long lead, bool strided_lr = false) {
  TORCH_CHECK(xq.dim() == 4, "ttt_scan: xq must be [B, L, NH, F], got ", xq.sizes());
  TORCH_CHECK(group >= 1, "ttt_scan: group must be >= 1, got ", group);
  const auto dt = xq.scalar_type();
  check_dtype(dt);
  const int64_t B = xq.size(0), L = xq.size(1), NH = xq.size(2), F = xq.size(3), b = coef.numel();
  TORCH_CHECK(L >= 1 && b >= 1 && F >= 2 && F % 2 == 0, "ttt_scan: bad heads input ", xq.sizes(), " with ", b,
              " tokens per mini-batch");
  for (const auto* t : {&xq, &xk, &xv}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt && t->sizes() == xq.sizes() && t->stride(3) == 1,
                "ttt_scan: xq, xk, xv must be CPU ", dt, " tensors of shape ", xq.sizes(),
                " with unit feature stride");
  }
  check_tensor(lr, "lr", dt, {B, NH, L}, !strided_lr);  // the gate's logits are read with their strides
  check_tensor(coef, "coef", dt, {b});
  check_tensor(ln_w, "ln_w", dt, {NH, F});
  check_tensor(ln_b, "ln_b", dt, {NH, F});
  check_tensor(cos, "cos", dt, {b, F});
  check_tensor(sin, "sin", dt, {b, F});
  check_tensor(n_complete, "n_complete", at::kLong, {B * NH});
  const int64_t H = check_state(state, dt, B * NH, F, lead, true);
  return HeadsDims{Dims{B * NH, (L + b - 1) / b, b, F, H, true}, B, L, NH};
}

template <typename T> Strided<T> strided(const at::Tensor& t) {
  return Strided<T>{static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
HeadsIo<T> heads_io(const HeadsDims& h, const at::Tensor& xq, const at::Tensor& xk, const at::Tensor& xv,
                    const at::Tensor& lr, const at::Tensor& coef, const at::Tensor& ln_w, const at::Tensor& ln_b,
                    const at::Tensor& cos, const at::Tensor& sin, T* zsave) {
  return HeadsIo<T>{h.L, h.NH, strided<const T>(xq), strided<const T>(xk), strided<const T>(xv), lr.data_ptr<T>(),
                    coef.data_ptr<T>(), ln_w.data_ptr<T>(), ln_b.data_ptr<T>(), cos.data_ptr<T>(),
                    sin.data_ptr<T>(), Strided<T>{nullptr, 0, 0, 0}, zsave};
}

// -> [out [B, L, NH, F], final state..., checkpoints..., Zbar [R, N, b, F] (empty unless save)]
std::vector<at::Tensor> heads_forward(const at::Tensor& xq, const at::Tensor& xk, const at::Tensor& xv,
                                      const at::Tensor& lr, const at::Tensor& coef, const at::Tensor& ln_w,
                                      const at::Tensor& ln_b, const at::Tensor& cos, const at::Tensor& sin,
                                      const at::Tensor& n_complete, std::vector<at::Tensor> state, int64_t group,
                                      bool save, const std::optional<at::Tensor>& out_buf,
                                      const std::optional<at::Tensor>& lr_bias, double lr_base) {
  // with lr_bias, lr holds the gate's logits (any strides) and the learning rates are formed here
  const HeadsDims h =
      check_heads(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete, state, group, 0, lr_bias.has_value());
  if (lr_bias) check_tensor(*lr_bias, "lr_bias", xq.scalar_type(), {h.NH});
  const Dims& d = h.d;
  const long n_groups = (d.N + group - 1) / group;
  at::Tensor out;
  if (out_buf) {  // the caller's buffer (e.g. reused scratch memory at inference)
    out = *out_buf;
    check_tensor(out, "out", xq.scalar_type(), {h.B, h.L, h.NH, d.F});
  } else {
    out = at::empty({h.B, h.L, h.NH, d.F}, xq.options());
  }
  at::Tensor zsave = save ? at::empty({d.R, d.N, d.b, d.F}, xq.options()) : at::empty({0}, xq.options());
  // checkpoint the accumulators only where they can be non-zero at a checkpoint (see scan_driver.h):
  // a training step starts from zero accumulators and closes every mini-batch but the last, so its
  // checkpoints hold the weights alone
  const size_t ns = state.size();
  size_t n_ckpt = save ? ns / 2 : 0;
  if (save) {
    const int64_t* nc = n_complete.data_ptr<int64_t>();
    for (int64_t r = 0; r < d.R; ++r)
      if (nc[r] < (n_groups - 1) * group) n_ckpt = ns;
    for (size_t i = ns / 2; i < ns && n_ckpt < ns; ++i)
      AT_DISPATCH_FLOATING_TYPES(state[i].scalar_type(), "ttt_scan_acc_nz", [&] {
        if (any_nonzero(state[i].data_ptr<scalar_t>(), state[i].numel())) n_ckpt = ns;
      });
  }
  std::vector<at::Tensor> fin, ckpt;
  for (const auto& t : state) {
    fin.push_back(at::empty_like(t));
    if (ckpt.size() < n_ckpt) {
      std::vector<int64_t> shape = {d.R, n_groups};
      shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
      ckpt.push_back(at::empty(shape, t.options()));
    }
  }
  AT_DISPATCH_FLOATING_TYPES(xq.scalar_type(), "ttt_scan_heads_forward", [&] {
    using T = scalar_t;
    HeadsIo<T> io = heads_io<T>(h, xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, save ? zsave.data_ptr<T>() : nullptr);
    io.out = strided<T>(out);
    if (lr_bias) {
      io.lr_sB = lr.stride(0);
      io.lr_sH = lr.stride(1);
      io.lr_sL = lr.stride(2);
      io.lr_bias = lr_bias->data_ptr<T>();
      io.lr_base = T(lr_base);
    }
    auto f = state.size() == 8 ? &mlp_forward<T, HeadsIo<T>> : &linear_forward<T, HeadsIo<T>>;
    f(d, io, n_complete.data_ptr<int64_t>(), cptrs<T>(state), ptrs<T>(fin), ptrs<T>(ckpt), group);
  });
  std::vector<at::Tensor> res = {out};
  res.insert(res.end(), fin.begin(), fin.end());
  res.insert(res.end(), ckpt.begin(), ckpt.end());
  res.push_back(zsave);
  return res;
}

// -> [dxq, dxk, dxv [B, L, NH, F], dlr [B, NH, L], dcoef [R, b], d ln_w [R, F], d ln_b [R, F], d state...]
std::vector<at::Tensor> heads_backward(const at::Tensor& xq, const at::Tensor& xk, const at::Tensor& xv,
                                       const at::Tensor& lr, const at::Tensor& coef, const at::Tensor& ln_w,
                                       const at::Tensor& ln_b, const at::Tensor& cos, const at::Tensor& sin,
                                       const at::Tensor& n_complete, std::vector<at::Tensor> saved,
                                       const at::Tensor& zsave, int64_t group, const at::Tensor& d_out,
                                       std::vector<at::Tensor> d_final) {
  const HeadsDims h = check_heads(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete, d_final, group, 0);
  const Dims& d = h.d;
  const long n_groups = (d.N + group - 1) / group;
  // checkpoints: the whole state, or its weights alone (heads_forward: zero accumulators there)
  TORCH_CHECK(saved.size() == d_final.size() || 2 * saved.size() == d_final.size(),
              "ttt_scan: ", saved.size(), " checkpoint tensors for a state of ", d_final.size());
  for (size_t i = 0; i < saved.size(); ++i) {
    std::vector<int64_t> shape = {d.R, n_groups};
    shape.insert(shape.end(), d_final[i].sizes().begin() + 1, d_final[i].sizes().end());
    const std::string name = "checkpoint[" + std::to_string(i) + "]";
    check_tensor(saved[i], name.c_str(), xq.scalar_type(), shape);
  }
  check_tensor(zsave, "zbar", xq.scalar_type(), {d.R, d.N, d.b, d.F});
  TORCH_CHECK(d_out.scalar_type() == xq.scalar_type() && d_out.sizes() == xq.sizes() && d_out.stride(3) == 1,
              "ttt_scan: d_out must be ", xq.scalar_type(), " of shape ", xq.sizes(), " with unit feature stride");
  auto opts = xq.options();
  at::Tensor dxq = at::empty({h.B, h.L, h.NH, d.F}, opts), dxk = at::empty_like(dxq), dxv = at::empty_like(dxq);
  at::Tensor dlr = at::empty({h.B, h.NH, h.L}, opts), dcoef = at::empty({d.R, d.b}, opts);
  at::Tensor dlnw = at::empty({d.R, d.F}, opts), dlnb = at::empty({d.R, d.F}, opts);
  std::vector<at::Tensor> d_init;
  for (const auto& t : d_final) d_init.push_back(at::empty_like(t));
  AT_DISPATCH_FLOATING_TYPES(xq.scalar_type(), "ttt_scan_heads_backward", [&] {
    using T = scalar_t;
    HeadsIo<T> io = heads_io<T>(h, xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, zsave.data_ptr<T>());
    io.dout = strided<const T>(d_out);
    io.dxq = strided<T>(dxq);
    io.dxk = strided<T>(dxk);
    io.dxv = strided<T>(dxv);
    io.dlr = dlr.data_ptr<T>();
    io.dlnb = dlnb.data_ptr<T>();
    auto f = d_final.size() == 8 ? &mlp_backward<T, HeadsIo<T>> : &linear_backward<T, HeadsIo<T>>;
    f(d, io, n_complete.data_ptr<int64_t>(), cptrs<T>(saved), group, cptrs<T>(d_final), dcoef.data_ptr<T>(),
      dlnw.data_ptr<T>(), ptrs<T>(d_init));
  });
  std::vector<at::Tensor> res = {dxq, dxk, dxv, dlr, dcoef, dlnw, dlnb};
  res.insert(res.end(), d_init.begin(), d_init.end());
  return res;
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
  m.def("heads_forward(Tensor xq, Tensor xk, Tensor xv, Tensor lr, Tensor coef, Tensor ln_w, Tensor ln_b, "
        "Tensor cos, Tensor sin, Tensor n_complete, Tensor[] state, int group, bool save, Tensor? out=None, "
        "Tensor? lr_bias=None, float lr_base=1.0) -> Tensor[]",
        &ttt_scan::heads_forward);
  m.def("heads_backward(Tensor xq, Tensor xk, Tensor xv, Tensor lr, Tensor coef, Tensor ln_w, Tensor ln_b, "
        "Tensor cos, Tensor sin, Tensor n_complete, Tensor[] saved, Tensor zbar, int group, Tensor d_out, "
        "Tensor[] d_final) -> Tensor[]",
        &ttt_scan::heads_backward);
}
