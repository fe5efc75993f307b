"""Trainer: outputs, exact resume, errors before training, every architecture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from training_utils import records, tiny_config, train_losses

from ttt.training import CheckpointError, ConfigError, Trainer
from ttt.training.checkpoint import latest_checkpoint, list_checkpoints


def test_fit_writes_metrics_checkpoints_summary(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(
        run,
        data_cache,
        "model.arch=transformer",
        "train.steps=4",
        "train.eval_every=2",
        "checkpoint.every=2",
        "checkpoint.keep=1",
        "log.tensorboard=true",
    )
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 2 * 64 and not summary["interrupted"]
    assert math.isfinite(summary["final_val_loss"]) and summary["tokens_per_s"] > 0
    assert summary["run_dir"] == str(run)
    train = records(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(train[0])
    assert [r["step"] for r in records(run, "val")] == [2, 4]
    assert (run / "metrics.csv").read_text().count("\n") == 1 + 4 + 2
    assert any((run / "tb").iterdir())
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert (run / "config.yaml").exists()
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step_00000004"]  # keep=1
    assert latest_checkpoint(run) == ckpts[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not list((run / "checkpoints").glob(".tmp*"))


@pytest.mark.parametrize("arch", ["transformer", "ttt-mlp"])
def test_resume_reproduces_losses_exactly(tmp_path: Path, data_cache: Path, arch: str) -> None:
    """6 steps straight == 3 steps, stop, resume for 3 more (bit for bit)."""
    common = (
        f"model.arch={arch}",
        "train.steps=6",
        "train.grad_accum=2",
        "train.eval_every=2",
        "optim.warmup_steps=3",
    )
    straight = tmp_path / "straight"
    Trainer(tiny_config(straight, data_cache, *common)).fit()
    split = tmp_path / "split"
    first = Trainer(tiny_config(split, data_cache, *common, "train.max_steps_this_run=3")).fit()
    assert first["interrupted"] and first["steps"] == 3
    second = Trainer(tiny_config(split, data_cache, *common), resume=True).fit()
    assert second["steps"] == 6 and not second["interrupted"]
    a, b = train_losses(straight), train_losses(split)
    assert len(a) == len(b) == 6
    assert a == b  # exact
    assert [r["lr"] for r in records(straight)] == [r["lr"] for r in records(split)]
    assert records(straight, "val") == records(split, "val")
    if arch == "ttt-mlp":  # inner LR warmed up 0.01 -> 0.1 over the 3 warmup steps
        inner = [r["ttt_base_lr"] for r in records(split)]
        assert inner[0] == pytest.approx(0.01) and inner[3:] == [pytest.approx(0.1)] * 3
        assert inner[0] < inner[1] < inner[2] < 0.1


def test_refuses_to_overwrite_and_bad_checkpoints(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    Trainer(tiny_config(run, data_cache, "model.arch=transformer", "train.steps=2")).fit()
    ckpt = latest_checkpoint(run)
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    # fresh run into a directory with checkpoints
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(tiny_config(run, data_cache, "model.arch=transformer", "train.steps=4")).fit()
    # another architecture: the saved config refuses it
    with pytest.raises(ConfigError, match="changed model.arch: 'transformer' -> 'ttt-linear'"):
        Trainer(tiny_config(run, data_cache, "model.arch=ttt-linear", "train.steps=4"), resume=True).fit()
    # other shapes
    with pytest.raises(ConfigError, match="changed model.overrides.intermediate_size"):
        Trainer(
            tiny_config(
                run,
                data_cache,
                "model.arch=transformer",
                "train.steps=4",
                "model.overrides.intermediate_size=96",
            ),
            resume=True,
        ).fit()
    # other batch geometry
    with pytest.raises(CheckpointError, match="global batch"):
        Trainer(
            tiny_config(
                run, data_cache, "model.arch=transformer", "train.steps=4", "train.micro_batch_size=3"
            ),
            resume=True,
        ).fit()
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    # corrupt weights: clear error, file left as it is
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        Trainer(tiny_config(run, data_cache, "model.arch=transformer", "train.steps=4"), resume=True).fit()
    assert weights.read_bytes() == b"garbage" * 10
    weights.write_bytes(good)
    (ckpt / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.safetensors"):
        Trainer(tiny_config(run, data_cache, "model.arch=transformer", "train.steps=4"), resume=True).fit()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Trainer(tiny_config(tmp_path / "empty", data_cache, "train.steps=4"), resume=True).fit()


def test_seq_len_beyond_model_limit(tmp_path: Path, data_cache: Path) -> None:
    cfg = tiny_config(
        tmp_path / "r",
        data_cache,
        "model.arch=transformer",
        "train.steps=1",
        "model.overrides.max_position_embeddings=32",
    )
    with pytest.raises(ConfigError, match="exceeds what transformer supports"):
        Trainer(cfg).fit()
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_tokenizer_larger_than_model_vocab(tmp_path: Path, data_cache: Path) -> None:
    cfg = tiny_config(tmp_path / "r", data_cache, "train.steps=1", "model.overrides.vocab_size=100")
    with pytest.raises(ConfigError, match="the model's vocabulary must be at least the tokenizer's"):
        Trainer(cfg).fit()


@pytest.mark.parametrize("arch", ["ttt-linear", "mamba", "mamba2"])
def test_every_arch_trains(tmp_path: Path, data_cache: Path, arch: str) -> None:
    summary = Trainer(tiny_config(tmp_path / arch, data_cache, f"model.arch={arch}", "train.steps=2")).fit()
    assert summary["steps"] == 2 and math.isfinite(summary["final_val_loss"])


@pytest.mark.parametrize("arch", ["transformer", "mamba", "ttt-linear"])
def test_gradient_checkpointing(tmp_path: Path, data_cache: Path, arch: str) -> None:
    cfg = tiny_config(
        tmp_path / arch,
        data_cache,
        f"model.arch={arch}",
        "train.steps=2",
        "model.gradient_checkpointing=true",
    )
    assert math.isfinite(Trainer(cfg).fit()["final_train_loss"])


@pytest.mark.parametrize(
    "arch",
    [
        "transformer",
        "mamba2",
        "ttt-linear",
        "ttt-mlp",
    ],
)
def test_bf16_autocast(tmp_path: Path, data_cache: Path, arch: str) -> None:
    cfg = tiny_config(tmp_path / arch, data_cache, f"model.arch={arch}", "train.steps=2", "train.bf16=true")
    assert math.isfinite(Trainer(cfg).fit()["final_train_loss"])


def test_weight_decay_groups() -> None:
    from ttt.models.registry import build_model
    from ttt.training.trainer import param_groups

    model = build_model("mamba", "tiny", 256, 64)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all("A_log" not in n and "embed" not in n and not n.endswith(".D") for n in decayed)
    assert any("in_proj" in n for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])


def test_packed_documents_do_not_attend_across(tmp_path: Path) -> None:
    """Llama with restarting position_ids (no mask, no cache): a document's logits ignore the previous one."""
    from ttt.models.registry import build_model

    model = build_model("transformer", "tiny", 256, 64).eval()
    a, b = torch.randint(0, 256, (1, 10)), torch.randint(0, 256, (1, 6))
    other = torch.randint(0, 256, (1, 10))
    pos = torch.cat([torch.arange(10), torch.arange(6)])[None]
    with torch.no_grad():
        la = model(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits[:, 10:]
        lb = model(input_ids=torch.cat([other, b], 1), position_ids=pos, use_cache=False).logits[:, 10:]
        alone = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(la, alone, atol=1e-5, rtol=1e-5)


def test_bad_corpus_errors_before_training(tmp_path: Path, data_cache: Path) -> None:
    from ttt.data import DataError

    run = tmp_path / "r"
    with pytest.raises(DataError, match="nowhere"):
        Trainer(
            tiny_config(run, data_cache, f"data.source={tmp_path / 'nowhere.txt'}", "train.steps=1")
        ).fit()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError):
        Trainer(tiny_config(run, data_cache, f"data.source={empty}", "train.steps=1")).fit()
    small = tmp_path / "small.txt"
    small.write_text("just a few words\n" * 4)
    with pytest.raises(DataError):
        Trainer(
            tiny_config(run, data_cache, f"data.source={small}", "data.val_fraction=0.0", "train.steps=1")
        ).fit()
    assert not run.exists()
    with pytest.raises(ConfigError, match="valid keys of 'data'"):
        tiny_config(run, data_cache, "data.corpus=x")


def test_check_compatible_names_arch_and_shape_differences(tmp_path: Path) -> None:
    """The last guard on resume: the checkpoint's recorded arch and parameter shapes must fit the model."""
    from ttt.training.checkpoint import check_compatible

    meta = {"arch": "transformer", "size": "tiny", "param_shapes": {"w": [4, 8], "b": [8]}}
    check_compatible(tmp_path, meta, "transformer", {"w": (4, 8), "b": (8,)})
    with pytest.raises(CheckpointError, match="is for arch 'transformer'"):
        check_compatible(tmp_path, meta, "mamba", {"w": (4, 8), "b": (8,)})
    with pytest.raises(CheckpointError, match=r"missing c; w: checkpoint \(4, 8\) vs model \(4, 9\)"):
        check_compatible(tmp_path, meta, "transformer", {"w": (4, 9), "b": (8,), "c": (1,)})
