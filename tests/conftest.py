"""Shared test set-up: every test gets its own KETTLE_HOME; GPT-2's tokenizer files come from
../shared/tiktoken_cache so nothing touches the network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, trained_tokenizer) -> Path:
    """A real, randomly initialised 2-layer model with a trained 512-token tokenizer."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, context_length=128, n_layer=2, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(GPT(config), path, trained_tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_vocab_model_dir(tmp_path_factory) -> Path:
    """A tiny random model on GPT-2's vocabulary (no tokenizer file: it uses GPT-2's)."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=128, n_layer=2, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    save_model(GPT(config), path)
    return path


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory, trained_tokenizer) -> Path:
    """Like tiny_model_dir with a 2048-token context: generations long enough to cancel midway."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, context_length=2048, n_layer=2, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("models") / "long"
    save_model(GPT(config), path, trained_tokenizer)
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, trained_tokenizer) -> Path:
    """A tiny random chat model with a long context (4096), so an answer can run long enough
    to be stopped (greedy decoding runs to the token limit); the app tests cap answers through
    config.json."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import GPTConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, context_length=4096, n_layer=2, n_head=2, n_embd=32)
    path = tmp_path_factory.mktemp("models") / "chat"
    save_model(GPT(config), path, trained_tokenizer)
    return path


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
        store.activate_model(store.add_model_version("tiny", path, "imported").id)
    return "tiny"
