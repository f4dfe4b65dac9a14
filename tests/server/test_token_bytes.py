"""A token's own bytes (chat logprobs' ``bytes``) for byte-level BPE, with SmolLM2's tokenizer:
tokens that split a CJK character or an emoji report their raw byte(s), never U+FFFD's."""

from __future__ import annotations

import pytest

from plait.server.token_bytes import TokenBytes, display

REPLACEMENT = "\ufffd".encode()
TEXT = "你好，世界！🙂 Ünïcödé and 日本語のテキスト 🎉🎉"


@pytest.fixture(scope="module")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def test_byte_level_tokens_concatenate_to_the_texts_bytes(tokenizer):
    tb = TokenBytes(tokenizer)
    assert tb.scheme == "byte_level"
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = [tb.bytes_of(i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    partial = [p for p in pieces if not _valid(p)]
    assert partial, "the text must hold tokens that split a character"
    assert all(REPLACEMENT not in p for p in pieces)
    for p in partial:  # OpenAI's spelling of a partial character
        shown = display(p)
        assert shown.startswith("bytes:") and "\\x" in shown and "\ufffd" not in shown


def test_special_tokens_are_their_text_and_whole_tokens_their_decoding(tokenizer):
    tb = TokenBytes(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tb.entry(eos) == ("<|im_end|>", list(b"<|im_end|>"))
    hello = tokenizer.encode(" hello", add_special_tokens=False)[0]
    assert tb.entry(hello) == (tokenizer.decode([hello]), list(tokenizer.decode([hello]).encode()))


def test_a_real_replacement_character_keeps_its_bytes(tokenizer):
    tb = TokenBytes(tokenizer)
    ids = tokenizer.encode("a\ufffdb", add_special_tokens=False)
    assert b"".join(tb.bytes_of(i) for i in ids) == "a\ufffdb".encode()


def _valid(raw: bytes) -> bool:
    try:
        raw.decode()
        return True
    except UnicodeDecodeError:
        return False
