"""The comparison study's pipeline (resume, report, table) with a fake backend of tiny Llama models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from eval_helpers import synthetic_docs, tiny_llama

from ttt.evaluation.compare import (
    ALL_ARCHS,
    StudyConfig,
    StudyData,
    StudyError,
    TrainOutcome,
    UnknownArch,
    run_study,
)


class ByteTok:
    """Minimal tokenizer: token id = byte value (vocab 32 keeps ids in range)."""

    pad_token_id = 0
    eos_token_id = None
    bos_token_id = None

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False) -> dict:
        return {"input_ids": torch.tensor([[b % 32 for b in text.encode()]])}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class FakeBackend:
    def __init__(self) -> None:
        self.trained: list[str] = []

    def prepare(self, cfg: StudyConfig, out_dir: Path) -> StudyData:
        return StudyData(
            ByteTok(), synthetic_docs(4, 200), synthetic_docs(2, 200, seed=1), 32, {"bytes_per_token": 1.0}
        )

    def train(self, arch, cfg, run_dir, data, log) -> TrainOutcome:
        self.trained.append(arch)
        run_dir.mkdir(parents=True, exist_ok=True)
        return TrainOutcome(tiny_llama(), [(100, 3.5), (200, 3.4)], 200, 1234.0, 0.1)


def _cfg(**kw) -> StudyConfig:
    base = StudyConfig.from_preset("tiny", {"archs": ["ttt-linear", "transformer"], "sample_tokens": 5})
    for k, v in kw.items():
        setattr(base, k, v)
    return base


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
        assert r["params"] > 0 and r["tokens"] == 200 and r["latency"]["prefill_ms"] > 0
        assert r["latency"]["decode_ms_per_token"] is not None
    assert math.isfinite(data["unigram"]["bits_per_byte"])
    for key in ("val_loss_plot", "loss_by_position_plot"):
        assert rep.paths[key].stat().st_size > 1000
    assert (tmp_path / "sample.txt").exists()
    # resume: finished runs are reused, a new arch is trained, changed settings retrain
    be2 = FakeBackend()
    run_study(_cfg(archs=["ttt-linear", "transformer", "mamba"]), tmp_path, backend=be2, log=None)
    assert be2.trained == ["mamba"]
    be3 = FakeBackend()
    run_study(_cfg(lr=1e-4), tmp_path, backend=be3, log=None)
    assert be3.trained == ["ttt-linear", "transformer"]


def test_study_config_overrides_and_errors() -> None:
    cfg = StudyConfig.from_preset(
        "tiny", {"train_tokens": "2e3", "model_overrides.hidden_size": 32, "archs": "ttt-mlp,mamba"}
    )
    assert (
        cfg.train_tokens == 2000
        and cfg.model_overrides["hidden_size"] == 32
        and cfg.archs == ["ttt-mlp", "mamba"]
    )
    assert StudyConfig.from_preset("tiny").archs == list(ALL_ARCHS)
    with pytest.raises(UnknownArch, match="unknown architecture"):
        StudyConfig.from_preset("tiny", {"archs": ["ttt-linear", "lstm"]})
    with pytest.raises(StudyError, match="unknown study setting"):
        StudyConfig.from_preset("tiny", {"bogus": 1})
    with pytest.raises(StudyError, match="unknown preset"):
        StudyConfig.from_preset("nope")


def test_study_context_longer_than_documents(tmp_path) -> None:
    with pytest.raises(StudyError, match="longer than every evaluation document"):
        run_study(_cfg(seq_len=500), tmp_path, backend=FakeBackend(), log=None)
