"""The trainer reads a prepared directory: same losses as the implicit preparation, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

from ttt.data import PrepareConfig, prepare_corpus

TINY = ["model.size=tiny", "model.arch=transformer", "data.seq_len=64", "data.val_rows=4",
        "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every=0", "checkpoint.every=0",
        "log.progress=false", "log.tensorboard=false", "train.steps=4", "optim.warmup_steps=2"]


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("split") == "train"]


def test_trainer_on_prepared_shards_matches_implicit_and_resumes(tmp_path: Path) -> None:
    from ttt.training import Trainer, load_config

    prepared = tmp_path / "prepared"
    manifest = prepare_corpus(PrepareConfig(workers=2, shard_mb=0.5), prepared)  # Shakespeare, 10 shards
    assert len(manifest["splits"]["train"]["shards"]) >= 8

    def cfg(run: str, *extra: str):
        return load_config("tiny", [*TINY, f"train.run_dir={tmp_path / run}",
                                    f"data.cache_dir={tmp_path / 'cache'}", *extra])

    Trainer(cfg("implicit")).fit()  # built-in corpus, prepared implicitly into the cache (one shard)
    first = Trainer(cfg("shards", f"data.source={prepared}", "train.max_steps_this_run=2")).fit()
    assert first["interrupted"] and first["steps"] == 2
    Trainer(cfg("shards", f"data.source={prepared}"), resume=True).fit()
    assert _losses(tmp_path / "implicit") == _losses(tmp_path / "shards")  # exact
    assert len(_losses(tmp_path / "shards")) == 4
