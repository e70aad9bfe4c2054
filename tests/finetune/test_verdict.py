"""The fine-tuning verdict: corrections that come back, the base's skills, never "not checked"."""

from __future__ import annotations

from finetune.verdict import judge, summary_lines

BASE = {
    "recall_base": 0,
    "recall": 10,
    "recall_of": 10,
    "replay_examples": 10,
    "replay_loss_before": 2.0,
    "replay_loss_after": 2.1,
    "gate_parent_loss": None,
    "gate_new_loss": None,
}


def test_a_model_that_learned_and_kept_its_skills_passes():
    assert judge(BASE) == ("passed", [])
    lines = summary_lines(BASE)
    assert lines[0].startswith("your corrections: 10 of 10 now come back")
    assert "the base gave back 0" in lines[0]
    assert any("2.000 -> 2.100 (+5.0%" in line for line in lines)
    assert lines[-1] == "regression gate: passed"


def test_forgetting_the_base_or_losing_corrections_regresses():
    gate, reasons = judge({**BASE, "replay_loss_after": 2.3})
    assert gate == "regressed" and "forgot" in reasons[0]
    gate, reasons = judge({**BASE, "recall_base": 5, "recall": 4})
    assert gate == "regressed" and "fewer of your corrections" in reasons[0]
    gate, _ = judge({**BASE, "gate_parent_loss": 1.0, "gate_new_loss": 1.2})
    assert gate == "regressed"
    gate, reasons = judge({**BASE, "recall": 0, "train_loss_before": 3.0, "train_loss_after": 9.0})
    assert gate == "regressed" and "trained on worse" in reasons[0]


def test_without_replay_or_held_out_examples_the_corrections_decide():
    m = {**BASE, "replay_loss_before": None, "replay_loss_after": None}
    lines = summary_lines(m)
    assert not any("not checked" in line and "gate" in line for line in lines)
    assert any("no instruction data of its own" in line for line in lines)
    assert judge(m)[0] == "passed"
    assert judge({**m, "recall_base": 3, "recall": 2})[0] == "regressed"


def test_a_change_near_the_tolerance_shows_its_decimal():
    """A loss up 10.4% regresses (more than 10%): "+10%" read as if it had passed."""
    m = {**BASE, "replay_loss_before": 2.5, "replay_loss_after": 2.76}
    gate, reasons = judge(m)
    assert gate == "regressed" and "rose 10.4%" in reasons[0]
    assert any("2.500 -> 2.760 (+10.4%;" in line for line in summary_lines(m))


PROBE = {
    "questions": 48,
    "loops_before": 3,
    "loops_after": 3,
    "leaks": 0,
    "right_before": 21,
    "lost": 0,
    "examples": {"loops": {}, "leaks": {}, "lost": {}},
}


def test_unrelated_answers_are_shown_and_worse_ones_regress_naming_them():
    m = {**BASE, "probe": PROBE}
    assert judge(m) == ("passed", [])
    assert "unrelated answers: loops 3 -> 3, leaks 0, lost 0 of 21 (greedy, 48 of the base's own questions)" in (
        summary_lines(m)
    )
    oct_ = {"What does oct do?": "Return a single immutable sequence, written with parentheses like (1, 2, 3)."}
    gate, reasons = judge({**BASE, "probe": {**PROBE, "leaks": 1, "examples": {**PROBE["examples"], "leaks": oct_}}})
    assert (gate, reasons) == (
        "regressed",
        [
            "your corrections' wording leaks into answers to unrelated questions (1 of 48): "
            "'What does oct do?' -> 'Return a single immutable sequence, written with parenthese…'"
        ],
    )
    loops = {"What does len do?": "Return the number of items of the number of items of the number of items."}
    m = {**BASE, "probe": {**PROBE, "loops_after": 4, "examples": {**PROBE["examples"], "loops": loops}}}
    gate, reasons = judge(m)
    assert gate == "regressed" and reasons[0].startswith(
        "more of its answers to unrelated questions loop (3 -> 4 of 48)"
    )
    assert "'What does len do?' -> 'Return the number of items of the number" in reasons[0]
    assert summary_lines(m)[-1] == f"regression gate: regressed: {reasons[0]}"


def test_a_lost_answer_regresses_past_five_percent_of_those_the_base_had_right_and_one():
    lost = {"What does abs do?": "Return the number.", "What does len do?": "Return the length of the length."}

    def gate(n_lost, right):
        probe = {**PROBE, "lost": n_lost, "right_before": right, "examples": {**PROBE["examples"], "lost": lost}}
        return judge({**BASE, "probe": probe})

    assert gate(1, 10)[0] == "passed"  # one flipped first sentence is tolerated
    assert gate(2, 21) == (
        "regressed",
        [
            "it lost answers its base got right (2 of 21): 'What does abs do?' -> 'Return the number.', "
            "'What does len do?' -> 'Return the length of the length.'"
        ],
    )
    assert gate(2, 40)[0] == "passed" and gate(3, 40)[0] == "regressed"


def test_answers_the_base_had_right_stand_for_its_skills_once_there_are_enough():
    probe = {"questions": 48, "loops_before": 0, "loops_after": 0, "leaks": 0, "lost": 0, "examples": {}}
    rose = {**BASE, "replay_loss_after": 2.9}  # +45% on held-out questions the base never answered
    assert judge({**rose, "probe": {**probe, "right_before": 29}}) == ("passed", [])
    assert "its answers below decide" in " ".join(summary_lines({**rose, "probe": {**probe, "right_before": 29}}))
    # too few right answers to stand for anything: the loss decides, as without a probe
    gate, reasons = judge({**rose, "probe": {**probe, "right_before": 3}})
    assert gate == "regressed" and "forgot part of its base's skills" in reasons[0]
    lost = {**probe, "right_before": 29, "lost": 3, "examples": {"lost": {"What does len do?": "A tuple."}}}
    gate, reasons = judge({**rose, "probe": lost})
    assert gate == "regressed" and "'What does len do?'" in reasons[0]
