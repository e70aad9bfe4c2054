"""Tokenizers on tiktoken: GPT-2's encoding, or a byte-level BPE trained on the user's corpus.

A model directory that does not use GPT-2's encoding holds `kettle-tokenizer.json` (pattern,
merges, special tokens); `load_tokenizer` picks whichever the directory says. `hf_tokenizer_json`
and `from_hf_tokenizer` convert to and from the Hugging Face `tokenizers` library's format, exactly:
tiktoken's byte-level BPE merges the adjacent pair whose concatenation has the lowest rank, so each
token's merge is the split of it that this very procedure reaches one step before the token.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Collection, Iterable, Iterator, Sequence

import regex  # tiktoken's own dependency: it reads the pattern syntax tiktoken's engine does
import tiktoken

from gpt.errors import KettleError
from gpt.files import read_regular_text

TOKENIZER_FILE = "kettle-tokenizer.json"
# Kettle's earlier name for that file, which is Hugging Face's: still read, never written.
LEGACY_TOKENIZER_FILE = "tokenizer.json"
END_OF_TEXT = "<|endoftext|>"
# Special tokens a trained tokenizer carries: end of text, and the chat format's markers.
SPECIAL_TOKENS = (END_OF_TEXT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# GPT-4's pre-split pattern, with numbers split into 1-2 digits (nanochat's choice for small
# vocabularies, where 3-digit number tokens waste merges): the pattern of Kettle's tokenizers
# before LLAMA3_SPLIT_PATTERN became the default, which they keep (it is in their file).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# Llama 3's pattern (numbers in 1-3 digits), as llama.cpp spells it: the default for new
# tokenizers (the starter's too), since llama.cpp runs it, so their models export to GGUF
# (gpt/gguf_export.py); no llama.cpp pre-tokenizer splits numbers as SPLIT_PATTERN does.
LLAMA3_SPLIT_PATTERN = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The patterns `tokenizer train --pattern` offers, by name.
SPLIT_PATTERNS = {"kettle": SPLIT_PATTERN, "llama3": LLAMA3_SPLIT_PATTERN}


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

    def ranked_tokens(self) -> list[bytes]:
        """The mergeable tokens' bytes, in rank (= id) order."""
        ranks = self.encoding._mergeable_ranks
        return sorted(ranks, key=ranks.__getitem__)

    def save(self, directory: str | Path) -> None:
        """Write `kettle-tokenizer.json` into `directory` (not for GPT-2's encoding, which is
        fetched). The special tokens in id order: the same tokenizer writes the same bytes."""
        if self.name == "gpt2":
            return
        data = {
            "name": self.name,
            "pattern": self.encoding._pat_str,
            "special_tokens": dict(sorted(self.special_tokens.items(), key=lambda kv: kv[1])),
            "merges": [base64.b64encode(token).decode("ascii") for token in self.ranked_tokens()],
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
        data = json.loads(read_regular_text(path))
    except FileNotFoundError:
        raise KettleError(f"{path}: tokenizer file not found") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise KettleError(f"{path}: not a valid Kettle tokenizer file ({exc})") from None
    try:
        name, pattern, ranks, special = _checked_fields(data)
        encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    except ValueError as exc:  # ours, or tiktoken's for a pattern its regex engine refuses
        raise KettleError(f"{path}: not a valid Kettle tokenizer file ({exc})") from None
    return Tokenizer(encoding, name)


# Text with letters, digits, punctuation and spaces, for checking how a pattern splits.
PATTERN_PROBE = "Hello, world! It's 2024.\n\tÀ la carte: x=1;  ok?"


def _checked_fields(data) -> tuple[str, str, dict[bytes, int], dict[str, int]]:
    """(name, pattern, merge ranks, special tokens) of a tokenizer.json, or ValueError."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    for key, kind, what in (
        ("name", str, "a string"),
        ("pattern", str, "a string"),
        ("merges", list, "a list"),
        ("special_tokens", dict, "an object"),
    ):
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
    if any(not isinstance(i, int) or isinstance(i, bool) for i in ids) or sorted(ids) != list(
        range(len(ranks), len(ranks) + len(ids))
    ):
        raise ValueError(
            f"special token ids must be distinct integers following the "
            f"{len(ranks)} merges ({len(ranks)}..{len(ranks) + len(ids) - 1})"
        )
    return data["name"], data["pattern"], ranks, special


def tokenizer_path(directory: str | Path) -> Path | None:
    """The Kettle tokenizer file in a directory Kettle wrote (a model, a run, `tokenizer
    train`'s output), under its name or the one older Kettles gave it; None when there is none."""
    for name in (TOKENIZER_FILE, LEGACY_TOKENIZER_FILE):
        if (path := Path(directory, name)).exists():
            return path
    return None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer a model directory uses: its own tokenizer file, else GPT-2's."""
    path = tokenizer_path(model_dir)
    return load_tokenizer_file(path) if path else gpt2_tokenizer()


# --- Hugging Face's tokenizers format ----------------------------------------------------------


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in."""
    from tokenizers.pre_tokenizers import ByteLevel

    # ByteLevel.alphabet() is the set of the 256 characters; their order is GPT-2's
    # bytes_to_unicode: the printable Latin-1 bytes stand for themselves, the rest follow from 256.
    printable = [b for b in range(256) if chr(b) in ByteLevel.alphabet()]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merge_pairs(tokenizer: Tokenizer) -> list[tuple[bytes, bytes]]:
    """Each multi-byte token's merge, in rank order: the two parts tiktoken's procedure (merge
    the adjacent pair of lowest rank) has made of its bytes when only lower ranks may merge."""
    ranks = tokenizer.encoding._mergeable_ranks
    pairs = []
    for token in tokenizer.ranked_tokens():
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            rank, i = min((ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if rank >= ranks[token]:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise KettleError(
                f"tokenizer {tokenizer.name}: token {token!r} is no merge of two "
                "lower-ranked tokens, so byte-level BPE cannot express it"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def byte_level_bpe(tokenizer: Tokenizer) -> tuple[list[str], list[tuple[str, str]]]:
    """The mergeable tokens in id order and their merges in rank order, written in GPT-2's
    printable stand-ins for bytes: how Hugging Face and llama.cpp (GGUF) store a byte-level BPE."""
    chars = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    return [text(t) for t in tokenizer.ranked_tokens()], [(text(a), text(b)) for a, b in _merge_pairs(tokenizer)]


def _prefix_split(prefixes: Sequence[str]) -> str:
    """A regex for any of `prefixes` at the start of a piece of text (the text between special
    tokens, which the tokenizers library pre-tokenizes one by one), every character escaped."""
    return r"\A(?:" + "|".join("".join(f"\\x{{{ord(c):x}}}" for c in p) for p in prefixes) + ")"


def hf_tokenizer_json(tokenizer: Tokenizer, prefixes: Sequence[str] = (), *, stop_tokens: Collection[str] = ()) -> str:
    """The tokenizer in the `tokenizers` library's format (a Hugging Face `tokenizer.json`) that
    encodes every text to tiktoken's ids: the same split pattern, the same byte-level BPE (a
    piece that is a whole token is that token, as in tiktoken: ignore_merges), the special tokens
    at their ids. Text that starts with one of `prefixes` (right after a special token) is split
    after it first: a chat template's headers, which Kettle encodes apart from the message.
    Only `stop_tokens` are marked special, which decoding skips by default: an answer never holds
    them, and it shows any other special token as its text, as Kettle's decoding does."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab, merges = byte_level_bpe(tokenizer)
    hf = HFTokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *([pre_tokenizers.Split(Regex(_prefix_split(prefixes)), behavior="isolated")] if prefixes else []),
            pre_tokenizers.Split(Regex(tokenizer.encoding._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    special = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    for token, _ in special:  # one by one, in id order: add_special_tokens marks all it adds special
        added = AddedToken(token, special=token in stop_tokens, normalized=False)
        (hf.add_special_tokens if token in stop_tokens else hf.add_tokens)([added])
    if [hf.token_to_id(t) for t, _ in special] != [i for _, i in special]:  # ids follow the merges
        raise KettleError(f"tokenizer {tokenizer.name}: its special tokens do not follow its merges")
    return hf.to_str(pretty=True)


def from_hf_tokenizer(path: str | Path, prefixes: Sequence[str] = ()) -> Tokenizer:
    """A Hugging Face `tokenizer.json` as a Kettle tokenizer, when it is a byte-level BPE that
    tiktoken runs exactly (what `hf_tokenizer_json(_, prefixes)` writes, and GPT-2's own); GPT-2's
    tokenizer when that is what it holds. Anything else is refused, naming what Kettle cannot run."""
    path = Path(path)
    try:
        data = json.loads(read_regular_text(path))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise KettleError(f"{path}: cannot read ({exc})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise KettleError(f"{path}: not a BPE tokenizer (Kettle runs byte-level BPE only)")
    pattern = _hf_split_pattern(data.get("pre_tokenizer"), prefixes)
    if pattern is None:
        raise KettleError(
            f"{path}: pre_tokenizer is not a byte-level split Kettle can run "
            "(ByteLevel, or Split by a regex then ByteLevel without its own)"
        )
    for key, wanted in (("normalizer", None), ("decoder", "ByteLevel")):
        got = data.get(key)
        if (got.get("type") if isinstance(got, dict) else got) != wanted:
            raise KettleError(f"{path}: {key} {got!r} is not {wanted!r} (byte-level BPE)")
    vocab, added = model.get("vocab"), data.get("added_tokens", [])
    if (
        not isinstance(vocab, dict)
        or not isinstance(added, list)
        or not all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in added)
    ):
        raise KettleError(f"{path}: model.vocab must be an object and added_tokens a list of tokens")
    special = {t["content"]: t.get("id") for t in added}
    bytes_of = {c: b for b, c in _byte_chars().items()}
    by_id = sorted((i, t) for t, i in vocab.items() if t not in special and isinstance(i, int))
    if [i for i, _ in by_id] != list(range(len(by_id))) or len(by_id) + len(special) < len(vocab):
        raise KettleError(f"{path}: the vocabulary's ids are not 0..{len(by_id) - 1} followed by the added tokens")
    try:
        merged = [bytes(bytes_of[c] for c in t) for _, t in by_id]
    except KeyError as exc:
        raise KettleError(f"{path}: vocabulary character {exc.args[0]!r} is not a byte-level one") from None
    fields = {
        "name": "hf-bpe",
        "pattern": pattern,
        "special_tokens": special,
        "merges": [base64.b64encode(t).decode("ascii") for t in merged],
    }
    try:
        name, pattern, ranks, special = _checked_fields(fields)
    except ValueError as exc:
        raise KettleError(f"{path}: not a tokenizer Kettle can run ({exc})") from None
    tokenizer = Tokenizer(
        tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special), name
    )
    stored = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    chars = _byte_chars()
    implied = [("".join(chars[x] for x in a), "".join(chars[x] for x in b)) for a, b in _merge_pairs(tokenizer)]
    if stored != implied:
        at = next(i for i, (s, m) in enumerate(zip(stored + [None], implied + [None])) if s != m)
        raise KettleError(
            f"{path}: model.merges[{at}] is not the merge its vocabulary's ranks make "
            "(Kettle merges by rank, as tiktoken does), so Kettle would encode differently"
        )
    if special == {END_OF_TEXT: len(ranks)}:  # GPT-2's one special token: is it GPT-2's?
        gpt2 = gpt2_tokenizer()
        if ranks == gpt2.encoding._mergeable_ranks:
            return gpt2
    return tokenizer


def _hf_split_pattern(pre, prefixes: Sequence[str]) -> str | None:
    """The regex a `tokenizers` pre-tokenizer splits text by before byte-level BPE, if it is one
    Kettle runs: ByteLevel with its built-in regex (GPT-2's), or Split(regex) then ByteLevel
    (after the split of `prefixes` that hf_tokenizer_json puts first)."""
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pattern, as tiktoken runs it

    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return r50k_pat_str
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        return None
    splits = [
        s.get("pattern", {}).get("Regex")
        if isinstance(s.get("pattern"), dict)
        and s.get("type") == "Split"
        and s.get("behavior") == "Isolated"
        and not s.get("invert")
        else None
        for s in steps[:-1]
    ]
    if prefixes and splits[:1] == [_prefix_split(prefixes)]:
        splits = splits[1:]
    byte_level = steps[-1]
    if (
        len(splits) == 1
        and isinstance(splits[0], str)
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
        and not byte_level.get("add_prefix_space")
    ):
        return splits[0]
    return None


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, name: str = "kettle-bpe", pattern: str = LLAMA3_SPLIT_PATTERN
) -> Tokenizer:
    """Train a byte-level BPE with rustbpe on text split by `pattern`; `vocab_size` includes the
    special tokens."""
    import rustbpe

    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise KettleError(f"vocab size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(_non_empty(texts), n_merged, pattern=pattern)
    ranks = dict(trainer.get_mergeable_ranks())
    special = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
    return Tokenizer(encoding, name)


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
