"""Pretraining corpora: text on disk turned into token shards, and the loaders that read them.

A corpus is a text file, a JSONL file with a text field, or a folder of such files. `build_shards`
tokenizes it in one streaming pass (memory use does not grow with the corpus) into

    train_000.bin, train_001.bin, ...   token ids, numpy uint16 (uint32 for vocabularies > 65536)
    val_000.bin, ...                    the validation split: the last `val_fraction` of the bytes
    meta.json                           dtype, token counts, tokenizer, the corpus fingerprint

Documents are separated by the tokenizer's end-of-text token. Decoding train then val, with those
separators read as document boundaries, gives back the corpus text exactly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt.errors import KettleError
from gpt.files import atomic_directory
from gpt.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".jsonl"}
META_FILE = "meta.json"
SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB per uint16 shard
CHUNK_CHARS = 1 << 20  # text is tokenized in pieces of about this many characters


# --- reading the corpus -------------------------------------------------------------------------


def corpus_files(path: str | Path) -> list[Path]:
    """The files a corpus path stands for: the file itself, or a folder's text files (sorted)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise KettleError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise KettleError(f"{path}: the folder holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def check_corpus(path: str | Path) -> list[Path]:
    """The corpus files, after the checks that need no tokenizer: it exists, is not empty, and
    holds no binary file."""
    files = corpus_files(path)
    if sum(f.stat().st_size for f in files) == 0:
        raise KettleError(f"{path}: the corpus is empty")
    for file in files:
        _check_text(file)
    return files


