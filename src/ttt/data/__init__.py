"""Corpora, tokenizers, token stores (single-file and prepared shards), packed rows and a resumable sampler
(see docs/contracts.md)."""

from .corpus import (
    Document,
    corpus_fingerprint,
    iter_documents,
    load_documents,
    load_shakespeare,
    shakespeare_dir,
    split_documents,
    strip_gutenberg,
)
from .errors import DataError
from .packing import IGNORE_INDEX, PackedRows, WindowRows, collate
from .pipeline import DataBundle, DataConfig, check_config, check_seq_len, open_prepared, prepare_data
from .prepare import PrepareConfig, prepare_corpus
from .sampler import ResumableSampler, epoch_permutation
from .shards import ShardedTokens, ShardedTokenStore, is_prepared_dir, read_manifest
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
    "iter_documents",
    "open_prepared",
    "PrepareConfig",
    "prepare_corpus",
    "ShardedTokens",
    "ShardedTokenStore",
    "is_prepared_dir",
    "read_manifest",
]
