"""The comparison study's pipeline (resume, report, table) with a fake backend of tiny Llama models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ttt.data import DataBundle, TokenStore
from ttt.models.registry import ARCHS
from ttt.study import StudyConfig, StudyError, TrainOutcome, run_study, study_config
from ttt.study.config import STUDY_PRESETS
from ttt.study.run import trainer_overrides
from ttt.training import load_config


class ByteTok:
    """Minimal tokenizer: token id = byte value (vocab 32 keeps ids in range)."""

    pad_token_id = 0
    eos_token_id = None
    bos_token_id = None

    def __len__(self) -> int:
        return 32

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False) -> dict:
        return {"input_ids": torch.tensor([[b % 32 for b in text.encode()]])}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def store(n: int, length: int, seed: int) -> TokenStore:
    """``n`` random documents of ``length`` tokens, one byte each."""
    tokens = np.random.default_rng(seed).integers(0, 32, n * length).astype(np.uint32)
    return TokenStore(tokens, np.arange(n + 1) * length, doc_bytes=np.full(n, length))


class FakeBackend:
    def __init__(self) -> None:
        self.trained: list[str] = []

    def prepare(self, cfg: StudyConfig, out_dir: Path) -> DataBundle:
        return DataBundle(ByteTok(), store(4, 200, 0), store(2, 200, 1))

    def train(self, arch, cfg, run_dir, data, log) -> TrainOutcome:
        self.trained.append(arch)
        run_dir.mkdir(parents=True, exist_ok=True)
        return TrainOutcome(tiny_llama(), [(100, 3.5), (200, 3.4)], 200, 1234.0, 0.1)

    def load(self, arch: str, run_dir: Path) -> torch.nn.Module:
        return tiny_llama()


def _cfg(*overrides: str) -> StudyConfig:
    base = ["archs=[ttt-linear,transformer]", "sample_tokens=5", "device=cpu"]
    return study_config("smoke", [*base, *overrides])


def test_study_writes_report_and_resumes(tmp_path) -> None:
    be = FakeBackend()
    rep = run_study(_cfg(), tmp_path, backend=be, log=None)
    assert be.trained == ["ttt-linear", "transformer"]
    md = (tmp_path / "report.md").read_text()
    for label in ("TTT-Linear", "Transformer", "Unigram"):
        assert f"| {label}" in md
    data = json.loads((tmp_path / "results.json").read_text())
    for arch in ("ttt-linear", "transformer"):
        r = data["runs"][arch]
        for key in ("loss", "bits_per_byte", "first_quarter_loss", "last_quarter_loss"):
            assert math.isfinite(r["eval"][key])
        assert r["eval"]["bits_per_byte"] == pytest.approx(r["eval"]["loss"] / math.log(2))  # 1 byte/token
        assert r["params"] > 0 and r["tokens"] == 200 and r["latency"]["prefill_ms"] > 0
        assert r["latency"]["decode_ms_per_token"] is not None
    assert math.isfinite(data["unigram"]["bits_per_byte"])
    for key in ("val_loss_plot", "loss_by_position_plot"):
        assert rep.paths[key].stat().st_size > 1000
    assert (tmp_path / "samples.md").read_text().count("```") == 4  # one block per architecture
    # resume: finished runs are reused (the sample model is loaded), a new arch is trained,
    # changed settings retrain
    be2 = FakeBackend()
    run_study(_cfg("archs=[ttt-linear,transformer,mamba]"), tmp_path, backend=be2, log=None)
    assert be2.trained == ["mamba"]
    be3 = FakeBackend()
    run_study(_cfg("lr=1e-4"), tmp_path, backend=be3, log=None)
    assert be3.trained == ["ttt-linear", "transformer"]


def test_resumable_training_keys_do_not_change_the_fingerprint() -> None:
    base = _cfg().fingerprint("mamba")
    assert _cfg("train_overrides.train.max_steps_this_run=1").fingerprint("mamba") == base
    assert _cfg("train_overrides.optim.eps=1e-6").fingerprint("mamba") != base


def test_study_config_overrides_and_errors() -> None:
    overrides = ["train_tokens=2_000", "model_overrides.hidden_size=32", "archs=[ttt-mlp,mamba]"]
    cfg = study_config("smoke", overrides)
    assert cfg.train_tokens == 2000 and cfg.model_overrides["hidden_size"] == 32
    assert cfg.archs == ["ttt-mlp", "mamba"]
    assert study_config("smoke").archs == list(ARCHS)
    with pytest.raises(StudyError, match="unknown architecture"):
        study_config("smoke", ["archs=[ttt-linear,lstm]"])
    with pytest.raises(StudyError, match="unknown key 'bogus'"):
        study_config("smoke", {"bogus": 1})
    with pytest.raises(StudyError, match="train_tokens: Value 'many'"):
        study_config("smoke", ["train_tokens=many"])
    with pytest.raises(StudyError, match="unknown preset"):
        study_config("nope")
    with pytest.raises(StudyError, match="backbone must be one of"):
        study_config("smoke", ["backbone=rnn"])


@pytest.mark.parametrize("preset", sorted(STUDY_PRESETS))
def test_every_preset_builds_a_valid_training_config(preset: str, tmp_path) -> None:
    cfg = study_config(preset)
    tcfg = load_config(None, trainer_overrides(cfg.archs[0], cfg, tmp_path / "run", tmp_path / "data"))
    steps = math.ceil(cfg.train_tokens / (cfg.batch_size * cfg.seq_len))
    assert tcfg.train.steps == steps and tcfg.data.seq_len == cfg.seq_len
    assert tcfg.model.backbone == cfg.backbone == "mamba"  # the paper's main TTT setting
    assert 0 <= tcfg.optim.warmup_steps < steps


def test_preset_recipes() -> None:
    """`full` = the demo's recipe with all five architectures and 1.5x the tokens; with the demo's
    token budget it has the demo's fingerprints, so the demo's runs are reused."""
    demo, full = study_config("demo"), study_config("full")
    assert set(demo.archs) < set(full.archs) == set(ARCHS)
    assert full.train_tokens == 3 * demo.train_tokens // 2 and full.warmup_tokens == demo.warmup_tokens
    at_demo_budget = study_config("full", [f"train_tokens={demo.train_tokens}"])
    for arch in demo.archs:
        assert demo.fingerprint(arch) == at_demo_budget.fingerprint(arch) != full.fingerprint(arch)
    assert demo.seq_len >= 1024
    assert study_config("gpu").size == study_config("gpu-8k").size == "125m"
    assert (study_config("gpu").seq_len, study_config("gpu-8k").seq_len) == (2048, 8192)


def test_study_context_longer_than_documents(tmp_path) -> None:
    with pytest.raises(StudyError, match="longer than every evaluation document"):
        run_study(_cfg("seq_len=500"), tmp_path, backend=FakeBackend(), log=None)
