"""The offline starter: its corpus (read with ast, nothing imported) and the staged brew."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data.pydocs import stdlib_docstrings
from finetune import starter
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
        "class Horn:\n    '''A horn.'''\n    def blow(self, volume=1):\n        '''Blow the horn.'''\n"
    )
    (root / "pkg" / "__init__.py").write_text('"""The pkg package: a module docstring over forty characters."""\n')
    (root / "test" / "test_loud.py").write_text("def test_x():\n    '''Tests are not docs.'''\n")
    (root / "broken.py").write_text("def (:\n")
    docs = stdlib_docstrings(root)
    assert "loud.shout(text, *, times=2)\n\nReturn text in capitals, times times." in docs
    assert "class loud.Horn\n\nA horn." in docs
    assert "loud.Horn.blow(self, volume=1)\n\nBlow the horn." in docs
    assert any(d.startswith("Module pkg\n") for d in docs)
    assert not any("Never part" in d or "Tests are not" in d for d in docs)


def test_python_corpus_is_the_stdlib_source_the_reference_and_help():
    from pydoc_data.topics import topics

    docs = starter.python_corpus()
    texts = [d.text for d in docs]
    assert topics["if"].strip() in texts
    decoder = next(t for t in texts if t.startswith("# json/decoder.py\n"))
    assert "class JSONDecoder" in decoder and "#" in decoder.split("\n", 1)[1]  # code and comments
    assert any(t.startswith("Help on built-in function len") for t in texts)
    assert len(texts) == len(set(texts))  # deduplicated
    assert sum(len(t.encode()) for t in texts) > 18e6  # 10x the 1.8 MB of docstrings it replaces


def test_held_out_split_is_whole_modules_with_their_tests():
    docs = starter.python_corpus()
    held = starter.held_out_groups(docs)
    share = sum(len(d.text) for d in docs if d.group in held) / sum(len(d.text) for d in docs)
    assert 0.02 < share < 0.05 and len(held) >= 10
    assert not held & starter.HELD_IN  # what the instruction data asks about is trained on
    assert starter.source_group(Path("test/test_json/test_fail.py")) == "json"
    assert starter.source_group(Path("test/test_zlib.py")) == "zlib"
    assert starter.source_group(Path("email/mime/text.py")) == "email"
    assert held == starter.held_out_groups(list(reversed(docs)))  # by name, not by order


def small_corpus(brew):
    """The real corpus, cut to a few hundred documents (keeping the held-out tail) so the test
    stays fast."""
    starter.build_corpus(brew)
    lines = brew.corpus.read_text(encoding="utf-8").splitlines()
    lines = lines[:200] + lines[-20:]
    brew.corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    brew.val_fraction = sum(len(x.encode()) + 1 for x in lines[-20:]) / sum(len(x.encode()) + 1 for x in lines)
    brew.notes["val_text_bytes"] = sum(len(__import__("json").loads(x)["text"].encode()) for x in lines[-20:])


TINY = GPTConfig(vocab_size=512, context_length=64, n_layer=2, n_head=2, n_embd=32, qkv_bias=False)


def _stages():
    return [starter.Stage("corpus", small_corpus), starter.Stage("pretrain", starter.pretrain_stage)]


def test_brew_runs_its_stages_and_registers_the_model(monkeypatch, tmp_path):
    from data.store import open_store

    monkeypatch.setitem(starter.MODEL_SHAPES, "cpu", TINY)
    monkeypatch.setitem(starter.PRETRAIN_STEPS, "cpu", 30)
    seen = []
    stages = _stages() + [starter.Stage("after", lambda brew: seen.append(brew.model_dir))]
    result = starter.brew_starter(device="cpu", stages=stages)
    assert seen == [result.out.parent.parent / "runs" / seen[0].parent.name / "pretrained"]
    model, tokenizer = load_model(result.out)
    n = result.notes
    assert tokenizer.n_vocab <= 512 and n["val_loss"] < n["untrained_val_loss"]
    assert n["pretrain_steps"] == 30 and 0 < n["val_bits_per_byte"] < 8
    assert "bits per byte" in result.summary()
    assert result.activated and "active model" in result.summary()
    with open_store() as store:
        active = store.active_model()
        assert active.kind == "starter" and active.path == str(result.out.resolve())
    with pytest.raises(KettleError, match="already exists"):
        starter.brew_starter(device="cpu", stages=stages)


def test_the_same_seed_brews_the_same_model_however_busy_the_machine(monkeypatch, tmp_path):
    """Fixed work, not a time budget: a busy machine only takes longer."""
    import subprocess
    import sys

    import torch

    monkeypatch.setitem(starter.MODEL_SHAPES, "cpu", TINY)
    monkeypatch.setitem(starter.PRETRAIN_STEPS, "cpu", 20)
    # On one core (so one thread: float sums in one order); the busy loop shares that core.
    cores = os.sched_getaffinity(0)
    core = min(cores)
    os.sched_setaffinity(0, {core})
    try:
        first = starter.brew_starter(tmp_path / "a", device="cpu", stages=_stages())
        busy = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"]
        )
        try:
            second = starter.brew_starter(tmp_path / "b", device="cpu", stages=_stages())
        finally:
            busy.kill()
    finally:
        os.sched_setaffinity(0, cores)
    other_seed = starter.brew_starter(tmp_path / "c", device="cpu", stages=_stages(), seed=7)
    assert second.notes["val_loss"] == first.notes["val_loss"]
    a, b = load_model(tmp_path / "a")[0], load_model(tmp_path / "b")[0]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert other_seed.notes["val_loss"] != first.notes["val_loss"]


@pytest.mark.slow
def test_full_starter_learns_python():
    """The real `kettle brew starter`: far below the untrained loss (its time is a benchmark
    figure: the work is fixed, so a busy machine takes longer)."""
    result = starter.brew_starter()
    assert result.notes["val_loss"] < result.notes["untrained_val_loss"] - 3.0
    assert result.notes["val_bits_per_byte"] < 2.5


def test_the_brew_says_its_eta_again_as_the_speed_changes_and_after_pretraining(tmp_path):
    """A 51-minute brew had said "about 8 minutes" once, at step 40, and nothing after."""
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    brew = starter.Brew(tmp_path, "cpu", Console(file=out, width=200))
    now = [0.0]
    eta = starter.BrewETA(brew, 900, clock=lambda: now[0])
    for step in range(1, 901):
        now[0] += 1.0 if step <= 400 else 3.0  # the machine gets busy at step 400
        eta.step(step, 2.0)
    eta.pretrained()
    said = [starter.parse_eta(line) for line in out.getvalue().splitlines()]
    said = [s for s in said if s is not None]
    assert len(said) == 7  # steps 40, 190, ..., 790, and the end of pretraining
    assert abs(said[0] - (900 - 40 + starter.LATER_STAGES_STEPS)) <= 3  # 1 s a step: the whole brew
    assert brew.notes["eta_s"] == 900 - 40 + starter.LATER_STAGES_STEPS  # the first, for the record
    assert abs(said[4] - 3 * (900 - 640 + starter.LATER_STAGES_STEPS)) <= 3  # 3 s a step since 490
    assert abs(said[-1] - 3 * starter.LATER_STAGES_STEPS) <= 3  # what is left after pretraining
    assert starter.parse_eta(starter.eta_text(45)) == 45 and starter.parse_eta("loss 2.1 eta 0:03") is None


def test_grounded_corrections_teach_the_passage_over_the_lesson():
    """A user's correction contradicts what the starter learnt: half of the correction-shaped
    grounded pairs answer with the passage's answer, not the lesson's, so the model follows the
    passage (taught only agreeing ones, it answered from its lessons beside a correction)."""
    from gpt.chat_template import QUESTION

    plain = [
        [{"role": "user", "content": f"How do I do task {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
        for i in range(40)
    ]
    lesson = {p[0]["content"]: p[1]["content"] for p in plain}
    overruled = 0
    for pair in starter.grounded_pairs(plain, heldout=set(), seed=0):
        question = pair[0]["content"].rpartition(QUESTION)[2]
        if question in lesson and pair[1]["content"] != lesson[question]:
            assert any(pair[1]["content"] in r for r in pair[0]["references"])  # the passage's
            overruled += 1
    assert overruled >= 5
