"""Corrections as lessons: trained in other words and in a chat, kept across fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.jobs import JobSpec, create_run, execute, run_dir
from finetune.lessons import (
    CHATS,
    CONTRASTS,
    LESSONS_FILE,
    OPENERS,
    REWORDINGS,
    contrasts,
    in_context,
    merge,
    read_lessons,
    rewordings,
    subject,
    variants,
)
from finetune.verdict import judge, summary_lines


@pytest.mark.parametrize(
    "question, topic",
    [
        ("How do I reverse a list in Python?", "reverse"),
        ("how can i split a string on commas", "split"),
        ("What does enumerate do?", "enumerate"),
        ("What is a tuple?", "tuple"),
        ("Why is my loop slow?", "loop"),  # no known family: case, punctuation, synonyms only
    ],
)
def test_rewordings_ask_the_same_thing_in_other_words(question, topic):
    forms = rewordings(question, 8)
    assert len(forms) == 8 and len(set(forms)) == 8 and question not in forms
    assert all(topic in f.lower() for f in forms)  # the subject stays
    assert forms == rewordings(question, 8)  # the same for the same question (a resumed run)
    assert rewordings(question, 8, seed=1) != forms


def test_families_find_the_subject_and_ask_it_in_their_own_forms():
    topic, forms = subject("What's the best way to sort a list?")
    assert topic == "sort a list" and "How can I {}?" in forms
    assert subject("What does range(5) give?")[0] == "range(5)"
    assert subject("Explain what a generator is.")[0] == "a generator"
    assert subject("Why is my loop slow?") is None
    # whole words only: "integer" is swapped, "int" inside "print" never is
    assert not any("prstr" in f or "prinumber" in f for f in rewordings("How do I print an integer?", 12))
    # nor a part of a name in code: "What does duplicate.copy do?" asks about nothing
    assert all("copy.copy" in f for f in rewordings("What does copy.copy do?", 12))


def test_in_context_puts_earlier_exchanges_first_as_context_only():
    lesson = [{"role": "user", "content": "What is a tuple?"}, {"role": "assistant", "content": "Immutable."}]
    earlier = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]]
    chat = in_context(lesson, earlier, question="Explain a tuple.")
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    assert chat[1]["weight"] == 0 and "weight" not in chat[3]  # only the lesson's answer is learned
    assert chat[2]["content"] == "Explain a tuple." and lesson[0]["content"] == "What is a tuple?"
    alone, chats = variants([lesson], [earlier[0], earlier[0]])
    assert len(alone) == REWORDINGS and all(len(f) == 2 and f[-1] == lesson[-1] for f in alone)
    assert len(chats) == CHATS and all(len(f) > 2 and f[-1] == lesson[-1] for f in chats)
    assert len({json.dumps(c) for c in chats}) > CHATS // 2  # many different chats


def test_a_newer_correction_of_the_same_question_replaces_the_older():
    old = [[{"role": "user", "content": "What is a tuple?"}, {"role": "assistant", "content": "A list."}]]
    kept = [[{"role": "user", "content": "What is a set?"}, {"role": "assistant", "content": "Unique items."}]]
    new = [[{"role": "user", "content": "what is a tuple"}, {"role": "assistant", "content": "Immutable."}]]
    assert merge(old + kept, new) == kept + new


def _data(tmp_path, name, pairs):
    path = tmp_path / f"{name}.jsonl"
    lines = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


FAST = {"lr": 3e-3, "epochs": 3}


def test_a_fine_tune_trains_every_form_and_keeps_its_lineages_lessons(store, tmp_path, make_model_dir):
    base = make_model_dir(tmp_path / "base", context_length=256, n_embd=64)
    first_data = _data(tmp_path, "a", [("What is a kettle?", "It boils water."), ("What is a mug?", "A cup.")])
    run = create_run(store, JobSpec(model=str(base), data=str(first_data), name="one", sft=FAST, device="cpu"))
    execute(run.id, progress=False)
    data = json.loads((run_dir(run.id) / "data.json").read_text())
    assert len(data["train"]) == 2 and data["lessons"] == []
    assert len(data["variants"]) == 2 * REWORDINGS and len(data["contexts"]) == 2 * CHATS
    # kept as the base answers them: a chat's small talk and questions worded like the lessons
    # (this base has no conversations of its own: no contrasts, small talk only)
    assert 0 < len(data["anchors"]) <= len(OPENERS)
    one = store.find_model_version("one")
    assert [c[0]["content"] for c in read_lessons(one.path)] == ["What is a kettle?", "What is a mug?"]

    # The next fine-tune, on the first's model: a new lesson and the kettle corrected again.
    second_data = _data(tmp_path, "b", [("what is a kettle", "A pot for tea."), ("What is a pan?", "It fries.")])
    run = create_run(store, JobSpec(model="one", data=str(second_data), name="two", sft=FAST, device="cpu"))
    execute(run.id, progress=False)
    data = json.loads((run_dir(run.id) / "data.json").read_text())
    assert len(data["lessons"]) == 1  # the mug: the old kettle answer is replaced, not trained
    assert len(data["variants"]) == 3 * REWORDINGS
    two = store.find_model_version("two")
    answers = [c[-1]["content"] for c in read_lessons(two.path)]
    assert answers == ["A cup.", "A pot for tea.", "It fries."]
    card = Path(two.path, "card.md").read_text()
    assert "earlier corrections (its lineage's):" in card
    # Asked as the chat asks (sampled, after earlier turns); three epochs teach a random model
    # nothing, so the card names each correction that did not come back.
    assert "asked as the chat asks: 0 of 6 at its default sampling (3 seeds), 0 of 2 after earlier turns" in card
    assert (
        "did not come back: 'what is a kettle' (sampled, seed 0, sampled, seed 1, sampled, seed 2, in a chat)" in card
    )


def test_forgetting_a_lineage_lesson_fails_the_gate_by_name():
    m = {
        "recall_base": 0,
        "recall": 2,
        "recall_of": 2,
        "lessons_of": 3,
        "lessons_recall_base": 3,
        "lessons_recall": 2,
        "lessons_forgotten": ["What is a mug?"],
    }
    gate, reasons = judge(m)
    assert gate == "regressed" and "'What is a mug?'" in reasons[0]
    assert "earlier corrections (its lineage's): 2 of 3 come back (the base gave back 3)" in summary_lines(m)
    assert judge({**m, "lessons_recall": 3, "lessons_forgotten": []}) == ("passed", [])


def test_a_model_without_lessons_reads_as_none(tmp_path):
    assert read_lessons(tmp_path) == []
    (tmp_path / LESSONS_FILE).write_text("not json\n")
    assert read_lessons(tmp_path) == []


def test_contrasts_ask_like_a_lesson_about_something_else():
    lesson = [
        {"role": "user", "content": "How do I convert a string to an integer?"},
        {"role": "assistant", "content": "int"},
    ]
    pool = [
        [{"role": "user", "content": f"What does {name} do?"}, {"role": "assistant", "content": "."}]
        for name in ("bytes", "getattr", "str.upper")
    ]
    near = contrasts([lesson], pool)
    assert len(near) == CONTRASTS and near == contrasts([lesson], pool)
    for question in near:
        assert question != lesson[0]["content"]
        changed = set(question.split()) ^ set(lesson[0]["content"].split())
        assert changed and changed & {"bytes", "getattr", "str.upper", "bytes?", "getattr?", "str.upper?"}
