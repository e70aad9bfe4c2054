"""What a fine-tuning run tells the user: did their corrections come back, and did the model keep
what it knew? One judgement, one wording, for the command line, the model card and the app.

- "your corrections: k of n now come back": of the examples trained on, how many the model gives
  back exactly under greedy decoding (finetune.instruct.recalled), before (the base) and after.
- the base's skills: the loss on the held-out part of the base's own instruction data (replay),
  before and after; up by more than FORGET_TOLERANCE means it forgot them, unless the probe's
  answers stand for them (ANSWERS_STAND_FOR_SKILLS).
- held-out loss: on a held-out share of the user's examples, when there are enough of them.
- the lineage's corrections (finetune.lessons): those its base gave back, and whether it still does.
- unrelated answers: greedy answers to a fixed probe of the base's own questions, before and after
  (finetune.probe): how many loop, how many took up a correction's wording (leaks), and how many
  the base answered right and the new model no longer does (lost).

The gate regresses a model that forgot its base's skills, gives back fewer corrections than its base
did, does worse on the held-out examples, fits its own training examples worse than the base did
(training that went wrong), forgot a correction its lineage had learned, or answers unrelated
questions worse: more of them loop, any takes up a correction's wording, or it lost more than
LOST_TOLERANCE of the answers its base had right. Losses alone passed a fine-tune whose loops went
10 -> 22 and whose corrections leaked into 10 of 180 unrelated answers. A regressed model is never
activated on its own; the reasons name the questions and what the model now answers.
"""

from __future__ import annotations

FORGET_TOLERANCE = 0.10
# Leaks tolerated: none. A leak is a run of a correction's words that neither the base's answer
# nor the expected one held, in the answer to a question no correction asks: an answer taken
# from the wrong correction, never a right one, and one is already what a user would notice.
LEAK_TOLERANCE = 0
# Lost answers tolerated: this share of those the base had right, and at least one (a greedy
# first sentence can flip on a near tie without the model having forgotten anything).
LOST_TOLERANCE = 0.05
# With this many answers its base had right in the probe, those answers stand for the base's
# skills and the held-out replay loss is shown, not gated: on the starter that knows its own
# lessons, a fine-tune of 10 corrections kept 167 of 167 of its right answers (29 of 29 in the
# probe) and leaked 1 in 180, while the loss on 19 held-out questions it never answered rose 35-49%.
ANSWERS_STAND_FOR_SKILLS = 10
SHOWN_EXAMPLES = 2  # named in a reason
SHOWN_CHARS = 60  # of a question or an answer, in a reason


def judge(metrics: dict) -> tuple[str, list[str]]:
    """("passed" | "regressed", the reasons it regressed) from a run's metrics."""
    m = metrics
    reasons = []
    if m.get("recall_of") and m["recall"] < m["recall_base"]:
        reasons.append(
            f"it gives back fewer of your corrections than its base "
            f"({m['recall']} vs {m['recall_base']} of {m['recall_of']})"
        )
    if m.get("lessons_forgotten"):
        forgotten = m["lessons_forgotten"]
        reasons.append(
            f"it forgot {len(forgotten)} of the corrections its base had learned: "
            + "; ".join(repr(q) for q in forgotten[:5])
            + (f" and {len(forgotten) - 5} more" if len(forgotten) > 5 else "")
        )
    before, after = m.get("replay_loss_before"), m.get("replay_loss_after")
    if not answers_read(m) and before is not None and after is not None and after > before * (1 + FORGET_TOLERANCE):
        reasons.append(f"it forgot part of its base's skills (their loss rose {after / before - 1:.1%})")
    if m.get("gate_parent_loss") is not None and m["gate_new_loss"] > m["gate_parent_loss"]:
        reasons.append("it does worse than its base on your held-out examples")
    if m.get("train_loss_before") is not None and m["train_loss_after"] > m["train_loss_before"]:
        reasons.append("it fits the very examples it was trained on worse than its base did")
    p = m.get("probe")
    if p:
        n, examples = p["questions"], p["examples"]
        if p["loops_after"] > p["loops_before"]:
            reasons.append(
                f"more of its answers to unrelated questions loop ({p['loops_before']} -> "
                f"{p['loops_after']} of {n}): {_named(examples['loops'])}"
            )
        if p["leaks"] > LEAK_TOLERANCE:
            reasons.append(
                f"your corrections' wording leaks into answers to unrelated questions "
                f"({p['leaks']} of {n}): {_named(examples['leaks'])}"
            )
        if p["lost"] > max(1, LOST_TOLERANCE * p["right_before"]):
            reasons.append(
                f"it lost answers its base got right ({p['lost']} of {p['right_before']}): {_named(examples['lost'])}"
            )
    return ("regressed" if reasons else "passed"), reasons


