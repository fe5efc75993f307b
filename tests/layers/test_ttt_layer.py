"""TTTLayer: dual vs reference (outputs and every parameter gradient), streaming, padding, errors.

Tolerances: float64 1e-10; float32 rtol/atol 1e-5; bf16 relative L2 error < 3e-2 against fp32.
"""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch

from ttt.layers import TTTMLP, TTTLayer, TTTLayerState, TTTLinear
from ttt.ops.linear import PACK_MIN_ROWS, PackedWeight, packing_available

# every test here runs once per CPU scan backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("scan_backend")


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float, msg: str = "") -> None:
    """max|a - b| <= tol * max|b| (relative to the reference's scale)."""
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{msg}: max abs err {err:.3e} vs scale {scale:.3e}"


OPTIONS = list(itertools.product(["linear", "mlp"], [False, True], [False, True]))


def make_pair(kind: str, share_qk: bool, use_gate: bool, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    fast = TTTLayer(32, 4, kind, mini_batch_size=4, share_qk=share_qk, use_gate=use_gate, **kw).to(dtype)
    with torch.no_grad():  # move every parameter away from its init so all gradient paths are exercised
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = TTTLayer(32, 4, kind, mini_batch_size=4, share_qk=share_qk, use_gate=use_gate, impl="reference",
                   **kw).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("kind,share_qk,use_gate", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_dual_equals_reference_outputs_and_grads(kind, share_qk, use_gate, dtype, tol) -> None:
    fast, ref = make_pair(kind, share_qk, use_gate, dtype)
    x = torch.randn(2, 11, 32, dtype=dtype)
    weight = torch.randn(2, 11, 32, dtype=dtype)
    outs = []
    for layer in (fast, ref):
        out, state = layer(x)
        (out * weight).sum().backward()
        outs.append((out, state))
    assert_rel_close(outs[0][0], outs[1][0], tol, "output")
    for (name, p1), p2 in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p1.grad is not None, name
        assert_rel_close(p1.grad, p2.grad, tol, name)


@pytest.mark.parametrize("kind,share_qk,use_gate", OPTIONS)
def test_streaming_chunks_equal_one_call(kind, share_qk, use_gate) -> None:
    layer, _ = make_pair(kind, share_qk, use_gate)
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    full, st_full = layer(x)
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        if trial == 0:
            cuts = list(range(1, 29))  # token by token
        else:
            cuts = sorted(torch.randperm(28, generator=gen)[: 3 + 2 * trial].add(1).tolist())
        st, outs, prev = None, [], 0
        for c in cuts + [29]:
            out, st = layer(x[:, prev:c], st)
            outs.append(out)
            prev = c
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
        got, want = st.inner.weights() + st.inner.grads(), st_full.inner.weights() + st_full.inner.grads()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert torch.equal(st.inner.pos, st_full.inner.pos)
        if share_qk:
            torch.testing.assert_close(st.conv_q, st_full.conv_q)
            torch.testing.assert_close(st.conv_k, st_full.conv_k)


@pytest.mark.parametrize("kind,share_qk", [("linear", True), ("mlp", False)])
def test_padding_rows_equal_single_rows(kind, share_qk) -> None:
    layer, _ = make_pair(kind, share_qk, False)
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 0])
    out, st = layer(x, lengths=lengths)
    for r in range(3):
        n = int(lengths[r])
        single, st_r = layer(x[r : r + 1, :n])
        torch.testing.assert_close(out[r : r + 1, :n], single, rtol=1e-10, atol=1e-10)
        assert out[r, n:].abs().max() == 0 if n < 9 else True
        torch.testing.assert_close(st.inner.W1[r : r + 1], st_r.inner.W1)
        assert int(st.inner.pos[r]) == n % 4
    # continuing the padded batch equals continuing each row alone
    y = torch.randn(3, 5, 32, dtype=torch.float64)
    out2, _ = layer(y, st)
    for r in range(3):
        n = int(lengths[r])
        _, st_r = layer(x[r : r + 1, :n])
        single2, _ = layer(y[r : r + 1], st_r)
        torch.testing.assert_close(out2[r : r + 1], single2, rtol=1e-10, atol=1e-10)


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    layer = TTTLinear(64, 4, mini_batch_size=16)
    x = torch.randn(2, 40, 64)
    out32, _ = layer(x)
    layer16 = TTTLinear(64, 4, mini_batch_size=16).to(torch.bfloat16)
    layer16.load_state_dict(layer.state_dict())
    out16, st16 = layer16(x.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and st16.inner.W1.dtype == torch.float32
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 3e-2, f"bf16 relative error {rel:.3e}"
    out16.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer16.parameters())


