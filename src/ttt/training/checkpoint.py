"""Atomic, world-size independent training checkpoints.

Layout under ``run_dir/checkpoints``::

    step_00000012/
        model.safetensors     full (unsharded) model state dict, fp32
        optimizer.pt          full optimizer state keyed by parameter name (same format for 1 process,
                              DDP and FSDP2, so a checkpoint moves between world sizes and strategies)
        trainer_state.pt      step, tokens, LR scheduler, data sampler, RNG states (python/numpy/torch/cuda)
        meta.json             arch, size, model config, parameter shapes, batch geometry, train config
    latest                    name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place (``os.replace``);
``latest`` is replaced atomically after that, and older checkpoints beyond ``keep`` are deleted
afterwards. A crash can therefore leave a stray ``.tmp-*`` directory but never a half-written
``step_*`` directory or a ``latest`` pointing at one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ttt.util.files import atomic_write_text

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "trainer_state.pt", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the model being trained."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``latest`` (or None if the run has none)."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        path = root / name
        if not STEP_RE.match(name) or not path.is_dir():
            raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}")
        return path
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | bool | Path, run_dir: Path) -> Path:
    """``True``/``"latest"`` -> the run's latest checkpoint; a path -> that checkpoint (or run) directory."""
    if resume is True or str(resume) in ("latest", "True", "true", "auto"):
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint found in {checkpoint_dir(run_dir)}")
        return found
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume: {path} does not exist")
    if (path / "checkpoints").is_dir():  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint found in {path / 'checkpoints'}")
        return found
    return path


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (CUDA states only if the device count matches)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- optimizer state
def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_state_to_named(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter names instead of indices (plain, unsharded models)."""
    names = _param_names(model)
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"]):
        for p, idx in zip(group["params"], sd_group["params"]):
            index_to_name[idx] = names[id(p)]
    state = {
        index_to_name[i]: {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    groups = [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_state_to_named` (checks that the parameter names/groups match)."""
    names = _param_names(model)
    groups = []
    index = 0
    name_to_index: dict[str, int] = {}
    if len(named["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(
            f"optimizer state has {len(named['param_groups'])} parameter groups, "
            f"the optimizer {len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, named["param_groups"]):
        current = [names[id(p)] for p in group["params"]]
        if current != list(saved["params"]):
            missing = sorted(set(current) ^ set(saved["params"]))[:5]
            raise CheckpointError(f"optimizer state does not match the model's parameters (e.g. {missing})")
        ids = []
        for name in current:
            name_to_index[name] = index
            ids.append(index)
            index += 1
        groups.append({**saved, "params": ids})
    state = {name_to_index[n]: s for n, s in named["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full model state dict (gathered to CPU from FSDP2 shards when ``sharded``; collective)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name (same format with and without FSDP2)."""
    if not sharded:
        return optimizer_state_to_named(model, optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_states(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, torch.Tensor],
                optim_sd: dict[str, Any], sharded: bool) -> None:
    """Inverse of :func:`model_state` and :func:`optimizer_state` (scatters to FSDP2 shards)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    model.load_state_dict(model_sd)
    load_named_optimizer_state(model, optimizer, optim_sd)


# --------------------------------------------------------------------------- write
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write a checkpoint atomically (call on one process only); return its directory.

    ``model_state``/``optimizer_state`` must be full (unsharded) CPU state dicts. If a complete checkpoint
    of this step already exists it is left untouched and returned.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.is_dir():
        return final
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # clone so that tied tensors (embedding / LM head) are separate buffers for safetensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    full_meta = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_at": time.time(),
        "param_shapes": {k: list(v.shape) for k, v in tensors.items()},
        **meta,
    }
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, default=str))  # tmp dir: renamed below
    for name in FILES:  # flush file contents before the rename makes them visible
        fd = os.open(tmp / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- read
def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, after checking that every file is there."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: missing {missing}")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: meta.json unreadable ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    return meta


def check_compatible(
    path: Path, meta: dict[str, Any], arch: str, model_shapes: dict[str, tuple[int, ...]]
) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was written for another arch or shapes."""
    if meta.get("arch") != arch:
        raise CheckpointError(
            f"checkpoint {path} is for arch {meta.get('arch')!r} (size {meta.get('size')!r}), "
            f"but this run trains {arch!r}; use another run_dir or the matching config"
        )
    saved = {k: tuple(v) for k, v in meta.get("param_shapes", {}).items()}
    current = {k: tuple(v) for k, v in model_shapes.items()}
    problems = [f"missing {k}" for k in sorted(set(current) - set(saved))]
    problems += [f"unexpected {k}" for k in sorted(set(saved) - set(current))]
    problems += [
        f"{k}: checkpoint {saved[k]} vs model {current[k]}"
        for k in sorted(set(saved) & set(current))
        if saved[k] != current[k]
    ]
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems)} differences)" if len(problems) > 6 else ""
        )
        raise CheckpointError(
            f"checkpoint {path} does not fit the model ({arch}, size {meta.get('size')!r} "
            f"saved vs this config): {shown}"
        )


def load_checkpoint_files(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state, trainer_state)`` read from disk, with clear errors if corrupt."""
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt", device="cpu") as f:
            model_state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse error means a corrupt file
        raise CheckpointError(f"checkpoint {path} is corrupt: model.safetensors unreadable ({e})") from e
    out = []
    for name in ("optimizer.pt", "trainer_state.pt"):
        try:
            out.append(torch.load(path / name, map_location="cpu", weights_only=False))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} unreadable ({e})") from e
    return model_state, out[0], out[1]


__all__ = [
    "CheckpointError",
    "check_compatible",
    "checkpoint_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_files",
    "load_states",
    "model_state",
    "optimizer_state",
    "load_named_optimizer_state",
    "optimizer_state_to_named",
    "read_meta",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
