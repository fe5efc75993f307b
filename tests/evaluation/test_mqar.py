"""MQAR: the generator's structure and a tiny end-to-end sweep."""

from __future__ import annotations

import json

import pytest
import torch
from eval_helpers import llama_factory

from ttt.data import IGNORE_INDEX
from ttt.evaluation.mqar import (
    MQAR_PRESETS,
    MQARConfig,
    chance_accuracy,
    generate_mqar,
    mqar_settings,
    mqar_table,
    run_mqar,
    train_mqar_model,
)


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
            assert labels[r, t] == kv[int(ids[r, t - 1])]  # query key, then its value as the label
            assert ids[r, t] == 0  # the answer is not in the input (Zoology): no ruling values out
        assert set(ids[r, answers - 1].tolist()) == set(keys.tolist())  # every key queried once
        rest = torch.ones(L, dtype=torch.bool)
        rest[: 2 * p] = False
        rest[answers - 1] = False
        assert bool((ids[r, rest] == 0).all())  # filler elsewhere
    again = generate_mqar(n, L, p, V, seed=1)
    assert torch.equal(again[0], ids) and torch.equal(again[1], labels)
    assert not torch.equal(generate_mqar(n, L, p, V, seed=2)[0], ids)
    shown, shown_labels = generate_mqar(n, L, p, V, seed=1, reveal_answers=True)
    assert torch.equal(shown_labels, labels)
    mask = labels != IGNORE_INDEX
    assert torch.equal(shown[mask], labels[mask]) and torch.equal(shown[~mask], ids[~mask])


def test_generate_mqar_rejects_impossible_settings() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        generate_mqar(1, 16, 8, 100)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_mqar(1, 64, 8, 10)


def test_settings_grid_and_chance() -> None:
    assert mqar_settings([64, 16, 32], [8, 2, 4]) == [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 2),
                                                     (64, 4), (64, 8)]
    with pytest.raises(ValueError, match="no setting"):
        mqar_settings([16], [8])
    assert chance_accuracy(64) == pytest.approx(1 / 32)
    assert chance_accuracy(129) == pytest.approx(1 / 65)  # values are ids vocab // 2 .. vocab - 1
    ids, labels = generate_mqar(200, 32, 4, 129, seed=0)
    values = labels[labels != IGNORE_INDEX]
    assert int(values.min()) >= 64 and int(values.max()) <= 128 and len(values.unique()) == 65


def test_run_mqar_tiny_writes_table_json_plot(tmp_path) -> None:
    preset = MQAR_PRESETS["smoke"]
    cfg = MQARConfig(**{**preset, "archs": ["a", "b"], "seq_lens": [16, 32], "num_kv_pairs": [2, 4, 8]})
    rows = run_mqar(cfg, tmp_path, model_factory=llama_factory, log=None)
    settings = {(16, 2), (16, 4), (32, 2), (32, 4), (32, 8)}
    assert {(r["arch"], r["seq_len"], r["num_kv_pairs"]) for r in rows} == {
        (a, s, k) for a in "ab" for s, k in settings
    }
    assert len(rows) == 10 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert all(r["chance"] == pytest.approx(1 / 32) and r["seconds"] > 0 for r in rows)
    data = json.loads((tmp_path / "mqar.json").read_text())
    assert len(data["runs"]) == 2 and data["rows"] == rows
    assert data["chance"] == pytest.approx(1 / 32) and set(data["seconds_by_arch"]) == {"a", "b"}
    assert data["total_seconds"] == pytest.approx(sum(data["seconds_by_arch"].values()))
    assert set(data["cpu_seconds_by_arch"]) == {"a", "b"} and all(r["cpu_seconds"] > 0 for r in data["runs"])
    assert data["total_cpu_seconds"] == pytest.approx(sum(data["cpu_seconds_by_arch"].values()))
    md = (tmp_path / "mqar.md").read_text()
    assert "| 32 | a |" in md and "2 kv pairs" in md and "8 kv pairs" in md
    assert "| 32 | b | " in md and "| 16 |" in md
    assert "chance" in md and "0.031" in md
    a16 = next(line for line in md.splitlines() if line.startswith("| 32 | a |") and "| 16 |" in line)
    assert a16.count(" - ") == 1  # 8 pairs do not fit in 16 tokens
    assert (tmp_path / "mqar.png").stat().st_size > 1000
    # finished runs are reused: a second call trains nothing
    calls = []
    run_mqar(cfg, tmp_path, model_factory=lambda *a: calls.append(a) or llama_factory(*a), log=None)
    assert calls == []
    assert len(mqar_table(rows).splitlines()) == 2 + 4 + 1  # header, separator, 2 archs x 2 lengths, chance


