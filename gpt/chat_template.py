"""The one chat format, shared by fine-tuning and generation.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}.
Each message is rendered on its own as  header + content + end-of-turn:

- With a tokenizer that carries Kettle's special tokens (a trained one), the header is the role's
  special token and the end-of-turn marker is <|end|>:
      <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
- With GPT-2's vocabulary (no new tokens), the header is plain text and the end-of-turn marker is
  <|endoftext|>, a token GPT-2 already knows as "the text ends here":
      ### System:\\nYou are terse.<|endoftext|>### User:\\nHi<|endoftext|>### Assistant:\\nHello.<|endoftext|>

Because every message is encoded separately, rendering a conversation is a prefix of rendering
any continuation of it: the engine relies on that to reuse its KV cache across turns. A prompt ends
with the assistant header, so the model writes the next answer; fine-tuning teaches the model the
assistant content and the end-of-turn marker (the loss mask covers both), so generation stops.
"""

from __future__ import annotations

import json
import re

from gpt.errors import KettleError
from gpt.tokenizer import END_OF_TEXT, Tokenizer

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
SPECIAL_HEADERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
TEXT_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


def uses_special_tokens(tokenizer: Tokenizer) -> bool:
    """True when the tokenizer has all of the chat format's special tokens."""
    return all(tokenizer.has_special(t) for t in (*SPECIAL_HEADERS.values(), END_OF_TURN))


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    if uses_special_tokens(tokenizer):
        return tokenizer.special_id(END_OF_TURN)
    return tokenizer.eot_id


def stop_token_ids(tokenizer: Tokenizer) -> set[int]:
    """Tokens that end an answer: the end-of-turn marker and end-of-text."""
    ids = {end_of_turn_id(tokenizer)}
    if tokenizer.has_special(END_OF_TEXT):
        ids.add(tokenizer.special_id(END_OF_TEXT))
    return ids


def header_ids(role: str, tokenizer: Tokenizer) -> list[int]:
    if uses_special_tokens(tokenizer):
        return [tokenizer.special_id(SPECIAL_HEADERS[role])]
    return tokenizer.encode(TEXT_HEADERS[role])


def render_message(message: dict, tokenizer: Tokenizer) -> list[int]:
    """One message, complete with its end-of-turn marker."""
    return header_ids(message["role"], tokenizer) + tokenizer.encode(message["content"]) + [end_of_turn_id(tokenizer)]


