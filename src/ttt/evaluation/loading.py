"""Loading a model (and its tokenizer) from a saved Hugging Face directory or a training run.

Accepted paths:

* a saved HF model directory (``config.json`` + weights; ``save_pretrained`` output), with or without
  tokenizer files: any causal LM class known to ``AutoModelForCausalLM`` (``import ttt.models``
  registers ``model_type="ttt"``);
* a training run directory (``run_dir`` with ``checkpoints/``) or one checkpoint directory inside it: a
  run's checkpoint is picked by the trainer's ``latest`` rule (:func:`ttt.training.checkpoint.latest_state`),
  and every trainer checkpoint is opened through :func:`ttt.training.checkpoint.open_checkpoint` (fields
  validated, sha256 of every file verified, weights checked to be finite).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ttt.data import DataBundle, DataConfig, prepare_data
from ttt.training.checkpoint import CheckpointError, latest_checkpoint, open_checkpoint, read_model_state
from ttt.training.config import RUN_CONFIG

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


EXPORT_RUN_FILE = "ttt_run.json"


class ModelLoadError(FileNotFoundError):
    """No loadable model at the given path (clear message for the command line)."""


class TokenizerMismatch(ValueError):
    """The tokenizer is not the model's (clear message for the command line)."""


@dataclass
class LoadedModel:
    """A model plus what was found next to it."""

    model: torch.nn.Module
    tokenizer: Any | None
    model_dir: Path
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # the folder the tokenizer was loaded from


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(
        (p / n).exists() for n in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    )


def _is_train_checkpoint(p: Path) -> bool:
    return (p / "meta.json").is_file() and (p / "model.safetensors").is_file()


def find_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """Resolve ``path`` to ``(model_dir, run_dir)``.

    ``model_dir`` is a saved HF directory or a trainer checkpoint (``meta.json`` + ``model.safetensors``);
    for a run directory it is its latest checkpoint (:func:`ttt.training.checkpoint.latest_checkpoint`).

    Raises:
        ModelLoadError: nothing loadable under ``path``, or ``checkpoints/latest`` names a checkpoint that
            does not exist.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"no checkpoint or model directory at {str(p)!r}")
    if _is_model_dir(p) or _is_train_checkpoint(p) or (p.parent.name == "checkpoints" and p.is_dir()):
        return p, (p.parent.parent if p.parent.name == "checkpoints" else None)
    run_dir = p.parent if p.name == "checkpoints" else p
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError as e:
        raise ModelLoadError(str(e)) from None
    if latest is None:
        raise ModelLoadError(
            f"{str(p)!r} holds no saved model (expected a Hugging Face model directory with config.json and "
            f"weights, a training checkpoint with meta.json, or a run directory with checkpoints/)"
        )
    return latest, run_dir


def read_run_config(run_dir: Path | None, model_dir: Path | None = None) -> dict[str, Any]:
    """The training configuration of a run as a dict (``TrainConfig.to_dict()``; empty if none found):
    the one a checkpoint's ``meta.json`` records (or an exported model's ``ttt_run.json``), else the
    run's ``config.yaml``."""
    if model_dir is not None and (model_dir / "meta.json").is_file():
        meta = open_checkpoint(model_dir, verify=False).meta
        if isinstance(meta.get("config"), dict):
            return meta["config"]
    if model_dir is not None and (model_dir / EXPORT_RUN_FILE).is_file():
        meta = json.loads((model_dir / EXPORT_RUN_FILE).read_text())
        if isinstance(meta.get("config"), dict):
            return meta["config"]
    if run_dir is not None and (run_dir / RUN_CONFIG).is_file():
        return yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}
    return {}


def run_data(run_config: dict[str, Any], source: str | None = None, tokenizer: str | None = None,
             cache_dir: Path | None = None) -> DataBundle:
    """The data a run trained on (its ``data`` section), or another corpus / tokenizer if given.

    Args:
        run_config: ``TrainConfig.to_dict()`` of the run (may be empty: Shakespeare, byte tokenizer).
        source: corpus source instead of the run's.
        tokenizer: tokenizer spec instead of the run's.
        cache_dir: where tokenized stores are cached (default: the run's cache, else ``~/.cache/ttt``).

    Raises:
        DataError: the corpus or tokenizer cannot be prepared.
    """
    run = dict(run_config.get("data") or {})
    fields = {f.name: run[f.name] for f in dataclasses.fields(DataConfig) if run.get(f.name) is not None}
    fields.pop("seq_len", None)
    if source is not None:
        fields["source"] = source
    if tokenizer is not None:
        fields["tokenizer"] = tokenizer
    cache = cache_dir or Path(run.get("cache_dir") or Path.home() / ".cache" / "ttt" / "data")
    return prepare_data(DataConfig(**fields), cache)


def tokenizer_dir(model_dir: Path, run_dir: Path | None = None) -> Path | None:
    """The folder of the tokenizer saved with the model or in its run directory (None if none)."""
    for d in (model_dir, *([run_dir / "tokenizer", run_dir] if run_dir else [])):
        if d is not None and d.is_dir() and (d / "tokenizer.json").is_file():
            return d
    return None


def load_tokenizer(model_dir: Path, run_dir: Path | None = None) -> Any | None:
    """The tokenizer saved with the model or in the run directory (None if there is none)."""
    from ttt.data.tokenizer import load_tokenizer as load

    found = tokenizer_dir(model_dir, run_dir)
    return None if found is None else load(found)


