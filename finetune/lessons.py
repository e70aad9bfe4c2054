"""Corrections as lessons that hold: asked in other words, in the middle of a chat, and after
later fine-tunes.

Trained only on its exact question, a correction came back word for word and nowhere else (1 of
20 rewordings; 0 of 4 asked in the chat where it was made). So each lesson is trained in several
forms, made offline from its own text:

- `rewordings`: the question in other words — the families people ask in ("How do I X?", "How
  can I X?", "What's the way to X?", "X in Python"; "What is X?", "Explain X"; "What does X do?",
  "What is X for?"), with case, punctuation, "in Python" and a few synonyms varied; the model
  learns that the meaning, not the wording, brings the answer.
- `in_context`: the question after one to three earlier exchanges (context, not targets), as it
  is asked in an ongoing chat.

A fine-tuned model keeps every lesson of its lineage in LESSONS_FILE beside its weights; the next
fine-tune trains them again with its own (a newer correction of the same question replaces the
older one) and its gate checks that none was forgotten.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

LESSONS_FILE = "lessons.jsonl"
REWORDINGS = 6  # forms of each lesson's question trained beside the question itself
IN_CONTEXT = 4  # ... and times each epoch it is trained after earlier exchanges of a chat
CHATS = 24  # chats made for each lesson, IN_CONTEXT of them sampled afresh each epoch: trained
# in the same 4 chats every epoch, 1 of 10 corrections came back in a new 6-turn chat
CONTEXT_TURNS = (1, 6)  # how many earlier exchanges come before it
# Earlier turns as a chat holds them: the base's own answers, sampled as the chat samples. Trained
# after clean question-answer pairs only, 0 of 10 corrections came back in a 6-turn chat whose
# earlier answers were the starter's (half-right, some looping "1010..."): it copied the loop.
OPENERS = (
    "Hi!",
    "Hello, can you help me with Python?",
    "Thanks!",
    "Thank you, that helps.",
    "One more question.",
    "Great.",
    "That did not work.",
    "Can you explain that again?",
)
CHATTER = len(OPENERS) + 4  # ... and four of the base's own questions
FORMS = REWORDINGS + IN_CONTEXT  # examples of each lesson an epoch trains beside the lesson

# Families of questions: a pattern that finds the subject, and the forms that ask the same.
_END = r"\s*[?.!]*\s*$"
HOWTO = (
    "How do I {}?",
    "How can I {}?",
    "How would I {}?",
    "How should I {}?",
    "How to {}?",
    "What's the way to {}?",
    "What is the best way to {}?",
    "What's the easiest way to {}?",
    "Is there a way to {}?",
    "Can you tell me how to {}?",
    "Show me how to {}.",
    "I want to {}. How?",
    "how do i {}",
    "{}?",
)
WHAT_IS = (
    "What is {}?",
    "What's {}?",
    "Explain {}.",
    "What is meant by {}?",
    "Tell me about {}.",
    "Describe {}.",
    "Define {}.",
    "what is {}",
    "Can you explain {}?",
)
WHAT_DOES = (
    "What does {} do?",
    "What is {} for?",
    "What's {} used for?",
    "What does {} give?",
    "What does {} return?",
    "Explain {}.",
    "Tell me what {} does.",
    "How does {} work?",
    "what does {} do",
    "What does the {} function do?",
    "What is the point of {}?",
)
FAMILIES = (
    (
        re.compile(
            r"^(?:how (?:do|can|could|would|should|might) (?:i|you|we|one)|how to|"
            r"what(?:'s| is) (?:the |a )?(?:best |easiest |right |simplest )?way to|is there a way to|"
            r"(?:can|could) you (?:tell|show) me how to|show me how to|i (?:want|need) to)\s+(.+?)" + _END,
            re.IGNORECASE,
        ),
        HOWTO,
    ),
    (
        re.compile(
            r"^(?:what (?:does|do|did) (?:the )?(.+?)(?: function| method)? "
            r"(?:do|give|return|produce|mean|output|check|compute|yield|make)|"
            r"what(?:'s| is) (?:the )?(.+?)(?: function| method)? (?:used )?for)" + _END,
            re.IGNORECASE,
        ),
        WHAT_DOES,
    ),
    (
        re.compile(
            r"^(?:what(?:'s| is| are)(?: meant by)?|explain(?: what)?|define|describe|tell me about|"
            r"can you explain)\s+(.+?)(?:\s+(?:is|are))?" + _END,
            re.IGNORECASE,
        ),
        WHAT_IS,
    ),
)
# Words people swap for one another in a question (both ways).
SYNONYMS = (
    ("dictionary", "dict"),
    ("string", "str"),
    ("integer", "int"),
    ("a list", "a Python list"),
    ("check", "test"),
    ("get", "find"),
    ("convert", "turn"),
    ("make", "create"),
    ("remove", "delete"),
    ("join", "combine"),
    ("number", "count"),
    ("copy", "duplicate"),
    ("item", "element"),
    ("last", "final"),
    ("split", "break up"),
    ("sort", "order"),
    ("file", "text file"),
    ("key", "entry"),
)


def subject(question: str) -> tuple[str, tuple[str, ...]] | None:
    """(what the question asks about, the forms of its family), or None for a question of no
    known family ("How do I reverse a list in Python?" -> ("reverse a list in Python", HOWTO))."""
    for pattern, forms in FAMILIES:
        match = pattern.match(question.strip())
        if match:
            found = next(g for g in match.groups() if g)
            return found[0].lower() + found[1:] if found[:2] != found[:2].upper() else found, forms
    return None


def _swap(text: str, rng: random.Random) -> str:
    """`text` with one of SYNONYMS swapped (whole words), when it holds one."""
    options = []
    for a, b in SYNONYMS:
        for old, new in ((a, b), (b, a)):
            if re.search(_word(old), text, re.IGNORECASE):
                options.append((old, new))
    if not options:
        return text
    old, new = rng.choice(options)
    return re.sub(_word(old), new, text, count=1, flags=re.IGNORECASE)


def _word(word: str) -> str:
    """A pattern for `word` as a word of its own, never part of a name in code ("copy.copy",
    "str.split": "What does duplicate.copy return" asks about nothing)."""
    return rf"(?<![\w.]){re.escape(word)}(?!\w|\.\w)"


def _python(text: str, rng: random.Random) -> str:
    """`text` with " in Python" taken off when it has it, else sometimes put on."""
    stripped = re.sub(r"\s+(?:in|with|using) python\b", "", text, flags=re.IGNORECASE)
    if stripped != text or "python" in text.lower():
        return stripped
    return text + rng.choice((" in Python", " in python", " with Python")) if rng.random() < 0.5 else text


def _surface(question: str, rng: random.Random) -> str:
    """The same words asked differently: case, end punctuation, a leading word."""
    q = question.strip()
    choice = rng.randrange(4)
    if choice == 0:
        return q.lower()
    if choice == 1:
        return q.rstrip("?.! ")
    if choice == 2:
        return rng.choice(("Quick question: ", "Hey, ", "Please tell me: ", "In Python, ")) + q[0].lower() + q[1:]
    return q + rng.choice((" Thanks.", " Thanks!", " Any idea?"))


def rewordings(question: str, n: int, *, seed: int = 0) -> list[str]:
    """Up to `n` other ways of asking `question` (never the question itself), the same for the
    same question and seed."""
    rng = random.Random(f"{seed}:{question}")
    found = subject(question)
    seen, out = {question.strip()}, []
    for _ in range(n * 8):
        if len(out) == n:
            break
        if found:
            topic, forms = found
            if rng.random() < 0.5:
                topic = _swap(topic, rng)
            if rng.random() < 0.5:
                topic = _python(topic, rng)
            text = rng.choice(forms).format(topic)
            text = text[0].upper() + text[1:] if rng.random() < 0.8 else text
        else:
            text = _swap(question, rng) if rng.random() < 0.5 else question
        if rng.random() < 0.35:
            text = _surface(text, rng)
        if text.strip() not in seen:
            seen.add(text.strip())
            out.append(text)
    return out


def in_context(lesson: list[dict], earlier: list[list[dict]], *, question: str | None = None) -> list[dict]:
    """`lesson` asked after `earlier` exchanges (each a user turn and an answer): their answers
    are context, not targets (weight 0); `question` replaces the lesson's last question."""
    head = [dict(m, weight=0) if m["role"] == "assistant" else dict(m) for pair in earlier for m in pair]
    system = lesson[:1] if lesson and lesson[0]["role"] == "system" else []
    body = [dict(m) for m in lesson[len(system) :]]
    if question is not None:
        last_user = max(i for i, m in enumerate(body) if m["role"] == "user")
        body[last_user]["content"] = question
    return system + head + body


