"""Smoke run of the decode-speed benchmark (tiny sizes).

The real run is ``python -m ttt.benchmarks.decode_speed``.
"""

from __future__ import annotations

import json

import pytest
import torch

from ttt.benchmarks import decode_speed


def test_decode_speed_smoke(tmp_path) -> None:
    payload = decode_speed.main(["--preset", "tiny", "--prompt-lens", "8", "24", "--batches", "1", "2",
                                 "--decode-tokens", "2", "--prefill-chunk", "16", "--max-cache-gb", "1e-9",
                                 "--out", str(tmp_path)])
    data = json.loads((tmp_path / "decode_speed.json").read_text())
    assert data["results"] == payload["results"]
    ttt = [r for r in data["results"] if r["model"].startswith("ttt")]
    assert len(ttt) == 8 and all(r["status"] == "ok" for r in ttt)
    for r in ttt:
        assert r["decode_ms_per_token"] > 0 and r["prefill_tokens_per_s"] > 0
    # TTT cache size is the same after 8 and 24 prompt tokens
    by_len = {(r["model"], r["batch"], r["prompt_len"]): r["cache_bytes"] for r in ttt}
    assert by_len[("ttt-linear", 1, 8)] == by_len[("ttt-linear", 1, 24)]
    # the tiny KV-cache limit makes every Llama setting an honest "skipped" with a reason
    llama = [r for r in data["results"] if r["model"] == "llama"]
    assert len(llama) == 4 and all(r["status"] == "skipped" and "KV cache" in r["reason"] for r in llama)
    assert (tmp_path / "decode_speed.md").exists()


def test_decode_speed_llama_path_smoke(tmp_path) -> None:
    payload = decode_speed.main(["--models", "llama", "--preset", "tiny", "--prompt-lens", "8", "16",
                                 "--batches", "1", "--decode-tokens", "2", "--prefill-chunk", "8",
                                 "--out", str(tmp_path)])
    rows = payload["results"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[1]["cache_bytes"] > rows[0]["cache_bytes"] > 0  # a KV cache grows with the prompt


@pytest.mark.parametrize("kind", decode_speed.MODELS)
def test_prefill_then_decode_equals_the_full_forward(kind: str) -> None:
    """The benchmark's protocol (prefill in chunks, then one token at a time through the cache) computes
    what one forward over the whole sequence computes, for every model it times (Mamba's prompt goes in
    one forward: its cache cannot take more than one token after the first forward)."""
    model = decode_speed.build_model(kind, "tiny", torch.float32, "cpu", 64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 44), generator=gen)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache, logits = decode_speed.prefill(kind, model, ids[:, :40], chunk=16)
        torch.testing.assert_close(logits, full[:, 39], rtol=1e-4, atol=1e-4)
        for t in range(40, 44):
            cache, logits = decode_speed.decode_step(model, ids[:, t:t + 1], cache)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_decode_speed_mamba_smoke(tmp_path) -> None:
    payload = decode_speed.main(["--models", "mamba", "mamba2", "--preset", "tiny", "--prompt-lens", "8",
                                 "24", "--batches", "1", "--decode-tokens", "2", "--prefill-chunk", "8",
                                 "--name", "decode_mamba", "--out", str(tmp_path)])
    rows = {(r["model"], r["prompt_len"]): r for r in payload["results"]}
    assert all(r["status"] == "ok" for r in rows.values())
    for kind in ("mamba", "mamba2"):  # a constant-size state: the same cache after 8 and 24 tokens
        assert rows[(kind, 8)]["cache_bytes"] == rows[(kind, 24)]["cache_bytes"] > 0
    assert rows[("mamba", 24)]["prefill_chunk"] == 24 and rows[("mamba2", 24)]["prefill_chunk"] == 8
    assert "ok (prompt in one forward)" in (tmp_path / "decode_mamba.md").read_text()
    assert json.loads((tmp_path / "decode_mamba.json").read_text())["results"] == payload["results"]
    skipped = decode_speed.main(["--models", "mamba", "--preset", "tiny", "--prompt-lens", "8", "--batches",
                                 "1", "--decode-tokens", "1", "--max-prefill-gb", "1e-9",
                                 "--out", str(tmp_path)])
    (row,) = skipped["results"]
    assert row["status"] == "skipped" and "--max-prefill-gb" in row["reason"]
