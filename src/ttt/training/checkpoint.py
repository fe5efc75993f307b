"""Training checkpoints: atomic, verified, world-size independent, and unable to run code.

Layout of a run directory::

    .lock                       OS lock (``fcntl.flock``) held by the process training in the directory
    checkpoints/
        step_00000012/
            model.safetensors       full (unsharded) model state dict, fp32
            optimizer.safetensors   full optimizer state keyed by parameter name (the same for 1 process,
                                    DDP and FSDP2); param groups and non-tensor values as JSON in the header
            trainer_state.json      step, tokens, data sampler, RNG states (python/numpy/torch/cuda)
            meta.json               arch, size, model config, parameter shapes, batch geometry, train
                                    config, ``files`` (sha256 and size of the three files above) and
                                    ``meta_sha256`` (a digest of meta.json's own content);
                                    ``tokenizer_sha256`` (fingerprint of the run's tokenizer) and
                                    ``tokenizer_files`` (sha256 and size of each file of ``tokenizer/``)
        latest                      name of the newest complete checkpoint
        superseded/                 checkpoints set aside when a run resumed from an older one
    tokenizer/                  the tokenizer the run trains with (``save_pretrained`` layout), verified
                                against the checkpoint's ``tokenizer_files`` whenever a checkpoint is opened

No code runs when a checkpoint is read: tensors are safetensors and everything else is JSON (no pickle,
no ``torch.load``). Format 1 checkpoints (pickled ``.pt`` files) are refused.

Writing (:func:`save_checkpoint`, one process). The files go to a hidden ``.tmp-step_N-<pid>``
directory, are flushed (``fsync``) and the directory is renamed to ``step_N``: the rename is the commit
point, so a ``step_N`` directory is always complete. ``latest`` is then replaced atomically and old
checkpoints beyond ``keep`` are renamed away and deleted. An existing ``step_N`` is never kept in place
of new weights: saving over it is refused.

The ``latest`` rule (:func:`latest_checkpoint`, used by the trainer, ``ttt eval``, ``ttt generate`` and
export alike): ``latest`` names the checkpoint, and naming one that does not exist is an error; a
``step_N`` directory newer than the one named (a crash between the rename and the ``latest`` update)
wins, since only complete checkpoints are ever renamed into place. The trainer repairs ``latest`` in
that case (:func:`repair_latest`). A run resumed from an older checkpoint than its newest moves the
newer ones to ``checkpoints/superseded/`` (:func:`supersede_after`) instead of silently keeping them.

Reading (:func:`open_checkpoint`): resolves a run or checkpoint directory, validates ``meta.json`` field
by field, and verifies the sha256 of every file; :func:`load_checkpoint_files` then parses the files and
checks that every tensor is finite. Every problem is a :class:`CheckpointError` whose one-line message
names the checkpoint, the file and the field.

Locking (:class:`RunLock`): the trainer holds an exclusive ``flock`` on ``run_dir/.lock`` while it runs;
the OS drops it when the process exits or dies. With the lock held it removes what killed writers left
behind (:func:`clean_leftovers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ttt.util.files import atomic_write_text, fsync_dir

FORMAT_VERSION = 2
STEP_RE = re.compile(r"^step_(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE, META_FILE = (
    "model.safetensors", "optimizer.safetensors", "trainer_state.json", "meta.json")
DATA_FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_FILE)  # checksummed in meta.json
FILES = (*DATA_FILES, META_FILE)
LOCK_FILE = ".lock"
TOKENIZER_DIR = "tokenizer"  # = ttt.data.tokenizer.RUN_TOKENIZER_DIR
SUPERSEDED = "superseded"
_OPTIM_KEY = "ttt_optimizer"  # safetensors header entry holding the optimizer's JSON structure
_HASH_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt, or does not fit the run; or a run directory in use."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def _step(path: Path) -> int:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``step_N`` directories of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)), key=_step)


def latest_state(run_dir: str | Path) -> tuple[Path | None, str | None]:
    """``(checkpoint, note)`` by the ``latest`` rule (module docstring); ``note`` says why the checkpoint
    differs from the one ``latest`` names (``None`` when it does not).

    Raises:
        CheckpointError: ``latest`` is unreadable or names no checkpoint directory.
    """
    root = checkpoint_dir(run_dir)
    pointer = root / "latest"
    found = list_checkpoints(run_dir)
    newest = found[-1] if found else None
    if not pointer.is_file():
        if pointer.exists():
            raise CheckpointError(f"{pointer} is not a file")
        return newest, None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is unreadable ({e})") from None
    named = root / name
    if not STEP_RE.match(name) or not named.is_dir():
        raise CheckpointError(
            f"{pointer} names {name[:80]!r}, which is not a checkpoint directory in {root}; write the name "
            "of an existing step_N directory into it, or give that directory's path")
    if newest is not None and _step(newest) > _step(named):
        return newest, (f"{pointer} names {name} but {newest.name} is newer and complete (a run stopped "
                        "between writing it and updating latest); using it")
    return named, None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest checkpoint by the ``latest`` rule (``None`` if it has none)."""
    return latest_state(run_dir)[0]


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
    if path.name == "checkpoints":
        path = path.parent
    if (path / "checkpoints").is_dir():  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"--resume: no checkpoint found in {path / 'checkpoints'}")
        return found
    return path


