"""Smoke test of the row-ops benchmark: it runs, writes its JSON + table, and reports every op."""

from __future__ import annotations

import json


def test_rowops_speed_smoke(tmp_path) -> None:
    from ttt.benchmarks import rowops_speed

    rows = rowops_speed.main(["--lengths", "32", "--width", "24", "--ffn", "40", "--rounds", "1",
                              "--out", str(tmp_path)])
    assert {(r["op"], r["mode"]) for r in rows} == {
        (op, mode) for op in ("rms_norm", "post_norm_gate", "swiglu") for mode in ("fwd", "fwd+bwd")}
    assert all(r["reference_ms"] > 0 and r["compiled_ms"] > 0 for r in rows)
    payload = json.loads((tmp_path / "rowops_speed.json").read_text())
    assert payload["command"].startswith("python -m ttt.benchmarks.rowops_speed --lengths 32")
    assert "| swiglu | fwd+bwd | 32 | 40 |" in (tmp_path / "rowops_speed.md").read_text()
