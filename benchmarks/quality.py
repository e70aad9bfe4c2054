"""Answers, not losses: what a user gets back from a model, scored exactly, on question sets of
our own (none of them in any training data).

    .venv/bin/python benchmarks/quality.py MODEL [--files 1000] [--only SECTION ...]

MODEL is a model directory or a name under KETTLE_HOME/models (the brewed starter: `starter`).
Every answer is greedy (temperature 0) unless said otherwise. Sections:

- own: 120 of the model's own instruction questions (both shares of its replay data), without
  grounding and with it (its documentation and its lessons in memory, as the app answers): the
  first sentence of the answer equals the trained answer's.
- heldout: "What does X do?" about 40 names of the standard-library modules held out of the
  starter's training (pretraining validation split), with grounding and without: the first
  sentence equals the first sentence of X's docstring.
- corrections: 10 corrections saved in a fresh store, not fine-tuned, each asked in 2 other
  words with grounding: the answer equals the correction.
- unrelated: 20 questions about things not in the index (not Python): how many retrieve a
  passage, and how many answers grounding changed.
- untaught: 10 questions no instruction data asks, answered verbatim with grounding (the
  chat's default) and without, for a reader to judge.
- finetune: 10 corrections fine-tuned with the product's defaults (--lora for LoRA): exact,
  reworded (2 each), asked in an ongoing 6-turn chat, at the chat's default sampling (3 seeds);
  answers to 180 of the base's own questions before and after (looping, leaked wording, right
  answers kept); then 5 more fine-tuned on top: how many of all 15 come back.
- speed: time to first token with grounding (retrieval included) over without, on an index of
  the installed Python's documentation plus --files generated Markdown files, with the chat's
  sampling settings: a chat's first turn step by step, then later turns of chats, then as an
  OpenAI client sees it through `kettle serve` (streamed, over HTTP); the time to index
  Python's documentation.

Everything runs in a temporary KETTLE_HOME through the product's own code paths, as the chat
screen and the server take them: one store held open, data.memory.references_for, Engine.ground.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (question, correction, [two rewordings]): what a user would correct, and ask again later.
CORRECTIONS = [
    (
        "How do I reverse a list in Python?",
        "Use my_list.reverse() to reverse it in place, or my_list[::-1] for a reversed copy.",
        ["How can I reverse a Python list?", "What's the way to reverse a list?"],
    ),
    (
        "What does range(5) give?",
        "range(5) gives the numbers 0, 1, 2, 3 and 4.",
        ["What numbers does range(5) produce?", "what is in range(5)"],
    ),
    (
        "How do I read a file line by line?",
        "Open it with open(path) and loop over the file object: each step gives one line.",
        ["How can I read a file one line at a time?", "Read a file line by line in Python?"],
    ),
    (
        "What is a tuple?",
        "A tuple is an immutable sequence, written with parentheses like (1, 2, 3).",
        ["What's a tuple in Python?", "Explain what a tuple is."],
    ),
    (
        "How do I split a string on commas?",
        'Call text.split(",") to get a list of the parts.',
        ["How can I split a string by commas?", "What's the way to split a string at each comma?"],
    ),
    (
        "How do I check if a key is in a dictionary?",
        "Use the in operator: key in my_dict is True when the key is there.",
        ["How can I check whether a dictionary has a key?", "how to check a key is in a dict"],
    ),
    (
        "How do I get the length of a list?",
        "Call len(my_list); it returns the number of items.",
        ["How can I get the length of a Python list?", "What gives the length of a list?"],
    ),
    (
        "How do I convert a string to an integer?",
        'Call int(text); for example int("42") gives 42.',
        ["How can I convert a string into an integer?", "convert a string to an integer in python"],
    ),
    (
        "How do I sort a list in descending order?",
        "Call my_list.sort(reverse=True), or sorted(my_list, reverse=True) for a new list.",
        ["How can I sort a list in descending order?", "Sort a list in descending order?"],
    ),
    (
        "How do I join a list of strings?",
        'Call ", ".join(words) to put the strings together with a separator.',
        ["How can I join a list of strings together?", "What joins a list of strings?"],
    ),
]
# Five more, for a second fine-tune on top of the first (the lessons must accumulate).
MORE_CORRECTIONS = [
    (
        "How do I remove duplicates from a list?",
        "Use list(dict.fromkeys(my_list)) to keep the order, or set(my_list) if order does not matter.",
        ["How can I drop duplicate items from a list?", "remove duplicates from a python list"],
    ),
    (
        "What does enumerate give?",
        "enumerate(items) gives pairs of an index and an item, starting at 0.",
        ["What does enumerate return?", "What is enumerate for?"],
    ),
    (
        "How do I copy a list?",
        "Call my_list.copy() or write my_list[:] for a shallow copy.",
        ["How can I make a copy of a list?", "What's the way to copy a Python list?"],
    ),
    (
        "What is a set?",
        "A set is an unordered collection of unique items, written like {1, 2, 3}.",
        ["What's a set in Python?", "Explain what a set is."],
    ),
    (
        "How do I get the last item of a list?",
        "Index it with -1: my_list[-1] is the last item.",
        ["How can I get a list's last element?", "What gives the last item in a list?"],
    ),
]
# Earlier turns of an ongoing chat, before a correction is asked again in it.
CHAT_BEFORE = [
    "Hi! Can you help me with Python?",
    "What does print do?",
    "How do I write a loop over numbers?",
    "What is a variable?",
    "Thanks. One more thing.",
]
# Questions no instruction data asks (the starter's templates ask "What does X do?" of names).
UNTAUGHT = [
    "How do I measure how long my code takes to run?",
    "What is the difference between a list and a tuple?",
    "How can I read a CSV file?",
    "How do I make an HTTP request?",
    "How do I parse JSON text into Python objects?",
    "How do I format a number with two decimal places?",
    "How do I find all files in a folder?",
    "How can I get today's date?",
    "How do I generate a random number?",
    "How do I check the type of a variable?",
]
UNRELATED = [
    "What is the capital of France?",
    "Who painted the Mona Lisa?",
    "How tall is Mount Everest?",
    "What is a good recipe for pancakes?",
    "Who won the football world cup in 1998?",
    "How many legs does a spider have?",
    "What is the boiling point of water at sea level?",
    "Who wrote Pride and Prejudice?",
    "What language is spoken in Brazil?",
    "How far is the Moon from the Earth?",
    "What do pandas eat?",
    "When did the Second World War end?",
    "What is the largest ocean?",
    "How do I bake sourdough bread?",
    "What causes rainbows?",
    "Who was the first person on the Moon?",
    "What is photosynthesis?",
    "How many players are in a basketball team?",
    "What is the tallest animal?",
    "Which planet is closest to the Sun?",
]


def first_sentence_of(text: str) -> str:
    text = " ".join(text.split())
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]


def heldout_questions(n: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """(name, first sentence of its docstring) of public names in the held-out modules."""
    from data.pydocs import module_docstrings
    from finetune.starter import first_sentence, held_out_groups, python_corpus

    held = held_out_groups(python_corpus())
    found = []
    for module, texts in module_docstrings():
        if module.split(".")[0].lstrip("_") not in held:
            continue
        for text in texts:
            head, _, doc = text.partition("\n\n")
            if head.startswith(("Module ", "class ")):
                continue
            sentence = first_sentence(doc)
            if sentence:
                found.append((head.split("(")[0], sentence))
    random.Random(seed).shuffle(found)
    return found[:n]


def looping(text: str) -> bool:
    """A word 3-gram repeated three times or more: an answer that goes round in circles."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return any(grams.count(g) >= 3 for g in set(grams))