def repair_latest(run_dir: Path) -> str | None:
    """Point ``latest`` at the checkpoint the ``latest`` rule picks, if it names another (call with the
    run's lock held); returns a note on what was repaired."""
    found, note = latest_state(run_dir)
    if found is not None and note is not None:
        atomic_write_text(checkpoint_dir(run_dir) / "latest", found.name + "\n")
        return f"{note}; latest now names {found.name}"
    return None


def supersede_after(run_dir: Path, resumed: Path) -> list[Path]:
    """Move the checkpoints of ``run_dir`` that do not lead to ``resumed`` to ``checkpoints/superseded/``
    (never deleted), so that the continuation from ``resumed`` never mixes with them: the newer ones when
    ``resumed`` is one of the run's own checkpoints, all of them when it comes from elsewhere. ``latest``
    names ``resumed`` (or is removed) first, so an interruption leaves the run as it was or as asked.
    Returns the new paths; call with the run's lock held."""
    root = checkpoint_dir(run_dir)
    own = resumed.parent.resolve() == root.resolve()
    doomed = [p for p in list_checkpoints(run_dir) if not own or _step(p) > _step(resumed)]
    if not doomed:
        return []
    if own:
        atomic_write_text(root / "latest", resumed.name + "\n")
    else:
        (root / "latest").unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (root / SUPERSEDED).mkdir(exist_ok=True)
    moved = []
    for path in doomed:
        target, n = root / SUPERSEDED / f"{path.name}-{stamp}", 1
        while target.exists():
            n += 1
            target = target.with_name(f"{path.name}-{stamp}-{n}")
        os.rename(path, target)
        moved.append(target)
    fsync_dir(root)
    return moved


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what killed writers left behind (``.tmp-step_*`` / ``.old-step_*`` directories, ``.*.tmp``
    files of atomic writes); call with the run's lock held. Returns the removed names."""
    removed = []
    for folder in (Path(run_dir), checkpoint_dir(run_dir)):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_dir() and not p.is_symlink() and p.name.startswith((".tmp-step_", ".old-step_")):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
            else:
                continue
            removed.append(str(p.relative_to(run_dir)))
    return removed


# --------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``run_dir/.lock``, held while a trainer works in the
    run directory; the OS releases it when the process exits or dies.

    >>> with RunLock(run_dir):   # doctest: +SKIP
    ...     train()
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.created_dir = False
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock (creating the run directory if needed).

        Raises:
            CheckpointError: another process holds it, or it cannot be taken.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        fd = -1
        try:
            self.created_dir = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
                    os.close(fd)
                    fd = -1
                    raise CheckpointError(
                        f"run directory {self.run_dir} is in use by another trainer ({holder}); wait for it "
                        "to finish, or choose another train.run_dir / run_name") from None
                try:  # the file may have been removed (and re-created) between open and flock
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
                fd = -1
            os.ftruncate(fd, 0)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode())
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise CheckpointError(f"cannot lock run directory {self.run_dir}: {e.strerror or e}") from None
        self._fd = fd
        return self

    def release(self, remove_created: bool = False) -> None:
        """Drop the lock; with ``remove_created``, also remove the run directory if :meth:`acquire` created
        it and it holds nothing but the lock file."""
        if self._fd is None:
            return
        try:
            if remove_created and self.created_dir:
                left = [p.name for p in self.run_dir.iterdir()]
                if left == [LOCK_FILE]:
                    self.path.unlink(missing_ok=True)
                    self.run_dir.rmdir()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states as plain JSON values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _int_list(value: Any, where: str, length: int | None = None, low: int = 0, high: int = 2**32 - 1
              ) -> list[int]:
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or not all(type(v) is int and low <= v <= high for v in value)):
        size = f"{length} " if length is not None else ""
        raise CheckpointError(f"{where} must be a list of {size}integers in [{low}, {high}]")
    return value


