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
