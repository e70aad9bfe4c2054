"""The starter's instruction data: Python questions answered by their docstrings' first sentence."""

from __future__ import annotations

from pathlib import Path

from finetune.starter import (
    LESSON_NAMES,
    example_pairs,
    first_sentence,
    howto_pairs,
    instruction_pairs,
    lesson_names,
    python_qa_pairs,
)


def test_first_sentence_skips_signatures_and_keeps_prose():
    assert (
        first_sentence("Return a copy of the string converted to uppercase.")
        == "Return a copy of the string converted to uppercase."
    )
    assert (
        first_sentence(
            "S.count(sub[, start[, end]]) -> int\n\nReturn the number of non-overlapping "
            "occurrences of substring sub.  More text."
        )
        == "Return the number of non-overlapping occurrences of substring sub."
    )
    assert (
        first_sentence(
            "max(iterable, *[, key=func]) -> value\nmax(a, b)\n\nWith a single "
            "iterable argument, return its biggest item. The default..."
        )
        == "With a single iterable argument, return its biggest item."
    )
    assert first_sentence("Return\n   the value\n   for key.") == "Return the value for key."
    assert first_sentence(None) is None and first_sentence("todo") is None


def test_the_lessons_are_the_names_python_code_calls_most():
    names = lesson_names()
    assert len(names) == LESSON_NAMES and len(set(names)) == len(names)
    assert {"len", "str.join", "dict.get", "os.path.join", "re.compile", "json.dumps", "str.upper"} <= set(names)
    assert names.index("len") < names.index("os.path.join") < names.index("json.dumps")
    assert not {"calendar.firstweekday", "bytes.upper", "logging.Handler.close"} & set(names)
    pairs = python_qa_pairs()
    by_question = {p[0]["content"]: p[1]["content"] for p in pairs}
    assert len(pairs) == len(by_question) == len(names)
    upper = [a for q, a in by_question.items() if "str.upper " in q + " "]
    assert upper == ["Return a copy of the string converted to uppercase."]
    assert all(p[0]["role"] == "user" and p[1]["role"] == "assistant" for p in pairs)


def test_howto_and_example_pairs_teach_short_answers_with_code():
    howto = {p[0]["content"]: p[1]["content"] for p in howto_pairs()}
    assert (
        howto["How do I get a copy of the string converted to uppercase?"]
        == "Call str.upper(): return a copy of the string converted to uppercase."
    )
    examples = {p[0]["content"].split()[-1].rstrip(".?"): p[1]["content"] for p in example_pairs()}
    assert "```python\n>>> bin(2796202)\n'0b1010101010101010101010'\n```" in examples["bin"]
    assert len(instruction_pairs()) > len(python_qa_pairs()) + 300


def test_the_instruct_stage_teaches_its_lessons_until_they_come_back(tmp_path, make_model_dir, monkeypatch):
    """A few lessons on a tiny random model: it trains until they come back, well before its
    epoch cap, and then answers them (greedy, first sentence exact)."""
    from rich.console import Console

    import finetune.starter as starter
    from finetune.replay import read_replay
    from gpt.checkpoint import load_model

    monkeypatch.setattr(starter, "LESSON_NAMES", 12)
    monkeypatch.setattr(starter, "INSTRUCT_EPOCHS", 400)
    monkeypatch.setattr(starter, "INSTRUCT_LR", 3e-3)
    monkeypatch.setattr(starter, "GROUNDED_PER_EPOCH", 8)
    make_model_dir(tmp_path / "pretrained", context_length=256, n_embd=64)
    brew = starter.Brew(tmp_path, "cpu", Console(file=open(tmp_path / "log", "w")), model_dir=tmp_path / "pretrained")
    starter.instruct_stage(brew)
    assert brew.model_dir == tmp_path / "instruct"
    load_model(brew.model_dir)
    n = brew.notes
    assert n["instruct_learned_epoch"] < n["instruct_epochs"] < 400
    assert n["own_lessons"] >= 0.9 * n["own_lessons_asked"] and starter.passed_own_check(n)
    replay = read_replay(brew.model_dir)  # the model ships its lessons for its fine-tunes to replay
    assert len(replay["train"]) == n["own_lessons_asked"] == n["instruct_lessons"]
    # the grounded pairs train the starter, not its fine-tunes' replay
    assert len(replay["train"]) + len(replay["heldout"]) < n["instruct_pairs"]
    assert not any(p[0]["content"].startswith("Reference:") for p in replay["train"] + replay["heldout"])
    lessons = {p[0]["content"]: p[1]["content"] for p in replay["train"]}
    question, answer = n["answer_sample"].split(" -> ")  # what the brew shows is a lesson it knows
    assert lessons[question].startswith(answer)


def test_a_starter_that_fails_its_own_check_is_not_made_active(tmp_path, make_model_dir, monkeypatch, capsys):
    """One epoch of lessons leaves a random model answering almost none: the brew says so in its
    last line (the app shows it as the brew's failure), exits 1 and registers the model as failed,
    not active. Brewed again with --force over that starter once the user made it active, a
    failing brew leaves the active model as it was."""
    import re

    import finetune.starter as starter
    from data.store import open_store
    from tui.cli import main

    monkeypatch.setattr(starter, "LESSON_NAMES", 12)
    monkeypatch.setattr(starter, "INSTRUCT_EPOCHS", 1)
    pretrained = make_model_dir(tmp_path / "pretrained", context_length=256)

    def pretrain(brew):
        brew.model_dir = pretrained

    monkeypatch.setattr(
        starter, "STAGES", [starter.Stage("pretrain", pretrain), starter.Stage("instruct", starter.instruct_stage)]
    )
    assert main(["brew", "starter", "--device", "cpu"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(
        r"the starter answers only \d+/\d+ \(\d+%\) of its own lessons, below the 90% it must: it is not made active",
        lines[-1],
    )
    assert any(line.startswith("own lessons: ") for line in lines)
    with open_store() as store:
        assert store.active_model() is None
        version = store.find_model_version("starter")
        assert version.status == "failed" and version.note == lines[-1]
        assert version.metrics["own_lessons"] < 0.9 * version.metrics["own_lessons_asked"]
        store.activate_model(version.id)
    weights = (Path(version.path) / "model.safetensors").read_bytes()
    result = starter.brew_starter(device="cpu", force=True)
    assert not result.activated and "the active starter is kept" in result.refused
    assert result.out.parent.parent.name == "runs" and (result.out / "model.safetensors").exists()
    assert (Path(version.path) / "model.safetensors").read_bytes() == weights
