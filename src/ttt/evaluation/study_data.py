"""Glue between the evaluation / study code and :mod:`ttt.data` (corpus, tokenizer, token stores)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataUnavailable(RuntimeError):
    """The data package is missing or the corpus cannot be prepared (clear message for the CLI)."""


@dataclass
class EvalData:
    """What ``ttt eval`` evaluates on."""

    tokenizer: Any
    train: Any
    val: Any
    source: str
    seq_len: int | None = None


def _data_module() -> Any:
    try:
        import ttt.data as data
    except ImportError as e:
        raise DataUnavailable(f"the data package (ttt.data) is not available: {e}") from None
    return data


def make_tokenizer(spec: str = "byte") -> Any:
    """A tokenizer that needs no corpus (``"byte"`` or a saved HF tokenizer path)."""
    data = _data_module()
    return data.build_tokenizer(spec)


def make_data_config(**fields: Any) -> Any:
    """A :class:`ttt.data.DataConfig` from the given fields (unknown field names are a clear error)."""
    data = _data_module()
    cls = data.DataConfig
    if dataclasses.is_dataclass(cls):
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(k for k in fields if k not in valid)
        if bad:
            raise DataUnavailable(f"DataConfig has no field(s) {bad}; fields: {sorted(valid)}")
    return cls(**fields)


def prepare(fields: dict[str, Any], cache_dir: Path) -> Any:
    """``ttt.data.prepare_data(DataConfig(**fields), cache_dir)`` -> DataBundle(tokenizer, train, val)."""
    data = _data_module()
    cfg = make_data_config(**{k: v for k, v in fields.items() if v is not None})
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return data.prepare_data(cfg, cache_dir)


def eval_data(
    source: str | None,
    tokenizer: str | None,
    loaded_tokenizer: Any | None,
    run_config: dict[str, Any],
    cache_dir: Path | None = None,
) -> EvalData:
    """The validation data of ``ttt eval``: the run's data settings unless ``source`` / ``tokenizer`` given.

    Args:
        source: corpus source (None: the run's, else the built-in Shakespeare).
        tokenizer: tokenizer spec; None: the run's, else ``"byte"``.
        loaded_tokenizer: the tokenizer saved next to the model (used for byte counts if given).
        run_config: ``TrainConfig.to_dict()`` of the run (may be empty).
        cache_dir: where tokenized stores are cached (default: the run's cache, else ``~/.cache/ttt``).
    """
    run_data = dict(run_config.get("data") or {})
    fields: dict[str, Any] = {
        k: v for k, v in run_data.items() if k not in ("seq_len", "cache_dir", "document_mask", "val_rows")
    }
    if source is not None:
        fields["source"] = source
    if tokenizer is not None:
        fields["tokenizer"] = tokenizer
    elif "tokenizer" not in fields:
        fields["tokenizer"] = "byte"
    cache = cache_dir or Path(run_data.get("cache_dir") or Path.home() / ".cache" / "ttt" / "data")
    try:
        bundle = prepare(fields, cache)
    except DataUnavailable:
        raise
    except (OSError, ValueError) as e:
        raise DataUnavailable(f"could not prepare the evaluation data: {e}") from None
    tok = loaded_tokenizer if (loaded_tokenizer is not None and tokenizer is None) else bundle.tokenizer
    return EvalData(
        tokenizer=tok,
        train=bundle.train,
        val=bundle.val,
        source=str(fields.get("source") or "shakespeare"),
        seq_len=run_data.get("seq_len"),
    )


def study_data(cfg: Any, cache_dir: Path) -> Any:
    """Tokenized corpus of a comparison study (:class:`ttt.evaluation.compare.StudyData`)."""
    from .compare import StudyData

    bundle = prepare({"source": cfg.data, "tokenizer": cfg.tokenizer, "seq_len": cfg.seq_len}, cache_dir)
    if bundle.val is None:
        raise DataUnavailable("the study needs a validation split (val_fraction > 0)")
    tok = bundle.tokenizer
    extra: dict[str, Any] = {}
    bpt = getattr(bundle.val, "bytes_per_token", None)
    if bpt is None and cfg.tokenizer == "byte":
        bpt = 1.0
    if bpt is not None:
        extra["bytes_per_token"] = float(bpt)
    return StudyData(tokenizer=tok, train=bundle.train, val=bundle.val, vocab_size=len(tok), extra=extra)