def _check_text(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\x00" in head:
        raise KettleError(f"{path}: a binary file, not text (pretraining reads UTF-8 text)")


def _read_chunks(path: Path) -> Iterator[str]:
    """A text file in pieces of about CHUNK_CHARS characters, cut after a newline."""
    _check_text(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            buf: list[str] = []
            size = 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)
    except UnicodeDecodeError as exc:
        raise KettleError(
            f"{path}: not UTF-8 text (byte {exc.start} of a piece cannot be decoded); is it a binary file?"
        ) from None
    except OSError as exc:
        raise KettleError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """Each record's text, with the bytes its line takes in the file."""
    _check_text(path)
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise KettleError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise KettleError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                yield record[text_field], len(line.encode("utf-8"))
    except UnicodeDecodeError:
        raise KettleError(f"{path}: not UTF-8 text; is it a binary file?") from None
    except OSError as exc:
        raise KettleError(f"{path}: cannot read ({exc.strerror or exc})") from None


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[Iterator[tuple[str, int]]]:
    """Each document of the corpus (a text file, a JSONL record) as an iterator of text pieces,
    each with the number of file bytes it came from."""
    for file in corpus_files(path):
        if file.suffix.lower() == ".jsonl":
            for text, size in _read_jsonl(file, text_field):
                yield iter(((text, size),))
        else:
            yield ((text, len(text.encode("utf-8"))) for text in _read_chunks(file))


def iter_texts(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """All text pieces of the corpus in order, e.g. to train a tokenizer on."""
    for doc in iter_documents(path, text_field):
        for text, _size in doc:
            yield text


def fingerprint(path: str | Path) -> str:
    """Identifies the corpus files and their versions (names, sizes, modification times)."""
    h = hashlib.sha256()
    for file in corpus_files(path):
        st = file.stat()
        h.update(f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# --- writing shards -----------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token ids to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.counts: list[int] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.counts[-1] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.counts[-1]
            part, ids = ids[:room], ids[room:]
            part.astype(self.dtype, copy=False).tofile(self._file)
            self.counts[-1] += len(part)

    def _open_next(self) -> None:
        self.close()
        self._file = open(self.directory / f"{self.split}_{len(self.counts):03d}.bin", "wb")
        self.counts.append(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class ShardInfo:
    directory: Path
    dtype: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    documents: int
    bytes: int


def build_shards(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    text_field: str = "text",
    shard_tokens: int = SHARD_TOKENS,
    on_progress: Callable[[int, int], None] | None = None,
) -> ShardInfo:
    """Tokenize the corpus at `path` into shards in `out_dir` (written atomically).

    The validation split is the text after the first (1 - val_fraction) of the corpus bytes, cut
    at a line end where there is one, so a single-file corpus is split too. `on_progress(done,
    total)` is called with bytes read.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise KettleError(f"validation fraction must be in [0, 1), got {val_fraction}")
    files = check_corpus(path)
    total = sum(f.stat().st_size for f in files)
    split_at = total * (1.0 - val_fraction) if val_fraction > 0 else float("inf")
    dtype = token_dtype(tokenizer.n_vocab)
    eot = tokenizer.eot_id
    done = 0
    documents = 0
    with atomic_directory(out_dir, overwrite=True) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}

        def emit(text: str, size: int) -> None:
            nonlocal done
            in_train = done < split_at
            done += size
            if in_train and done > split_at:
                # The split point falls inside this piece: cut it there, at a line end if any.
                cut = int(len(text) * (1.0 - (done - split_at) / size))
                newline = text.rfind("\n", 0, cut)
                cut = newline + 1 if newline > 0 else cut
                writers["train"].write(np.asarray(tokenizer.encode(text[:cut]), dtype=np.int64))
                writers["val"].write(np.asarray(tokenizer.encode(text[cut:]), dtype=np.int64))
            else:
                split = "train" if in_train else "val"
                writers[split].write(np.asarray(tokenizer.encode(text), dtype=np.int64))
            if on_progress:
                on_progress(done, total)

        try:
            for doc in iter_documents(path, text_field):
                empty = True
                for text, size in doc:
                    if text:
                        empty = False
                        emit(text, size)
                if not empty:
                    documents += 1
                    writers["train" if done <= split_at else "val"].write(np.array([eot]))
        finally:
            for w in writers.values():
                w.close()
        counts = {s: sum(w.counts) for s, w in writers.items()}
        if counts["train"] + counts["val"] == 0:
            raise KettleError(f"{path}: the corpus holds no text")
        meta = {
            "dtype": dtype.name,
            "vocab_size": tokenizer.n_vocab,
            "tokenizer": tokenizer.name,
            "eot_id": eot,
            "documents": documents,
            "bytes": done,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "shards": {s: w.counts for s, w in writers.items()},
            "source": str(Path(path).expanduser().resolve()),
            "fingerprint": fingerprint(path),
            "val_fraction": val_fraction,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return ShardInfo(Path(out_dir), dtype.name, tokenizer.n_vocab, counts["train"], counts["val"], documents, done)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory, META_FILE)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KettleError(f"{path}: missing; {directory} holds no token shards") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise KettleError(f"{path}: cannot read ({exc})") from None


# --- reading shards -----------------------------------------------------------------------------


class TokenStream:
    """The shards of one split, memory-mapped and read as one sequence of token ids."""

    def __init__(self, directory: str | Path, split: str):
        meta = read_meta(directory)
        self.eot_id = int(meta["eot_id"])
        self.shards = [
            np.memmap(Path(directory, f"{split}_{i:03d}.bin"), dtype=meta["dtype"], mode="r")
            for i, n in enumerate(meta["shards"][split])
            if n > 0
        ]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside 0..{len(self)}")
        parts = [np.zeros(0, dtype=np.int64)]
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            local = start - int(self.offsets[i])
            part = self.shards[i][local : local + length]
            parts.append(part)
            start += len(part)
            length -= len(part)
            i += 1
        return np.concatenate(parts).astype(np.int64)


def check_windows(n_tokens: int, max_length: int) -> None:
    """A training split must hold one window of `max_length` tokens and the one after them."""
    if n_tokens < max_length + 1:
        raise KettleError(
            f"the corpus has {n_tokens} training tokens, fewer than one context "
            f"window ({max_length} + 1); use more text or a shorter context"
        )


class WindowLoader:
    """Batches of (inputs, targets) windows; targets are the inputs shifted by one token.

    Batches are a pure function of the step, so a run's data position is one integer and
    resuming continues exactly. One step's batch holds `step_batch` = batch_size x world_size x
    accum_steps windows; micro-step `micro` of rank `rank` reads its own slice of them. The same
    windows make up a step whether they come from one process accumulating gradients or from
    several processes, so both train alike.

    `sliding` (the book's loader): windows start every `stride` tokens; each epoch visits them
    all once, shuffled with the seed (in order with shuffle=False).
    `random`: windows start at random positions drawn from (seed, step).
    """

    def __init__(
        self,
        stream: TokenStream,
        batch_size: int,
        max_length: int,
        stride: int | None = None,
        mode: str = "sliding",
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accum_steps: int = 1,
    ):
        if mode not in ("sliding", "random"):
            raise KettleError(f"unknown loader {mode!r} (choose sliding or random)")
        check_windows(len(stream), max_length)
        self.stream, self.batch_size, self.max_length = stream, batch_size, max_length
        self.stride = stride or max_length
        self.mode, self.shuffle, self.seed = mode, shuffle, seed
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.n_windows = (len(stream) - max_length - 1) // self.stride + 1
        self.step_batch = batch_size * world_size * accum_steps

    @property
    def batches_per_epoch(self) -> int:
        """Steps in one pass over the sliding windows (a partial last batch is dropped, except
        when there is only one: then windows repeat to fill it)."""
        return max(1, self.n_windows // self.step_batch)

    def _starts(self, step: int) -> np.ndarray:
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.stream) - self.max_length, size=self.step_batch)
        epoch, pos = divmod(step, self.batches_per_epoch)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            if self.shuffle
            else np.arange(self.n_windows)
        )
        return np.resize(order[pos * self.step_batch :], self.step_batch) * self.stride

    def batch(self, step: int, micro: int = 0):
        """This rank's part of micro-step `micro` of step `step`: (inputs, targets) int64 [B, T]."""
        import torch

        first = (micro * self.world_size + self.rank) * self.batch_size
        starts = self._starts(step)[first : first + self.batch_size]
        rows = np.stack([self.stream.read(int(s), self.max_length + 1) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def __iter__(self):
        """One epoch of batches in order (the book's epoch loop)."""
        for step in range(self.batches_per_epoch):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.batches_per_epoch
