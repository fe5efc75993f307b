"""Tokenizers, all as :class:`transformers.PreTrainedTokenizerFast`.

* ``"byte"`` (default, needs no files): the 256 byte values (token id == byte value) plus
  ``<|endoftext|>`` (id 256, used as bos/eos/pad); ``decode(encode(s)) == s`` for any UTF-8 text.
* ``"bpe"``: byte-level BPE trained with Hugging Face ``tokenizers`` on the given documents.
* anything else: a Hugging Face tokenizer by local path (or Hub name when online).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .corpus import Document
from .errors import DataError

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
DEFAULT_BPE_VOCAB = 8192
NUM_BYTES = 256


def _byte_to_char() -> dict[int, str]:
    """The byte -> printable character table of byte-level pre-tokenization.

    Bytes that are visible, non-space Latin-1 characters stand for themselves; the others (controls,
    space, soft hyphen, ...) are moved, in order, to the characters from U+0100 on.
    """
    visible = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, moved = {}, 0
    for b in range(NUM_BYTES):
        if b in visible:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + moved)
            moved += 1
    return table


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer: ids 0..255 are the bytes of the UTF-8 text, 256 is ``<|endoftext|>``."""
    table = _byte_to_char()
    if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):  # pragma: no cover - safety net
        raise RuntimeError("byte table does not match the tokenizers ByteLevel alphabet")
    vocab = {table[b]: b for b in range(NUM_BYTES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap(tok)


def _iter_texts(documents: Iterable[Document], chunk_chars: int = 1 << 16) -> Iterator[str]:
    for d in documents:  # long documents in pieces: bounded memory for the trainer's word counts
        for start in range(0, len(d.text), chunk_chars):
            yield d.text[start:start + chunk_chars]


def _check_bpe_vocab(vocab_size: int | None) -> int:
    min_vocab = NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size is None or int(vocab_size) <= min_vocab:
        raise DataError(f"a BPE vocab_size must be larger than {min_vocab} (256 bytes + {EOS_TOKEN}), "
                        f"got {vocab_size}")
    return int(vocab_size)


def train_bpe_from_documents(documents: Iterable[Document], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization, no prefix space) on a stream of
    documents (consumed once, in pieces of 64k characters: the corpus is never held in memory).

    Raises:
        DataError: ``vocab_size`` not larger than the 256 bytes + special tokens, or no documents.
    """
    vocab_size = _check_bpe_vocab(vocab_size)
    seen = [0]

    def texts() -> Iterator[str]:
        for piece in _iter_texts(documents):
            seen[0] += 1
            yield piece

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if not seen[0]:
        raise DataError("cannot train a BPE tokenizer without documents")
    return _wrap(tok)


def train_bpe_tokenizer(documents: Sequence[Document], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization, no prefix space) on ``documents``.

    Raises:
        DataError: no documents, or ``vocab_size`` not larger than the 256 bytes + special tokens.
    """
    _check_bpe_vocab(vocab_size)
    if not documents:
        raise DataError("cannot train a BPE tokenizer without documents")
    return train_bpe_from_documents(documents, vocab_size)


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer from a local folder (or Hub name when online), as a fast tokenizer.

    Raises:
        DataError: it cannot be loaded, or it has no fast (``tokenizers``) backend.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    looks_like_path = path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1
    if looks_like_path and not path.exists():
        raise DataError(f"tokenizer path '{spec}' does not exist (use 'byte', 'bpe', a saved tokenizer "
                        "folder or a Hugging Face Hub name)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear message
        where = (f"folder '{path}'" if path.exists()
                 else f"name '{spec}' (not a local path; the Hub needs network)")
        raise DataError(f"could not load a tokenizer from {where}: {e}; "
                        "use 'byte', 'bpe', a saved tokenizer folder or a Hub name") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer '{spec}' has no fast (tokenizers) backend ({type(tok).__name__})")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def build_tokenizer(
    spec: str | Path = "byte",
    documents: Sequence[Document] | None = None,
    save_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> PreTrainedTokenizerFast:
    """Build or load a tokenizer.

    Args:
        spec: ``"byte"``, ``"bpe"``, or a Hugging Face tokenizer path / Hub name.
        documents: the training documents (required for ``"bpe"``).
        save_dir: if given, the tokenizer is saved there with ``save_pretrained``.
        vocab_size: BPE vocabulary size (default 8192); for other specs it must not be smaller than the
            tokenizer's vocabulary if given.
    """
    name = str(spec).strip()
    if name.lower() == "byte":
        tok = byte_tokenizer()
    elif name.lower() == "bpe":
        if documents is None:
            raise DataError("the 'bpe' tokenizer is trained on the corpus: pass the training documents")
        tok = train_bpe_tokenizer(documents, vocab_size or DEFAULT_BPE_VOCAB)
    else:
        tok = load_tokenizer(name)
    if vocab_size is not None and name.lower() != "bpe":
        check_vocab(tok, vocab_size)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(save_dir))
    return tok


def check_vocab(tokenizer: PreTrainedTokenizerFast, model_vocab_size: int) -> None:
    """Raise :class:`DataError` if the tokenizer can emit ids ``>= model_vocab_size``."""
    n = len(tokenizer)
    if n > int(model_vocab_size):
        raise DataError(f"the tokenizer has {n} tokens but the model vocabulary holds only "
                        f"{model_vocab_size}; "
                        f"use a model vocab_size of at least {n} or a smaller tokenizer")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of the tokenizer's full ``tokenizers`` definition (vocab, merges, normalizer, specials)."""
    return _fingerprint_of(tokenizer.backend_tokenizer)


def text_encoder(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the tokenizer's backend that treats special-token strings inside text as plain text.

    Corpus text is data: a literal ``<|endoftext|>`` in a document is encoded as its characters, never
    as the special token, and no special tokens (bos/eos) are added.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    backend.no_truncation()
    backend.no_padding()
    return backend


def is_byte_tokenizer(tokenizer: PreTrainedTokenizerFast | Tokenizer) -> bool:
    """True if ``tokenizer`` is (a copy of) the ``"byte"`` tokenizer: token id == byte value."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer
    return _fingerprint_of(backend) in _byte_fingerprints()


@functools.cache
def _byte_fingerprints() -> frozenset[str]:
    backend = byte_tokenizer().backend_tokenizer
    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    return frozenset({_fingerprint_of(backend), _fingerprint_of(copy)})


def _fingerprint_of(backend: Tokenizer) -> str:
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def encode_documents(tokenizer: PreTrainedTokenizerFast | Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (batched, in Rust), as :func:`text_encoder` encodes them."""
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else text_encoder(tokenizer)
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(list(texts), add_special_tokens=False)]


#: the folder of a run directory that holds the tokenizer the run was trained with
RUN_TOKENIZER_DIR = "tokenizer"


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write ``tokenizer`` with ``save_pretrained`` into ``directory`` atomically
    (:func:`ttt.util.files.atomic_dir`): an existing folder is replaced only once the new one is complete.
    """
    from ttt.util.files import atomic_dir

    with atomic_dir(directory, replace=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return Path(directory)


def run_tokenizer(run_dir: str | Path) -> PreTrainedTokenizerFast | None:
    """The tokenizer saved in a run directory (``run_dir/tokenizer``), or None if the run has none."""
    folder = Path(run_dir) / RUN_TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        return None
    return load_tokenizer(folder)


def describe_tokenizer(tokenizer: PreTrainedTokenizerFast, source: str) -> dict[str, object]:
    """What an evaluation reports about its tokenizer: where it came from, its size and fingerprint."""
    model = tokenizer.backend_tokenizer.model
    kind = "byte" if is_byte_tokenizer(tokenizer) else type(model).__name__.lower()
    return {"source": source, "kind": kind, "vocab_size": len(tokenizer),
            "sha256": tokenizer_fingerprint(tokenizer)[:16], "eos_token_id": tokenizer.eos_token_id}
