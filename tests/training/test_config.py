"""Config loading: shipped configs, dotted overrides, clear errors."""

from __future__ import annotations

import pytest

from ttt.training import ConfigError, list_configs, load_config
from ttt.training.schedule import inner_lr_warmup, resolve_warmup, warmup_cosine


def test_shipped_configs_load() -> None:
    names = list_configs()
    for name in ("tiny", "mini", "small", "125m", "350m", "760m", "1.3b"):
        assert name in names
    peak = {"125m": 3e-3, "350m": 1.5e-3, "760m": 1.25e-3, "1.3b": 1e-3}
    for name, lr in peak.items():
        cfg = load_config(name)
        assert cfg.model.size == name
        assert cfg.optim.lr == pytest.approx(lr)
        assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
        assert cfg.optim.min_lr == pytest.approx(1e-5)
        assert cfg.train.global_batch_size * cfg.data.seq_len == 256 * 2048  # 0.5M tokens per step
        assert cfg.train.tokens > 0 and cfg.train.bf16


def test_overrides_and_types(tmp_path) -> None:
    cfg = load_config(
        "tiny",
        [
            "model.arch=ttt-mlp",
            "optim.lr=1e-3",
            "train.steps=7",
            "optim.betas=[0.8,0.9]",
            "model.overrides.mini_batch_size=8",
            "train.bf16=true",
        ],
    )
    assert (cfg.model.arch, cfg.optim.lr, cfg.train.steps) == ("ttt-mlp", 1e-3, 7)
    assert cfg.optim.betas == [0.8, 0.9] and cfg.model.overrides == {"mini_batch_size": 8} and cfg.train.bf16
    assert load_config("tiny", {"train.steps": 3}).train.steps == 3
    # a user file extending a shipped one
    f = tmp_path / "mine.yaml"
    f.write_text("extends: tiny\noptim:\n  lr: 0.002\n")
    cfg = load_config(f, ["train.steps=5"])
    assert cfg.optim.lr == 0.002 and cfg.model.size == "tiny" and cfg.train.steps == 5
    assert load_config(None, ["train.steps=2"]).train.steps == 2  # defaults
    # to_dict round trip
    from ttt.training.config import config_from_dict

    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lrr=1", "valid keys of 'optim'"),
        ("model.arch=gpt2", "choose from ['ttt-linear'"),
        ("model.size=huge", "choose from"),
        ("optim.lr=fast", "optim.lr: Value 'fast'"),
        ("trainer.steps=1", "unknown key 'trainer'"),
        ("model.overrides.not_a_field=1", "valid keys"),
        ("train.steps=0", "train.steps must be >= 1"),
        ("dist.strategy=deepspeed", "choose from ['ddp', 'fsdp']"),
        ("train.bf16=maybe", "train.bf16: Value 'maybe' is not a valid bool"),
        ("steps=3", "unknown key 'steps'"),
        ("steps", "must look like section.key=value"),
        ("data.bogus=1", "valid keys of 'data': ['source'"),
        ("train.tokens=1000", "exactly one of train.tokens and train.steps"),
    ],
)
def test_bad_config_values(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config("tiny", [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_resume_changes_allows_budget_refuses_recipe() -> None:
    from ttt.training.config import resume_changes

    saved = load_config("tiny", ["train.steps=10"])
    notes = resume_changes(saved, load_config("tiny", ["train.steps=20", "log.progress=false"]))
    assert len(notes) == 2 and any("train.steps: 10 -> 20" in n and "LR schedule" in n for n in notes)
    assert resume_changes(saved, saved) == []
    with pytest.raises(ConfigError, match="cannot resume with a changed optim.lr"):
        resume_changes(saved, load_config("tiny", ["train.steps=10", "optim.lr=1e-4"]))


def test_printed_config_loads_back_unchanged(tmp_path) -> None:
    from ttt.training.config import print_config

    overrides = ["model.arch=mamba2", "data.source=/tmp/corpus.jsonl", "model.overrides.expand=4"]
    cfg = load_config("125m", overrides)
    saved = tmp_path / "config.yaml"
    saved.write_text(print_config(cfg))
    assert load_config(saved) == cfg and "extends" not in saved.read_text()


def test_unknown_config_name() -> None:
    with pytest.raises(ConfigError, match="shipped config"):
        load_config("no-such-config")


def test_schedules() -> None:
    total, warm, peak, low = 100, 10, 3e-3, 1e-5
    lrs = [warmup_cosine(s, total, warm, peak, low) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert lrs[warm] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))
    assert lrs[-1] == pytest.approx(low, rel=0.01) or lrs[-1] < 2e-5
    assert warmup_cosine(total, total, warm, peak, low) == pytest.approx(low)
    assert inner_lr_warmup(0, 10, 0.01, 0.1) == pytest.approx(0.01)
    assert inner_lr_warmup(5, 10, 0.01, 0.1) == pytest.approx(0.055)
    assert inner_lr_warmup(10, 10, 0.01, 0.1) == pytest.approx(0.1)
    assert resolve_warmup(100, None, 0.1) == 10 and resolve_warmup(5, 50, 0.1) == 5