def variants(
    lessons: list[list[dict]], pool: list[list[dict]], *, chatter: list[list[dict]] = (), seed: int = 0
) -> tuple[list[list[dict]], list[list[dict]]]:
    """The other forms of every lesson: (REWORDINGS of it asked alone, CHATS of it asked after
    1-4 earlier exchanges, half of them reworded too). The earlier exchanges come from `chatter`
    (the base's sampled answers), the other lessons and `pool` (the base's own conversations)."""
    alone, chats = [], []
    for lesson in lessons:
        question = last_question(lesson)
        if question is None:
            continue
        rng = random.Random(f"{seed}:{question}:context")
        forms = rewordings(question, REWORDINGS + CHATS, seed=seed)
        alone += [in_context(lesson, [], question=form) for form in forms[:REWORDINGS]]
        others = [c for c in pool if c is not lesson and len(c) == 2] or [c for c in lessons if c is not lesson]
        for i in range(CHATS if others else 0):
            earlier = [_earlier_turn(rng, lesson, lessons, chatter, others) for _ in range(rng.randint(*CONTEXT_TURNS))]
            form = forms[REWORDINGS + i] if i % 2 and len(forms) > REWORDINGS + i else None
            chats.append(in_context(lesson, earlier, question=form))
    return alone, chats


