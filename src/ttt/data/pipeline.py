"""From a :class:`DataConfig` to a tokenizer and train/validation token stores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .errors import DataError
from .prepare import DEFAULT_BPE_SAMPLE_MB, PrepareConfig, prepare_corpus, source_spec
from .shards import TOKENIZER_DIR, ShardedTokenStore, is_prepared_dir, read_manifest
from .store import TokenStore
from .tokenizer import check_vocab, load_tokenizer


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
        data_files: ``data_files`` of ``datasets.load_dataset`` for ``hf:`` sources (e.g. ``hf:json``).
        streaming: load ``hf:`` sources in streaming mode.
        workers: tokenizing processes when the corpus is prepared implicitly (large corpora: run
            ``ttt data prepare`` once and give its directory as ``source``).
        bpe_sample_mb: MB of training text a ``bpe`` tokenizer is trained on.

    A ``source`` that is a prepared directory (``ttt data prepare``) is used as it is: its tokenizer,
    split and shards; ``text_field``, ``val_fraction``, ``seed`` and the other corpus settings are then
    those it was prepared with.
    """

    source: str | None = None
    text_field: str = "text"
    tokenizer: str = "byte"
    vocab_size: int | None = None
    seq_len: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    data_files: str | list[str] | None = None
    streaming: bool = False
    workers: int = 1
    bpe_sample_mb: float = DEFAULT_BPE_SAMPLE_MB


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
    """The tokenizer and the train/validation token stores of ``cfg``.

    A prepared directory (``ttt data prepare``) given as ``cfg.source`` is opened as it is. Any other
    source is prepared the same way (streamed, split by document, tokenized into shards, see
    :func:`ttt.data.prepare.prepare_corpus`) into ``cache_dir/prepared-<key>`` with ``cfg.workers``
    processes, once: later calls find it there. A BPE tokenizer is trained on the training documents only.

    Raises:
        DataError: any bad input (missing corpus, no documents, bad field, tokenizer, seq_len, ...).
    """
    check_config(cfg)
    if is_prepared_dir(cfg.source):
        path = Path(str(cfg.source)).expanduser()
    else:
        pcfg = PrepareConfig(source=cfg.source, text_field=cfg.text_field, data_files=cfg.data_files,
                             streaming=bool(cfg.streaming), tokenizer=cfg.tokenizer,
                             vocab_size=cfg.vocab_size,
                             val_fraction=float(cfg.val_fraction), seed=int(cfg.seed),
                             workers=int(cfg.workers or 1), bpe_sample_mb=float(cfg.bpe_sample_mb))
        key = hashlib.sha256(json.dumps({k: v for k, v in asdict(pcfg).items() if k != "workers"}
                                        | {"where": source_spec(pcfg)}, sort_keys=True,
                                        default=str).encode()).hexdigest()
        path = Path(cache_dir) / f"prepared-{key[:24]}"
        prepare_corpus(pcfg, path, wait=True)  # another run preparing the same corpus: wait for it
    return open_prepared(path, cfg)


def open_prepared(path: str | Path, cfg: DataConfig | None = None) -> DataBundle:
    """A :class:`DataBundle` over a prepared directory: its tokenizer and its train / val shards.

    Raises:
        DataError: not a prepared directory, a ``cfg.tokenizer`` other than the one it was prepared with,
            a tokenizer larger than ``cfg.vocab_size``, or splits shorter than ``cfg.seq_len``.
    """
    cfg = cfg or DataConfig()
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    spec = str(manifest["tokenizer"]["spec"])
    if str(cfg.tokenizer) not in ("byte", spec):
        raise DataError(f"'{path}' was prepared with the tokenizer '{spec}', not '{cfg.tokenizer}'; drop the "
                        "tokenizer setting or prepare the corpus again with it")
    tok_dir = path / TOKENIZER_DIR
    tok = load_tokenizer(tok_dir)
    if cfg.vocab_size is not None and spec.lower() != "bpe":
        check_vocab(tok, int(cfg.vocab_size))
    splits = manifest.get("splits") or {}
    if "train" not in splits:
        raise DataError(f"the corpus {manifest['source']['source']!r} leaves no training documents after the "
                        "split")
    if float(manifest["split"]["val_fraction"]) > 0 and "val" not in splits:
        raise DataError(f"the corpus {manifest['source']['source']!r} is too small for a validation split")
    train = ShardedTokenStore.open(path, "train")
    val = ShardedTokenStore.open(path, "val") if "val" in splits else None
    if cfg.seq_len is not None:
        check_seq_len(train, int(cfg.seq_len), "training")
        check_seq_len(val, int(cfg.seq_len), "validation")
    return DataBundle(tokenizer=tok, train=train, val=val, config=DataConfig(**asdict(cfg)),
                      tokenizer_dir=tok_dir if spec.lower() == "bpe" else None)
