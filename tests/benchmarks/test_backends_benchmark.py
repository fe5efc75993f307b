"""Smoke test of the scan-backends benchmark: one tiny round of the layer and model-forward workloads
writes its JSON and table, with ratios to the baselines and the TTT-Linear forward's FLOP-rate figures."""

from __future__ import annotations

import json


def test_backends_benchmark_smoke(tmp_path) -> None:
    from ttt.benchmarks import backends

    payload = backends.main(["--backends", "torch", "--lengths", "32", "--rounds", "1", "--model-size",
                             "tiny", "--workloads", "layer", "forward", "--out", str(tmp_path)])
    models = {(r["workload"], r["model"], r["mode"]) for r in payload["results"]}
    assert ("layer", "attention", "fwd") in models and ("layer", "ttt-linear[torch]", "fwd+bwd") in models
    assert ("model forward", "transformer", "prefill") in models
    assert all(r["ratio"] is not None for r in payload["results"])
    (frac,) = payload["linear_forward_fraction_of_peak"]
    assert frac["best_gflops"] >= frac["gflops"] > 0
    assert 0 < frac["fraction"] <= frac["fraction_best"]
    assert frac["fraction_in_rounds"] > 0 and frac["fraction_paired"] > 0
    lin = next(r for r in payload["results"] if r["model"] == "ttt-linear[torch]" and r["mode"] == "fwd")
    assert len(lin["times_s"]) == lin["runs"] == 1 and lin["median_s"] == lin["times_s"][0]
    saved = json.loads((tmp_path / "backends.json").read_text())
    assert saved["command"].startswith("python -m ttt.benchmarks.backends --backends torch")
    text = (tmp_path / "backends.md").read_text()
    assert "TTT-Linear layer forward [torch] at 32:" in text and "its best call" in text
    assert "median of the per-round ratios" in text
