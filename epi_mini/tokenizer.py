"""Tokenizers built on tiktoken, usable with no internet connection.

The default, :func:`byte_tokenizer`, is a byte-level ``tiktoken.Encoding``: token ``i`` is the byte ``i``
(0-255), followed by two special tokens, ``<|endoftext|>`` (ends every response) and ``<|pad|>`` (fills
short rows of a batch). Any UTF-8 text round-trips exactly, and nothing is downloaded.

GPT-2's BPE vocabulary is optional (:func:`gpt2_tokenizer`): it is loaded from local files only, and a
clear ``FileNotFoundError`` says how to provide them when they are absent.
"""
import hashlib
import os
import tempfile
from pathlib import Path

import tiktoken

EOT = "<|endoftext|>"
PAD = "<|pad|>"

# The two files tiktoken's "gpt2" encoding is built from (OpenAI's public blobs).
GPT2_FILES = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


class Tokenizer:
    """A thin wrapper over a ``tiktoken.Encoding`` that knows its end-of-text and pad ids."""

    def __init__(self, encoding: tiktoken.Encoding, eot: str = EOT, pad: str = PAD):
        self.encoding = encoding
        self.name = encoding.name
        self.eot_id = encoding._special_tokens[eot]
        self.pad_id = encoding._special_tokens[pad]
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # Special-token strings in user text are encoded as plain bytes, never as control tokens.
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        """Decode ids to text, dropping end-of-text and pad tokens."""
        ids = [int(i) for i in ids if int(i) not in (self.eot_id, self.pad_id)]
        return self.encoding.decode(ids, errors="replace")

    def __repr__(self):
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + <|endoftext|> (id 256) + <|pad|> (id 257). Works offline."""
    encoding = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",  # any split works: with no merges every piece becomes its bytes
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256, PAD: 257},
    )
    return Tokenizer(encoding)


def _tiktoken_cache_dir() -> Path:
    # Same lookup order as tiktoken.load.read_file_cached.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return Path(os.environ["TIKTOKEN_CACHE_DIR"])
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return Path(os.environ["DATA_GYM_CACHE_DIR"])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def gpt2_tokenizer(path=None) -> Tokenizer:
    """GPT-2's BPE (50257 tokens) plus a <|pad|> token, read from local files only.

    ``path`` is a folder holding ``vocab.bpe`` and ``encoder.json``; without it, tiktoken's cache
    (``$TIKTOKEN_CACHE_DIR``, else ``<tmp>/data-gym-cache``) is searched for them.
    """
    if path is not None:
        folder = Path(path)
        files = {name: folder / name for name in GPT2_FILES}
    else:
        cache = _tiktoken_cache_dir()
        files = {name: cache / hashlib.sha1(url.encode()).hexdigest() for name, url in GPT2_FILES.items()}
    missing = [f"{name} (looked for {p})" for name, p in files.items() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "GPT-2 vocabulary not found: " + "; ".join(missing) + ". This machine may be offline, so "
            "epi-mini never downloads it. Copy vocab.bpe and encoder.json (from " + GPT2_FILES["vocab.bpe"]
            .rsplit("/", 1)[0] + "/) into a folder and pass it with --gpt2-vocab DIR, or run "
            "tiktoken.get_encoding('gpt2') once on a machine with internet and copy its cache folder "
            "here via TIKTOKEN_CACHE_DIR. The default byte-level tokenizer needs no file.")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    ranks = data_gym_to_mergeable_bpe_ranks(str(files["vocab.bpe"]), str(files["encoder.json"]))
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOT: len(ranks), PAD: len(ranks) + 1},
    )
    return Tokenizer(encoding)


def get_tokenizer(name: str = "bytes", path=None) -> Tokenizer:
    """Look a tokenizer up by name: ``"bytes"`` (default, offline) or ``"gpt2"`` (local files)."""
    if name == "bytes":
        return byte_tokenizer()
    if name == "gpt2":
        return gpt2_tokenizer(path)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'bytes' or 'gpt2'")