@pytest.mark.parametrize("head_dim,mb", [(16, 1), (64, 16), (128, 64)])
def test_sizes_run(head_dim, mb) -> None:
    layer = TTTMLP(head_dim * 2, 2, mini_batch_size=mb)
    out, st = layer(torch.randn(1, 70, head_dim * 2))
    assert out.shape == (1, 70, head_dim * 2) and torch.isfinite(out).all()
    assert int(st.inner.pos[0]) == 70 % mb


@pytest.mark.parametrize("kind,share_qk,use_gate", OPTIONS)
def test_inference_fused_projections(kind, share_qk, use_gate) -> None:
    """Without autograd the input projections run as one GEMM over cached concatenated weights (and the
    token coefficients come from a cache): same outputs and state as the reference, the caches follow
    in-place parameter updates, and a hook on a projection (an adapter, say) turns the fusion off."""
    fast, ref = make_pair(kind, share_qk, use_gate)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        for step in range(2):
            (out, state), (out_r, state_r) = fast(x), ref(x)
            assert_rel_close(out, out_r, 1e-10, f"output, step {step}")
            assert_rel_close(state.inner.W1, state_r.inner.W1, 1e-10, f"state, step {step}")
            assert fast.__dict__["_inference_cache"][1].fused is not None
            for layer in (fast, ref):  # an in-place update (an optimizer step) must reach the caches
                layer.v_proj.weight.mul_(1.5)
                layer.learnable_ttt_lr_weight.add_(0.1)
                layer.learnable_token_idx.add_(0.05)
        handle = fast.v_proj.register_forward_hook(lambda mod, inp, out: out * 2)
        doubled, _ = fast(x)
        handle.remove()
        fast.v_proj.weight.mul_(2)
        assert_rel_close(doubled, fast(x)[0], 1e-10, "hooked projection")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_inference_token_coefficients_follow_updates(kind) -> None:
    """Inference takes the token coefficients from a cache: after the parameter changes (in place, or
    replaced) its output still equals the autograd path's, which computes them afresh."""
    layer, _ = make_pair(kind, False, False)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    seen = []
    for step in range(3):
        with torch.no_grad():
            out, _ = layer(x)
        ref, _ = layer(x)
        assert_rel_close(out, ref.detach(), 1e-10, f"step {step}")
        seen.append(out)
        if step == 0:
            with torch.no_grad():
                layer.learnable_token_idx.add_(0.3)
        else:
            layer.learnable_token_idx = torch.nn.Parameter(layer.learnable_token_idx.detach() - 0.2)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


