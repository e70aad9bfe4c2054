"""Shared test set-up: every test gets its own KETTLE_HOME; GPT-2's tokenizer files come from
../shared/tiktoken_cache so nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = ROOT / "tests" / "fixtures"  # files the tests read, kept with them
os.environ["TIKTOKEN_CACHE_DIR"] = str(ROOT.parent / "shared" / "tiktoken_cache")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each avoids oversubscription.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def kettle_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "kettle-home"
    monkeypatch.setenv("KETTLE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def verdict_text() -> str:
    return (SHARED_DATA / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def trained_tokenizer(verdict_text):
    from gpt.tokenizer import train_tokenizer

    return train_tokenizer([verdict_text], vocab_size=512)


# The shape of every test model unless a test asks for another: real, random and tiny.
TEST_SHAPE = {"vocab_size": 512, "context_length": 128, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="session")
def make_model_dir(tmp_path_factory, trained_tokenizer):
    """make_model_dir(where, *, seed=0, gpt2_tokenizer=False, **shape): a model directory of a
    randomly initialised GPT of TEST_SHAPE changed by `shape` (GPTConfig's fields), saved at
    `where` (a path, or a name for a new folder of this session), with the 512-token tokenizer
    trained on the verdict, or none (GPT-2's) with gpt2_tokenizer. The one way tests make models."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT

    def make(where: str | Path, *, seed: int = 0, gpt2_tokenizer: bool = False, **shape) -> Path:
        path = where if isinstance(where, Path) else tmp_path_factory.mktemp("models") / where
        torch.manual_seed(seed)
        config = GPTConfig(**{**TEST_SHAPE, **({"vocab_size": 50257} if gpt2_tokenizer else {}), **shape})
        save_model(GPT(config), path, tokenizer=None if gpt2_tokenizer else trained_tokenizer)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_model_dir) -> Path:
    """A real, randomly initialised 2-layer model with a trained 512-token tokenizer."""
    return make_model_dir("tiny")


@pytest.fixture(scope="session")
def tiny_gpt2_vocab_model_dir(make_model_dir) -> Path:
    """A tiny random model on GPT-2's vocabulary (no tokenizer file: it uses GPT-2's)."""
    return make_model_dir("tiny-gpt2", gpt2_tokenizer=True)


@pytest.fixture(scope="session")
def long_context_model_dir(make_model_dir) -> Path:
    """Like tiny_model_dir with a 2048-token context: generations long enough to cancel midway."""
    return make_model_dir("long", context_length=2048)


@pytest.fixture(scope="session")
def chat_model_dir(make_model_dir) -> Path:
    """A tiny random chat model with a long context (4096), so an answer can run long enough
    to be stopped (greedy decoding runs to the token limit); the app tests cap answers through
    config.json."""
    return make_model_dir("chat", context_length=4096)


@pytest.fixture
def store(kettle_home):
    """The store of this test's KETTLE_HOME, open for the test."""
    from data.store import open_store

    with open_store() as opened:
        yield opened


@pytest.fixture
def app_model(chat_model_dir, kettle_home) -> str:
    """The chat model copied into this test's KETTLE_HOME/models/tiny, registered in the store
    and active; returns its name."""
    import shutil

    from data.paths import models_dir
    from data.store import open_store

    path = models_dir() / "tiny"
    shutil.copytree(chat_model_dir, path)
    with open_store() as store:
        store.activate_model(store.add_model_version("tiny", path, kind="imported").id)
    return "tiny"


def old_snapshot(store, examples: list[dict]) -> int:
    """A snapshot of `examples` as an older Kettle could write it (no checks on what it holds):
    whole, sealed, its hash right; its id."""
    from data.records import canonical_json, content_hash

    with store.transaction():
        sid = store.conn.execute(
            "INSERT INTO snapshots (name, filter, content_hash, n_examples, n_pairs, created_at, sealed)"
            " VALUES ('old', '{}', ?, ?, 0, 0, 0)",
            (content_hash({"examples": examples, "pairs": []}), len(examples)),
        ).lastrowid
        store.conn.executemany(
            "INSERT INTO snapshot_rows (snapshot_id, kind, position, data) VALUES (?, 'example', ?, ?)",
            [(sid, i, canonical_json(e)) for i, e in enumerate(examples)],
        )
        store.conn.execute("UPDATE snapshots SET sealed = 1 WHERE id = ?", (sid,))
    return sid