NEIGHBOURS = 8  # the base's own conversations trained beside each lesson every epoch


CONTRASTS = 3  # near misses of each lesson's question, answered as the base answers them
CONTRASTED = 20  # lessons given near misses (each costs the base CONTRASTS answers)
_PLAIN_WORDS = set(
    "a an the in on of to do does did i is are how what why can could would with and or it my for".split()
)


def contrasts(lessons: list[list[dict]], pool: list[list[dict]], *, seed: int = 0) -> list[str]:
    """Questions worded like a lesson's but about something else: one of its words swapped for
    a word of another question of `pool` ("How do I convert a string to an integer?" -> "How do
    I convert a bytes to an integer?"). Answered as the base answers them and trained beside the
    lessons, they keep a correction to its subject: without them, questions the base never
    learned took up a correction's words ("How do I get the hexadecimal representation of an
    integer?" -> "Call int(text); for example ...")."""
    vocabulary = sorted(
        {w for c in pool for w in re.findall(r"[\w.]+", last_question(c) or "") if w.lower() not in _PLAIN_WORDS}
    )
    out = []
    for lesson in lessons[:CONTRASTED]:
        question = last_question(lesson) or ""
        rng = random.Random(f"{seed}:{question}:contrast")
        words = [w for w in re.findall(r"[\w.]+", question) if w.lower() not in _PLAIN_WORDS]
        for _ in range(CONTRASTS if words and vocabulary else 0):
            old = rng.choice(words)
            other = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w.])", rng.choice(vocabulary), question, count=1)
            if other != question:
                out.append(other)
    return out


def neighbours(lessons: list[list[dict]], pool: list[list[dict]]) -> list[list[dict]]:
    """For each lesson, the NEIGHBOURS conversations of `pool` (the base's own) whose questions
    share the most words with it: asked alike, answered otherwise. Trained every epoch, they keep
    a lesson to its own question: with its rewordings alone, a lesson's answer leaked into 16 of
    180 of the base's own questions ("How do I get a 2-tuple ...?" -> "Call str.sort(...)")."""
    words = [set(re.findall(r"\w+", (last_question(c) or "").lower())) for c in pool]
    chosen: dict[int, None] = {}
    for lesson in lessons:
        asked = set(re.findall(r"\w+", (last_question(lesson) or "").lower()))
        ranked = sorted(range(len(pool)), key=lambda i: -len(asked & words[i]) / (1 + len(words[i])))
        for i in ranked[:NEIGHBOURS]:
            chosen.setdefault(i)
    return [pool[i] for i in chosen]


