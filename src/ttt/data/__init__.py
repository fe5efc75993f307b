"""Corpora, tokenizers, token stores, packed rows and a resumable sampler (see docs/contracts.md)."""

from .corpus import (
    Document,
    corpus_fingerprint,
    load_documents,
    load_shakespeare,
    shakespeare_dir,
    split_documents,
    strip_gutenberg,
)
from .errors import DataError
from .packing import IGNORE_INDEX, PackedRows, WindowRows, collate
from .pipeline import DataBundle, DataConfig, check_config, check_seq_len, prepare_data
from .sampler import ResumableSampler, epoch_permutation
from .store import TokenStore, build_token_store, store_key, token_dtype
from .tokenizer import (
    EOS_TOKEN,
    build_tokenizer,
    byte_tokenizer,
    check_vocab,
    is_byte_tokenizer,
    load_tokenizer,
    text_encoder,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "DataBundle",
    "DataConfig",
    "DataError",
    "Document",
    "PackedRows",
    "ResumableSampler",
    "TokenStore",
    "WindowRows",
    "build_token_store",
    "build_tokenizer",
    "byte_tokenizer",
    "check_config",
    "check_seq_len",
    "check_vocab",
    "collate",
    "corpus_fingerprint",
    "epoch_permutation",
    "is_byte_tokenizer",
    "load_documents",
    "load_shakespeare",
    "load_tokenizer",
    "prepare_data",
    "shakespeare_dir",
    "split_documents",
    "store_key",
    "strip_gutenberg",
    "text_encoder",
    "token_dtype",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
