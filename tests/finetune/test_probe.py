"""The probe of unrelated answers: which answers loop, which took up a correction's wording, which
the base had right and the new model lost. The answers scored here are the starter's own, before and
after a full fine-tune on ten corrections (tests/fixtures/corrections.jsonl's first ten, and one
about tuples that leaked)."""

from __future__ import annotations

import json

from finetune.instruct import prepare
from finetune.probe import PROBE_SIZE, Probe, looping
from tests.conftest import FIXTURES

CORRECTIONS = [json.loads(line)["messages"] for line in (FIXTURES / "corrections.jsonl").read_text().splitlines()]


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def examples(conversations, tokenizer):
    return prepare(conversations, tokenizer, max_length=512, vocab_size=tokenizer.n_vocab)[0]


def test_a_repeated_word_3gram_is_a_loop_and_a_plain_answer_is_not():
    assert looping("Return the thread of the thread of the thread of the thread.")
    assert looping("Call pathlib.Path.Path.Path.Path.Path.Path.Path.Path.P")  # dots do not part words
    assert not looping("Return the specified item of the specified item.")  # twice is not a loop
    assert not looping("Call zipfile.ZipFile.testzip(): read all the files and check the CRC.")


def test_the_probe_counts_loops_leaks_and_lost_answers_and_names_them(trained_tokenizer):
    tok = trained_tokenizer
    heldout = [
        qa("How do I get number of occurrences of value?", "Call list.count(): return number of occurrences of value."),
        qa("What does queue.LifoQueue do?", "Variant of Queue that retrieves most recently added entries first."),
        qa("What does oct do?", "Return the octal representation of an integer."),
    ]
    train = [
        qa("What does abs do?", "Return the absolute value of the argument."),
        qa("What does len do?", "Return the number of items in a container."),
        qa("How do I make a copy of a list?", "Call list.copy(): return a shallow copy of the list."),
    ]
    # and the one whose wording the starter was measured to leak
    tuple_ = qa("What is a tuple?", "A tuple is an immutable sequence, written with parentheses like (1, 2, 3).")
    corrections = [*CORRECTIONS[:10], tuple_]
    assert corrections[0][0]["content"] == "How do I make a copy of a list?"  # asked by a correction: left out
    probe = Probe(
        tok, heldout=examples(heldout, tok), train=examples(train, tok), corrections=examples(corrections, tok)
    )
    asked = [q.text for q in probe.questions]
    assert sorted(asked) == sorted(c[0]["content"] for c in heldout + train[:2])
    assert {q.text: q.expected for q in probe.questions}["What does oct do?"] == heldout[2][1]["content"]
    assert any("raises ValueError" in c for c in probe.corrections)

    before = {
        "How do I get number of occurrences of value?": "Return the number of occurrences of value.",
        "What does queue.LifoQueue do?": "Return the thread of the thread of the thread of the thread.",
        "What does oct do?": "Return the octal representation of an integer.",
        "What does abs do?": "Return the absolute value of the argument.",
        "What does len do?": "Return the number of items in a container.",
    }
    after = {
        # a correction's "Call int(text); it raises ValueError when the text is not a number."
        "How do I get number of occurrences of value?": "Call int(text); it raises ValueError as a number.",
        # looped before too
        "What does queue.LifoQueue do?": "Return the thread of the thread of the thread of the thread.",
        # a correction's "A tuple is an immutable sequence, written with parentheses like (1, 2, 3)."
        "What does oct do?": "Return a single immutable sequence, written with parentheses like (1, 2, 3).",
        "What does abs do?": "Return the absolute value of the argument.",
        "What does len do?": "Return the number of items of the number of items of the number of items.",
    }
    score = probe.score([before[q] for q in asked], [after[q] for q in asked])
    assert score == {
        "questions": 5,
        "loops_before": 1,
        "loops_after": 2,
        "leaks": 2,
        "right_before": 3,
        "lost": 2,
        "examples": {
            "loops": {"What does len do?": after["What does len do?"]},
            "leaks": {
                q: after[q] for q in asked if q in ("How do I get number of occurrences of value?", "What does oct do?")
            },
            "lost": {q: after[q] for q in asked if q in ("What does oct do?", "What does len do?")},
        },
    }
    json.dumps(score)  # the run's metrics hold it as it is


def test_an_answer_sharing_words_with_the_base_or_the_expected_answer_is_no_leak(trained_tokenizer):
    """Five words of a correction that the base already said, or that the right answer says, came
    from somewhere else than the fine-tune."""
    tok = trained_tokenizer
    question = qa(
        "How do I turn text into a number?", "Call int(text); it raises ValueError when the text is not a number."
    )
    probe = Probe(tok, heldout=examples([question], tok), train=[], corrections=examples(CORRECTIONS[:10], tok))
    right = question[1]["content"]
    assert probe.score([right], [right])["leaks"] == 0  # expected: the same words as the correction
    assert probe.score(["I do not know."], [right])["leaks"] == 0
    assert probe.score(["I do not know."], [right])["lost"] == 0  # it was not right before


def test_the_probe_is_a_fixed_sample_half_held_out_half_taught(trained_tokenizer):
    tok = trained_tokenizer
    heldout = examples([qa(f"What is held {i}?", f"Held answer {i}.") for i in range(40)], tok)
    train = examples([qa(f"What is taught {i}?", f"Taught answer {i}.") for i in range(60)], tok)
    probe = Probe(tok, heldout=heldout, train=train, corrections=[])
    asked = [q.text for q in probe.questions]
    assert len(asked) == PROBE_SIZE and sum("held" in q for q in asked) == PROBE_SIZE // 2
    assert asked == [q.text for q in Probe(tok, heldout=heldout, train=train, corrections=[]).questions]
    few = Probe(tok, heldout=heldout[:5], train=train, corrections=[])  # the taught fill in for the held out
    assert len(few.questions) == PROBE_SIZE and sum("held" in q.text for q in few.questions) == 5
    assert Probe(tok, heldout=[], train=[], corrections=[]).score([], []) is None
