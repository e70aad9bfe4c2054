"""What a fine-tune did to the answers it was not about: greedy answers to a fixed probe of the
base's own questions, before and after, scored for what the gate's losses do not show.

Measured on the starter: a full fine-tune on 10 corrections recalled them and kept its replay loss,
yet its looping answers on 100 unrelated questions went 10 -> 22, and the corrections' wording
leaked into 10 of 180 unrelated answers ("What does oct do?" -> "Return a single immutable
sequence, written with parentheses like (1, 2, 3)." where a correction said "A tuple is an
immutable sequence, written with parentheses like (1, 2, 3)."); the gate said "passed".

The probe (`Probe`): PROBE_SIZE questions of the base's replay data (finetune.replay), half from
its held-out split (questions it never trained on: where a fine-tune's wording leaks or loops) and
the rest from its training split (answers it was taught, which a fine-tune can lose), a seeded
sample, leaving out any question a correction asks. The base and then the fine-tuned model answer
each greedily, in at most MAX_NEW_TOKENS tokens (about a second for 48 on the starter, on a CPU).
Scored (`score`):
- looping: some word 3-gram occurs LOOP_REPEATS times or more in the answer;
- a leak: the answer after contains LEAK_WORDS consecutive words of a correction's answer that
  neither the base's answer nor the expected answer contained (the corrections are the last
  trained assistant turns of the run's training examples);
- a lost answer: the base's first sentence was the expected answer's, the new model's is not.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from finetune.instruct import IGNORE, Example
from gpt.chat_template import QUESTION, REFERENCE, end_of_turn_id, header_ids, stop_token_ids
from gpt.engine import Engine
from gpt.sampling import SamplingParams
from gpt.tokenizer import Tokenizer

PROBE_SIZE = 48
PROBE_SEED = 0
# Long enough for a loop to show (three repeats of a 3-gram are 9 words) and for most of the
# starter's one-sentence answers to end on their own.
MAX_NEW_TOKENS = 64
LOOP_NGRAM, LOOP_REPEATS = 3, 3
LEAK_WORDS = 5
EXAMPLES_KEPT = 5  # of each kind, in the metrics: the verdict names a few
WORD = re.compile(r"\w+")


@dataclass
class Question:
    text: str  # its last user turn, which names it
    prompt: list[int]  # the conversation up to the answer, ending with the assistant header
    expected: str  # the answer its data gives


def last_exchange(example: Example, tokenizer: Tokenizer) -> Question:
    """An example's last trained answer as a Question: its prompt, the user turn before it ("" when
    there is none), the answer."""
    labels = example.labels
    end = max(i for i, t in enumerate(labels) if t != IGNORE)
    start = end
    while start and labels[start - 1] != IGNORE:
        start -= 1
    prompt = example.input_ids[: start + 1]  # the target at `start` is the answer's first token
    user, close = header_ids("user", tokenizer), end_of_turn_id(tokenizer)
    at = next((i for i in range(len(prompt) - len(user), -1, -1) if prompt[i : i + len(user)] == user), None)
    turn = [] if at is None else prompt[at + len(user) :]
    text = tokenizer.decode(turn[: turn.index(close)] if close in turn else turn)
    if text.startswith(REFERENCE):  # a grounded question (older starters replay them) goes by its question
        text = text.rpartition(QUESTION)[2]
    stop = stop_token_ids(tokenizer)
    return Question(
        text=text,
        prompt=prompt,
        expected=tokenizer.decode(t for t in labels[start : end + 1] if t not in stop),
    )


class Probe:
    """The questions a run's model answers before and after training (see the module docstring)."""

    def __init__(
        self, tokenizer: Tokenizer, *, heldout: list[Example], train: list[Example], corrections: list[Example]
    ):
        self.tokenizer = tokenizer
        corrected = [last_exchange(e, tokenizer) for e in corrections]
        self.corrections = [q.expected for q in corrected]
        seen = {"", *(q.text for q in corrected)}  # nameless questions left out too
        rng = random.Random(PROBE_SEED)

        def pick(examples: list[Example], n: int) -> list[Question]:
            # Converted lazily, in a seeded order: the replay data holds thousands of examples.
            order = list(range(len(examples)))
            rng.shuffle(order)
            out = []
            for i in order:
                if len(out) == n:
                    break
                q = last_exchange(examples[i], tokenizer)
                if q.text not in seen:
                    seen.add(q.text)
                    out.append(q)
            return out

        held = pick(heldout, PROBE_SIZE)
        taught = pick(train, PROBE_SIZE - min(len(held), PROBE_SIZE // 2))
        self.questions = held[: PROBE_SIZE - len(taught)] + taught

    def answers(self, model) -> list[str]:
        """The model's greedy answer to each question."""
        if not self.questions:
            return []
        was_training = model.training
        engine = Engine(model, self.tokenizer)
        params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW_TOKENS)
        try:
            return [engine.generate(q.prompt, params).text for q in self.questions]
        finally:
            model.train(was_training)

    def score(self, before: list[str], after: list[str]) -> dict | None:
        """The figures and examples (question -> answer after) the verdict reads; None without
        questions (a base with no replay data)."""
        if not self.questions:
            return None
        leak_grams = [set(ngrams(words(c), LEAK_WORDS)) for c in self.corrections]
        loops, leaks, lost = {}, {}, {}
        right = 0
        for q, old, new in zip(self.questions, before, after):
            if looping(new) and not looping(old):
                loops[q.text] = new
            known = set(ngrams(words(old), LEAK_WORDS)) | set(ngrams(words(q.expected), LEAK_WORDS))
            fresh = set(ngrams(words(new), LEAK_WORDS)) - known
            if any(fresh & grams for grams in leak_grams):
                leaks[q.text] = new
            if first_sentence(old) == first_sentence(q.expected):
                right += 1
                if first_sentence(new) != first_sentence(q.expected):
                    lost[q.text] = new
        return {
            "questions": len(self.questions),
            "loops_before": sum(map(looping, before)),
            "loops_after": sum(map(looping, after)),
            "leaks": len(leaks),
            "right_before": right,
            "lost": len(lost),
            "examples": {  # sorted: the store keeps JSON objects' keys sorted, and the verdict names the first
                kind: dict(sorted(found.items())[:EXAMPLES_KEPT])
                for kind, found in (("loops", loops), ("leaks", leaks), ("lost", lost))
            },
        }


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: "pathlib.Path.Path.Path" repeats a word too."""
    return WORD.findall(text.lower())


def ngrams(items: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def looping(text: str) -> bool:
    """Whether some word 3-gram occurs LOOP_REPEATS times or more."""
    return any(c >= LOOP_REPEATS for c in Counter(ngrams(words(text), LOOP_NGRAM)).values())


def first_sentence(text: str) -> str:
    text = " ".join(text.split())
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
