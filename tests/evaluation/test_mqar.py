"""MQAR: the generator's structure and a tiny end-to-end sweep."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import llama_factory

from ttt.data import IGNORE_INDEX
from ttt.evaluation.mqar import MQAR_PRESETS, MQARConfig, generate_mqar, mqar_table, run_mqar


def test_generate_mqar_structure() -> None:
    n, L, p, V = 8, 64, 6, 100
    ids, labels = generate_mqar(n, L, p, V, seed=1)
    assert ids.shape == labels.shape == (n, L) and ids.dtype == torch.long
    for r in range(n):
        keys, vals = ids[r, 0 : 2 * p : 2], ids[r, 1 : 2 * p : 2]
        assert bool((keys >= 1).all() and (keys < V // 2).all()) and len(set(keys.tolist())) == p
        assert bool((vals >= V // 2).all() and (vals < V).all())
        answers = (labels[r] != IGNORE_INDEX).nonzero().flatten()
        assert len(answers) == p and bool((answers >= 2 * p + 1).all())
        kv = dict(zip(keys.tolist(), vals.tolist()))
        for t in answers.tolist():
            assert ids[r, t] == labels[r, t] == kv[int(ids[r, t - 1])]  # query key then its value
        assert set(ids[r, answers - 1].tolist()) == set(keys.tolist())  # every key queried once
        rest = torch.ones(L, dtype=torch.bool)
        rest[: 2 * p] = False
        rest[answers] = False
        rest[answers - 1] = False
        assert bool((ids[r, rest] == 0).all())  # filler elsewhere
    again = generate_mqar(n, L, p, V, seed=1)
    assert torch.equal(again[0], ids) and torch.equal(again[1], labels)
    assert not torch.equal(generate_mqar(n, L, p, V, seed=2)[0], ids)


def test_generate_mqar_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        generate_mqar(1, 16, 8, 100)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_mqar(1, 64, 8, 10)


def test_run_mqar_tiny_writes_table_json_plot(tmp_path) -> None:
    preset = MQAR_PRESETS["smoke"]
    cfg = MQARConfig(**{**preset, "archs": ["a", "b"], "seq_lens": [16, 32], "num_kv_pairs": 2})
    rows = run_mqar(cfg, tmp_path, model_factory=llama_factory, log=None)
    assert len(rows) == 4 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    data = json.loads((tmp_path / "mqar.json").read_text())
    assert len(data["runs"]) == 4 and data["rows"] == rows
    md = (tmp_path / "mqar.md").read_text()
    assert "| 32 | a |" in md and "L=16" in md and "L=32" in md
    assert (tmp_path / "mqar.png").stat().st_size > 1000
    # finished runs are reused: a second call trains nothing
    calls = []
    run_mqar(cfg, tmp_path, model_factory=lambda *a: calls.append(a) or llama_factory(*a), log=None)
    assert calls == []
    assert mqar_table(rows).count("\n") == 3