def validate_messages(messages) -> list[dict]:
    """Check the shape of a conversation; returns it. Raises KettleError naming the bad message."""
    if not isinstance(messages, list):
        raise KettleError("messages must be a list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise KettleError(f"message {i}: must be an object with role and content")
        if m.get("role") not in ROLES:
            raise KettleError(f"message {i}: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise KettleError(f"message {i}: content must be a string")
        if m["role"] == "system" and i != 0:
            raise KettleError(f"message {i}: a system message may only come first")
    return messages


def render_prompt(messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    """The conversation's token ids, ending with the assistant header."""
    validate_messages(messages)
    ids: list[int] = []
    for m in messages:
        ids += render_message(m, tokenizer)
    return ids + header_ids("assistant", tokenizer)


def render_training(messages: list[dict], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and a loss mask, True exactly on the assistant content
    tokens and each assistant turn's end-of-turn marker (without it the model never learns to stop)."""
    validate_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise KettleError("a training conversation needs at least one assistant message")
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        header = header_ids(m["role"], tokenizer)
        body = tokenizer.encode(m["content"]) + [end_of_turn_id(tokenizer)]
        ids += header + body
        mask += [False] * len(header) + [m["role"] == "assistant"] * len(body)
    return ids, mask


# Grounding: passages the answer may be taken from go inside the newest user turn, ahead of the
# question. There they change only the last turn's tokens, so the turns before it stay a cached
# prefix; the stored conversation never holds them (they are chosen afresh for each answer).
REFERENCE = "Reference:\n"
QUESTION = "\n\nQuestion: "


def grounded(messages: list[dict], references: list[str], *, taught: int = 0) -> list[dict]:
    """The conversation with `references` in the newest user turn; as it is with none. `taught`:
    how many of them, the first ones, are answers the user taught (copied whole: CopyBias)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not references or not users:
        return messages
    last = users[-1]
    content = REFERENCE + "\n\n".join(references) + QUESTION + messages[last]["content"]
    # the passages ride along too, for the copy bias (gpt.engine.Engine.copy_bias); only
    # "content" is ever rendered
    turn = {
        **messages[last],
        "content": content,
        "references": list(references),
        "taught": min(taught, len(references)),
    }
    return [*messages[:last], turn, *messages[last + 1 :]]


def fit_references(references: list[str], tokenizer: Tokenizer, budget: int) -> list[str]:
    """As many of `references` (best first) as fit in `budget` tokens with the grounding's own
    words. One that fits only in part keeps its first line (the question a correction answers,
    the name a passage documents) and as many whole sentences after it as fit, or is left out."""
    used = len(tokenizer.encode(REFERENCE + QUESTION))
    kept: list[str] = []
    for text in references:
        cost = len(tokenizer.encode(text + "\n\n"))
        if used + cost <= budget:
            kept.append(text)
            used += cost
            continue
        head, newline, body = text.partition("\n")
        sentences = re.split(r"(?<=[.!?])\s+", body.strip()) if newline else []
        while sentences:
            part = head + newline + " ".join(sentences)
            if used + len(tokenizer.encode(part + "\n\n")) <= budget:
                kept.append(part)
                break
            sentences.pop()
        break
    return kept


def render_alpaca(instruction: str, input: str = "", *, output: str | None = None) -> str:
    """The Alpaca prompt used in the book's chapter 7; with `output`, the full training text."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    text += "\n\n### Response:\n"
    return text if output is None else text + output


def jinja_chat_template(tokenizer: Tokenizer) -> str:
    """This format as a Jinja chat template (Hugging Face's `chat_template`), for a tokenizer
    converted by gpt.tokenizer.hf_tokenizer_json: rendered and encoded, it gives render_prompt's
    ids (and, with add_generation_prompt false, a whole conversation's render_training ids).
    Each answer and its end-of-turn marker sit in a {% generation %} block, transformers' mark for
    the tokens render_training's loss mask covers (TRL's assistant_only_loss reads it)."""
    special = uses_special_tokens(tokenizer)
    headers = SPECIAL_HEADERS if special else TEXT_HEADERS
    end = END_OF_TURN if special else END_OF_TEXT
    # `documents` (apply_chat_template's passages for grounded answers, {"title", "text"} each:
    # the text as Passage.reference has it) go into the newest user turn as grounded() puts them
    return (
        "{%- set headers = " + json.dumps(headers) + " -%}"
        "{%- set ns = namespace(last_user=-1) -%}"
        "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
        "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in headers -%}"
        "{{ raise_exception('role must be one of " + ", ".join(ROLES) + "') }}"
        "{%- elif message['role'] == 'system' and not loop.first -%}"
        "{{ raise_exception('a system message may only come first') }}"
        "{%- endif -%}"
        "{{ headers[message['role']] }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}{{ message['content'] }}" + end + "{% endgeneration %}"
        "{%- elif documents and loop.index0 == ns.last_user -%}"
        "{{ " + json.dumps(REFERENCE) + " }}"
        "{%- for doc in documents -%}{{ doc['text'] if doc is mapping else doc }}"
        "{%- if not loop.last -%}{{ " + json.dumps("\n\n") + " }}{%- endif -%}{%- endfor -%}"
        "{{ "
        + json.dumps(QUESTION)
        + " }}{{ message['content'] }}"
        + end
        + "{%- else -%}{{ message['content'] }}"
        + end
        + "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ headers['assistant'] }}{%- endif -%}"
    )