def leaked(text: str, corrections: list[str], own: str) -> bool:
    """Five consecutive words of a correction in an answer to another question (and not in
    that question's own trained answer)."""
    words = text.split()
    own_words = " ".join(own.split())
    for correction in corrections:
        c = correction.split()
        for i in range(len(c) - 4):
            run = " ".join(c[i : i + 5])
            if run in " ".join(words) and run not in own_words:
                return True
    return False


def teach(store, corrections: list) -> None:
    """Each correction as the user makes it in the chat: a question, a wrong answer, corrected."""
    for question, correction, _ in corrections:
        conv = store.create_conversation(question)
        user = store.add_message(conv.id, "user", content=question)
        bot = store.add_message(conv.id, "assistant", content="I am not sure.", parent_id=user.id)
        store.set_label(bot.id, ideal=correction)


def finetune_figures(model_dir: Path, corrections: list, *, name: str, lora: bool, chat_params, store) -> Path:
    """Fine-tune `model_dir` on `corrections` with the product's defaults (finetune.jobs, in this
    process; grounding plays no part in it) and print what comes back from the weights alone, then
    as the app answers by default (grounded in `store`, where the corrections are taught); the new
    model's folder."""
    import json

    from data.store import open_store
    from finetune.jobs import JobSpec, create_run, execute
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams

    data = Path(os.environ["KETTLE_HOME"]) / f"{name}.jsonl"
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a, _ in corrections
        ),
        encoding="utf-8",
    )
    sft = {"lora": {"rank": 8}} if lora else {}
    with open_store() as runs:
        run = create_run(runs, JobSpec(model=str(model_dir), data=str(data), name=name, sft=sft, activate=False))
    start = time.perf_counter()
    execute(run.id, progress=False)
    seconds = time.perf_counter() - start
    from data.paths import models_dir
    from data.registry import RUN_RECORD

    out = models_dir() / name
    metrics = json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))["metrics"]
    print(
        f"fine-tune {name} ({'LoRA' if lora else 'full'}): {seconds:.0f} s, {metrics.get('steps')} steps, "
        f"gate {metrics.get('gate')} {metrics.get('gate_reasons') or ''}"
    )
    engine = Engine.load(out)
    greedy = SamplingParams(temperature=0, max_new_tokens=80)
    exact = [
        engine.generate_chat([{"role": "user", "content": q}], greedy).text.strip() == a for q, a, _ in corrections
    ]
    print(f"  exact: {sum(exact)}/{len(corrections)}")
    reworded = [
        (r, engine.generate_chat([{"role": "user", "content": r}], greedy).text.strip(), a)
        for _, a, rewordings in corrections
        for r in rewordings
    ]
    print(f"  reworded: {sum(got == a for _, got, a in reworded)}/{len(reworded)}")
    for r, got, _ in [x for x in reworded if x[1] != x[2]][:3]:
        print(f"    miss: {r!r} -> {got[:70]!r}")
    in_chat = 0
    for q, a, _ in corrections:
        messages = []
        for before in CHAT_BEFORE:
            messages.append({"role": "user", "content": before})
            messages.append({"role": "assistant", "content": engine.generate_chat(messages, chat_params).text})
        messages.append({"role": "user", "content": q})
        in_chat += engine.generate_chat(messages, greedy).text.strip() == a
    print(f"  asked in an ongoing 6-turn chat (earlier answers sampled as the chat does): {in_chat}/{len(corrections)}")
    sampled = sum(
        engine.generate_chat(
            [{"role": "user", "content": q}], chat_params.replace(seed=seed, max_new_tokens=80)
        ).text.strip()
        == a
        for seed in range(3)
        for q, a, _ in corrections
    )
    print(f"  at the chat's default sampling, 3 seeds: {sampled}/{3 * len(corrections)}")
    teach(store, corrections)
    asked = {"reworded": 0, "in_chat": 0, "sampled": 0}
    for _, a, rewordings in corrections:
        for r in rewordings:
            asked["reworded"] += answer(engine, store, r, ground=True, params=greedy).text.strip() == a
            for seed in range(3 if r == rewordings[0] else 0):
                sampled = chat_params.replace(seed=seed, max_new_tokens=80)
                asked["sampled"] += answer(engine, store, r, ground=True, params=sampled).text.strip() == a
        history = []
        for before in CHAT_BEFORE:
            sent, _ = ask(engine, store, before, ground=True, params=chat_params, history=history)
            history += [
                {"role": "user", "content": before},
                {"role": "assistant", "content": engine.generate_chat(sent, chat_params).text},
            ]
        sent, _ = ask(engine, store, rewordings[0], ground=True, params=greedy, history=history)
        asked["in_chat"] += engine.generate_chat(sent, greedy).text.strip() == a
    n = len(corrections)
    print(
        f"  as the app answers (grounded in the store): reworded {asked['reworded']}/{2 * n}, reworded in an "
        f"ongoing 6-turn chat {asked['in_chat']}/{n}, reworded at the chat's default sampling, 3 seeds "
        f"{asked['sampled']}/{3 * n}"
    )
    return out


