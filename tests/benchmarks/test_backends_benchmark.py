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
    assert "cpu_model" in saved["machine"]
    assert saved["command"].startswith("python -m ttt.benchmarks.backends --backends torch")
    text = (tmp_path / "backends.md").read_text()
    assert "TTT-Linear layer forward [torch] at 32:" in text and "its best call" in text
    assert "median of the per-round ratios" in text
    assert f"{saved['machine']['torch_threads']} torch threads)" in text
    if saved["machine"]["cpu_model"]:  # which CPU measured it
        assert saved["machine"]["cpu_model"] in text


def test_cpu_model_names_the_first_processor(tmp_path) -> None:
    from ttt.benchmarks.common import cpu_model

    info = tmp_path / "cpuinfo"
    block = ("processor\t: {i}\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
             "model name\t: AMD EPYC\n")
    info.write_text(block.format(i=0) + "\n" + block.format(i=1).replace("EPYC", "other"))
    assert cpu_model(info) == "AMD EPYC (cpu family 26, model 2)"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")  # no model name
    assert cpu_model(info) is None
    assert cpu_model(tmp_path / "missing") is None
