"""Labelled conversations -> what would train: the answers a DataFilter chooses, rendered as
examples in the one chat format, and preference pairs.

Pure functions over rows the store has already read (see Store.dataset); nothing here touches
the database. A message row is a dict with the message's id, conversation_id, parent_id, role,
content and meta (JSON text or None), plus its conversation's system_prompt and external_id.
"""

from __future__ import annotations

import json
from collections import Counter

from data.records import DataFilter, Label


def chat_problem(messages: list[dict]) -> str | None:
    """Why `messages` (a conversation, or the prompt of a preference pair) is not one a model can
    be asked or learn from, or None: a system message only comes first, and a question comes
    before any answer (the shapes gpt.chat_template.validate_messages and the server accept)."""
    for i, m in enumerate(messages):
        if m["role"] == "system" and i:
            return f"has a system message after its start (message {i}; a system prompt only comes first)"
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        return "holds only a system prompt, no question" if messages else "holds no messages"
    if turns[0]["role"] != "user":
        return "starts with an answer, not a question"
    return None


def render_dataset(
    messages: dict[int, dict], labels: dict[int, Label], *, filt: DataFilter, skipped: Counter | None = None
) -> tuple[list[dict], list[dict]]:
    """(examples, preference pairs) from `messages` (message rows by id: whole branches of live
    conversations) and `labels` (their current, non-empty labels by message id), each with the id
    of the answer it came from under "message_id" (not part of the example).

    An example is {"messages": [...]} ending at a chosen answer that has no chosen answer
    below it on its branch (a branch of several chosen turns makes one example), plus "meta"
    when the import it came from needs it to export exactly (Alpaca fields, ShareGPT id).
    A pair is {"prompt": [...], "chosen": [assistant msg], "rejected": [assistant msg]}: a
    corrected answer against its original, and an up-voted against a down-voted sibling.

    A branch no model can learn from (see `chat_problem`: an older Kettle imported some) is left
    out, counted in `skipped` by reason, so that one such conversation never stops a snapshot.
    """
    skipped = Counter() if skipped is None else skipped
    excluded = {mid for mid, lab in labels.items() if lab.excluded}
    paths = {}
    chosen = set()
    for mid, m in messages.items():
        if m["role"] != "assistant" or not filt.chooses(labels.get(mid)):
            continue
        path = _path(messages, mid)
        if any(p["id"] in excluded for p in path):
            continue
        paths[mid] = path
        chosen.add(mid)
    inner = {p["id"] for path in paths.values() for p in path[:-1]}
    examples = []
    for mid in sorted(chosen - inner):
        path = paths[mid]
        example = {"messages": _render(path, labels, chosen=chosen)}
        if problem := chat_problem(example["messages"]):
            skipped[problem] += 1
            continue
        meta = _example_meta(path)
        if meta:
            example["meta"] = meta
        examples.append({"message_id": mid, "example": example})
    pairs = _pairs(messages, labels, excluded=excluded, filt=filt, skipped=skipped)
    return examples, pairs


def _path(messages: dict[int, dict], mid: int) -> list[dict]:
    """The branch from the root down to message `mid`, in order."""
    path = []
    while mid is not None:
        path.append(messages[mid])
        mid = messages[mid]["parent_id"]
    return path[::-1]


def _render(path: list[dict], labels: dict[int, Label], *, chosen: set[int]) -> list[dict]:
    """Chat messages for a branch: assistant turns use the corrected answer where there is
    one; assistant turns that were not chosen carry "weight": 0 (context, not to be learned —
    the OpenAI fine-tuning convention)."""
    first = path[0]
    out = [{"role": "system", "content": first["system_prompt"]}] if first["system_prompt"] else []
    for m in path:
        msg = {"role": m["role"], "content": m["content"]}
        label = labels.get(m["id"])
        if m["role"] == "assistant":
            if label is not None and label.ideal is not None:
                msg["content"] = label.ideal
            if m["id"] not in chosen:
                msg["weight"] = 0
        out.append(msg)
    return out


def _example_meta(path: list[dict]) -> dict:
    meta = {}
    if path[0]["external_id"] is not None:
        meta["id"] = path[0]["external_id"]
    users = [p for p in path if p["role"] == "user"]
    if users and users[-1]["meta"]:  # Alpaca fields: the last question (earlier: history)
        meta.update(json.loads(users[-1]["meta"]))
    return meta


def _pairs(
    messages: dict[int, dict], labels: dict[int, Label], *, excluded: set[int], filt: DataFilter, skipped: Counter
) -> list[dict]:
    def passes_tags(label: Label) -> bool:
        tags = set(label.tags)
        return (not filt.tags_include or bool(tags & set(filt.tags_include))) and not tags & set(filt.tags_exclude)

    def prompt_of(mid: int) -> list[dict] | None:
        """The messages before answer `mid`; None when excluded or not a question to answer."""
        path = _path(messages, mid)
        if any(p["id"] in excluded for p in path):
            return None
        prompt = _render(path, labels, chosen={p["id"] for p in path})[:-1]  # the system prompt is the root's
        if problem := chat_problem(prompt):
            skipped[f"a preference pair whose prompt {problem}"] += 1
            return None
        return prompt

    pairs = []
    siblings: dict[tuple, list[int]] = {}
    for mid, m in messages.items():
        if m["role"] != "assistant":
            continue
        siblings.setdefault((m["conversation_id"], m["parent_id"]), []).append(mid)
        label = labels.get(mid)
        if label is None or label.ideal is None or label.ideal == m["content"]:
            continue
        if not passes_tags(label) or (prompt := prompt_of(mid)) is None:
            continue
        pairs.append(
            {
                "message_id": mid,
                "pair": {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": label.ideal}],
                    "rejected": [{"role": "assistant", "content": m["content"]}],
                },
            }
        )
    for group in siblings.values():
        ups = [i for i in group if labels.get(i) and labels[i].thumb == 1 and passes_tags(labels[i])]
        downs = [i for i in group if labels.get(i) and labels[i].thumb == -1]
        downs = [i for i in downs if i not in excluded]
        for up in ups if downs else ():
            if (prompt := prompt_of(up)) is None:
                continue
            for down in downs:
                chosen_text = labels[up].ideal or messages[up]["content"]
                pairs.append(
                    {
                        "message_id": up,
                        "pair": {
                            "prompt": prompt,
                            "chosen": [{"role": "assistant", "content": chosen_text}],
                            "rejected": [{"role": "assistant", "content": messages[down]["content"]}],
                        },
                    }
                )
    pairs.sort(key=lambda p: p["message_id"])
    return pairs