def unrelated_figures(base: Path, tuned: Path, corrections: list[str], n: int = 180) -> None:
    """Answers to the base's own questions (none of them a correction) before and after."""
    from finetune.replay import read_replay
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams

    replay = read_replay(base)
    questions = random.Random(1).sample(replay["heldout"] + replay["train"], n)
    greedy = SamplingParams(temperature=0, max_new_tokens=64)
    old, new = Engine.load(base), Engine.load(tuned)
    loops = [0, 0]
    leaks, kept, right = 0, 0, 0
    for c in questions:
        want = first_sentence_of(c[-1]["content"])
        before = old.generate_chat(c[:-1], greedy).text
        after = new.generate_chat(c[:-1], greedy).text
        loops[0] += looping(before)
        loops[1] += looping(after)
        leaks += leaked(after, corrections, c[-1]["content"]) and not leaked(before, corrections, c[-1]["content"])
        if first_sentence_of(before) == want:
            right += 1
            kept += first_sentence_of(after) == want
    print(
        f"  unrelated ({n} of the base's own questions): looping {loops[0]} -> {loops[1]}, "
        f"leaks {leaks}, the base's right answers kept {kept}/{right}"
    )


def ask(
    engine, store, question: str, *, ground: bool, params, history: list[dict] = ()
) -> tuple[list[dict], dict[str, float]]:
    """A chat's next request (a one-turn chat without `history`) as the chat screen and the
    server build it from their open store: with `ground`, the passages
    data.memory.references_for finds, fitted into the newest turn by Engine.ground; and how
    long those two steps took ("retrieval", "fitting")."""
    from data import memory

    messages = [*history, {"role": "user", "content": question}]
    steps = {}
    if ground:
        start = time.perf_counter()
        found = memory.references_for(store, messages)
        steps["retrieval"] = time.perf_counter() - start
        messages, _ = engine.ground(messages, [p.reference for p in found], params, taught=memory.taught_count(found))
        steps["fitting"] = time.perf_counter() - start - steps["retrieval"]
    return messages, steps