@pytest.mark.parametrize("kind,share_qk,use_gate", OPTIONS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inference_fused_post_norm_and_gate(kind, share_qk, use_gate, dtype, tol) -> None:
    """At inference the post-norm (and gate) run as one compiled pass over the scan's output; a no-op
    hook on ``post_norm`` turns that off (the module and ``gelu_tanh`` run): same outputs."""
    layer, _ = make_pair(kind, share_qk, use_gate, dtype)
    x = torch.randn(2, 37, 32, dtype=dtype)
    with torch.no_grad():
        fused, _ = layer(x)
        handle = layer.post_norm.register_forward_hook(lambda mod, inp, out: None)
        plain, _ = layer(x)
        handle.remove()
    assert_rel_close(fused, plain, tol, "post-norm")


@pytest.mark.parametrize("kind,share_qk,use_gate", OPTIONS)
def test_inference_results_do_not_alias_scratch(kind, share_qk, use_gate) -> None:
    """Inference keeps the projections and the scan's output in reusable scratch memory: a second call
    (other input, other length) leaves the first call's output and state untouched, and both equal the
    autograd path's results."""
    layer, _ = make_pair(kind, share_qk, use_gate, torch.float32)
    x1, x2 = torch.randn(2, 37, 32), torch.randn(2, 45, 32)
    ref1, st_ref1 = layer(x1)
    with torch.no_grad():
        out1, st1 = layer(x1)
        kept = (out1.clone(), *(t.clone() for t in st1.inner.weights()))
        out2, _ = layer(x2)
    ref2, _ = layer(x2)
    assert torch.equal(out1, kept[0])
    assert all(torch.equal(a, b) for a, b in zip(st1.inner.weights(), kept[1:], strict=True))
    assert_rel_close(out1, ref1.detach(), 1e-5, "first call")
    assert_rel_close(out2, ref2.detach(), 1e-5, "second call")
    assert_rel_close(st1.inner.W1, st_ref1.inner.W1.detach(), 1e-5, "state")


@pytest.mark.parametrize("kind,share_qk,use_gate", [("linear", False, False), ("mlp", True, True)])
def test_inference_packed_weights(kind, share_qk, use_gate) -> None:
    """float32 inference on the CPU runs the fused input projections and ``o_proj`` from weights packed
    for MKL's GEMM (ttt.ops.linear), from the second call with a row count on (and from PACK_MIN_ROWS
    rows): every call equals the autograd path, also after in-place updates of the weights, with other
    row counts in between (decode steps are not packed) and with another thread count;
    ``pack_weights = False`` gives the same outputs without packing."""
    if not packing_available():
        pytest.skip("this PyTorch build has no MKL packed GEMM")
    layer, _ = make_pair(kind, share_qk, use_gate, torch.float32)
    xs = {70: torch.randn(2, 70, 32), 77: torch.randn(2, 77, 32), 1: torch.randn(2, 1, 32)}
    names = ("input", "output")

    def packs() -> dict:  # name -> {(rows, threads): packing}
        return layer.__dict__["_inference_cache"][1].packs

    def check(n: int, msg: str) -> torch.Tensor:
        with torch.no_grad():
            out, st = layer(xs[n])
        ref, st_ref = layer(xs[n])
        assert_rel_close(out, ref.detach(), 1e-5, msg)
        assert_rel_close(st.inner.W1, st_ref.inner.W1.detach(), 1e-5, f"{msg}: state")
        return out

    assert PACK_MIN_ROWS <= 140
    key = (140, torch.get_num_threads())
    check(70, "first call")
    assert all(packs()[n][key] is None for n in names)  # seen once: not packed yet
    for step in range(2):
        check(70, f"packed, step {step}")
        assert all(isinstance(packs()[n][key], PackedWeight) for n in names)
    for n in (77, 77, 1, 1, 70):  # other row counts in between (prefill and decode)
        check(n, f"{n} tokens")
    assert {k[0] for k in packs()["output"]} == {140, 154}
    with torch.no_grad():  # an optimizer step: the packings are made anew from the new weights
        layer.o_proj.weight.mul_(1.5)
        layer.q_proj.weight.add_(0.02)
    before = packs()
    for step in range(2):
        check(70, f"after an update, step {step}")
    assert packs() is not before and all(isinstance(packs()[n][key], PackedWeight) for n in names)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(2):
            check(70, f"1 thread, step {step}")
        assert (140, 1) in packs()["output"]
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        packed = layer(xs[70])[0]
        TTTLayer.pack_weights = False
        try:
            del layer.__dict__["_inference_cache"]
            plain = layer(xs[70])[0]
            assert packs() == {}
        finally:
            TTTLayer.pack_weights = True
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_inference_caches_are_not_copied(how) -> None:
    """A copy of a layer (``copy.deepcopy``, pickling the module) leaves the inference caches (fused and
    packed weights, token coefficients) behind and derives its own: same outputs as the original, also
    after the copy's weights change. (A packed weight is tied to its address: copied, it would be
    refused by the packed GEMM or, without that check, give wrong products.)"""
    layer, _ = make_pair("linear", False, True, torch.float32)
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        for _ in range(3):  # packed from the second call on (where the packed GEMM is available)
            ref = layer(x)[0]
        assert layer.__dict__["_inference_cache"][1].fused is not None
        twin = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
        assert twin.__dict__.get("_inference_cache") is None
        for _ in range(3):
            torch.testing.assert_close(twin(x)[0], ref, rtol=0, atol=0)
        twin.o_proj.weight.mul_(2)
        torch.testing.assert_close(twin(x)[0], 2 * ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x)[0], ref, rtol=0, atol=0)


def test_inference_without_packed_gemm(monkeypatch) -> None:
    """Where the packed GEMM is missing (no MKL), inference keeps torch.matmul: same outputs."""
    import ttt.ops.linear as module

    layer, _ = make_pair("linear", False, False, torch.float32)
    x = torch.randn(2, 70, 32)
    ref, _ = layer(x)
    monkeypatch.setattr(module, "packing_available", lambda: False)
    with torch.no_grad():
        for step in range(3):
            out, _ = layer(x)
            assert_rel_close(out, ref.detach(), 1e-5, f"step {step}")
    assert layer.__dict__["_inference_cache"][1].packs == {}


