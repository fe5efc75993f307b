"""Model registry: every arch builds, trains a step, and baselines match the TTT parameter count."""

from __future__ import annotations

import pytest
import torch

from ttt.models.registry import ARCHS, build_model, match_size, model_max_length


@pytest.mark.parametrize("arch", ARCHS)
def test_build_forward_backward(arch: str) -> None:
    model = build_model(arch, "tiny", vocab_size=256, max_seq_len=64)
    ids = torch.randint(0, 256, (2, 32))
    out = model(input_ids=ids, use_cache=False)
    assert out.logits.shape == (2, 32, 256)
    out.logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_sizes_match_within_tolerance() -> None:
    for size in ("tiny", "mini", "small", "125m"):
        vocab = 32000 if size == "125m" else 256
        with torch.device("meta"):
            ref = build_model("ttt-linear", size, vocab, 128).num_parameters(exclude_embeddings=True)
        for arch in ("transformer", "mamba", "mamba2"):
            with torch.device("meta"):
                n = build_model(arch, size, vocab, 128).num_parameters(exclude_embeddings=True)
            assert abs(n / ref - 1) < 0.03, (size, arch, n, ref)


def test_match_size_rules() -> None:
    fields = match_size("transformer", "small", vocab_size=256)
    assert set(fields) == {"intermediate_size"} and fields["intermediate_size"] % 8 == 0
    assert set(match_size("mamba", "small", vocab_size=256)) >= {"num_hidden_layers", "hidden_size"}
    assert match_size("ttt-mlp", "small") == {}
    # explicit target
    fields = match_size("transformer", "tiny", vocab_size=256, target_params=300_000)
    with torch.device("meta"):
        n = build_model("transformer", "tiny", 256, 64, **fields).num_parameters(exclude_embeddings=True)
    assert abs(n / 300_000 - 1) < 0.03


def test_parameter_counts_tied_and_embeddings() -> None:
    model = build_model("transformer", "tiny", vocab_size=256, max_seq_len=64)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    full, body = model.num_parameters(), model.num_parameters(exclude_embeddings=True)
    assert full - body == 256 * 64
    assert full == sum(p.numel() for p in model.parameters())


def test_baseline_configs() -> None:
    llama = build_model("transformer", "tiny", vocab_size=256, max_seq_len=128)
    assert llama.config._attn_implementation == "sdpa"
    assert model_max_length(llama) == 128
    assert model_max_length(build_model("ttt-linear", "tiny", 256, 64)) == float("inf")
    ttt = build_model("ttt-mlp", "tiny", 256, 64, backbone="mamba", mini_batch_size=8)
    assert ttt.config.ttt_layer_type == "mlp" and ttt.config.share_qk and ttt.config.mini_batch_size == 8
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("rwkv", "tiny", 256, 64)
    with pytest.raises(ValueError, match="unknown model size"):
        build_model("transformer", "giant", 256, 64)


def test_mamba_uses_mambapy_parallel_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, training Mamba goes through ``mambapy.pscan`` (parallel scan), not the per-token loop."""
    import mambapy.pscan

    calls = []
    real = mambapy.pscan.pscan

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mambapy.pscan, "pscan", counting)
    model = build_model("mamba", "tiny", vocab_size=256, max_seq_len=64)
    assert model.config.use_mambapy
    model.train()
    ids = torch.randint(0, 256, (2, 48))
    model(input_ids=ids, use_cache=False).logits.sum().backward()
    assert len(calls) == model.config.num_hidden_layers
    assert calls[0][1] == 48  # [B, L, ED, N]: the whole sequence in one scan