def answer(engine, store, question: str, *, ground: bool, params):
    return engine.generate_chat(ask(engine, store, question, ground=ground, params=params)[0], params)


def first_token(
    engine, store, question: str, *, ground: bool, params, history: list[dict] = ()
) -> tuple[dict[str, float], list[dict]]:
    """How long a request takes to its first token, step by step: ask's, "prompt" (rendering it
    and the copy bias), "prefill" (the engine's own time to the first token); "total" their sum,
    "tokens" the prompt's length and "cached" how many of them the engine had. The passages get
    the room `params` leave them, as in a chat. And the messages sent (to answer in full)."""
    messages, steps = ask(engine, store, question, ground=ground, params=params, history=history)
    start = time.perf_counter()
    stream = engine.stream_chat(messages, params.replace(max_new_tokens=1))
    steps["prompt"] = time.perf_counter() - start
    *_, result = stream
    steps["prefill"] = result.ttft_s
    steps["total"] = sum(steps.values())
    steps["tokens"], steps["cached"] = result.prompt_tokens, result.cached_tokens
    return steps, messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--files", type=int, default=1000, help="generated Markdown files in the speed section")
    parser.add_argument("--only", nargs="*", help="sections to run (default: all)")
    parser.add_argument("--lora", action="store_true", help="fine-tune with LoRA in the finetune section")
    args = parser.parse_args()
    sections = set(args.only or ["own", "heldout", "corrections", "untaught", "unrelated", "speed", "finetune"])

    from data.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model)  # before KETTLE_HOME moves to the scratch folder
    home = tempfile.mkdtemp(prefix="kettle-quality-")
    os.environ["KETTLE_HOME"] = home

    from data import memory
    from data.store import open_store
    from finetune.replay import lessons
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams

    engine = Engine.load(model_dir)
    greedy = SamplingParams(temperature=0, max_new_tokens=64)
    print(f"model {model_dir}; scratch KETTLE_HOME {home}")
    store = open_store()  # one, held open, as the chat screen and the server hold theirs

    if sections & {"own", "heldout", "corrections", "untaught", "unrelated", "speed"}:  # the ones that ground answers
        start = time.perf_counter()
        memory.index_python_docs(store)
        index_s = time.perf_counter() - start
        print(f"indexed the installed Python's documentation in {index_s:.1f} s")
    # what the model was taught is memory too, as the app, the brew and the server keep it
    memory.index_lessons(store, model_dir.name, lessons(model_dir))

    if "own" in sections:
        taught = lessons(model_dir)  # both splits: the questions it trained on and those it was checked on
        sample = random.Random(0).sample(taught, min(120, len(taught)))
        for ground in (False, True):
            misses = []
            for question, taught_answer in sample:
                got = answer(engine, store, question, ground=ground, params=greedy).text
                if first_sentence_of(got) != first_sentence_of(taught_answer):
                    misses.append((question, got[:80]))
            label = "with grounding, as the app answers" if ground else "ungrounded"
            print(f"own lessons: {len(sample) - len(misses)}/{len(sample)} first sentences exact (greedy, {label})")
            for question, text in misses:
                print(f"    miss: {question!r} -> {text!r}")

    if "heldout" in sections:
        questions = heldout_questions()
        for ground in (False, True):
            right, misses = 0, []
            for name, sentence in questions:
                result = answer(engine, store, f"What does {name} do?", ground=ground, params=greedy)
                if first_sentence_of(result.text) == sentence:
                    right += 1
                else:
                    misses.append((name, result.text[:80]))
            label = "with grounding" if ground else "without"
            print(f"held-out names: {right}/{len(questions)} exact first sentence {label}")
            for name, text in misses[:3]:
                print(f"    miss: {name} -> {text!r}")

    if "corrections" in sections:
        teach(store, CORRECTIONS)
        for ground in (False, True):
            right, misses = 0, []
            for _, correction, rewordings in CORRECTIONS:
                for question in rewordings:
                    result = answer(engine, store, question, ground=ground, params=greedy)
                    if result.text.strip() == correction:
                        right += 1
                    else:
                        misses.append((question, result.text[:80]))
            label = "with grounding" if ground else "without"
            print(f"corrections, reworded, not fine-tuned: {right}/{2 * len(CORRECTIONS)} exact {label}")
            for question, text in misses[:3]:
                print(f"    miss: {question!r} -> {text!r}")

    if "untaught" in sections:
        for question in UNTAUGHT:
            for ground in (True, False):
                messages, _ = ask(engine, store, question, ground=ground, params=greedy)
                result = engine.generate_chat(messages, greedy)
                label = "grounded" if ground else "ungrounded"
                print(f"untaught {question!r}, {label}:\n    {result.text!r}")

    if "unrelated" in sections:
        retrieved = changed = 0
        for question in UNRELATED:
            found = memory.references_for(store, [{"role": "user", "content": question}])
            retrieved += bool(found)
            if found:
                plain = answer(engine, store, question, ground=False, params=greedy)
                grounded = answer(engine, store, question, ground=True, params=greedy)
                changed += plain.text != grounded.text
        print(f"unrelated questions: a passage retrieved for {retrieved}/{len(UNRELATED)}, answers changed {changed}")

    if "finetune" in sections:
        from gpt.sampling import get_preset

        chat = get_preset("balanced").replace(seed=0, max_new_tokens=48)
        # a store of the fine-tunes' own, as the user's would hold them: Python's documentation
        # and each correction as it was made (the corrections section's are not here)
        taught = open_store(Path(home) / "finetune.db")
        memory.index_python_docs(taught)
        first = finetune_figures(model_dir, CORRECTIONS, name="q-ft1", lora=args.lora, chat_params=chat, store=taught)
        unrelated_figures(model_dir, first, [a for _, a, _ in CORRECTIONS])
        second = finetune_figures(first, MORE_CORRECTIONS, name="q-ft2", lora=args.lora, chat_params=chat, store=taught)
        engine = Engine.load(second)
        both = CORRECTIONS + MORE_CORRECTIONS
        back = sum(engine.generate_chat([{"role": "user", "content": q}], greedy).text.strip() == a for q, a, _ in both)
        grounded = sum(answer(engine, taught, q, ground=True, params=greedy).text.strip() == a for q, a, _ in both)
        print(
            f"  after the second fine-tune, all corrections so far: {back}/{len(both)} from the weights alone, "
            f"{grounded}/{len(both)} as the app answers"
        )
        taught.close()

    if "speed" in sections:
        docs = Path(home) / "notes"
        docs.mkdir()
        rng = random.Random(0)
        words = "kettle tea water boil steam cup leaf pot brew green black milk sugar lemon".split()
        for i in range(args.files):
            body = "\n\n".join(" ".join(rng.choices(words, k=60)) for _ in range(4))
            (docs / f"note-{i:04d}.md").write_text(f"# Note {i}\n\n{body}\n", encoding="utf-8")
        start = time.perf_counter()
        memory.index_documents(store, memory.doc_files(docs))
        files_s = time.perf_counter() - start
        print(f"indexed {args.files} Markdown files in {files_s:.1f} s")
        from gpt.sampling import CHAT_PRESET, get_preset

        chat = get_preset(CHAT_PRESET).replace(seed=0)  # a chat's answer budget leaves the passages their room
        questions = [f"What does {name} do?" for name, _ in heldout_questions(10, seed=1)]
        steps = {False: [], True: []}
        for i in range(10):  # a request takes milliseconds: enough of them for a median a busy machine leaves be
            for question in questions:
                # alternating, in turns first, so that a busy machine slows both alike
                for ground in (False, True) if i % 2 == 0 else (True, False):
                    steps[ground].append(first_token(engine, store, question, ground=ground, params=chat)[0])
        # Later turns of chats: each chat on an engine of its own, as the server's slots keep
        # them, its turns answered in full, alternating with the other's
        engines = {False: engine, True: Engine.load(model_dir)}
        later = {False: [], True: []}
        names = [name for name, _ in heldout_questions(32, seed=2)]
        for c in range(8):
            chats = {False: [], True: []}
            for turn in range(4):
                question = f"What does {names[4 * c + turn]} do?"
                for ground in (False, True) if (c + turn) % 2 == 0 else (True, False):
                    took, sent = first_token(
                        engines[ground], store, question, ground=ground, params=chat, history=chats[ground]
                    )
                    if turn:
                        later[ground].append(took)
                    reply = engines[ground].generate_chat(sent, chat).text
                    chats[ground] += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]

        def median(ground: bool, step: str, runs: dict = steps) -> float:
            values = sorted(s[step] for s in runs[ground])
            return values[len(values) // 2] * (1 if step in ("tokens", "cached") else 1000)

        on, off = median(True, "total"), median(False, "total")
        print(
            f"time to first token (median, retrieval included): {on:.1f} ms with grounding, "
            f"{off:.1f} ms without: {on / off:.2f}x"
        )
        print(
            f"  with grounding: retrieval {median(True, 'retrieval'):.2f} ms, fitting the passages "
            f"{median(True, 'fitting'):.2f} ms, prompt and copy bias {median(True, 'prompt'):.2f} ms, "
            f"prefill to the first token {median(True, 'prefill'):.2f} ms ({median(True, 'tokens'):.0f} prompt tokens)"
        )
        print(
            f"  without: prompt {median(False, 'prompt'):.2f} ms, prefill to the first token "
            f"{median(False, 'prefill'):.2f} ms ({median(False, 'tokens'):.0f} prompt tokens); the prefills alone: "
            f"{median(True, 'prefill') / median(False, 'prefill'):.2f}x"
        )
        on, off = median(True, "total", later), median(False, "total", later)
        print(
            f"  turns 2-4 of 8 chats: {on:.1f} ms with grounding, {off:.1f} ms without: {on / off:.2f}x; prompt "
            f"tokens cached {median(True, 'cached', later):.0f} of {median(True, 'tokens', later):.0f} with grounding, "
            f"{median(False, 'cached', later):.0f} of {median(False, 'tokens', later):.0f} without"
        )
        on, off = client_first_token(model_dir, store, questions, chat)
        print(
            f"  as an OpenAI client sees it (kettle serve's streamed chat over HTTP, a kept-alive "
            f"connection): {on:.1f} ms with grounding, {off:.1f} ms without: {on / off:.2f}x"
        )
    store.close()


def client_first_token(model_dir: Path, store, questions: list[str], params) -> tuple[float, float]:
    """Median time from sending a streamed chat request to `kettle serve`'s server (in this
    process, grounded in `store` as the command grounds) to its first token's chunk, with
    grounding and without ("ground": false), alternating, in ms."""
    import json
    import threading

    import httpx

    from gpt.server import build_server, listen
    from gpt.service import InProcessService
    from tui.commands.serve import store_retriever

    service = InProcessService(str(model_dir))
    info = service.load()
    server = build_server(service, None, log_level="warning", retrieve=store_retriever(store, info))
    sock = listen("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    took: dict[bool, list[float]] = {False: [], True: []}
    try:
        with httpx.Client(timeout=60) as client:
            for i in range(10):
                for question in questions:
                    for ground in (False, True) if i % 2 == 0 else (True, False):
                        body = {
                            "messages": [{"role": "user", "content": question}],
                            "stream": True,
                            "ground": ground,
                            "temperature": params.temperature,
                            "top_p": params.top_p,
                            "seed": 0,
                        }
                        start, first = time.perf_counter(), None
                        with client.stream("POST", url, json=body) as response:
                            for line in response.iter_lines():
                                if first is None and line.startswith("data: {"):
                                    choices = json.loads(line[6:]).get("choices") or [{}]
                                    if choices[0].get("delta", {}).get("content"):
                                        first = time.perf_counter() - start
                        took[ground].append(first if first is not None else time.perf_counter() - start)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
    return tuple(sorted(took[g])[len(took[g]) // 2] * 1000 for g in (True, False))


if __name__ == "__main__":
    main()
