"""The starter's instruction data: Python questions answered by their docstrings' first sentence."""

from __future__ import annotations

from finetune.starter import example_pairs, first_sentence, howto_pairs, instruction_pairs, plain, python_qa_pairs


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


def test_python_qa_pairs_cover_builtins_and_the_stdlib():
    pairs = python_qa_pairs()
    by_question = {p[0]["content"]: p[1]["content"] for p in pairs}
    assert len(pairs) > 500 and len(by_question) == len(pairs)
    upper = [a for q, a in by_question.items() if "str.upper " in q + " "]
    assert upper == ["Return a copy of the string converted to uppercase."]
    assert any("json.dumps" in q for q in by_question) and any("os.path." in q for q in by_question)
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


def test_instruct_stage_fine_tunes_the_brewed_model(tmp_path, make_model_dir, monkeypatch):
    from rich.console import Console

    import finetune.starter
    from finetune.replay import read_replay
    from finetune.starter import Brew, instruct_stage
    from gpt.checkpoint import load_model

    monkeypatch.setattr(finetune.starter, "INSTRUCT_EPOCHS", 1)  # the mechanics, not the quality
    make_model_dir(tmp_path / "pretrained")
    brew = Brew(tmp_path, "cpu", Console(file=open(tmp_path / "log", "w")), model_dir=tmp_path / "pretrained")
    instruct_stage(brew)
    assert brew.model_dir == tmp_path / "instruct"
    load_model(brew.model_dir)
    n = brew.notes
    assert n["instruct_pairs"] > 1000 and n["instruct_steps"] > 0
    assert n["instruct_val_loss"] < n["instruct_val_loss_before"]
    assert isinstance(n["answer_sample"], str)
    replay = read_replay(brew.model_dir)  # the model ships its instruction data for replay
    kept = plain(instruction_pairs())  # the grounded pairs train the starter, not its fine-tunes' replay
    assert len(replay["train"]) + len(replay["heldout"]) == len(kept) < len(instruction_pairs())
    assert 0.03 < len(replay["heldout"]) / len(kept) < 0.07
