"""Token shards and window loaders (finetune.corpus) on real files and a real trained tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.corpus import TokenStream, WindowLoader, build_shards, read_meta, token_dtype
from gpt.errors import KettleError

NON_ASCII = [
    "Naïve café owners say «bonjour» — über-cool!\nZweite Zeile: Grüße.\n",
    "日本語のテキストと絵文字 🎉🐍, and Ελληνικά too.\r\nWindows line end above.\n",
    "Emoji split across tokens: 👩‍👩‍👧‍👦 and combining e\u0301.",
]


def decode_documents(directory, tokenizer) -> list[str]:
    ids = np.concatenate([TokenStream(directory, s).read(0, len(TokenStream(directory, s))) for s in ("train", "val")])
    eot = tokenizer.eot_id
    docs, start = [], 0
    for i in np.flatnonzero(ids == eot):
        docs.append(tokenizer.decode_bytes(ids[start:i].tolist()).decode("utf-8"))
        start = i + 1
    assert start == len(ids), "every document ends with end-of-text"
    return docs


def test_non_ascii_shards_decode_to_the_exact_text(tmp_path, trained_tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_bytes(NON_ASCII[0].encode("utf-8"))
    (folder / "sub" / "b.md").write_bytes(NON_ASCII[1].encode("utf-8"))
    (folder / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in NON_ASCII) + "\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read", encoding="utf-8")
    (folder / "image.png").write_bytes(b"\x89PNG\x00\x00")
    # Tiny shards so that both splits span several files.
    info = build_shards(folder, trained_tokenizer, out_dir=tmp_path / "shards", val_fraction=0.3, shard_tokens=7)
    expected = [NON_ASCII[0], *NON_ASCII, NON_ASCII[1]]  # a.txt, c.jsonl, sub/b.md (sorted)
    docs = decode_documents(tmp_path / "shards", trained_tokenizer)
    # The validation split may cut a document in two; joined, the text is exact.
    assert "".join(docs) == "".join(expected)
    assert info.val_tokens > 0 and info.train_tokens > info.val_tokens
    meta = read_meta(tmp_path / "shards")
    assert meta["dtype"] == "uint16" and len(meta["shards"]["train"]) > 1
    assert info.documents == 5


def test_whole_documents_without_validation_split(tmp_path, trained_tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in NON_ASCII) + "\n", encoding="utf-8")
    build_shards(path, trained_tokenizer, out_dir=tmp_path / "shards", val_fraction=0.0, text_field="body")
    assert decode_documents(tmp_path / "shards", trained_tokenizer) == NON_ASCII


def test_validation_is_the_tail_of_a_single_file(tmp_path, trained_tokenizer, verdict_text):
    path = tmp_path / "verdict.txt"
    path.write_text(verdict_text, encoding="utf-8")
    info = build_shards(path, trained_tokenizer, out_dir=tmp_path / "shards", val_fraction=0.1)
    share = info.val_tokens / (info.train_tokens + info.val_tokens)
    assert 0.07 < share < 0.13
    val = TokenStream(tmp_path / "shards", "val")
    text = trained_tokenizer.decode(val.read(0, len(val) - 1).tolist())
    assert verdict_text.endswith(text) and text.startswith(verdict_text[len(verdict_text) - len(text)])


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(100277) == np.uint32


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\n\n", None),  # whitespace is text: no error
        (b"GIF89a\x00\x01\x02binary", "binary"),
        (b"caf\xe9 latin-1 text", "not UTF-8"),
    ],
)
def test_bad_corpus_files(tmp_path, trained_tokenizer, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    if message is None:
        build_shards(path, trained_tokenizer, out_dir=tmp_path / "shards")
        return
    with pytest.raises(KettleError, match=message):
        build_shards(path, trained_tokenizer, out_dir=tmp_path / "shards")
    assert not (tmp_path / "shards").exists(), "a failed build leaves nothing behind"


def test_bad_corpus_paths(tmp_path, trained_tokenizer):
    with pytest.raises(KettleError, match="no such file"):
        build_shards(tmp_path / "missing", trained_tokenizer, out_dir=tmp_path / "s")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(KettleError, match="no text files"):
        build_shards(tmp_path / "pics", trained_tokenizer, out_dir=tmp_path / "s")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(KettleError, match=r"bad.jsonl:2: .*'text'"):
        build_shards(bad, trained_tokenizer, out_dir=tmp_path / "s")


@pytest.fixture()
def verdict_shards(tmp_path, trained_tokenizer, verdict_text):
    path = tmp_path / "verdict.txt"
    path.write_text(verdict_text, encoding="utf-8")
    build_shards(path, trained_tokenizer, out_dir=tmp_path / "shards", val_fraction=0.1, shard_tokens=1000)
    return tmp_path / "shards"


def test_sliding_windows_are_the_books(verdict_shards):
    stream = TokenStream(verdict_shards, "train")
    all_ids = stream.read(0, len(stream))
    loader = WindowLoader(stream, batch_size=4, max_length=32, stride=16, shuffle=False)
    x, y = loader.batch(0)
    assert x.shape == (4, 32) and y.shape == (4, 32)
    for row in range(4):
        start = row * 16
        assert x[row].tolist() == all_ids[start : start + 32].tolist()
        assert y[row].tolist() == all_ids[start + 1 : start + 33].tolist()
    # One shuffled epoch visits every window once; the next epoch is another order.
    shuffled = WindowLoader(stream, batch_size=4, max_length=32, stride=16, seed=3)
    firsts = [tuple(x[i].tolist()) for x, _ in shuffled for i in range(4)]
    assert len(set(firsts)) == len(firsts) == shuffled.batches_per_epoch * 4
    assert not np.array_equal(shuffled.batch(0)[0], shuffled.batch(shuffled.batches_per_epoch)[0])


def test_reads_across_shard_boundaries(verdict_shards):
    stream = TokenStream(verdict_shards, "train")
    assert len(stream.shards) > 1
    whole = np.concatenate([np.asarray(s, dtype=np.int64) for s in stream.shards])
    assert stream.read(990, 25).tolist() == whole[990:1015].tolist()


@pytest.mark.parametrize("mode", ["sliding", "random"])
def test_ranks_and_accumulation_read_the_same_windows(verdict_shards, mode):
    """A step is the same set of windows for one process accumulating two micro-batches and for
    two processes taking one each; batches depend only on the step (exact resume)."""
    stream = TokenStream(verdict_shards, "train")
    one = WindowLoader(stream, 3, 16, mode=mode, seed=5, accum_steps=2)
    ranks = [WindowLoader(stream, 3, 16, mode=mode, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 7):
        assert np.array_equal(one.batch(step, 0)[0], ranks[0].batch(step)[0])
        assert np.array_equal(one.batch(step, 1)[0], ranks[1].batch(step)[0])
    again = WindowLoader(stream, 3, 16, mode=mode, seed=5, accum_steps=2)
    assert np.array_equal(one.batch(4, 1)[1], again.batch(4, 1)[1])


def test_corpus_shorter_than_one_window(verdict_shards):
    stream = TokenStream(verdict_shards, "val")
    with pytest.raises(KettleError, match="fewer than one context window"):
        WindowLoader(stream, 2, len(stream))