def test_run_mqar_max_seq_len_caps_an_arch(tmp_path) -> None:
    cfg = MQARConfig(**{**MQAR_PRESETS["smoke"], "archs": ["a", "b"], "max_seq_len": {"b": 16}})
    seen: list[tuple] = []
    rows = run_mqar(cfg, None, model_factory=lambda *a: seen.append(a) or llama_factory(*a), log=None)
    assert {r["seq_len"] for r in rows if r["arch"] == "a"} == {16, 32}
    assert {r["seq_len"] for r in rows if r["arch"] == "b"} == {16}
    assert [s[4] for s in seen] == [32, 16]  # each model is built for its longest length


class _Recorder(torch.nn.Module):
    """Wraps a model and records the shape of every training batch."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, input_ids: torch.Tensor, **kw):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner(input_ids=input_ids, **kw)


def test_curriculum_then_mixture_and_tokens_per_batch() -> None:
    train = {s: generate_mqar(40, s[0], s[1], 64, seed=i) for i, s in enumerate([(16, 2), (32, 4), (64, 8)])}
    model = _Recorder(llama_factory("x", 16, 1, 64, 64))
    loss, passed = train_mqar_model(model, train, 1e-3, steps=30, tokens_per_batch=256, curriculum_steps=10)
    assert passed and loss == loss and loss > 0  # finite mean of the last steps
    assert model.shapes[:10] == [(16, 16)] * 10  # the easiest setting first, 256 // 16 sequences
    rest = set(model.shapes[10:])
    assert rest <= {(16, 16), (8, 32), (4, 64)} and len(rest) == 3  # then every setting, same tokens


def test_failed_curriculum_stops_training_and_restarts(tmp_path) -> None:
    train = {s: generate_mqar(40, s[0], s[1], 64, seed=i) for i, s in enumerate([(16, 2), (32, 4)])}
    model = _Recorder(llama_factory("x", 16, 1, 64, 32))
    seen = []
    _, passed = train_mqar_model(model, train, 1e-3, 30, 256, curriculum_steps=10,
                                 gate=lambda m: seen.append(m) or False)
    assert not passed and len(model.shapes) == 10 and seen == [model]
    # run_mqar: a gate no model passes (threshold > 1) -> every restart is used, the last trains fully
    cfg = MQARConfig(**{**MQAR_PRESETS["smoke"], "archs": ["a"], "restarts": 2, "curriculum_pass": 1.1})
    built = []
    run_mqar(cfg, tmp_path, model_factory=lambda *a: built.append(a) or llama_factory(*a), log=None)
    run = json.loads((tmp_path / "mqar.json").read_text())["runs"][0]
    assert len(built) == 3 and run["attempts"] == 3 and len(run["curriculum_val_accuracy"]) == 2
    # a gate every model passes -> one attempt
    cfg = MQARConfig(**{**MQAR_PRESETS["smoke"], "archs": ["a"], "restarts": 2, "curriculum_pass": 0.0})
    run_mqar(cfg, tmp_path / "b", model_factory=llama_factory, log=None)
    run = json.loads((tmp_path / "b" / "mqar.json").read_text())["runs"][0]
    assert run["attempts"] == 1 and len(run["curriculum_val_accuracy"]) == 1


def test_cpu_preset_sweeps_pairs_and_length_for_every_arch() -> None:
    from ttt.models.registry import ARCHS

    cfg = MQARConfig(**MQAR_PRESETS["cpu"])
    assert sorted(cfg.archs) == sorted(ARCHS)
    grid = mqar_settings(cfg.seq_lens, cfg.num_kv_pairs)
    for arch in cfg.archs:
        cap = cfg.max_seq_len.get(arch, max(cfg.seq_lens))
        mine = [(s, k) for s, k in grid if s <= cap]
        lengths_at = {k: {s for s, kk in mine if kk == k} for k in cfg.num_kv_pairs}
        pairs_at = {s: {k for ss, k in mine if ss == s} for s in cfg.seq_lens if s <= cap}
        assert max(len(v) for v in lengths_at.values()) >= 3  # accuracy against length, pairs fixed
        assert max(len(v) for v in pairs_at.values()) >= 3  # accuracy against pairs, length fixed
    assert cfg.curriculum_steps < cfg.steps and grid[0] == (min(cfg.seq_lens), min(cfg.num_kv_pairs))


def test_registry_factory_heads_backbone_and_mamba2_chunk() -> None:
    from ttt.evaluation.mqar import registry_factory

    ttt = registry_factory("ttt-linear", 32, 2, 64, 64, num_heads=1, ttt_backbone="mamba")
    assert ttt.config.num_attention_heads == 1 and ttt.config.pre_conv and ttt.config.num_hidden_layers == 2
    assert not registry_factory("ttt-linear", 32, 2, 64, 64).config.pre_conv
    llama = registry_factory("transformer", 32, 2, 64, 64, num_heads=2)
    assert llama.config.num_attention_heads == llama.config.num_key_value_heads == 2
    assert registry_factory("mamba2", 32, 2, 64, 256).config.chunk_size == 32


def test_lrs_by_arch_and_resume_keep_unchanged_runs(tmp_path) -> None:
    cfg = MQARConfig(**{**MQAR_PRESETS["smoke"], "archs": ["a", "b"]})
    run_mqar(cfg, tmp_path, model_factory=llama_factory, log=None)
    built: list[tuple] = []
    cfg2 = MQARConfig(**{**MQAR_PRESETS["smoke"], "archs": ["a", "b"], "lrs_by_arch": {"b": [1e-3, 3e-3]}})
    rows = run_mqar(cfg2, tmp_path, model_factory=lambda *a: built.append(a) or llama_factory(*a), log=None)
    assert [b[0] for b in built] == ["b"]  # only b at the new lr is trained
    data = json.loads((tmp_path / "mqar.json").read_text())
    assert sorted(r["key"] for r in data["runs"]) == ["a|32|0.003", "b|32|0.001", "b|32|0.003"]
    assert {tuple(sorted(r["accuracy_by_lr"])) for r in rows if r["arch"] == "b"} == {("0.001", "0.003")}
    # a change that matters to every run (steps) retrains everything; a dropped lr drops its run
    built.clear()
    cfg3 = MQARConfig(**{**MQAR_PRESETS["smoke"], "archs": ["a", "b"], "steps": 5})
    run_mqar(cfg3, tmp_path, model_factory=lambda *a: built.append(a) or llama_factory(*a), log=None)
    assert sorted(b[0] for b in built) == ["a", "b"]
    assert len(json.loads((tmp_path / "mqar.json").read_text())["runs"]) == 2


def test_model_overrides_reach_the_model_and_only_that_arch_retrains(tmp_path) -> None:
    from ttt.evaluation.mqar import _run_config, registry_factory

    over = {"ttt-mlp": {"ttt_base_lr": 0.5, "mini_batch_size": 8}}
    mlp = registry_factory("ttt-mlp", 32, 2, 64, 64, num_heads=1, model_overrides=over)
    assert mlp.config.ttt_base_lr == 0.5 and mlp.config.mini_batch_size == 8
    assert registry_factory("ttt-linear", 32, 2, 64, 64, model_overrides=over).config.ttt_base_lr == 1.0
    base = MQARConfig(**MQAR_PRESETS["smoke"])
    changed = MQARConfig(**{**MQAR_PRESETS["smoke"], "model_overrides": over, "jobs": 2})
    assert _run_config(changed, "ttt-linear") == _run_config(base, "ttt-linear")  # reused on resume
    assert _run_config(changed, "ttt-mlp")["model_overrides"] == over["ttt-mlp"]


def test_jobs_train_in_worker_processes_like_one_process(tmp_path) -> None:
    """``jobs=2``: two spawned workers with one thread each give the runs of a one-thread serial sweep."""
    fields = {**MQAR_PRESETS["smoke"], "archs": ["ttt-linear", "transformer"], "device": "cpu"}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run_mqar(MQARConfig(**fields), tmp_path / "serial", log=None)
        torch.set_num_threads(2)
        parallel = run_mqar(MQARConfig(**fields, jobs=2), tmp_path / "jobs", log=None)
    finally:
        torch.set_num_threads(threads)
    runs = {r["key"]: r for r in json.loads((tmp_path / "jobs" / "mqar.json").read_text())["runs"]}
    assert sorted(runs) == ["transformer|32|0.003", "ttt-linear|32|0.003"]
    assert {r["threads"] for r in runs.values()} == {1}
    serial_runs = {r["key"]: r for r in json.loads((tmp_path / "serial" / "mqar.json").read_text())["runs"]}
    for key, run in runs.items():
        assert run["final_train_loss"] == serial_runs[key]["final_train_loss"]
        assert run["accuracy"] == serial_runs[key]["accuracy"]
    assert [(r["arch"], r["accuracy"]) for r in parallel] == [(r["arch"], r["accuracy"]) for r in serial]
    with pytest.raises(ValueError, match="picklable"):
        run_mqar(MQARConfig(**fields, jobs=2), None, model_factory=lambda *a: llama_factory(*a), log=None)
    with pytest.raises(ValueError, match="jobs"):
        run_mqar(MQARConfig(**fields, jobs=0), None, log=None)