def last_question(conversation: list[dict]) -> str | None:
    """The last user turn before the conversation's answer."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return users[-1] if users else None


def key(question: str) -> str:
    """What makes two questions the same lesson (a newer correction replaces an older one)."""
    return " ".join(re.findall(r"\w+", question.lower()))


def merge(earlier: list[list[dict]], newer: list[list[dict]]) -> list[list[dict]]:
    """A lineage's lessons after a fine-tune on `newer`: the earlier ones that no newer one
    corrects again, then the newer ones."""
    asked = {key(q) for c in newer if (q := last_question(c))}
    return [c for c in earlier if key(last_question(c) or "") not in asked] + newer


def read_lessons(model_dir: str | Path) -> list[list[dict]]:
    """The lessons a model directory keeps (none when it has no readable LESSONS_FILE)."""
    try:
        lines = Path(model_dir, LESSONS_FILE).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["messages"] for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return []


def lessons_text(lessons: list[list[dict]]) -> str:
    return "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in lessons)


def _earlier_turn(rng: random.Random, lesson, lessons, chatter, others) -> list[dict]:
    """One exchange before a lesson is asked in a chat: the base's sampled answer to something,
    another lesson asked and answered, or another lesson's answer given to something else (a
    fine-tuned model's chat holds those: the starter, fine-tuned on 10 corrections, answered
    "Thanks. One more thing." with one of them, and then "What does range(5) give?" with
    "range(5) gives the numbers 42." copied from it), or one of the base's own pairs."""
    siblings = [c for c in lessons if c is not lesson and len(c) >= 2]
    roll = rng.random()
    if roll < 0.3 and chatter:
        return rng.choice(chatter)
    if roll < 0.55 and siblings:
        return rng.choice(siblings)[-2:]
    if roll < 0.8 and siblings:
        question = rng.choice(chatter or others)[0]
        return [question, rng.choice(siblings)[-1]]
    return rng.choice(others)


def chatter(model, tokenizer, questions: list[str], *, params) -> list[list[dict]]:
    """Exchanges as a chat with this model holds them: `questions` with its answers at `params`
    (the chat's default sampling, each seeded; or greedy)."""
    from gpt.engine import Engine

    engine = Engine(model, tokenizer)
    out = []
    for i, question in enumerate(questions):
        messages = [{"role": "user", "content": question}]
        answer = engine.generate_chat(messages, params.replace(seed=i, max_new_tokens=48)).text
        if answer.strip():  # an answer that ends at once has nothing to keep or show
            out.append(messages + [{"role": "assistant", "content": answer}])
    return out


CHECKED = 10  # lessons the verdict asks as the chat does (each costs SEEDS + 1 generations)
SEEDS = 3


def as_the_chat_asks(model, tokenizer, lessons: list[list[dict]], pool: list[list[dict]], *, params) -> dict:
    """How the lessons come back the way the chat asks: at its default sampling (`params`)
    under SEEDS seeds alone, and greedy after two earlier exchanges from `pool`; with the
    questions of those that did not, and how they were asked."""
    from gpt.engine import Engine

    engine = Engine(model, tokenizer)
    checked = lessons[:CHECKED]
    sampled = in_chat = 0
    missed = []
    for i, lesson in enumerate(checked):
        question, want = last_question(lesson), lesson[-1]["content"].strip()
        prompt = lesson[:-1]
        limit = len(tokenizer.encode(want)) + 8
        for seed in range(SEEDS):
            got = engine.generate_chat(prompt, params.replace(seed=seed, max_new_tokens=limit)).text.strip()
            sampled += got == want
            if got != want:
                missed.append({"question": question, "asked": f"sampled, seed {seed}", "answer": got[:120]})
        others = [c for c in pool if len(c) == 2 and c is not lesson]
        earlier = random.Random(i).sample(others, min(2, len(others)))
        greedy = params.replace(temperature=0, repetition_penalty=1.0, max_new_tokens=limit)
        got = engine.generate_chat(in_context(lesson, earlier)[:-1], greedy).text.strip()
        in_chat += got == want
        if got != want:
            missed.append({"question": question, "asked": "in a chat", "answer": got[:120]})
    return {
        "chat_sampled": sampled,
        "chat_sampled_of": SEEDS * len(checked),
        "chat_in_context": in_chat,
        "chat_in_context_of": len(checked),
        "chat_missed": missed,
    }
