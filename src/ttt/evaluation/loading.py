"""Loading a model (and its tokenizer) from a saved Hugging Face directory or a training run.

Accepted paths:

* a saved HF model directory (``config.json`` + weights; ``save_pretrained`` output), with or without
  tokenizer files: any causal LM class known to ``AutoModelForCausalLM`` (``import ttt.models``
  registers ``model_type="ttt"``);
* a training run directory (``run_dir`` with ``checkpoints/``) or one checkpoint directory inside it: the
  newest checkpoint that holds a saved model is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RUN_CONFIG_FILES = ("config.yaml", "train_config.yaml", "run_config.yaml", "config.json")


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


def _step_key(p: Path) -> tuple[int, float]:
    nums = re.findall(r"\d+", p.name)
    return (int(nums[-1]) if nums else -1, p.stat().st_mtime)


def find_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """Resolve ``path`` to ``(model_dir, run_dir)``.

    ``model_dir`` is a saved HF directory or a trainer checkpoint (``meta.json`` + ``model.safetensors``);
    for a run directory it is the checkpoint named by ``checkpoints/latest`` (else the newest one).

    Raises:
        ModelLoadError: nothing loadable under ``path``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"no checkpoint or model directory at {str(p)!r}")
    if _is_model_dir(p) or _is_train_checkpoint(p):
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
        return p, run_dir
    run_dir = p.parent if p.name == "checkpoints" else p
    ckpt_root = run_dir / "checkpoints"
    latest = ckpt_root / "latest"
    if latest.is_file():
        named = ckpt_root / latest.read_text().strip()
        if _is_train_checkpoint(named) or _is_model_dir(named):
            return named, run_dir
    candidates: list[Path] = []
    for base in (ckpt_root, run_dir):
        if base.is_dir():
            candidates += [
                s for s in base.iterdir() if s.is_dir() and (_is_model_dir(s) or _is_train_checkpoint(s))
            ]
    for name in ("final", "model", "hf_model"):
        if _is_model_dir(run_dir / name):
            return run_dir / name, run_dir
    if not candidates:
        raise ModelLoadError(
            f"{str(p)!r} holds no saved model (expected a Hugging Face model directory with config.json and "
            f"weights, a training checkpoint with meta.json, or a run directory with checkpoints/)"
        )
    return max(candidates, key=_step_key), (run_dir if ckpt_root.is_dir() else None)


def read_run_config(run_dir: Path | None, model_dir: Path | None = None) -> dict[str, Any]:
    """The training configuration of a run as a dict (``TrainConfig.to_dict()``; empty if none found).

    Also found in an exported model directory (``ttt_run.json`` written by ``ttt export``).
    """
    for name in ("meta.json", EXPORT_RUN_FILE):
        if model_dir is not None and (model_dir / name).is_file():
            meta = json.loads((model_dir / name).read_text())
            if isinstance(meta.get("config"), dict):
                return meta["config"]
    if run_dir is None:
        return {}
    for name in RUN_CONFIG_FILES:
        f = run_dir / name
        if f.is_file():
            if f.suffix == ".json":
                return json.loads(f.read_text())
            import yaml

            return yaml.safe_load(f.read_text()) or {}
    return {}


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
    """Rebuild the model of a trainer checkpoint from its ``meta.json`` and load its weights."""
    from safetensors.torch import load_file

    meta = json.loads((ckpt_dir / "meta.json").read_text())
    arch, cfg_dict = meta.get("arch"), dict(meta.get("model_config") or {})
    if not cfg_dict:
        raise ModelLoadError(f"checkpoint {str(ckpt_dir)!r} has no model_config in meta.json")
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = cfg_dict.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"checkpoint {str(ckpt_dir)!r}: model_config has no model_type (arch {arch!r})")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    if model_type == "llama":
        config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config)
    state = load_file(str(ckpt_dir / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
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
    import ttt.models  # noqa: F401  (registers model_type="ttt" with the Auto classes)

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
