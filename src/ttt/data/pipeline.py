"""From a :class:`DataConfig` to a tokenizer and train/validation token stores."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .corpus import Document, corpus_fingerprint, load_documents, split_documents
from .errors import DataError
from .store import TokenStore, build_token_store
from .tokenizer import DEFAULT_BPE_VOCAB, build_tokenizer, load_tokenizer


@dataclass
class DataConfig:
    """What to train on.

    Attributes:
        source: corpus (see :func:`ttt.data.load_documents`); None = built-in Shakespeare.
        text_field: text field of JSONL records / dataset rows.
        tokenizer: ``"byte"``, ``"bpe"`` or a Hugging Face tokenizer path / Hub name.
        vocab_size: BPE vocabulary size (default 8192); for other tokenizers, if given, the largest
            vocabulary allowed (a model's vocab size).
        seq_len: if given, :func:`prepare_data` checks that both splits hold at least one row of it.
        val_fraction: share of the characters that go to validation (whole documents), in ``[0, 1)``.
        seed: seed of the document-level split.
    """

    source: str | None = None
    text_field: str = "text"
    tokenizer: str = "byte"
    vocab_size: int | None = None
    seq_len: int | None = None
    val_fraction: float = 0.05
    seed: int = 0


@dataclass
class DataBundle:
    """A tokenizer and its train / validation token stores: what training, evaluation and the
    comparison study read (:func:`prepare_data` makes one). ``val`` is None when ``val_fraction == 0``."""

    tokenizer: PreTrainedTokenizerFast
    train: TokenStore
    val: TokenStore | None
    config: DataConfig | None = None
    tokenizer_dir: Path | None = None  # where a trained BPE tokenizer is saved

    @property
    def source(self) -> str:
        """The corpus, as given (``shakespeare`` for the built-in one)."""
        return str(self.config.source) if self.config is not None and self.config.source else "shakespeare"


def _bpe_tokenizer(train_docs: list[Document], vocab_size: int, cache_dir: Path) -> tuple[
        PreTrainedTokenizerFast, Path]:
    """Train (or reuse) the BPE tokenizer of ``train_docs``, saved under ``cache_dir`` atomically."""
    key = hashlib.sha256(json.dumps({"corpus": corpus_fingerprint(train_docs), "vocab_size": vocab_size,
                                     "kind": "bpe-v1"}).encode()).hexdigest()
    final = cache_dir / f"tokenizer-bpe{vocab_size}-{key[:24]}"
    if (final / "tokenizer.json").is_file():
        try:
            return load_tokenizer(final), final
        except DataError:
            shutil.rmtree(final, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        tok = build_tokenizer("bpe", documents=train_docs, save_dir=tmp, vocab_size=vocab_size)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # pragma: no cover
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tok, final


def check_config(cfg: DataConfig) -> None:
    """Validate the numbers of a :class:`DataConfig` (before any file is read)."""
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.seq_len is not None and int(cfg.seq_len) < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {cfg.seq_len}")
    if cfg.vocab_size is not None and int(cfg.vocab_size) < 1:
        raise DataError(f"vocab_size must be positive, got {cfg.vocab_size}")
    if not cfg.text_field:
        raise DataError("text_field must be a non-empty field name")


def check_seq_len(store: TokenStore | None, seq_len: int, split: str) -> None:
    """Raise :class:`DataError` if ``store`` holds less than one row of ``seq_len`` tokens."""
    if store is not None and store.num_tokens < seq_len:
        raise DataError(f"the {split} split holds {store.num_tokens} tokens ({store.num_docs} documents), "
                        f"less than one row of seq_len={seq_len}; lower seq_len, use more data"
                        + (" or a larger val_fraction" if split == "validation" else ""))


def prepare_data(cfg: DataConfig, cache_dir: str | Path) -> DataBundle:
    """Load the corpus, split it by document, build the tokenizer and tokenize both splits (cached).

    The BPE tokenizer is trained on the training documents only and saved under ``cache_dir``.

    Raises:
        DataError: any bad input (missing corpus, no documents, bad field, tokenizer, seq_len, ...).
    """
    check_config(cfg)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    docs = load_documents(cfg.source, text_field=cfg.text_field)
    train_docs, val_docs = split_documents(docs, float(cfg.val_fraction), int(cfg.seed))
    if not train_docs:
        raise DataError(f"the corpus {cfg.source!r} leaves no training documents after the split")
    if float(cfg.val_fraction) > 0 and not val_docs:
        raise DataError(f"the corpus {cfg.source!r} is too small for a validation split")
    tok_dir = None
    if str(cfg.tokenizer).strip().lower() == "bpe":
        tok, tok_dir = _bpe_tokenizer(train_docs, int(cfg.vocab_size or DEFAULT_BPE_VOCAB), cache_dir)
    else:
        tok = build_tokenizer(cfg.tokenizer, vocab_size=cfg.vocab_size)
    train = build_token_store(train_docs, tok, cache_dir, split="train")
    val = build_token_store(val_docs, tok, cache_dir, split="val") if val_docs else None
    if cfg.seq_len is not None:
        check_seq_len(train, int(cfg.seq_len), "training")
        check_seq_len(val, int(cfg.seq_len), "validation")
    return DataBundle(tokenizer=tok, train=train, val=val, config=DataConfig(**asdict(cfg)),
                      tokenizer_dir=tok_dir)