def parse_rng_state(raw: Any, where: str = "rng") -> dict[str, Any]:
    """Validate :func:`rng_state`'s JSON and turn it into the objects the generators take.

    Raises:
        CheckpointError: a field is missing or malformed (the message names ``where`` and the field).
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} must be an object")
    py, npy = raw.get("python"), raw.get("numpy")
    if not (isinstance(py, list) and len(py) == 3 and type(py[0]) is int
            and (py[2] is None or isinstance(py[2], float))):
        raise CheckpointError(f"{where}.python must be [version, [625 integers], gauss]")
    words = _int_list(py[1], f"{where}.python[1]", 625)
    if not isinstance(npy, dict) or npy.get("kind") != "MT19937":
        raise CheckpointError(f"{where}.numpy must be an object with kind 'MT19937'")
    keys = _int_list(npy.get("keys"), f"{where}.numpy.keys", 624)
    for name, kind in (("pos", int), ("has_gauss", int), ("cached_gaussian", float)):
        if not isinstance(npy.get(name), kind) or isinstance(npy.get(name), bool):
            raise CheckpointError(f"{where}.numpy.{name} must be a {kind.__name__}")
    out: dict[str, Any] = {
        "python": (py[0], tuple(words), py[2]),
        "numpy": ("MT19937", np.array(keys, dtype=np.uint32), npy["pos"], npy["has_gauss"],
                  npy["cached_gaussian"]),
        "torch": torch.tensor(_int_list(raw.get("torch"), f"{where}.torch", high=255), dtype=torch.uint8),
    }
    if raw.get("cuda") is not None:
        cuda = raw["cuda"]
        if not isinstance(cuda, list):
            raise CheckpointError(f"{where}.cuda must be a list")
        out["cuda"] = [torch.tensor(_int_list(s, f"{where}.cuda[{i}]", high=255), dtype=torch.uint8)
                       for i, s in enumerate(cuda)]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s output (CUDA states only if the device count matches)."""
    parsed = parse_rng_state(state) if isinstance(state.get("python"), list) else state
    random.setstate(parsed["python"])
    np.random.set_state(parsed["numpy"])
    torch.set_rng_state(parsed["torch"])
    cuda = parsed.get("cuda")
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
    """Inverse of :func:`optimizer_state_to_named` (checks parameter names, groups and state shapes)."""
    names = _param_names(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
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
    unknown = sorted(set(named["state"]) - set(name_to_index))
    if unknown:
        raise CheckpointError(f"optimizer state for unknown parameters {unknown[:5]}")
    for name, s in named["state"].items():
        for key, v in s.items():
            if torch.is_tensor(v) and v.ndim > 0 and tuple(v.shape) != shapes[name]:
                raise CheckpointError(f"optimizer state {name}.{key} has shape {tuple(v.shape)}, the "
                                      f"parameter {shapes[name]}")
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


def _optimizer_tensors(optim_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A named optimizer state as safetensors tensors plus a JSON header (groups, scalars, tensor map)."""
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, list[str]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tkey = f"{len(tensors)}:{name}:{key}"
                tensors[tkey] = value.detach().to("cpu").contiguous().clone()
                where[tkey] = [name, key]
            else:
                scalars.setdefault(name, {})[key] = value
    structure = {"param_groups": optim_sd["param_groups"], "scalars": scalars, "tensors": where,
                 "params": list(optim_sd["state"])}
    return tensors, {"format": "pt", _OPTIM_KEY: json.dumps(structure)}


def _named_optimizer(structure: Any, tensors: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Inverse of :func:`_optimizer_tensors` (validating the structure)."""
    if not isinstance(structure, dict):
        raise CheckpointError(f"{where}: the header entry {_OPTIM_KEY!r} must be an object")
    groups, scalars, tmap, params = (structure.get(k)
                                     for k in ("param_groups", "scalars", "tensors", "params"))
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list)
            and all(isinstance(n, str) for n in g["params"]) for g in groups):
        raise CheckpointError(f"{where}: param_groups must be a list of objects with parameter names")
    if not isinstance(scalars, dict) or not isinstance(tmap, dict) or not isinstance(params, list):
        raise CheckpointError(f"{where}: scalars, tensors and params must be present")
    state: dict[str, dict[str, Any]] = {str(n): {} for n in params}
    for tkey, loc in tmap.items():
        if not (isinstance(loc, list) and len(loc) == 2 and loc[0] in state and isinstance(loc[1], str)) \
                or tkey not in tensors:
            raise CheckpointError(f"{where}: tensor entry {str(tkey)[:60]!r} is malformed or missing")
        state[loc[0]][loc[1]] = tensors[tkey]
    for name, values in scalars.items():
        if name not in state or not isinstance(values, dict):
            raise CheckpointError(f"{where}: scalars of {str(name)[:60]!r} are malformed")
        state[name].update(values)
    out_groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
                  for g in groups]
    return {"state": state, "param_groups": out_groups}


