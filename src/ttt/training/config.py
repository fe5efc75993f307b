"""Training configuration: OmegaConf structured configs from YAML files and dotted overrides.

A config has the sections ``model``, ``data``, ``optim``, ``train``, ``checkpoint``, ``log`` and ``dist``
(the dataclasses below give every key, its type and default). A YAML file may start with
``extends: NAME`` to inherit another config (a shipped name or a path) and change a few keys; dotted
overrides ``section.key=value`` apply last (:mod:`ttt.util.config`).

>>> cfg = load_config("tiny", ["model.arch=transformer", "optim.lr=1e-3"])
>>> cfg.model.arch, cfg.optim.lr
('transformer', 0.001)

Unknown sections/keys and values of the wrong type or outside the allowed set raise
:class:`ConfigError` naming the problem, before anything is built. A run saves its config as
``config.yaml``; :func:`resume_config` restores it, and :func:`resume_changes` says which keys may change
when a run resumes (and what changing them does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttt.data import DataConfig
from ttt.models.registry import ARCHS, TTT_ARCHS, check_overrides, list_sizes
from ttt.util.config import ConfigError, build, flatten, override_node, read_yaml, resolve_file, to_yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIG = "config.yaml"  # the config a run saves in its directory


@dataclass
class ModelSection:
    """Which model to train.

    Attributes:
        arch: ``ttt-linear``, ``ttt-mlp``, ``transformer`` (Llama), ``mamba`` or ``mamba2``.
        size: model size (:func:`ttt.models.registry.list_sizes`: ``tiny`` ... ``1.3b``).
        backbone: TTT archs only: ``transformer`` or ``mamba`` (pre-conv, shared Q/K, gate).
        match_reference: baselines are sized to this TTT arch's parameter count
            (:func:`ttt.models.registry.match_size`).
        overrides: extra fields of the architecture's HF config (e.g. ``mini_batch_size: 16``).
        gradient_checkpointing: HF ``gradient_checkpointing_enable()`` (recompute blocks in backward).
    """

    arch: str = "ttt-linear"
    size: str = "tiny"
    backbone: str = "transformer"
    match_reference: str = "ttt-linear"
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclass
class DataSection(DataConfig):
    """Corpus and rows: every field of :class:`ttt.data.DataConfig` (``source``, ``tokenizer``, ...) plus
    the ones below.

    Attributes:
        seq_len: tokens per training row.
        cache_dir: where :func:`ttt.data.prepare_data` keeps prepared corpora (default ``<out_dir>/cache``);
            ignored when ``source`` is a prepared directory (``ttt data prepare``), which is read in place.
        document_mask: pass ``position_ids`` (restarting at 0 at each document) to the models that use
            them: TTT resets its state, Llama restarts RoPE *and* attends only within the document
            (transformers builds a block-diagonal causal mask from packed ``position_ids``). Mamba and
            Mamba-2 get no ``position_ids`` (their PyTorch paths cannot reset the state): their state
            flows across document boundaries inside a row. With ``false`` no model gets ``position_ids``.
        val_rows: validation rows used by periodic validation (``0`` = all of the validation split).
    """

    seq_len: int = 256  # type: ignore[assignment]  # required here (optional in DataConfig)
    cache_dir: str | None = None
    document_mask: bool = True
    val_rows: int = 64

    def data_config(self) -> DataConfig:
        """The :class:`ttt.data.DataConfig` part."""
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})


@dataclass
class OptimSection:
    """AdamW with linear warmup + cosine decay (published TTT recipe: betas 0.9/0.95, wd 0.1, clip 1).

    Weight decay applies to every parameter with 2+ dimensions except embeddings (and the tied LM head)
    and Mamba's ``A_log``/``D``/``dt_bias`` (as in the reference Mamba code); never to norms, biases or
    other vectors (TTT's learnable LR bias, token-position LR, inner LayerNorm). TTT's inner initial
    weights ``W1``/``W2`` and LR projection are matrices and are decayed.

    Attributes:
        lr: peak learning rate.
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warmup steps from 0; ``null`` = ``warmup_fraction`` of the total.
        warmup_fraction: used when ``warmup_steps`` is null.
        inner_lr_warmup: ``auto`` (on for ttt-mlp), ``on`` or ``off``: warm the TTT inner base LR up
            from ``inner_lr_start`` to the model's ``ttt_base_lr`` over the outer warmup.
        inner_lr_start: inner base LR at step 0 of that warmup.
    """

    lr: float = 3e-3
    min_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    inner_lr_warmup: str = "auto"
    inner_lr_start: float = 0.01


@dataclass
class TrainSection:
    """Batch, budget, device and the loop.

    Attributes:
        micro_batch_size: rows per forward pass on each rank.
        grad_accum: micro-batches per optimizer step on each rank.
        global_batch_size: if set, ``grad_accum`` is derived as ``global / (micro * world_size)``; the
            global batch (rows per optimizer step) is then independent of the number of processes.
        tokens: token budget (``steps = ceil(tokens / (global_batch * seq_len))``); exclusive with ``steps``.
        steps: optimizer steps.
        seed: seeds model init, the data order and every RNG.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``.
        bf16: bf16 autocast for forward/backward (weights and optimizer stay fp32).
        eval_every: validate every so many steps (0 = only at the end).
        log_every: write a metrics record every so many steps.
        out_dir: parent of run directories.
        run_name: run directory name (default ``<arch>-<size>``).
        run_dir: explicit run directory (overrides ``out_dir``/``run_name``).
        max_steps_this_run: stop (with a checkpoint) after this many steps in this process, e.g. to split
            a run into jobs; ``null`` = run to the end.
    """

    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int | None = None
    tokens: int | None = None
    steps: int | None = 200
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    eval_every: int = 50
    log_every: int = 1
    out_dir: str = "runs"
    run_name: str | None = None
    run_dir: str | None = None
    max_steps_this_run: int | None = None


@dataclass
class CheckpointSection:
    """Attributes:
    every: save every so many steps (0 = only at the end / on a signal).
    keep: how many checkpoints to keep (oldest deleted first).
    on_signal: on SIGINT/SIGTERM finish the current step, save, and stop.
    """

    every: int = 100
    keep: int = 3
    on_signal: bool = True


@dataclass
class LogSection:
    """Attributes:
    tensorboard: write TensorBoard events under ``run_dir/tb``.
    csv: write ``metrics.csv`` next to ``metrics.jsonl`` (always written).
    progress: report progress on rank 0: a progress bar on a terminal, else a plain line every
        ``print_every`` steps (validation losses are printed either way).
    print_every: steps between plain progress lines when stderr is not a terminal.
    """

    tensorboard: bool = True
    csv: bool = True
    progress: bool = True
    print_every: int = 10


@dataclass
class DistSection:
    """Attributes:
    strategy: ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard`` per block).
    backend: ``auto`` (nccl on CUDA, gloo on CPU), ``gloo`` or ``nccl``.
    timeout_s: seconds a collective may wait for the other ranks; a rank that stops or dies ends the job
        with an error after this long instead of a hang.
    """

    strategy: str = "ddp"
    backend: str = "auto"
    timeout_s: float = 600.0


@dataclass
class TrainConfig:
    """The whole training configuration (see the section classes)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dist: DistSection = field(default_factory=DistSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``config.yaml`` of a run holds), for :func:`config_from_dict`."""
        return dataclasses.asdict(self)

    def run_path(self) -> Path:
        """The run directory."""
        if self.train.run_dir:
            return Path(self.train.run_dir)
        name = self.train.run_name or f"{self.model.arch}-{self.model.size}"
        return Path(self.train.out_dir) / name


CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ARCHS,
    "model.backbone": ("transformer", "mamba"),
    "model.match_reference": TTT_ARCHS,
    "optim.inner_lr_warmup": ("auto", "on", "off"),
    "dist.strategy": ("ddp", "fsdp"),
    "dist.backend": ("auto", "gloo", "nccl"),
}

# keys a resumed run may change, with what changing them does; every other key must match the saved run
RESUMABLE: dict[str, str] = {
    "train.steps": "the run ends at the new budget; the LR schedule (warmup and cosine decay) is recomputed "
    "for the new total number of steps from the current step on",
    "train.tokens": "as train.steps",
    "train.max_steps_this_run": "only this process's stopping point",
    "train.device": "where the run continues (same numbers up to the device's arithmetic)",
    "train.micro_batch_size": "memory per forward pass; the global batch must stay the same",
    "train.grad_accum": "as train.micro_batch_size",
    "train.global_batch_size": "as train.micro_batch_size",
    "train.eval_every": "how often validation runs",
    "train.log_every": "how often metrics are recorded",
    "train.out_dir": "where the run is written",
    "train.run_name": "where the run is written",
    "train.run_dir": "where the run is written",
    "data.cache_dir": "where tokenized data is cached",
    "data.workers": "how many processes tokenize a corpus not yet prepared (the same tokens)",
    "data.val_rows": "how many validation rows are averaged (validation numbers only)",
    "checkpoint.": "checkpoint cadence and retention",
    "log.": "logging only",
    "dist.": "how processes share the work (same numbers up to summation order)",
}


def list_configs() -> list[str]:
    """Names of the shipped configs (``src/ttt/configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_from_dict(raw: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] | None = None
                     ) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested mapping (and dotted overrides)."""
    cfg = build(TrainConfig, raw, override_node(overrides))
    validate(cfg)
    return cfg


def load_config(path_or_name: str | Path | None = None,
                overrides: Iterable[str] | Mapping[str, Any] | None = None) -> TrainConfig:
    """Load a YAML config (a path or a shipped name, e.g. ``"tiny"``) and apply dotted overrides.

    Args:
        path_or_name: YAML path or shipped config name (:func:`list_configs`); ``None`` = defaults.
        overrides: ``["model.arch=ttt-mlp", "optim.lr=1e-3"]`` or ``{"model.arch": "ttt-mlp"}``.

    Raises:
        ConfigError: unknown file/section/key, or a bad value (the message names it).
    """
    raw = read_yaml(path_or_name, CONFIG_DIR) if path_or_name is not None else {}
    return config_from_dict(raw, overrides)


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory (holds the ``config.yaml`` a run saves)."""
    return (Path(path) / RUN_CONFIG).is_file()