def test_inference_projections_not_fused_on_shared_storage() -> None:
    """Weights that are views into a shared buffer (FSDP's gathered parameters) can change without
    their version counter moving: those layers keep the separate projections and derive the token
    coefficients afresh (no caches), so a write that no version counter sees still shows."""
    layer = TTTLinear(32, 4, mini_batch_size=4).double()
    flat = torch.cat([p.detach().flatten() for p in layer.parameters()])
    offset = 0
    for mod, name, p in [(m, n, p) for m in layer.modules() for n, p in m.named_parameters(recurse=False)]:
        setattr(mod, name, torch.nn.Parameter(flat[offset:offset + p.numel()].view_as(p)))
        offset += p.numel()
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        out, _ = layer(x)
        assert "_inference_cache" not in layer.__dict__
        TTTLayer.fuse_projections = False
        try:
            ref, _ = layer(x)
        finally:
            TTTLayer.fuse_projections = True
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # a write that no version counter sees (numpy over the shared buffer, as an all-gather into it)
    flat.numpy()[:] += 0.05
    with torch.no_grad():
        after, _ = layer(x)
    fresh, _ = layer(x)  # the autograd path derives everything from the parameters afresh
    assert not torch.allclose(after, out)
    torch.testing.assert_close(after, fresh.detach(), rtol=1e-10, atol=1e-12)


def test_official_parameter_names() -> None:
    names = dict(TTTLayer(32, 4, "mlp", share_qk=True, use_gate=True).named_parameters())
    for n in ["q_proj.weight", "v_proj.weight", "o_proj.weight", "g_proj.weight", "conv_q.weight",
              "conv_q.bias", "conv_k.weight", "conv_k.bias", "learnable_ttt_lr_weight",
              "learnable_ttt_lr_bias", "learnable_token_idx", "ttt_norm_weight", "ttt_norm_bias",
              "post_norm.weight", "post_norm.bias", "W1", "b1", "W2", "b2"]:
        assert n in names, n
    assert "k_proj.weight" not in names
    assert names["W1"].shape == (4, 8, 32) and names["W2"].shape == (4, 32, 8)
    assert names["learnable_ttt_lr_weight"].shape == (4, 1, 32) and names["b1"].shape == (4, 1, 32)


def test_state_helpers() -> None:
    layer = TTTLinear(32, 4, mini_batch_size=4, share_qk=True)
    _, st = layer(torch.randn(3, 6, 32))
    sub = st.index_select(torch.tensor([2, 0]))
    assert isinstance(sub, TTTLayerState) and sub.batch_size == 2
    torch.testing.assert_close(sub.inner.W1[0], st.inner.W1[2])
    torch.testing.assert_close(sub.conv_q[1], st.conv_q[0])
    assert not st.detach().inner.W1.requires_grad


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TTTLinear(30, 4)
    with pytest.raises(ValueError, match="mini_batch_size"):
        TTTLinear(32, 4, mini_batch_size=0)
    with pytest.raises(ValueError, match="ttt_layer_type"):
        TTTLayer(32, 4, "conv")
    layer = TTTLinear(32, 4, mini_batch_size=4)
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(5, 32))
    with pytest.raises(ValueError, match="does not match hidden_size"):
        layer(torch.randn(1, 5, 16))
    _, st = layer(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="state does not fit"):
        layer(torch.randn(3, 5, 32), st)
    with pytest.raises(ValueError, match="state does not fit"):
        TTTMLP(32, 4, mini_batch_size=4)(torch.randn(2, 5, 32), st)
    with pytest.raises(ValueError, match="state dtype"):
        layer.double()(torch.randn(2, 5, 32, dtype=torch.float64), st)
    with pytest.raises(ValueError, match="lengths must be"):
        layer.float()(torch.randn(2, 5, 32), lengths=torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_autocast_forward_backward(kind) -> None:
    """Under autocast the projections run in bf16 while the inner loop stays in fp32."""
    layer = TTTLayer(64, 4, kind, mini_batch_size=8, share_qk=True, use_gate=True)
    x = torch.randn(2, 21, 64)
    ref, _ = layer(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out, st = layer(x)
        one, _ = layer(x[:, :1])
    assert st.inner.W1.dtype == torch.float32
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 3e-2, f"autocast relative error {rel:.3e}"