# --------------------------------------------------------------------------- write
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of meta.json's content without its ``meta_sha256`` (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tokenizer_files(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of each file of the run's ``tokenizer/`` folder (recorded in every checkpoint's
    ``meta.json`` as ``tokenizer_files``; empty if the run has none)."""
    folder = Path(run_dir) / TOKENIZER_DIR
    if not folder.is_dir():
        return {}
    return {f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size}
            for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write a checkpoint atomically (call on one process only, holding the run's lock); return its
    directory.

    ``model_state``/``optimizer_state`` are full (unsharded) state dicts, the optimizer's keyed by
    parameter name; ``trainer_state`` must be JSON (``rng`` as :func:`rng_state` returns it).

    Raises:
        CheckpointError: ``step_N`` already exists (it is never silently kept in place of new weights).
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to keep it in place of the new "
                              f"weights of step {step} (move it away, or resume from it)")
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # clone so that tied tensors (embedding / LM head) are separate buffers for safetensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    opt_tensors, opt_header = _optimizer_tensors(optimizer_state)
    save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata=opt_header)
    (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state))  # tmp dir: renamed below
    full_meta = json.loads(json.dumps({
        "format_version": FORMAT_VERSION,
        "step": step,
        "saved_at": time.time(),
        "param_shapes": {k: list(v.shape) for k, v in tensors.items()},
        **meta,
        "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                  for name in DATA_FILES},
    }, default=str))
    full_meta["meta_sha256"] = _meta_digest(full_meta)
    (tmp / META_FILE).write_text(json.dumps(full_meta, indent=1))
    for name in FILES:  # flush file contents before the rename makes them visible
        _fsync(tmp / name)
    fsync_dir(tmp)
    os.rename(tmp, final)  # the commit point
    fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        if old != final:
            doomed = root / f".old-{old.name}-{os.getpid()}"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- read
@dataclass(frozen=True)
class CheckpointInfo:
    """An opened, validated and (unless opened with ``verify=False``) checksum-verified checkpoint.

    Attributes:
        path: the ``step_N`` directory.
        run_dir: the run directory it belongs to (``None`` when it is not inside ``<run>/checkpoints``).
        step: the optimizer step it was saved after.
        meta: the validated ``meta.json`` (``arch``, ``size``, ``model_config``, ``config``, ...).
        files: the file name -> path of ``model.safetensors``, ``optimizer.safetensors``,
            ``trainer_state.json`` and ``meta.json``.
        note: set when the ``latest`` rule picked another checkpoint than ``latest`` names.
    """

    path: Path
    run_dir: Path | None
    step: int
    meta: dict[str, Any]
    files: dict[str, Path]
    note: str | None = None


def _fail(path: Path, text: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path}: {text}")


def _field(meta: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, low: int | None = None
           ) -> Any:
    value = meta.get(key)
    if key not in meta or not isinstance(value, kind) or (isinstance(value, bool) and kind is int) or (
            low is not None and value < low):
        shown = f"{value!r}"[:60] if key in meta else "missing"
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(path, f"meta.json field {key!r} must be {want}{f' >= {low}' if low is not None else ''}, "
                          f"got {shown}")
    return value


def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint, validated field by field (no file checksums: see
    :func:`verify_files`).

    Raises:
        CheckpointError: a missing file, unreadable JSON, another format version or a malformed field.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    if not (path / META_FILE).is_file():
        legacy = [n for n in ("optimizer.pt", "trainer_state.pt") if (path / n).exists()]
        extra = (f" (it holds {legacy}: a format 1 checkpoint, which this version does not read)"
                 if legacy else "")
        raise _fail(path, f"missing meta.json{extra}")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"meta.json is corrupt ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "meta.json is corrupt (not a JSON object)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        why = (" (pickled .pt files, which can run code when loaded; retrain, or convert it with a trusted "
               "older version)") if version == 1 else ""
        raise _fail(path, f"format version {version!r}{why}; this version reads format {FORMAT_VERSION}")
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise _fail(path, "meta.json is corrupt (its content does not match its meta_sha256)")
    step = _field(meta, "step", int, path, low=0)
    if _step(path) >= 0 and _step(path) != step:
        raise _fail(path, f"meta.json field 'step' is {step}, the directory name says {_step(path)}")
    for key in ("arch", "size"):
        _field(meta, key, str, path)
    for key in ("model_config", "config", "param_shapes", "files"):
        _field(meta, key, dict, path)
    for key in ("global_batch", "seq_len", "total_steps"):
        _field(meta, key, int, path, low=1)
    _field(meta, "tokens", int, path, low=0)
    for name, shape in meta["param_shapes"].items():
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(path, f"meta.json param_shapes[{name!r}] must be a list of sizes")
    for name in DATA_FILES:
        entry = meta["files"].get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and type(entry.get("bytes")) is int):
            raise _fail(path, f"meta.json files[{name!r}] must hold sha256 and bytes")
    if "tokenizer_sha256" in meta:
        _field(meta, "tokenizer_sha256", str, path)
    if "tokenizer_files" in meta:
        for name, entry in _field(meta, "tokenizer_files", dict, path).items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and type(entry.get("bytes")) is int) or "/" in name or name.startswith("."):
                raise _fail(path, f"meta.json tokenizer_files[{str(name)[:60]!r}] must hold sha256 and bytes")
    return meta


def verify_files(path: Path, meta: dict[str, Any], names: tuple[str, ...] = DATA_FILES) -> None:
    """Check the size and sha256 of each of ``names`` against ``meta['files']``.

    Raises:
        CheckpointError: a file is missing or differs (the message names it).
    """
    for name in names:
        file, want = path / name, meta["files"][name]
        if not file.is_file():
            raise _fail(path, f"missing {name}")
        try:
            size = file.stat().st_size
            if size != want["bytes"]:
                raise _fail(path, f"{name} is corrupt: {size} bytes, meta.json records {want['bytes']}")
            if _sha256(file) != want["sha256"]:
                raise _fail(path, f"{name} is corrupt: its sha256 differs from the one meta.json records")
        except OSError as e:
            raise _fail(path, f"{name} is unreadable ({e.strerror or e})") from None


def verify_tokenizer(path: Path, run_dir: Path | None, meta: dict[str, Any]) -> None:
    """Check the run's ``tokenizer/`` files against the checkpoint's ``tokenizer_files`` (size and sha256).

    Checkpoints without ``tokenizer_files`` and checkpoints outside a run directory are not checked.

    Raises:
        CheckpointError: a tokenizer file is missing or differs (the message names it).
    """
    recorded = meta.get("tokenizer_files")
    if not recorded or run_dir is None:
        return
    folder = run_dir / TOKENIZER_DIR
    for name, want in recorded.items():
        file = folder / name
        if not file.is_file():
            raise _fail(path, f"the run's tokenizer file {file} is missing (meta.json tokenizer_files)")
        try:
            if file.stat().st_size != want["bytes"] or _sha256(file) != want["sha256"]:
                raise _fail(path, f"the run's tokenizer file {file} differs from the one this checkpoint was "
                                  "trained with (meta.json tokenizer_files)")
        except OSError as e:
            raise _fail(path, f"the run's tokenizer file {file} is unreadable ({e.strerror or e})") from None


def open_checkpoint(path: str | Path, verify: bool = True) -> CheckpointInfo:
    """Open a checkpoint for reading: the one entry point of the trainer, eval, generate and export.

    Args:
        path: a checkpoint directory (``.../checkpoints/step_N``), a run directory or its ``checkpoints``
            folder (the run's latest checkpoint, by the ``latest`` rule of the module docstring).
        verify: check every file's sha256 against ``meta.json`` (reads all files once), and the run's
            tokenizer files against ``tokenizer_files`` (:func:`verify_tokenizer`).

    Returns:
        a :class:`CheckpointInfo` with the validated meta and the verified file paths.

    Raises:
        CheckpointError: nothing to open, or anything missing, malformed or corrupt (one line naming the
            checkpoint, the file and the field).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    note = None
    if p.name == "checkpoints" or (p / "checkpoints").is_dir():
        run_dir = p.parent if p.name == "checkpoints" else p
        found, note = latest_state(run_dir)
        if found is None:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)}")
        p = found
    run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
    meta = read_meta(p)
    if verify:
        verify_files(p, meta)
        verify_tokenizer(p, run_dir, meta)
    return CheckpointInfo(path=p, run_dir=run_dir, step=meta["step"], meta=meta,
                          files={name: p / name for name in FILES}, note=note)


