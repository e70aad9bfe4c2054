"""The offline starter: its corpus (read with ast, nothing imported) and the staged brew."""
from __future__ import annotations

import pytest

from gpt import starter
from gpt.checkpoint import load_model
from gpt.config import GPTConfig
from gpt.errors import KettleError


def test_docstrings_are_read_without_importing(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "loud.py").write_text(
        '"""A module whose import would exit the interpreter, documented at length."""\n'
        "raise SystemExit('imported!')\n"
        "def shout(text, *, times=2):\n    '''Return text in capitals, times times.'''\n"
        "def _private():\n    '''Never part of the corpus.'''\n"
        "class Horn:\n    '''A horn.'''\n    def blow(self, volume=1):\n        '''Blow the horn.'''\n")
    (root / "pkg" / "__init__.py").write_text('"""The pkg package: a module docstring over forty characters."""\n')
    (root / "test" / "test_loud.py").write_text("def test_x():\n    '''Tests are not docs.'''\n")
    (root / "broken.py").write_text("def (:\n")
    docs = starter.stdlib_docstrings(root)
    assert "loud.shout(text, *, times=2)\n\nReturn text in capitals, times times." in docs
    assert "class loud.Horn\n\nA horn." in docs
    assert "loud.Horn.blow(self, volume=1)\n\nBlow the horn." in docs
    assert any(d.startswith("Module pkg\n") for d in docs)
    assert not any("Never part" in d or "Tests are not" in d for d in docs)


def test_documentation_corpus_has_the_language_reference():
    from pydoc_data.topics import topics

    texts = starter.documentation_texts()
    assert topics["if"].strip() in texts
    assert any(t.startswith("json.dumps(") for t in texts)
    assert len(texts) == len(set(texts)) > 1000


def small_corpus(brew):
    """The real corpus, cut to a few hundred documents so the test stays fast."""
    starter.build_corpus(brew)
    lines = brew.corpus.read_text(encoding="utf-8").splitlines()[:300]
    brew.corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_brew_runs_its_stages_and_registers_the_model(monkeypatch, tmp_path):
    from data.store import Store

    monkeypatch.setitem(starter.MODEL_SHAPES, "cpu", GPTConfig(
        vocab_size=512, context_length=64, n_layer=2, n_head=2, n_embd=32, qkv_bias=False))
    monkeypatch.setitem(starter.STEPS_PER_SECOND, "cpu", 1.0)
    seen = []
    stages = [starter.Stage("corpus", small_corpus, 0.1),
              starter.Stage("pretrain", starter.pretrain_stage, 0.1),
              starter.Stage("after", lambda brew: seen.append(brew.model_dir), 0.0)]
    result = starter.brew_starter(minutes=0.2, device="cpu", stages=stages)
    assert seen == [result.out.parent.parent / "runs" / seen[0].parent.name / "pretrained"]
    model, tokenizer = load_model(result.out)
    assert tokenizer.n_vocab <= 512 and result.notes["val_loss"] < result.notes["untrained_val_loss"]
    assert result.activated and "active model" in result.summary()
    with Store.open() as store:
        active = store.active_model()
        assert active.kind == "starter" and active.path == str(result.out.resolve())
    with pytest.raises(KettleError, match="already exists"):
        starter.brew_starter(minutes=0.2, device="cpu", stages=stages)


@pytest.mark.slow
def test_full_starter_learns_python_docs():
    """The real `kettle brew starter` budget: far below the untrained loss, doc-like samples."""
    result = starter.brew_starter()
    assert result.seconds < 10 * 60
    assert result.notes["val_loss"] < result.notes["untrained_val_loss"] - 3.0
