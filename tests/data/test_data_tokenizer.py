"""Byte, BPE and Hugging Face tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import TEXTS
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ttt.data import (
    DataError,
    Document,
    build_tokenizer,
    byte_tokenizer,
    check_vocab,
    load_tokenizer,
    tokenizer_fingerprint,
)
from ttt.data.tokenizer import encode_documents, is_byte_tokenizer, text_encoder

SAMPLES = [
    "",
    "plain ASCII, with  double spaces\tand tabs\nand newlines\r\n",
    "Naïve café — déjà vu! ¿Qué? Straße Ωμέγα Привет 日本語 한국어 עברית 🎉👩‍👩‍👧 \u00ad\u200b end",
    " leading space and trailing space ",
    "<|endoftext|> literal special string",
]


def _docs() -> list[Document]:
    return [Document(k, v) for k, v in TEXTS.items()]


def test_byte_tokenizer_round_trip() -> None:
    tok = byte_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 257
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 256 and tok.pad_token_id == 256
    for s in SAMPLES:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        if "<|endoftext|>" not in s:
            assert ids == list(s.encode("utf-8"))  # id == byte value
    # in the token stores, special-token strings inside text are plain bytes
    # (the token stores' byte fast path relies on this equality)
    texts = SAMPLES + list(TEXTS.values())
    assert encode_documents(tok, texts) == [list(s.encode("utf-8")) for s in texts]
    assert is_byte_tokenizer(tok) and is_byte_tokenizer(text_encoder(tok))


def test_byte_tokenizer_save_load(tmp_path: Path) -> None:
    tok = build_tokenizer("byte", save_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert isinstance(loaded, PreTrainedTokenizerFast)
    for s in SAMPLES:
        assert loaded.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
        assert loaded.decode(tok.encode(s, add_special_tokens=False)) == s
    assert loaded.eos_token_id == 256 and loaded.pad_token_id == 256
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    assert is_byte_tokenizer(loaded)


def test_bpe_train_round_trip_and_save_load(tmp_path: Path) -> None:
    tok = build_tokenizer("bpe", documents=_docs(), save_dir=tmp_path / "bpe", vocab_size=300)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 258 < len(tok) <= 300
    assert tok.convert_tokens_to_ids("<|endoftext|>") == tok.eos_token_id
    text = TEXTS["alpha.txt"]
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode())  # merges learned
    loaded = load_tokenizer(tmp_path / "bpe")
    assert not is_byte_tokenizer(loaded)
    assert encode_documents(tok, list(TEXTS.values())) == [
        tok.encode(t, add_special_tokens=False) for t in TEXTS.values()]
    for s in SAMPLES + list(TEXTS.values()):
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        assert loaded.encode(s, add_special_tokens=False) == ids
    again = build_tokenizer("bpe", documents=_docs(), vocab_size=300)
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_bpe_bad_input() -> None:
    with pytest.raises(DataError, match="pass the training documents"):
        build_tokenizer("bpe")
    with pytest.raises(DataError, match="vocab_size must be larger than 257"):
        build_tokenizer("bpe", documents=_docs(), vocab_size=200)


def test_hf_tokenizer_by_path(tmp_path: Path) -> None:
    byte_tokenizer().save_pretrained(str(tmp_path / "saved"))
    tok = build_tokenizer(str(tmp_path / "saved"))
    assert tok.decode(tok.encode(SAMPLES[2], add_special_tokens=False)) == SAMPLES[2]
    with pytest.raises(DataError, match=r"tokenizer path '.*missing' does not exist"):
        build_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="could not load a tokenizer from folder"):
        build_tokenizer(str(tmp_path / "junk"))


def test_check_vocab() -> None:
    tok = byte_tokenizer()
    check_vocab(tok, 257)
    check_vocab(tok, 50000)
    msg = "the tokenizer has 257 tokens but the model vocabulary holds only 256"
    with pytest.raises(DataError, match=msg):
        check_vocab(tok, 256)
    with pytest.raises(DataError, match="holds only 100"):
        build_tokenizer("byte", vocab_size=100)


def test_text_generation_pipeline() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, pipeline

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=256, eos_token_id=256, pad_token_id=256))
    gen = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    out = gen("Héllo", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("Héllo")


def test_hub_name_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("offline")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(DataError, match="could not load a tokenizer from name 'org/some-tokenizer'.*offline"):
        build_tokenizer("org/some-tokenizer")