def _check_finite(tensors: dict[str, torch.Tensor], path: Path, name: str) -> None:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise _fail(path, f"{name} holds non-finite values (NaN or inf) in {key!r}")


def read_model_state(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The model state dict of an opened checkpoint (safetensors; every tensor checked to be finite)."""
    try:
        with safe_open(str(info.files[MODEL_FILE]), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse error means a corrupt file
        raise _fail(info.path, f"{MODEL_FILE} is corrupt ({' '.join(str(e).split())[:120]})") from None
    _check_finite(state, info.path, MODEL_FILE)
    return state


def read_optimizer_state(info: CheckpointInfo) -> dict[str, Any]:
    """The named optimizer state of an opened checkpoint (every tensor checked to be finite)."""
    file = info.files[OPTIMIZER_FILE]
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            header = (f.metadata() or {}).get(_OPTIM_KEY)
        structure = json.loads(header) if header is not None else None
    except Exception as e:  # noqa: BLE001
        raise _fail(info.path, f"{OPTIMIZER_FILE} is corrupt ({' '.join(str(e).split())[:120]})") from None
    _check_finite(tensors, info.path, OPTIMIZER_FILE)
    return _named_optimizer(structure, tensors, f"checkpoint {info.path}: {OPTIMIZER_FILE}")


def read_trainer_state(info: CheckpointInfo) -> dict[str, Any]:
    """``trainer_state.json`` of an opened checkpoint, validated; ``rng`` parsed (:func:`parse_rng_state`)."""
    where = f"checkpoint {info.path}: {TRAINER_FILE}"
    try:
        state = json.loads(info.files[TRAINER_FILE].read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where} is corrupt ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is corrupt (not a JSON object)")
    for key in ("step", "tokens"):
        if type(state.get(key)) is not int or state[key] < 0:
            raise CheckpointError(f"{where}: field {key!r} must be an integer >= 0, got {state.get(key)!r}")
    if state["step"] != info.step:
        raise CheckpointError(f"{where}: field 'step' is {state['step']}, meta.json says {info.step}")
    sampler = state.get("sampler")
    if not isinstance(sampler, dict) or not all(type(v) is int for v in sampler.values()):
        raise CheckpointError(f"{where}: field 'sampler' must be an object of integers")
    return {**state, "rng": parse_rng_state(state.get("rng"), f"{where}: field 'rng'")}


def load_checkpoint_files(info: CheckpointInfo
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(model_state, optimizer_state, trainer_state)`` of an opened checkpoint, validated."""
    return read_model_state(info), read_optimizer_state(info), read_trainer_state(info)


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


__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "RunLock",
    "check_compatible",
    "checkpoint_dir",
    "clean_leftovers",
    "latest_checkpoint",
    "tokenizer_files",
    "verify_tokenizer",
    "latest_state",
    "list_checkpoints",
    "load_checkpoint_files",
    "load_named_optimizer_state",
    "load_states",
    "model_state",
    "open_checkpoint",
    "optimizer_state",
    "optimizer_state_to_named",
    "parse_rng_state",
    "read_meta",
    "read_model_state",
    "read_optimizer_state",
    "read_trainer_state",
    "repair_latest",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "supersede_after",
    "verify_files",
]
