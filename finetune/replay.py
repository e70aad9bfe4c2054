"""A model's own instruction data, kept beside its weights so that fine-tuning can replay it.

Fine-tuning a small model on a handful of corrections makes it forget what it knew unless some of
what it was taught before is mixed in ("replay"). A model directory may hold REPLAY_FILE: JSONL,
one conversation a line, `{"messages": [...], "split": "train" | "heldout"}`. The "train" ones are
mixed into fine-tuning; the "heldout" ones never are, and measure whether the base's skills
survived (their loss before and after). The starter writes its instruction data so; a fine-tuned
model carries its base's file on; a model without one is fine-tuned without replay, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

REPLAY_FILE = "replay.jsonl"
SPLITS = ("train", "heldout")


def replay_text(train: list[list[dict]], heldout: list[list[dict]]) -> str:
    """REPLAY_FILE's content for these conversations."""
    lines = [
        json.dumps({"messages": m, "split": split}, ensure_ascii=False)
        for split, part in zip(SPLITS, (train, heldout))
        for m in part
    ]
    return "\n".join(lines) + "\n"


def read_replay(model_dir: str | Path) -> dict[str, list[list[dict]]] | None:
    """{"train": [...], "heldout": [...]} from a model directory, or None when it has none (or
    one that cannot be read: replay is a help, not a requirement)."""
    path = Path(model_dir, REPLAY_FILE)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    out: dict[str, list[list[dict]]] = {s: [] for s in SPLITS}
    try:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                out[record["split"]].append(record["messages"])
    except (ValueError, KeyError, TypeError):
        return None
    return out if out["train"] else None


def lessons(model_dir: str | Path) -> list[tuple[str, str]]:
    """The (question, answer) pairs a model was taught, both splits, as data.memory keeps them:
    one-turn conversations whose question carries no passage (none for a model without a file)."""
    from gpt.chat_template import REFERENCE

    replay = read_replay(model_dir) or {}
    out = []
    for split in SPLITS:
        for c in replay.get(split, []):
            # a file written elsewhere may hold anything: what is not a plain exchange is skipped
            if not (isinstance(c, list) and len(c) == 2 and all(isinstance(m, dict) for m in c)):
                continue
            question, text = c[0].get("content"), c[1].get("content")
            if (c[0].get("role"), c[1].get("role")) != ("user", "assistant"):
                continue
            if isinstance(question, str) and isinstance(text, str) and not question.startswith(REFERENCE):
                out.append((question, text))
    return out
