"""Tests of the offline tokenizers (epi_mini/tokenizer.py). Run: python -m pytest tests/test_tokenizer.py -q"""
import json
import random

import pytest

from epi_mini.tokenizer import EOT, byte_tokenizer, get_tokenizer, gpt2_tokenizer


def test_byte_tokenizer_round_trips_any_utf8():
    tok = byte_tokenizer()
    rng = random.Random(0)
    samples = ["", "m 3+4-2=", "héllo wörld", "日本語 🙂 \n\t", EOT + " is plain text here", "\x00\x7f"]
    samples += ["".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(40)) for _ in range(50)]
    for text in samples:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)   # user text never turns into special tokens
        assert tok.decode(ids) == text
    assert tok.vocab_size == 258 and tok.eot_id == 256 and tok.pad_id == 257
    assert tok.decode([104, 105, tok.eot_id, tok.pad_id]) == "hi"


def test_gpt2_missing_files_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vocab.bpe.*--gpt2-vocab"):
        gpt2_tokenizer()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        get_tokenizer("gpt2", tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("bpe")


def _data_gym_files(folder, merges):
    """A small vocabulary in GPT-2's file format (the byte-to-unicode table of data_gym) plus given merges."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    order = printable + [b for b in range(256) if b not in printable]
    to_char = {b: chr(b) for b in printable}
    to_char.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    encoder = {to_char[b]: i for i, b in enumerate(order)}
    for i, (a, b) in enumerate(merges):
        encoder["".join(to_char[x] for x in (a + b).encode())] = 256 + i
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(
        " ".join("".join(to_char[x] for x in part.encode()) for part in m) + "\n" for m in merges))
    (folder / "encoder.json").write_text(json.dumps(encoder))


def test_gpt2_format_loads_from_a_local_folder(tmp_path):
    _data_gym_files(tmp_path, [("h", "e"), ("he", "llo")])
    tok = gpt2_tokenizer(tmp_path)
    ids = tok.encode("hello hello")
    assert 257 in ids                        # the merged "hello" token is used
    assert tok.decode(ids) == "hello hello"
    assert tok.eot_id == 258 and tok.pad_id == 259