def check_tokenizer_fits(model: torch.nn.Module, tokenizer: Any) -> None:
    """Raise :class:`TokenizerMismatch` if ``tokenizer`` cannot be the model's tokenizer.

    Its ids must fit the model's vocabulary, and the end-of-text id must agree with the model config's.
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > int(vocab):
        raise TokenizerMismatch(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                                f"{vocab}: it is not this model's tokenizer")
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and tokenizer.eos_token_id is not None and eos != tokenizer.eos_token_id:
        raise TokenizerMismatch(f"the tokenizer's end-of-text id is {tokenizer.eos_token_id} but the "
                                f"model's is {eos}: it is not this model's tokenizer")


def resolve_tokenizer(loaded: LoadedModel, spec: str | None = None) -> tuple[Any, str]:
    """The tokenizer to use with a loaded model and where it came from: exactly the one saved with the
    model or its run. ``spec`` ('byte' or a tokenizer folder / Hub name) is only for models saved without
    one; it must not contradict a saved tokenizer.

    Raises:
        TokenizerMismatch: ``spec`` differs from the saved tokenizer, the model has no saved tokenizer and
            its run did not use the byte tokenizer, or the tokenizer does not fit the model.
    """
    from ttt.data.tokenizer import build_tokenizer, tokenizer_fingerprint

    tok, source = loaded.tokenizer, str(loaded.tokenizer_dir) if loaded.tokenizer_dir else None
    run_tok = str((loaded.run_config.get("data") or {}).get("tokenizer") or "byte")
    if spec is not None:
        if str(spec).strip().lower() == "bpe":
            raise TokenizerMismatch("--tokenizer bpe would train a new tokenizer; give the folder of the "
                                    "tokenizer the model was trained with")
        try:
            wanted = build_tokenizer(spec)
        except ValueError as e:
            raise TokenizerMismatch(str(e)) from None
        if tok is not None and tokenizer_fingerprint(wanted) != tokenizer_fingerprint(tok):
            raise TokenizerMismatch(f"{loaded.model_dir} comes with its own tokenizer ({source}), which "
                                    f"differs from --tokenizer {spec}; drop --tokenizer")
        if tok is None:
            tok, source = wanted, str(spec)
    if tok is None:
        if run_tok.lower() != "byte":
            raise TokenizerMismatch(f"{loaded.model_dir} holds no saved tokenizer and its run used tokenizer "
                                    f"{run_tok!r}; pass --tokenizer with the folder of that tokenizer")
        if not loaded.run_config:
            raise TokenizerMismatch(f"{loaded.model_dir} holds no tokenizer and no training run to tell "
                                    "which one it needs; pass --tokenizer")
        tok, source = build_tokenizer("byte"), "byte"
    check_tokenizer_fits(loaded.model, tok)
    return tok, source


def model_from_checkpoint(ckpt_dir: Path) -> torch.nn.Module:
    """Rebuild the model of a trainer checkpoint from its ``meta.json`` and load its weights (the
    checkpoint verified by :func:`ttt.training.checkpoint.open_checkpoint`).

    Raises:
        CheckpointError: the checkpoint is malformed or corrupt.
        ModelLoadError: its weights do not fit the model its meta.json describes.
    """
    info = open_checkpoint(ckpt_dir)
    meta = info.meta
    arch, cfg_dict = meta.get("arch"), dict(meta.get("model_config") or {})
    if not cfg_dict:
        raise ModelLoadError(f"checkpoint {str(ckpt_dir)!r} has no model_config in meta.json")
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"checkpoint {str(ckpt_dir)!r}: model_config has no model_type (arch {arch!r})")
    try:
        config = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"checkpoint {str(ckpt_dir)!r}: meta.json model_config is invalid ({e})"
                             ) from None
    if model_type == "llama":
        config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    state = read_model_state(info)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelLoadError(f"checkpoint {str(ckpt_dir)!r} does not fit its model ({arch}): "
                             f"{' '.join(str(e).split())[:200]}") from None
    tied = {k for k in missing if k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"checkpoint {str(ckpt_dir)!r} does not fit its model ({arch}): missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load the model at ``path`` (see module docstring), in eval mode, on ``device``."""
    model_dir, run_dir = find_model_dir(path)
    if _is_model_dir(model_dir):
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    else:
        model = model_from_checkpoint(model_dir)
        if dtype is not None:
            model = model.to(dtype)
    model = model.to(device)
    model.eval()
    tok_dir = tokenizer_dir(model_dir, run_dir)
    tok_dir = tok_dir.resolve() if tok_dir is not None else None
    tok = load_tokenizer(model_dir, run_dir)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):  # trained without; decode with the cache
        config.use_cache = True
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = True
    if tok is not None and config is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, name, None) is None and getattr(tok, name, None) is not None:
                setattr(config, name, getattr(tok, name))
                if getattr(model, "generation_config", None) is not None:
                    setattr(model.generation_config, name, getattr(tok, name))
    return LoadedModel(
        model=model,
        tokenizer=tok,
        model_dir=model_dir,
        run_dir=run_dir,
        run_config=read_run_config(run_dir, model_dir),
        tokenizer_dir=tok_dir,
    )
