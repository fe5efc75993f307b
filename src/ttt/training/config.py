"""Training configuration: YAML files + dotted command-line overrides, validated up front.

A config is a YAML mapping with the sections ``model``, ``data``, ``optim``, ``train``, ``checkpoint``,
``log`` and ``dist`` (see the dataclasses below for every key and its default). A file may start with
``extends: NAME`` to inherit another config (a shipped name or a path) and change a few keys.

>>> cfg = load_config("tiny", ["model.arch=transformer", "optim.lr=1e-3"])
>>> cfg.model.arch, cfg.optim.lr
('transformer', 0.001)

Unknown sections/keys and values of the wrong type or outside the allowed set raise
:class:`ConfigError` naming the valid choices, before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """An invalid training configuration (unknown key, bad value, inconsistent settings)."""


@dataclass
class ModelSection:
    """Which model to train.

    Attributes:
        arch: ``ttt-linear``, ``ttt-mlp``, ``transformer`` (Llama), ``mamba`` or ``mamba2``.
        size: preset name (``tiny``, ``mini``, ``small``, ``125m``, ``350m``, ``760m``, ``1.3b``).
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
class DataSection:
    """Corpus and rows. Keys other than the ones below are fields of :class:`ttt.data.DataConfig`
    (``source``, ``tokenizer``, ...) and are kept in :attr:`config`.

    Attributes:
        seq_len: tokens per training row.
        cache_dir: where :func:`ttt.data.prepare_data` keeps tokenized stores (default ``<out_dir>/cache``).
        document_mask: pass ``position_ids`` (restarting at 0 at each document) to the models that use
            them: TTT resets its state, Llama restarts RoPE *and* attends only within the document
            (transformers builds a block-diagonal causal mask from packed ``position_ids``). Mamba and
            Mamba-2 get no ``position_ids`` (their PyTorch paths cannot reset the state): their state
            flows across document boundaries inside a row. With ``false`` no model gets ``position_ids``.
        val_rows: validation rows used by periodic validation (``0`` = all of the validation split).
        config: the :class:`ttt.data.DataConfig` fields.
    """

    seq_len: int = 256
    cache_dir: str | None = None
    document_mask: bool = True
    val_rows: int = 64
    config: dict[str, Any] = field(default_factory=dict)


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
    progress: show a progress bar (loss, tokens/s, ETA) on rank 0.
    """

    tensorboard: bool = True
    csv: bool = True
    progress: bool = True


@dataclass
class DistSection:
    """Attributes:
    strategy: ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard`` per block).
    backend: ``auto`` (nccl on CUDA, gloo on CPU), ``gloo`` or ``nccl``.
    """

    strategy: str = "ddp"
    backend: str = "auto"


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
        """Plain nested dict (``data.config`` flattened into ``data``), for :func:`config_from_dict`."""
        out = dataclasses.asdict(self)
        data = out["data"]
        data.update(data.pop("config"))
        return out

    def run_path(self) -> Path:
        """The run directory."""
        if self.train.run_dir:
            return Path(self.train.run_dir)
        name = self.train.run_name or f"{self.model.arch}-{self.model.size}"
        return Path(self.train.out_dir) / name


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
    "dist": DistSection,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.backbone": ("transformer", "mamba"),
    "optim.inner_lr_warmup": ("auto", "on", "off"),
    "dist.strategy": ("ddp", "fsdp"),
    "dist.backend": ("auto", "gloo", "nccl"),
}


def _arch_choices() -> tuple[str, ...]:
    from ttt.models.registry import ARCHS

    return ARCHS


def _size_choices() -> tuple[str, ...]:
    from ttt.models.presets import list_presets

    return tuple(list_presets())


def _data_config_fields() -> dict[str, Any] | None:
    """Field name -> type of :class:`ttt.data.DataConfig`, or None while that class is unavailable."""
    try:
        from ttt.data import DataConfig
    except Exception:  # noqa: BLE001 - data package not importable (yet)
        return None
    if dataclasses.is_dataclass(DataConfig):
        hints = typing.get_type_hints(DataConfig)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(DataConfig)}
    return None


def list_configs() -> list[str]:
    """Names of the shipped configs (``src/ttt/configs/*.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _resolve(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return p
    shipped = CONFIG_DIR / f"{path_or_name}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(
        f"unknown config {str(path_or_name)!r}: not a file, and not a shipped config "
        f"(choose from {list_configs()})"
    )


def _read_yaml(path_or_name: str | Path, depth: int = 0) -> dict[str, Any]:
    if depth > 8:
        raise ConfigError("config 'extends' chain is too deep (cycle?)")
    path = _resolve(path_or_name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    near = [path.parent / str(parent), path.parent / f"{parent}.yaml"]
    target = next((c for c in near if c.is_file()), str(parent))
    base = _read_yaml(target, depth + 1)
    return _merge(base, raw)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_scalar(text: str) -> Any:
    """A command-line value: YAML scalar/list syntax, with ``1e-3`` read as a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return (
                float(value)
                if any(c in value.lower() for c in ".e") and value.lower() not in ("nan", "inf")
                else value
            )
        except ValueError:
            return value
    return value


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["a.b=1", ...]`` (or a flat ``{"a.b": 1}``) -> nested dict."""
    nested: dict[str, Any] = {}
    if not overrides:
        return nested
    items: list[tuple[str, Any]]
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override {text!r} must look like section.key=value")
            key, value = text.split("=", 1)
            items.append((key.strip(), _parse_scalar(value.strip())))
    for key, value in items:
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(
                f"override key {key!r} must be dotted: section.key (sections: {list(SECTIONS)})"
            )
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in fields and not (cls is DataSection and key == "config"):
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        elif cls is DataSection:
            extra[key] = value
        else:
            raise ConfigError(f"unknown key {name}.{key}; valid keys of {name!r}: {sorted(fields)}")
    if cls is DataSection:
        data_fields = _data_config_fields()
        if data_fields is not None:
            valid = sorted(set(data_fields) | fields - {"config"})
            for key, value in list(extra.items()):
                if key not in data_fields:
                    raise ConfigError(f"unknown key data.{key}; valid keys of 'data': {valid}")
                extra[key] = _coerce(f"data.{key}", value, data_fields[key])
        kwargs["config"] = extra
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {list(SECTIONS)}")
    cfg = TrainConfig(**{name: _build_section(name, cls, raw.get(name)) for name, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid value {value!r} for {key}; choose from {list(choices)}")


def validate(cfg: TrainConfig) -> None:
    """Value checks that do not need the data or the model (raise :class:`ConfigError`)."""
    _check_choice("model.arch", cfg.model.arch, _arch_choices())
    _check_choice("model.size", cfg.model.size, _size_choices())
    _check_choice("model.match_reference", cfg.model.match_reference, ("ttt-linear", "ttt-mlp"))
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        _check_choice(key, getattr(getattr(cfg, section), name), choices)
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ConfigError(
            f"invalid value {dev!r} for train.device; choose from ['auto', 'cpu', 'cuda', 'cuda:N']"
        )
    positive = {
        "data.seq_len": cfg.data.seq_len,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "checkpoint.keep": cfg.checkpoint.keep,
        "train.log_every": cfg.train.log_every,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {
        "train.eval_every": cfg.train.eval_every,
        "checkpoint.every": cfg.checkpoint.every,
        "data.val_rows": cfg.data.val_rows,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if (cfg.train.tokens is None) == (cfg.train.steps is None):
        raise ConfigError(
            "set exactly one of train.tokens and train.steps (the other to null); got "
            f"tokens={cfg.train.tokens}, steps={cfg.train.steps}"
        )
    if cfg.train.tokens is not None and cfg.train.tokens < 1:
        raise ConfigError(f"train.tokens must be >= 1, got {cfg.train.tokens}")
    if cfg.train.steps is not None and cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {cfg.train.steps}")
    if cfg.train.global_batch_size is not None and cfg.train.global_batch_size < 1:
        raise ConfigError(f"train.global_batch_size must be >= 1, got {cfg.train.global_batch_size}")
    o = cfg.optim
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.eps <= 0:
        raise ConfigError("optim.weight_decay and optim.grad_clip must be >= 0 and optim.eps > 0")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if not 0 <= o.warmup_fraction <= 1:
        raise ConfigError(f"optim.warmup_fraction must be in [0, 1], got {o.warmup_fraction}")
    if not o.inner_lr_start > 0:
        raise ConfigError(f"optim.inner_lr_start must be > 0, got {o.inner_lr_start}")
    _validate_model_overrides(cfg)


def _validate_model_overrides(cfg: TrainConfig) -> None:
    from ttt.models.registry import TTT_ARCHS

    if cfg.model.arch in TTT_ARCHS:
        from ttt.models import TTTConfig as cls
    else:
        from transformers import LlamaConfig, Mamba2Config, MambaConfig

        cls = {"transformer": LlamaConfig, "mamba": MambaConfig, "mamba2": Mamba2Config}[cfg.model.arch]
    valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    if valid is None:
        return
    for key in cfg.model.overrides:
        if key not in valid or key == "backbone":
            raise ConfigError(
                f"unknown key model.overrides.{key} for arch {cfg.model.arch!r} "
                f"({cls.__name__}); valid keys: {sorted(valid)}"
            )


def load_config(
    path_or_name: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """Load a YAML config (a path or a shipped name, e.g. ``"tiny"``) and apply dotted overrides.

    Args:
        path_or_name: YAML path or shipped config name (:func:`list_configs`); ``None`` = defaults.
        overrides: ``["model.arch=ttt-mlp", "optim.lr=1e-3"]`` or ``{"model.arch": "ttt-mlp"}``.

    Raises:
        ConfigError: unknown file/section/key, or a bad value (the message lists the valid choices).
    """
    raw = _read_yaml(path_or_name) if path_or_name is not None else {}
    raw = _merge(raw, parse_overrides(overrides))
    return config_from_dict(raw)


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any] | None) -> TrainConfig:
    """A new, validated config: ``cfg`` with dotted overrides applied (``cfg`` itself is unchanged)."""
    if not overrides:
        return cfg
    return config_from_dict(_merge(cfg.to_dict(), parse_overrides(overrides)))


__all__ = [
    "CONFIG_DIR",
    "apply_overrides",
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
    "list_configs",
    "load_config",
    "parse_overrides",
    "validate",
]
