"""Answers, not losses: what a user gets back from a model, scored exactly, on question sets of
our own (none of them in any training data).

    .venv/bin/python benchmarks/quality.py MODEL [--files 1000] [--only SECTION ...]

MODEL is a model directory or a name under KETTLE_HOME/models (the brewed starter: `starter`).
Every answer is greedy (temperature 0) unless said otherwise. Sections:

- own: the model's own instruction questions (its replay data's training share, ungrounded):
  the first sentence of the answer equals the trained answer's.
- heldout: "What does X do?" about 40 names of the standard-library modules held out of the
  starter's training (pretraining validation split), with grounding and without: the first
  sentence equals the first sentence of X's docstring.
- corrections: 10 corrections saved in a fresh store, not fine-tuned, each asked in 2 other
  words with grounding: the answer equals the correction.
- unrelated: 20 questions about things not in the index (not Python): how many retrieve a
  passage, and how many answers grounding changed.
- speed: time to first token with grounding (retrieval included) over without, on an index of
  the installed Python's documentation plus --files generated Markdown files; the time to index
  Python's documentation.

Everything runs in a temporary KETTLE_HOME through the product's own code paths (data.memory,
gpt.engine's grounding, tui.commands.generate.ground).
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


def answer(engine, question: str, *, ground: bool, params):
    from tui.commands.generate import ground as ground_messages

    messages = [{"role": "user", "content": question}]
    sources = []
    if ground:
        messages, sources = ground_messages(engine, messages, params)
    result = engine.generate_chat(messages, params)
    return result, sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--files", type=int, default=1000, help="generated Markdown files in the speed section")
    parser.add_argument("--only", nargs="*", help="sections to run (default: all)")
    args = parser.parse_args()
    sections = set(args.only or ["own", "heldout", "corrections", "unrelated", "speed"])

    from data.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model)  # before KETTLE_HOME moves to the scratch folder
    home = tempfile.mkdtemp(prefix="kettle-quality-")
    os.environ["KETTLE_HOME"] = home

    from data import memory
    from data.store import open_store
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams

    engine = Engine.load(model_dir)
    greedy = SamplingParams(temperature=0, max_new_tokens=64)
    print(f"model {model_dir}; scratch KETTLE_HOME {home}")

    with open_store() as store:
        start = time.perf_counter()
        memory.index_python_docs(store)
        index_s = time.perf_counter() - start
    print(f"indexed the installed Python's documentation in {index_s:.1f} s")

    if "own" in sections:
        from finetune.replay import read_replay

        plain = [c for c in read_replay(model_dir)["train"] if not c[0]["content"].startswith("Reference:")]
        sample = random.Random(0).sample(plain, min(40, len(plain)))
        right = sum(
            first_sentence_of(engine.generate_chat(c[:-1], greedy).text) == first_sentence_of(c[-1]["content"])
            for c in sample
        )
        print(f"own lessons: {right}/{len(sample)} first sentences exact (greedy, ungrounded)")

    if "heldout" in sections:
        questions = heldout_questions()
        for ground in (False, True):
            right, misses = 0, []
            for name, sentence in questions:
                result, _ = answer(engine, f"What does {name} do?", ground=ground, params=greedy)
                if first_sentence_of(result.text) == sentence:
                    right += 1
                else:
                    misses.append((name, result.text[:80]))
            label = "with grounding" if ground else "without"
            print(f"held-out names: {right}/{len(questions)} exact first sentence {label}")
            for name, text in misses[:3]:
                print(f"    miss: {name} -> {text!r}")

    if "corrections" in sections:
        with open_store() as store:
            for question, correction, _ in CORRECTIONS:
                conv = store.create_conversation(question)
                user = store.add_message(conv.id, "user", content=question)
                bot = store.add_message(conv.id, "assistant", content="I am not sure.", parent_id=user.id)
                store.set_label(bot.id, ideal=correction)
        for ground in (False, True):
            right, misses = 0, []
            for _, correction, rewordings in CORRECTIONS:
                for question in rewordings:
                    result, _ = answer(engine, question, ground=ground, params=greedy)
                    if result.text.strip() == correction:
                        right += 1
                    else:
                        misses.append((question, result.text[:80]))
            label = "with grounding" if ground else "without"
            print(f"corrections, reworded, not fine-tuned: {right}/{2 * len(CORRECTIONS)} exact {label}")
            for question, text in misses[:3]:
                print(f"    miss: {question!r} -> {text!r}")

    if "unrelated" in sections:
        retrieved = changed = 0
        with open_store() as store:
            for question in UNRELATED:
                found = memory.references_for(store, [{"role": "user", "content": question}])
                retrieved += bool(found)
                if found:
                    plain, _ = answer(engine, question, ground=False, params=greedy)
                    grounded, _ = answer(engine, question, ground=True, params=greedy)
                    changed += plain.text != grounded.text
        print(f"unrelated questions: a passage retrieved for {retrieved}/{len(UNRELATED)}, answers changed {changed}")

    if "speed" in sections:
        docs = Path(home) / "notes"
        docs.mkdir()
        rng = random.Random(0)
        words = "kettle tea water boil steam cup leaf pot brew green black milk sugar lemon".split()
        for i in range(args.files):
            body = "\n\n".join(" ".join(rng.choices(words, k=60)) for _ in range(4))
            (docs / f"note-{i:04d}.md").write_text(f"# Note {i}\n\n{body}\n", encoding="utf-8")
        with open_store() as store:
            start = time.perf_counter()
            memory.index_documents(store, memory.doc_files(docs))
            files_s = time.perf_counter() - start
        print(f"indexed {args.files} Markdown files in {files_s:.1f} s")
        questions = [f"What does {name} do?" for name, _ in heldout_questions(10, seed=1)]
        timing = {False: [], True: []}
        for _ in range(3):
            for question in questions:
                for ground in (False, True):  # alternating, so a busy machine slows both alike
                    start = time.perf_counter()
                    result, _ = answer(engine, question, ground=ground, params=greedy.replace(max_new_tokens=1))
                    timing[ground].append(time.perf_counter() - start)
        off, on = (sorted(t)[len(t) // 2] for t in (timing[False], timing[True]))
        print(
            f"time to first token (median, retrieval included): {on * 1000:.0f} ms with grounding, "
            f"{off * 1000:.0f} ms without: {on / off:.2f}x"
        )


if __name__ == "__main__":
    main()
