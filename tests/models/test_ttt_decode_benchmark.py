"""Smoke run of the decode-speed benchmark (tiny sizes).

The real run is ``python -m ttt.benchmarks.decode_speed``.
"""

from __future__ import annotations

import json

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