def answers_read(metrics: dict) -> bool:
    """Whether the probe's answers stand for the base's skills (ANSWERS_STAND_FOR_SKILLS)."""
    probe = metrics.get("probe")
    return bool(probe) and probe["right_before"] >= ANSWERS_STAND_FOR_SKILLS


def _named(examples: dict[str, str]) -> str:
    """A few of a probe's examples as 'question' -> 'what it answers now', each trimmed."""
    return ", ".join(f"{_trim(q)!r} -> {_trim(a)!r}" for q, a in list(examples.items())[:SHOWN_EXAMPLES])


def _trim(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1].rstrip() + "…"


def summary_lines(metrics: dict) -> list[str]:
    """The verdict as plain lines of text (the model card and the app add their own markup)."""
    m = metrics
    lines = []
    if m.get("recall_of"):
        lines.append(
            f"your corrections: {m['recall']} of {m['recall_of']} now come back "
            f"(greedy, exact; the base gave back {m['recall_base']})"
        )
    if m.get("chat_sampled_of"):
        lines.append(
            f"asked as the chat asks: {m['chat_sampled']} of {m['chat_sampled_of']} at its default sampling "
            f"(3 seeds), {m['chat_in_context']} of {m['chat_in_context_of']} after earlier turns"
        )
        missed: dict[str, list[str]] = {}
        for miss in m.get("chat_missed", []):
            missed.setdefault(miss["question"], []).append(miss["asked"])
        for question, how in missed.items():
            lines.append(f"  did not come back: {question!r} ({', '.join(how)})")
    if m.get("lessons_of"):
        lines.append(
            f"earlier corrections (its lineage's): {m['lessons_recall']} of {m['lessons_of']} come back "
            f"(the base gave back {m['lessons_recall_base']})"
        )
    if m.get("replay_loss_before") is not None:
        change = m["replay_loss_after"] / m["replay_loss_before"] - 1
        lines.append(
            f"the base's skills: held-out loss {m['replay_loss_before']:.3f} -> "
            f"{m['replay_loss_after']:.3f} ({change:+.1%}; {m['replay_examples']} of its "
            f"own examples mixed into each epoch" + ("; its answers below decide)" if answers_read(m) else ")")
        )
    elif "replay_examples" in m:
        lines.append("the base's skills: not checked, it has no instruction data of its own to replay (replay.jsonl)")
    if m.get("gate_parent_loss") is not None:
        lines.append(f"held-out loss on your examples: {m['gate_parent_loss']:.3f} (base) -> {m['gate_new_loss']:.3f}")
    p = m.get("probe")
    if p:
        lines.append(
            f"unrelated answers: loops {p['loops_before']} -> {p['loops_after']}, leaks {p['leaks']}, "
            f"lost {p['lost']} of {p['right_before']} (greedy, {p['questions']} of the base's own questions)"
        )
    gate, reasons = judge(m)
    lines.append(f"regression gate: {gate}" + (f": {'; '.join(reasons)}" if reasons else ""))
    return lines
