"""Tokenizers on tiktoken: GPT-2's encoding, or a byte-level BPE trained on the user's corpus.

A model directory that does not use GPT-2's encoding holds `tokenizer.json` (pattern, merges,
special tokens); `load_tokenizer` picks whichever the directory says.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Iterable, Iterator

import regex  # tiktoken's own dependency: it reads the pattern syntax tiktoken's engine does
import tiktoken

from gpt.errors import KettleError

TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
# Special tokens a trained tokenizer carries: end of text, and the chat format's markers.
SPECIAL_TOKENS = (END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# GPT-4's pre-split pattern, with numbers split into 1-2 digits (nanochat's choice for small
# vocabularies, where 3-digit number tokens waste merges).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """A tiktoken encoding plus what Kettle needs to know about it."""

    def __init__(self, encoding: tiktoken.Encoding, name: str):
        self.encoding = encoding
        self.name = name

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t: self.encoding.encode_single_token(t) for t in self.encoding.special_tokens_set}

    @property
    def eot_id(self) -> int:
        return self.encoding.eot_token

    def has_special(self, token: str) -> bool:
        return token in self.encoding.special_tokens_set

    def special_id(self, token: str) -> int:
        if not self.has_special(token):
            raise KettleError(f"tokenizer {self.name} has no special token {token}")
        return self.encoding.encode_single_token(token)

    def encode(self, text: str) -> list[int]:
        """Encode user text. Special-token strings in it stay plain text, so typing
        "<|endoftext|>" into a chat never ends a document."""
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` into `directory` (not for GPT-2's encoding, which is fetched)."""
        if self.name == "gpt2":
            return
        ranks = sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1])
        data = {
            "name": self.name,
            "pattern": self.encoding._pat_str,
            "special_tokens": self.special_tokens,
            "merges": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
        }
        Path(directory, TOKENIZER_FILE).write_text(json.dumps(data), encoding="utf-8")


def gpt2_tokenizer() -> Tokenizer:
    try:
        return Tokenizer(tiktoken.get_encoding("gpt2"), "gpt2")
    except Exception as exc:  # tiktoken raises network errors of several libraries
        raise KettleError(
            "the GPT-2 tokenizer files are not cached and could not be downloaded "
            f"({type(exc).__name__}); connect to the internet once, or set TIKTOKEN_CACHE_DIR to "
            "a folder holding them"
        ) from None


def load_tokenizer_file(path: str | Path) -> Tokenizer:
    """A tokenizer.json as Tokenizer.save writes it, checked: a file that loads is one that
    encodes any text and decodes every id (tiktoken itself accepts much that fails later)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KettleError(f"{path}: tokenizer file not found") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise KettleError(f"{path}: not a valid Kettle tokenizer file ({exc})") from None
    try:
        name, pattern, ranks, special = _checked_fields(data)
        encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens=special)
    except ValueError as exc:  # ours, or tiktoken's for a pattern its regex engine refuses
        raise KettleError(f"{path}: not a valid Kettle tokenizer file ({exc})") from None
    return Tokenizer(encoding, name)


# Text with letters, digits, punctuation and spaces, for checking how a pattern splits.
PATTERN_PROBE = "Hello, world! It's 2024.\n\tÀ la carte: x=1;  ok?"


def _checked_fields(data) -> tuple[str, str, dict[bytes, int], dict[str, int]]:
    """(name, pattern, merge ranks, special tokens) of a tokenizer.json, or ValueError."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    for key, kind, what in (("name", str, "a string"), ("pattern", str, "a string"),
                            ("merges", list, "a list"), ("special_tokens", dict, "an object")):
        if not isinstance(data.get(key), kind):
            raise ValueError(f"{key!r} must be {what}")
    try:
        pieces = list(regex.finditer(data["pattern"], PATTERN_PROBE))
    except regex.error as exc:
        raise ValueError(f"the pattern is not a regular expression ({exc})") from None
    if any(m.group() == "" for m in pieces):  # tiktoken's encoder panics on an empty piece
        raise ValueError("the pattern matches empty text")
    ranks: dict[bytes, int] = {}
    for rank, token in enumerate(data["merges"]):
        try:
            piece = base64.b64decode(token, validate=True) if isinstance(token, str) else None
        except binascii.Error:
            piece = None
        if not piece:
            raise ValueError(f"merges[{rank}] is not a base64 token")
        if piece in ranks:
            raise ValueError(f"merges[{rank}] repeats merges[{ranks[piece]}]")
        ranks[piece] = rank
    missing = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if missing is not None:  # byte-level BPE: every byte must have a token of its own
        raise ValueError(f"no token for the byte 0x{missing:02x}")
    special = data["special_tokens"]
    if END_OF_TEXT not in special:
        raise ValueError(f"no {END_OF_TEXT} special token")
    ids = list(special.values())
    if (any(not isinstance(i, int) or isinstance(i, bool) for i in ids)
            or sorted(ids) != list(range(len(ranks), len(ranks) + len(ids)))):
        raise ValueError(f"special token ids must be distinct integers following the "
                         f"{len(ranks)} merges ({len(ranks)}..{len(ranks) + len(ids) - 1})")
    return data["name"], data["pattern"], ranks, special


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer a model directory uses: its own `tokenizer.json`, else GPT-2's."""
    path = Path(model_dir, TOKENIZER_FILE)
    return load_tokenizer_file(path) if path.exists() else gpt2_tokenizer()


def train_tokenizer(texts: Iterable[str], vocab_size: int, name: str = "kettle-bpe") -> Tokenizer:
    """Train a byte-level BPE with rustbpe; `vocab_size` includes the special tokens."""
    import rustbpe

    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise KettleError(f"vocab size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(_non_empty(texts), n_merged, pattern=SPLIT_PATTERN)
    ranks = dict(trainer.get_mergeable_ranks())
    special = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=special)
    return Tokenizer(encoding, name)


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
