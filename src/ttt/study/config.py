"""Settings of the comparison study (:class:`StudyConfig`) and its named presets.

A study is built from a preset (:data:`STUDY_PRESETS`, partial dicts of the fields) and dotted
``key=value`` overrides, with the same OmegaConf machinery as the training config
(:mod:`ttt.util.config`): ``train_tokens=2_000_000``, ``archs=[ttt-linear,mamba]``,
``model_overrides.hidden_size=32``, ``train_overrides.train.bf16=true``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ttt.models.registry import ARCHS
from ttt.training.config import CHOICES, RESUMABLE
from ttt.util.config import ConfigError, build, flatten, override_node


class StudyError(RuntimeError):
    """A study that cannot run as configured (a one-line message for the command line)."""


@dataclass
class StudyConfig:
    """Every setting of a study.

    Attributes:
        archs: architectures to train, in report order.
        size: model size; baselines are matched to TTT-Linear of this size.
        backbone: the TTT models' backbone, ``mamba`` (the paper's main setting: a causal conv before
            the TTT layer, and an output gate) or ``transformer``; the baselines are matched to TTT-Linear
            with this backbone.
        model_overrides: config fields for every architecture.
        data: corpus source for :mod:`ttt.data` (None: the built-in Shakespeare).
        train_tokens: training tokens per architecture.
        num_evals: validation points on the loss-vs-tokens curve.
        curve_eval_windows: validation rows per point of that curve.
        eval_windows: windows of the final evaluation (loss by position).
        decode_prompt / decode_tokens: decode speed is timed generating ``decode_tokens`` after a prompt
            of ``decode_prompt`` tokens (prefill speed: one full-context sequence).
        latency_rounds: rounds of the side-by-side prefill / decode timing (median over rounds).
        sample_prompt / sample_tokens: every model writes a sample of ``sample_tokens`` after this prompt.
        train_overrides: dotted training-config overrides for every run (e.g. ``train.bf16``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    size: str = "mini"
    backbone: str = "mamba"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    tokenizer: str = "byte"
    seq_len: int = 2048
    train_tokens: int = 2_000_000
    batch_size: int = 4
    lr: float = 3e-3
    warmup_tokens: int = 100_000
    weight_decay: float = 0.1
    num_evals: int = 8
    curve_eval_windows: int = 8
    eval_windows: int = 64
    buckets: int = 32
    decode_prompt: int = 128
    decode_tokens: int = 32
    latency_rounds: int = 3
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 300
    seed: int = 0
    train_overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"

    def training_overrides(self) -> dict[str, Any]:
        """:attr:`train_overrides` as flat dotted keys."""
        return flatten(self.train_overrides)

    def fingerprint(self, arch: str) -> str:
        """Hash of every setting that changes the run of ``arch`` (not the list of archs, sampling, the
        device, or training keys a run may change on resume)."""
        d = asdict(self)
        for k in ("archs", "sample_prompt", "sample_tokens", "decode_prompt", "decode_tokens",
                  "latency_rounds", "device"):
            d.pop(k)
        def resumable(key: str) -> bool:
            return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)

        d["train_overrides"] = {k: v for k, v in self.training_overrides().items() if not resumable(k)}
        d["arch"] = arch
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


_DEMO: dict[str, Any] = dict(
    archs=["ttt-linear", "ttt-mlp", "transformer"],
    size="mini",
    seq_len=1024,
    train_tokens=1_024_000,  # 500 steps of 2 x 1024 bytes
    batch_size=2,
    lr=3e-3,
    warmup_tokens=40_960,  # 20 steps
    num_evals=8,
    curve_eval_windows=8,
    eval_windows=128,  # loss by position: 128 windows of 1024 bytes inside the held-out plays
    buckets=20,
    decode_prompt=128,
    decode_tokens=32,
    sample_tokens=200,
)

_GPU: dict[str, Any] = dict(
    archs=list(ARCHS),
    size="125m",
    seq_len=2048,
    train_tokens=12_288_000,  # 1,500 steps of 4 x 2048
    batch_size=4,
    lr=3e-3,
    warmup_tokens=1_228_800,  # 150 steps
    num_evals=10,
    curve_eval_windows=32,
    eval_windows=128,
    buckets=24,
    decode_prompt=512,
    decode_tokens=64,
    sample_tokens=300,
    train_overrides={"train": {"bf16": True}, "model": {"gradient_checkpointing": True}},
    device="cuda",
)

STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: a fresh 2-core CPU, ~15 minutes in total (set-up included), byte-level Shakespeare,
    # TTT-Linear, TTT-MLP and a Transformer. Many small steps learn far more per second than few large
    # ones: 500 AdamW steps of 2 x 1024 bytes take TTT-Linear below 2.0 nats/byte, where 96 steps of
    # 4 x 2048 stopped at 2.42.
    "demo": _DEMO,
    # all five architectures with the demo's recipe at 1.5x its tokens (750 steps of 2 x 1024 bytes): the
    # budget that fits about two hours on this 2-core CPU. The Mamba baselines' pure-PyTorch scans are
    # the bottleneck (~660 (Mamba) and ~1,700 (Mamba-2) training tokens/s on 2 threads, against
    # ~17,000 for TTT-Linear): ~1 h of training alone on the machine, ~2 h as 1-thread processes in
    # the background (see docs/results.md). `-s train_tokens=1024000` gives the demo's runs (reused).
    "full": {**_DEMO, "archs": list(ARCHS), "train_tokens": 1_536_000},
    # the paper's 125m scale on one GPU: all five architectures at context 2048 (`gpu-8k`: 8192), bf16
    # autocast, gradient checkpointing (HF Mamba's PyTorch scan holds [batch, length, 1536, 16] fp32
    # tensors per layer). On the built-in Shakespeare (4.7M training bytes) 12.3M tokens are ~2.6
    # epochs, so the models start to overfit; for the paper's budget give it a prepared corpus:
    # `-s data=data/pile -s tokenizer=data/pile -s train_tokens=2_500_000_000`.
    # Expected time on one H100 / H200: ~45-60 min each (an estimate, see docs/results.md).
    "gpu": _GPU,
    "gpu-8k": {
        **_GPU,
        "seq_len": 8192,
        "batch_size": 1,  # 1,500 steps of 1 x 8192
        "curve_eval_windows": 16,
        "eval_windows": 32,  # the held-out plays hold 37 windows of 8192 bytes
        "buckets": 28,
    },
    # the test suite: seconds
    "smoke": dict(
        archs=list(ARCHS),
        size="tiny",
        seq_len=64,
        train_tokens=4 * 64 * 4,
        batch_size=4,
        lr=3e-3,
        warmup_tokens=256,
        num_evals=2,
        curve_eval_windows=2,
        eval_windows=4,
        buckets=4,
        decode_prompt=8,
        decode_tokens=4,
        latency_rounds=1,
        sample_tokens=16,
    ),
}


def check_archs(archs: list[str]) -> None:
    """Raise :class:`StudyError` for an empty list or names outside :data:`ttt.models.registry.ARCHS`."""
    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise StudyError(f"unknown architecture(s) {bad}; choose from {list(ARCHS)}")
    if not archs:
        raise StudyError("no architecture selected")


def study_config(preset: str, overrides: Iterable[str] | Mapping[str, Any] | None = None) -> StudyConfig:
    """A preset with dotted overrides applied (``["train_tokens=4096", "archs=[mamba]"]``).

    Raises:
        StudyError: unknown preset, setting or architecture, or a value of the wrong type.
    """
    if preset not in STUDY_PRESETS:
        raise StudyError(f"unknown preset {preset!r}; choose from {sorted(STUDY_PRESETS)}")
    try:
        cfg = build(StudyConfig, STUDY_PRESETS[preset], override_node(overrides))
    except ConfigError as e:
        raise StudyError(f"bad study setting: {e}") from None
    check_archs(cfg.archs)
    if cfg.backbone not in CHOICES["model.backbone"]:
        raise StudyError(f"backbone must be one of {list(CHOICES['model.backbone'])}, got {cfg.backbone!r}")
    return cfg


__all__ = ["STUDY_PRESETS", "StudyConfig", "StudyError", "check_archs", "study_config"]
