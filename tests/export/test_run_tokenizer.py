"""A run directory holds the tokenizer it trains with; resuming with another one is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from export_helpers import corpus_documents

from ttt.data.tokenizer import byte_tokenizer, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from ttt.training import Trainer, load_config
from ttt.training.config import ConfigError


def _trainer(run: Path, tok, resume: Path | None) -> Trainer:
    trainer = Trainer(load_config("tiny", [f"train.run_dir={run}"]))
    trainer.run_dir, trainer.data, trainer.resume_path = run, SimpleNamespace(tokenizer=tok), resume
    return trainer


def test_run_keeps_its_tokenizer(tmp_path) -> None:
    run = tmp_path / "run"
    bpe = train_bpe_tokenizer(corpus_documents(20), 300)
    _trainer(run, bpe, None)._keep_run_tokenizer(write=False)  # the check before any write
    assert not run.exists()
    _trainer(run, bpe, None)._keep_run_tokenizer()
    saved = load_tokenizer(run / "tokenizer")
    assert tokenizer_fingerprint(saved) == tokenizer_fingerprint(bpe)
    assert saved("ROMEO: what light").input_ids == bpe("ROMEO: what light").input_ids
    # resuming with the same tokenizer is fine; another one (e.g. retrained on an edited corpus) is not
    _trainer(run, bpe, run / "checkpoints" / "step_00000001")._keep_run_tokenizer()
    other = train_bpe_tokenizer(corpus_documents(20, chars=700), 300)
    with pytest.raises(ConfigError, match="differs from the one this run was trained with"):
        _trainer(run, other, run / "checkpoints" / "step_00000001")._keep_run_tokenizer(write=False)
    # a fresh run in the same directory replaces it
    _trainer(run, byte_tokenizer(), None)._keep_run_tokenizer()
    assert len(load_tokenizer(run / "tokenizer")) == 257
    assert not list(run.glob(".tokenizer.*"))  # written under a temporary name, then renamed