def resume_config(config: str | Path | None, overrides: Iterable[str] | None = None) -> TrainConfig:
    """The config of a run to resume: its saved ``config.yaml`` with the given overrides applied.

    ``config`` is the run directory itself, or the config (file or shipped name) that, with
    ``overrides``, names the run directory (``train.run_dir`` / ``out_dir`` + ``run_name``). Only the
    overrides given here change the saved config, and only keys of :data:`RESUMABLE` may change.
    """
    overrides = list(overrides or [])
    if config is not None and is_run_dir(config):
        run_dir = Path(config)
    else:
        run_dir = load_config(config, overrides).run_path()
    saved_file = run_dir / RUN_CONFIG
    if not saved_file.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no {RUN_CONFIG}; it is not a run directory")
    saved = load_config(saved_file)
    moved = [] if saved.run_path() == run_dir else [f"train.run_dir={run_dir}"]  # the run was moved
    cfg = load_config(saved_file, [*overrides, *moved])
    resume_changes(saved, cfg)
    return cfg


def resume_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Notes on what differs between a run's saved config and the one it resumes with.

    Raises:
        ConfigError: a key outside :data:`RESUMABLE` differs (e.g. ``optim.lr`` or ``model.arch``).
    """
    old, cur = flatten(saved.to_dict()), flatten(new.to_dict())
    notes, refused = [], []
    for key in sorted(set(old) | set(cur)):
        if old.get(key) == cur.get(key):
            continue
        effect = next((v for k, v in RESUMABLE.items()
                       if key == k or (k.endswith(".") and key.startswith(k))), None)
        change = f"{key}: {old.get(key)!r} -> {cur.get(key)!r}"
        if effect is None:
            refused.append(change)
        else:
            notes.append(f"{change} ({effect})")
    if refused:
        raise ConfigError(f"cannot resume with a changed {', '.join(refused)}; only these keys may change "
                          f"on resume: {sorted(RESUMABLE)}")
    return notes


def print_config(cfg: TrainConfig) -> str:
    """The config as the YAML a run saves."""
    return to_yaml(cfg)


def _check_choice(key: str, value: Any, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value {value!r} for {key}; choose from {list(choices)}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that need neither the data nor the model (raise :class:`ConfigError`)."""
    for key, choices in {**CHOICES, "model.size": tuple(list_sizes())}.items():
        section, name = key.split(".")
        _check_choice(key, getattr(getattr(cfg, section), name), choices)
    t, o = cfg.train, cfg.optim
    at_least = {
        ("data.seq_len", 2): cfg.data.seq_len, ("train.micro_batch_size", 1): t.micro_batch_size,
        ("train.grad_accum", 1): t.grad_accum, ("checkpoint.keep", 1): cfg.checkpoint.keep,
        ("train.log_every", 1): t.log_every, ("log.print_every", 1): cfg.log.print_every,
        ("train.eval_every", 0): t.eval_every, ("checkpoint.every", 0): cfg.checkpoint.every,
        ("data.val_rows", 0): cfg.data.val_rows, ("train.tokens", 1): t.tokens, ("train.steps", 1): t.steps,
        ("train.global_batch_size", 1): t.global_batch_size, ("optim.warmup_steps", 0): o.warmup_steps,
        ("optim.weight_decay", 0): o.weight_decay, ("optim.grad_clip", 0): o.grad_clip,
    }
    for (key, low), value in at_least.items():
        if value is not None and value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if (t.tokens is None) == (t.steps is None):
        raise ConfigError("set exactly one of train.tokens and train.steps (the other to null); got "
                          f"tokens={t.tokens}, steps={t.steps}")
    if not o.lr > 0 or not o.eps > 0 or not o.inner_lr_start > 0:
        raise ConfigError(f"optim.lr, optim.eps and optim.inner_lr_start must be > 0, got {o.lr}, {o.eps}, "
                          f"{o.inner_lr_start}")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if not cfg.dist.timeout_s > 0:
        raise ConfigError(f"dist.timeout_s must be > 0, got {cfg.dist.timeout_s}")
    if not 0 <= o.warmup_fraction <= 1:
        raise ConfigError(f"optim.warmup_fraction must be in [0, 1], got {o.warmup_fraction}")
    try:
        check_overrides(cfg.model.arch, cfg.model.overrides)
    except ValueError as e:
        raise ConfigError(f"model.overrides: {e}") from None


__all__ = [
    "CONFIG_DIR",
    "RESUMABLE",
    "RUN_CONFIG",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DistSection",
    "LogSection",
    "ModelSection",
    "OptimSection",
    "TrainConfig",
    "TrainSection",
    "config_from_dict",
    "is_run_dir",
    "list_configs",
    "load_config",
    "print_config",
    "resolve_file",
    "resume_changes",
    "resume_config",
    "validate",
]
