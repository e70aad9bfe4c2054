"""`kettle brew starter`: a working model on a fresh machine with no internet.

The corpus is what ships with every Python: the standard library's source (code, comments,
docstrings, tests), the language reference (`pydoc_data.topics`) and the `help()` text of the
builtins, deduplicated, ~30 MB. Files are read, never imported, so no module's side effects run.
Whole modules are held out (with their tests) as the validation split, on which the brew reports
bits per byte. A tokenizer and a small GPT are trained on it for a fixed amount of work chosen by
the device kind, from a fixed seed: the same seed on the same kind of device gives the same model,
however busy the machine is (it only takes longer, and the ETA says how much). The result is
registered as a model (the active one if none is, and if it passes its own check: below).

The work is a list of stages, each a function of the shared `Brew` state that may replace
`brew.model_dir` with the model it produced. A later stage (e.g. instruction tuning) is added by
appending a `Stage` to `STAGES`; `brew_starter` then saves and registers what the last stage made.

The instruction stage teaches the model to answer questions about Python. Its plain lessons are
made offline from the documentation it was pretrained on, about the few hundred names Python code
calls most (`lesson_names`: builtins, methods of the everyday builtin types, functions of commonly
used modules): "What does str.upper do?" is answered with the first sentence of `str.upper`'s
docstring, with how-to questions made from the same first sentences ("How do I get a copy of the
string converted to uppercase?") and examples with code from the docstrings' doctests. Every other
name is answered from its documentation, retrieved at answer time: grounded pairs (a passage beside
the question) teach the model to copy from one. The model trains until it gives its lessons back
(at most an epoch cap), then the brew asks it every lesson; a starter that answers fewer than
OWN_LESSONS_REQUIRED of them is registered as failed and never made active. The lessons go with
the model (replay.jsonl) so that fine-tuning it later can replay them.
"""

from __future__ import annotations

import ast
import builtins
import functools
import hashlib
import json
import math
import random
import re
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from data.pydocs import SKIP_PARTS, builtin_docs, docstrings
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.files import atomic_directory, check_ours, check_target, check_writable

# Modules whose functions people ask about most (the instruction data's questions): never held out.
COMMON_MODULES = (
    "os",
    "posixpath",
    "json",
    "re",
    "math",
    "random",
    "itertools",
    "functools",
    "collections",
    "pathlib",
    "datetime",
    "shutil",
    "subprocess",
    "string",
    "textwrap",
    "statistics",
    "heapq",
    "bisect",
    "copy",
    "glob",
    "csv",
    "typing",
    "dataclasses",
    "enum",
    "argparse",
    "logging",
    "urllib.parse",
    "base64",
    "uuid",
    "tempfile",
    "zipfile",
    "gzip",
    "threading",
    "queue",
    "fractions",
    "decimal",
    "difflib",
    "fnmatch",
    "inspect",
    "operator",
    "pprint",
    "secrets",
    "calendar",
)
HELD_IN = {m.split(".")[0] for m in COMMON_MODULES} | {"builtins"}
MAX_FILE_BYTES = 400_000
MAX_LINE_CHARS = 400
HELD_OUT_SHARE = 0.03  # of the text: whole modules, the validation split
CORPUS_SEED = 0

# Model shapes per device kind: what trains to a useful loss within the pretraining budget. A
# few CPU minutes are ~1e13-5e13 FLOPs, for which a model of about a million parameters learns
# fastest (Chinchilla: N ~ sqrt(C / 120)); a wider one learns less in the same time.
MODEL_SHAPES = {
    "cpu": GPTConfig(vocab_size=4096, context_length=1024, n_layer=4, n_head=4, n_embd=128, qkv_bias=False),
    "mps": GPTConfig(vocab_size=4096, context_length=256, n_layer=6, n_head=6, n_embd=384, qkv_bias=False),
    "cuda": GPTConfig(vocab_size=8192, context_length=512, n_layer=8, n_head=8, n_embd=512, qkv_bias=False),
}
# Small batches on CPU: more updates beat less noisy ones at this scale.
BATCH_TOKENS = {"cpu": 4096, "mps": 16384, "cuda": 65536}
# Sequence-length warm-up (finetune.pretrain): windows of SHORT_CONTEXT tokens for all but the last
# FULL_CONTEXT_SHARE of the steps. On CPU a step of 4 windows of 1,024 tokens costs 1.3x one of 16
# of 256 (attention grows with the window); the full-length steps train the positions past 256,
# so that a long chat or a grounded question with its passages stays in the text it has learnt.
SHORT_CONTEXT = 256
FULL_CONTEXT_SHARE = 0.25
# The pretraining work, fixed per device kind, so that the starter is the same model on a busy
# machine (which takes longer, and says so) as on an idle one: on CPU, 900 steps of 4,096
# tokens (3.7M tokens, ~half a pass over the corpus) take ~6.5 minutes on 2 idle cores.
PRETRAIN_STEPS = {"cpu": 900, "mps": 3000, "cuda": 4000}
# The whole brew as every screen and --help states it (measured 11.0 minutes on 2 cores shared with
# other work, load average 2-3, 744 CPU seconds; a busier machine takes longer, and the brew says so).
BREW_TIME = "about 10 minutes on 2 CPU cores"
SEED = 1337
SAMPLE_PROMPT = "Return the"
# What the stages after pretraining cost, in pretraining steps (measured on 2 CPU cores: the
# held-out measurement and the lessons, ~3 minutes where a pretraining step took ~0.75 s): the
# ETA printed once the pretraining speed is known covers the whole brew.
LATER_STAGES_STEPS = 250
ETA_AFTER_STEPS = 40
# The ETA is printed again every so many steps, from the speed since the last one, and when
# pretraining ends: a machine whose load changes took 51 minutes over a brew that had said 8.
ETA_EVERY_STEPS = 150
ETA_LINE = re.compile(r"about (\d+(?:\.\d+)?) (minutes|seconds) to go")


@dataclass
class Brew:
    """What the stages share."""

    work: Path  # scratch folder for this brew
    device: str
    console: object  # a rich Console for stage headings and results
    seed: int = SEED
    model_dir: Path | None = None  # the newest model a stage produced
    corpus: Path | None = None
    val_fraction: float = 0.05  # the corpus's share that is held out (build_corpus sets it)
    notes: dict = field(default_factory=dict)  # figures for the summary and the store


@dataclass
class Stage:
    name: str
    run: Callable[[Brew], None]


def build_corpus(brew: Brew) -> None:
    """The Python corpus as JSONL (one document a line): the training documents in a seeded
    order, then the held-out modules' documents, whose share of the file is the validation split."""
    docs = python_corpus()
    heldout = held_out_groups(docs)
    train = [d for d in docs if d.group not in heldout]
    val = [d for d in docs if d.group in heldout]
    random.Random(CORPUS_SEED).shuffle(train)
    brew.corpus = brew.work / "python.jsonl"
    sizes = {"train": 0, "val": 0}
    with open(brew.corpus, "w", encoding="utf-8") as f:
        for split, part in (("train", train), ("val", val)):
            for doc in part:
                line = json.dumps({"text": doc.text}) + "\n"
                f.write(line)
                sizes[split] += len(line.encode("utf-8"))
    brew.val_fraction = sizes["val"] / (sizes["train"] + sizes["val"])
    text_bytes = {
        split: sum(len(d.text.encode("utf-8")) for d in part) for split, part in (("train", train), ("val", val))
    }
    brew.notes.update(
        corpus_documents=len(docs),
        corpus_bytes=sum(text_bytes.values()),
        heldout_groups=sorted({d.group for d in val}),
        val_text_bytes=text_bytes["val"],
    )
    brew.console.print(
        f"corpus: {len(docs):,} documents, {sum(text_bytes.values()) / 1e6:.1f} MB of "
        f"Python's own code and documentation; held out: {len(val):,} documents "
        f"({text_bytes['val'] / 1e6:.2f} MB) of {len({d.group for d in val})} modules"
    )


def pretrain_stage(brew: Brew) -> None:
    """Train a tokenizer and a small GPT on the corpus for the device kind's fixed work."""
    from finetune.pretrain import TrainConfig, pretrain
    from gpt.device import pick_device

    kind = pick_device(brew.device).type
    config = MODEL_SHAPES.get(kind, MODEL_SHAPES["cpu"])
    steps = PRETRAIN_STEPS.get(kind, PRETRAIN_STEPS["cpu"])
    batch_tokens = BATCH_TOKENS.get(kind, 8192)
    cfg = TrainConfig(
        max_steps=steps,
        batch_tokens=batch_tokens,
        micro_batch_size=max(1, min(16, batch_tokens // config.context_length)),
        short_context=SHORT_CONTEXT if config.context_length % SHORT_CONTEXT == 0 else None,
        short_share=1 - FULL_CONTEXT_SHARE,
        lr=3e-3,
        warmup_steps=20,
        min_lr_ratio=0.05,
        eval_every=200,
        eval_batches=8,
        sample_every=400,
        sample_tokens=40,
        sample_prompt=SAMPLE_PROMPT,
        checkpoint_every=200,
        device=brew.device,
        val_fraction=brew.val_fraction,
        seed=brew.seed,
    )
    out = brew.work / "pretrained"
    eta = BrewETA(brew, steps)
    result = pretrain(
        brew.corpus,
        out,
        config=config,
        cfg=cfg,
        run_dir=brew.work / "pretrain-run",
        display_label="starter: pretraining",
        register=False,
        on_step=eta.step,
        console=brew.console,
    )
    if result.interrupted:
        raise KeyboardInterrupt
    brew.model_dir = out
    eta.pretrained()
    brew.console.print("starter: measuring bits per byte on the held-out modules…")
    bpb = heldout_bits_per_byte(
        out, brew.work / "pretrain-run" / "shards", val_bytes=brew.notes["val_text_bytes"], device=brew.device
    )
    brew.notes.update(
        pretrain_steps=result.step,
        pretrain_tokens=result.tokens,
        val_loss=result.val_loss,
        untrained_val_loss=result.initial_val_loss,
        val_bits_per_byte=bpb,
        sample=result.samples[-1] if result.samples else "",
    )
    brew.console.print(f"held-out modules: {bpb:.3f} bits per byte")


class BrewETA:
    """Once the pretraining speed on this machine is known, says how long the whole brew will
    take from here (a busy machine is slower: the work, and so the model, stays the same), and
    says it again as the speed changes and when pretraining ends (what is left then: the
    held-out measurement and the instruction stage)."""

    def __init__(self, brew: Brew, steps: int, clock: Callable[[], float] = time.monotonic):
        self.brew, self.steps, self.clock = brew, steps, clock
        self.mark: tuple[int, float] | None = None  # (step, time) the speed is measured from
        self.per_step: float | None = None

    def step(self, step: int, loss: float) -> None:
        now = self.clock()
        if step == 5:  # after the first steps' one-off costs
            self.mark = (step, now)
        elif self.mark and step >= ETA_AFTER_STEPS and (step - ETA_AFTER_STEPS) % ETA_EVERY_STEPS == 0:
            self.per_step = (now - self.mark[1]) / (step - self.mark[0])
            self.mark = (step, now)
            left = self.per_step * (self.steps - step + LATER_STAGES_STEPS)
            if "eta_s" not in self.brew.notes:  # the first estimate, for the record
                self.brew.notes["eta_s"] = round(left, 1)
                self.brew.notes["eta_at"] = now
            self.brew.console.print(f"starter: {eta_text(left)} on this machine ({1 / self.per_step:.1f} steps/s)")

    def pretrained(self) -> None:
        if self.per_step is not None:
            left = self.per_step * LATER_STAGES_STEPS
            self.brew.console.print(
                f"starter: pretrained; {eta_text(left)}: the held-out measurement, then instruction tuning"
            )


def eta_text(seconds: float) -> str:
    """The brew's estimate of the time left, as it prints it (parse_eta reads it back)."""
    minutes = f"{seconds / 60:.1f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"
    return f"about {minutes} to go"


def parse_eta(line: str) -> float | None:
    """The seconds left that a line of the brew's output announces, if it announces them."""
    found = ETA_LINE.search(line)
    return None if found is None else float(found[1]) * (60 if found[2] == "minutes" else 1)


def heldout_bits_per_byte(model_dir: Path, shards: Path, *, val_bytes: int, device: str) -> float:
    """Bits per byte of text over the whole held-out split (tokenizer-independent): the summed
    next-token loss in bits divided by the split's UTF-8 bytes."""
    import math

    from finetune import corpus
    from finetune.pretrain import evaluate
    from finetune.train import Dist
    from gpt.checkpoint import load_model
    from gpt.device import pick_device

    device = pick_device(device)
    model, _ = load_model(model_dir, device=device)
    stream = corpus.TokenStream(shards, "val")
    context = model.config.context_length
    loss = evaluate(
        model,
        stream,
        context=context,
        batch_size=16,
        n_batches=len(stream) // (16 * context) + 1,
        device=device,
        dist=Dist(),
    )
    return loss / math.log(2) * len(stream) / val_bytes


# --- the instruction stage: questions about Python, answered from its documentation ---------

QUESTIONS = ("What does {} do?", "What does {} do?", "What is {} for?", "Explain {} in one sentence.")
EXAMPLE_QUESTIONS = ("Show me an example of {}.", "How do I use {}?", "Give an example with {}.")
# "Return a copy of the string converted to uppercase." -> "How do I get a copy of the string ...?"
HOWTO_VERBS = {
    "Return": "get",
    "Returns": "get",
    "Compute": "compute",
    "Convert": "convert",
    "Create": "create",
    "Remove": "remove",
    "Split": "split",
    "Join": "join",
    "Make": "make",
    "Test": "test",
    "Check": "check",
    "Count": "count",
    "Find": "find",
    "Read": "read",
    "Write": "write",
    "Copy": "copy",
    "Sort": "sort",
    "Open": "open",
    "Delete": "delete",
    "Insert": "insert",
    "Append": "append",
    "Change": "change",
    "Encode": "encode",
    "Decode": "decode",
    "Parse": "parse",
    "Format": "format",
}
# Grounded examples (grounded_pairs): passages beside questions, as retrieval puts them.
GROUNDED_UNSEEN = 1200
GROUNDED_KNOWN = 300
GROUNDED_ANSWERS = 400
GROUNDED_UNRELATED = 150
GROUNDED_CHARS = 420  # a passage as long as the starter's context leaves room for
HELDOUT_SHARE = 0.05
INSTRUCT_LR = 2e-3
# The instruction stage trains until LEARNED_SHARE of the lessons come back exactly (the end of
# turn included, the stricter check), at most INSTRUCT_EPOCHS epochs; each epoch also trains on
# GROUNDED_PER_EPOCH of the grounded pairs. A starter that then answers less than
# OWN_LESSONS_REQUIRED of its lessons (first sentence, greedy) is not activated.
INSTRUCT_EPOCHS = 40
LEARNED_SHARE = 0.95
GROUNDED_PER_EPOCH = 160
OWN_LESSONS_REQUIRED = 0.9
SAMPLE_LESSON = "str.upper"  # the lesson the brew shows its answer to
# The plain lessons (answered from the weights, with no passage beside the question) are what a
# 1.3M-parameter model learns by heart within the brew: the names people ask about most
# (lesson_names), each asked one way, with how-tos and examples for some. Every other name is
# answered from its documentation, retrieved at answer time (grounded_pairs teach the copying).
LESSON_NAMES = 300
LESSON_TYPES = ("str", "list", "dict", "set", "tuple", "int", "float")
SIGNATURE = re.compile(r"^[\w.]+\(.*\)")


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring's first prose paragraph (signature lines skipped)."""
    for paragraph in (doc or "").split("\n\n"):
        paragraph = paragraph.strip()
        if not paragraph or "->" in paragraph.splitlines()[0] or SIGNATURE.match(paragraph):
            continue
        text = " ".join(paragraph.split())
        sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
        if 15 <= len(sentence) <= 200 and sentence.endswith(".") and sentence[0].isupper():
            return sentence
        return None
    return None


def stdlib_docs() -> list[tuple[str, str]]:
    """(name, docstring) of the public functions and classes of COMMON_MODULES, read from their
    source files the way the starter's pretraining corpus reads them (nothing is imported)."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for module in COMMON_MODULES:
        base = root.joinpath(*module.split("."))
        path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)
        if path is None:
            continue
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for text in docstrings(tree, module):
            head, _, doc = text.partition("\n\n")
            if not head.startswith("Module "):
                name = head.removeprefix("class ").split("(")[0]
                docs.append((name.replace("posixpath.", "os.path."), doc))
    return docs


def lesson_docs() -> list[tuple[str, str]]:
    """(name, docstring) of what a plain lesson may be about, in the documentation's order: the
    builtin functions and types, the methods of LESSON_TYPES, and the module-level functions and
    classes of COMMON_MODULES, each with a first sentence to answer with."""
    modules = set(COMMON_MODULES) | {"os.path"}
    out, seen = [], set()
    for name, doc in builtin_docs() + stdlib_docs():
        owner = name.rpartition(".")[0]
        if name in seen or "__" in name or (owner and owner not in LESSON_TYPES and owner not in modules):
            continue
        if first_sentence(doc):
            seen.add(name)
            out.append((name, doc))
    return out


def lesson_names() -> tuple[str, ...]:
    """The LESSON_NAMES names of lesson_docs called in the most files of the standard library:
    what Python code uses most, and so what people ask about most."""
    return _most_called()[:LESSON_NAMES]


@functools.lru_cache(maxsize=1)
def _most_called() -> tuple[str, ...]:
    """lesson_docs' names that the standard library calls, most files first (ties in the
    documentation's order)."""
    names = [name for name, _ in lesson_docs()]
    files = calling_files(names)
    return tuple(name for name in sorted(names, key=lambda name: -files[name]) if files[name])


CALL = re.compile(r"(\w+)\.(\w+)\(")
BARE_CALL = re.compile(r"(?<![\w.])(\w+)\(")
FROM_IMPORT = re.compile(r"^\s*from ([\w.]+) import", re.MULTILINE)


def calling_files(names: Iterable[str]) -> dict[str, int]:
    """How many source files of the standard library call each name: a builtin as `len(`, a
    method of a builtin type as `.upper(` on anything, a module's name as `json.dumps(` (the
    module's last part: `path.join(`) or as `dumps(` in a file that imports from json."""
    names = list(names)
    counts = dict.fromkeys(names, 0)
    for doc in python_corpus():
        if doc.group == "builtins" or doc.group.startswith("topic:"):  # help() and the reference
            continue
        calls, bare = set(CALL.findall(doc.text)), set(BARE_CALL.findall(doc.text))
        methods, imported = {attr for _, attr in calls}, set(FROM_IMPORT.findall(doc.text))
        for name in names:
            owner, _, attr = name.rpartition(".")
            if not owner:
                found = name in bare
            elif owner in LESSON_TYPES:
                found = attr in methods
            else:
                found = (owner.rpartition(".")[2], attr) in calls or (owner in imported and attr in bare)
            counts[name] += found
    return counts


def _lessons(names: Iterable[str] | None) -> list[tuple[str, str]]:
    """lesson_docs for `names` (default: lesson_names()), in the order of `names`."""
    docs = dict(lesson_docs())
    return [(name, docs[name]) for name in (lesson_names() if names is None else names) if name in docs]


def python_qa_pairs(names: Iterable[str] | None = None, seed: int = 0) -> list[list[dict]]:
    """Chat conversations "What does X do?" -> the first sentence of X's docstring, for each of
    `names` (default: lesson_names())."""
    rng = random.Random(seed)
    pairs = []
    for name, doc in _lessons(names):
        question = rng.choice(QUESTIONS).format(name)
        pairs.append([{"role": "user", "content": question}, {"role": "assistant", "content": first_sentence(doc)}])
    return pairs


def howto_pairs(names: Iterable[str] | None = None, seed: int = 0) -> list[list[dict]]:
    """ "How do I get a copy of the string converted to uppercase?" -> "Call str.upper(): it
    returns a copy of ..." for those of `names` whose first sentence starts with a verb of
    HOWTO_VERBS."""
    rng = random.Random(seed)
    pairs, asked = [], set()
    for name, doc in _lessons(names):
        sentence = first_sentence(doc)
        verb, _, rest = sentence.partition(" ")
        question = f"How do I {HOWTO_VERBS.get(verb)} {rest.rstrip('.')}?"
        if verb not in HOWTO_VERBS or not rest or question in asked:  # list.index's is tuple.index's
            continue
        asked.add(question)
        answer = f"Call {name}(): {sentence[0].lower()}{sentence[1:]}"
        pairs.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    rng.shuffle(pairs)
    return pairs


def example_pairs(names: Iterable[str] | None = None, seed: int = 0) -> list[list[dict]]:
    """ "Show me an example of bin." -> a short answer with the docstring's doctest as code, for
    those of `names` whose docstring has one."""
    import doctest

    rng = random.Random(seed)
    parser = doctest.DocTestParser()
    pairs = []
    for name, doc in _lessons(names):
        try:
            examples = parser.get_examples(doc)
        except ValueError:
            continue
        examples = [e for e in examples if "\n" not in e.source.strip() and len(e.source) + len(e.want) < 120][:3]
        if not any(e.want for e in examples):
            continue
        code = "".join(f">>> {e.source}{e.want}" for e in examples)
        answer = f"{first_sentence(doc)} For example:\n\n```python\n{code}```"
        question = rng.choice(EXAMPLE_QUESTIONS).format(name)
        pairs.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return pairs


def instruction_pairs(seed: int = 0, *, heldout: Iterable[str] | None = None) -> list[list[dict]]:
    """Everything the instruction stage teaches: what X does, how to do Y, examples of Z, and
    the same kinds of question answered from a passage put beside them (grounded_pairs)."""
    plain = python_qa_pairs(seed=seed) + howto_pairs(seed=seed) + example_pairs(seed=seed)
    if heldout is None:
        heldout = held_out_groups(python_corpus())
    return plain + grounded_pairs(plain, heldout=set(heldout), seed=seed)


def grounded_pairs(plain: list[list[dict]], *, heldout: set[str], seed: int = 0) -> list[list[dict]]:
    """Questions with passages in the chat format's grounding slot (gpt.chat_template.grounded),
    as data.memory retrieves them at answer time, so that the model copies from a passage when
    one is there and answers from its weights when none is:

    - names the plain questions never ask about (never those of the validation modules), with
      their documentation: the answer is only in the passage;
    - plain questions with their own documentation beside them;
    - a question asked before and its answer (a user's correction, as memory holds it), asked
      again in other words;
    - plain questions beside an unrelated passage: the answer from the weights."""
    from data.memory import python_chunk
    from data.pydocs import module_docstrings
    from gpt.chat_template import grounded

    rng = random.Random(seed + 21)
    asked = {_asked_name(pair[0]["content"]) for pair in plain}
    passages: dict[str, str] = {}
    unseen = []
    for module, texts in module_docstrings():
        group = module.split(".")[0].lstrip("_")
        for text in texts:
            chunk = python_chunk(text)
            if chunk is None:
                continue
            name, passage = chunk
            passage = _cut(passage, GROUNDED_CHARS)
            passages.setdefault(name, passage)
            answer = first_sentence(text.partition("\n\n")[2])
            if answer and group not in heldout and name not in asked:
                unseen.append((name, passage, answer))
    for name, doc in builtin_docs():
        if doc and (chunk := python_chunk(f"{name}\n\n{doc}")):
            passages.setdefault(name, _cut(chunk[1], GROUNDED_CHARS))
    rng.shuffle(unseen)
    pool = list(passages.values())

    def ask(reference: str, question: str, answer: str) -> list[dict]:
        refs = [reference]
        if rng.random() < 0.3:  # retrieval sometimes brings a second passage, less relevant
            refs.insert(rng.randrange(2), rng.choice(pool))
        return grounded([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], refs)

    pairs = [ask(p, rng.choice(QUESTIONS).format(n), a) for n, p, a in unseen[:GROUNDED_UNSEEN]]
    qa = [pair for pair in plain if _asked_name(pair[0]["content"]) in passages]
    for pair in rng.sample(qa, min(len(qa), GROUNDED_KNOWN)):
        pairs.append(ask(passages[_asked_name(pair[0]["content"])], pair[0]["content"], pair[1]["content"]))
    for pair in rng.sample(plain, min(len(plain), GROUNDED_ANSWERS)):
        question, answer = pair[0]["content"], pair[1]["content"]
        if rng.random() < 0.5:
            # a user's correction says otherwise than the weights: the passage wins. Taught only
            # passages that agreed with its lessons, the starter answered "How can I reverse a
            # Python list?" beside the user's correction with its lesson "Reverse *IN PLACE*."
            # (1-10 of 20 reworded corrections came back; the starter before it, 20)
            answer = rng.choice(plain)[1]["content"]
        pairs.append(ask(f"{_reworded(question, rng)}\n{answer}", question, answer))
    for pair in rng.sample(plain, min(len(plain), GROUNDED_UNRELATED)):
        unrelated = [{"role": "user", "content": pair[0]["content"]}, pair[1]]
        pairs.append(grounded(unrelated, [rng.choice(pool)]))
    rng.shuffle(pairs)
    return pairs


def plain(pairs: list[list[dict]]) -> list[list[dict]]:
    """The pairs without a passage in their question (grounded_pairs makes the others)."""
    from gpt.chat_template import REFERENCE

    return [p for p in pairs if not p[0]["content"].startswith(REFERENCE)]


def _asked_name(question: str) -> str:
    """The name a templated question asks about ("What does str.upper do?" -> "str.upper")."""
    for template in QUESTIONS + EXAMPLE_QUESTIONS:
        head, _, tail = template.partition("{}")
        if question.startswith(head) and question.endswith(tail):
            return question[len(head) : len(question) - len(tail)]
    return ""


def _reworded(question: str, rng: random.Random) -> str:
    """The same question in other words, as a user would have asked it before."""
    name = _asked_name(question)
    if name:
        others = [t for t in QUESTIONS + EXAMPLE_QUESTIONS if t.format(name) != question]
        return rng.choice(others).format(name)
    if question.startswith("How do I "):
        return rng.choice(("How can I ", "What is the way to ", "How would I ")) + question[len("How do I ") :]
    return question.lower()


def _cut(text: str, limit: int) -> str:
    """`text` cut at the last paragraph or sentence end before `limit` characters."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = max(head.rfind("\n\n"), head.rfind(". ") + 1)
    return head[:cut].rstrip() if cut > limit // 3 else head.rstrip()


def instruct_stage(brew) -> None:
    """Teach `brew.model_dir` its plain lessons until it gives LEARNED_SHARE of them back (at most
    INSTRUCT_EPOCHS epochs, the brew's seed: the same model however busy the machine), each epoch
    with a fresh slice of the grounded pairs (which teach copying from a passage; they are not
    learnt by heart); then measure how many lessons it answers (own_lessons). The plain pairs go
    with the model as its replay data (finetune.replay), a held-out share marked so."""
    import torch

    from finetune.instruct import SFTConfig, SFTTrainer, evaluate_loss, holdout, prepare, resolve
    from finetune.replay import REPLAY_FILE, replay_text
    from finetune.train import Display
    from gpt.checkpoint import load_model, save_model
    from gpt.device import pick_device

    device = pick_device(brew.device)
    model, tokenizer = load_model(brew.model_dir, device=device, dtype=torch.float32)
    pairs = instruction_pairs(heldout=brew.notes.get("heldout_groups"))
    train_pairs, heldout_pairs = holdout(pairs, HELDOUT_SHARE, seed=brew.seed)
    lessons = plain(train_pairs)
    taught = {id(pair) for pair in lessons}
    grounded_train = [pair for pair in train_pairs if id(pair) not in taught]
    context, vocab = model.config.context_length, model.config.vocab_size
    train, _ = prepare(lessons, tokenizer, max_length=context, vocab_size=vocab)
    mix, _ = prepare(grounded_train, tokenizer, max_length=context, vocab_size=vocab)
    val, _ = prepare(heldout_pairs, tokenizer, max_length=context, vocab_size=vocab)
    config = resolve(
        SFTConfig(
            lr=INSTRUCT_LR,
            epochs=INSTRUCT_EPOCHS,
            seed=brew.seed,
            learned_share=LEARNED_SHARE,
            replay=GROUNDED_PER_EPOCH,
            replay_spread=False,
        ),
        len(train),
        model=model.config,
        n_replay=len(mix),
    )
    torch.manual_seed(brew.seed)
    # no validation examples: early stopping on held-out names would stop the lessons being learnt
    trainer = SFTTrainer(model, train, [], config, tokenizer.eot_id, device, replay=mix)
    before = evaluate_loss(model, val, pad_id=tokenizer.eot_id, device=device)
    display = Display(True, trainer.total_steps, None, "starter: instruction tuning", brew.console)
    try:
        trainer.run(on_progress=lambda p: display.step(p.step, p.loss, tokens_per_s=p.tokens_per_s, mfu=None))
    finally:
        display.close()
    out = brew.work / "instruct"
    save_model(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=True,
        # the plain pairs only: a fine-tune of a few short corrections replaying passages of ~150
        # tokens measured its base's skills 18.9% worse (the gate's replay loss) where the plain
        # ones rose 3-9%, and the copy bias, not the weights, does most of a grounded answer's work
        extra_files={REPLAY_FILE: replay_text(lessons, plain(heldout_pairs))},
    )
    brew.model_dir = out
    after = evaluate_loss(model, val, pad_id=tokenizer.eot_id, device=device)
    brew.console.print(f"starter: asking it its {len(lessons)} lessons…")
    answers = own_lessons(model, tokenizer, lessons)
    right = [answer == lead_sentence(pair[1]["content"]) for pair, answer in zip(lessons, answers)]
    shown = next((i for i, pair in enumerate(lessons) if _asked_name(pair[0]["content"]) == SAMPLE_LESSON), 0)
    question, answer = lessons[shown][0]["content"], answers[shown]
    brew.notes.update(
        instruct_pairs=len(pairs),
        instruct_lessons=len(lessons),
        instruct_steps=trainer.step,
        instruct_epochs=math.ceil(trainer.step / trainer.steps_per_epoch),
        instruct_learned_epoch=trainer.learned_epoch,
        instruct_val_loss_before=before,
        instruct_val_loss=after,
        own_lessons=sum(right),
        own_lessons_asked=len(lessons),
        answer_sample=f"{question} -> {answer}",
    )
    brew.console.print(
        f"instruction tuning: {len(lessons)} lessons and {len(mix)} grounded pairs, {trainer.step} steps "
        f"({brew.notes['instruct_epochs']} epochs), held-out loss {before:.2f} -> {after:.2f}\n"
        f"own lessons: {own_lessons_text(brew.notes)}; "
        f"{question!r} -> {answer!r} ({'right' if right[shown] else 'wrong'})"
    )


def own_lessons(model, tokenizer, lessons: list[list[dict]]) -> list[str]:
    """The first sentence of the model's greedy answer to each lesson's question, ungrounded."""
    from gpt.engine import Engine
    from gpt.sampling import SamplingParams

    engine = Engine(model, tokenizer)
    answers = []
    for pair in lessons:
        # the lesson's first sentence and a few tokens more: enough to see it end, or not
        room = len(tokenizer.encode(lead_sentence(pair[1]["content"]))) + 4
        answer = engine.generate_chat(pair[:1], SamplingParams(temperature=0, max_new_tokens=room))
        answers.append(lead_sentence(answer.text))
    return answers


def lead_sentence(text: str) -> str:
    """An answer's first sentence, as the own-lessons check compares them."""
    return re.split(r"(?<=[.!?])\s", " ".join(text.split()), maxsplit=1)[0]


def own_lessons_text(notes: dict) -> str:
    """ "367/380 (97%)": how many of its plain lessons a brewed starter answers."""
    right, asked = notes["own_lessons"], notes["own_lessons_asked"]
    return f"{right}/{asked} ({right / asked:.0%})"


def passed_own_check(notes: dict) -> bool:
    """Whether a brew answers OWN_LESSONS_REQUIRED of its own lessons (one without an
    instruction stage has nothing to check)."""
    return "own_lessons" not in notes or notes["own_lessons"] >= OWN_LESSONS_REQUIRED * notes["own_lessons_asked"]


STAGES: list[Stage] = [
    Stage("corpus", build_corpus),
    Stage("pretrain", pretrain_stage),
    Stage("instruct", instruct_stage),
]


@dataclass
class StarterResult:
    out: Path
    seconds: float
    notes: dict
    activated: bool
    refused: str = ""  # why it was not activated, when it failed its own check

    def summary(self) -> str:
        n = self.notes
        lines = [f"starter model: {self.out} ({self.seconds / 60:.1f} minutes)"]
        if n.get("val_loss") is not None and n.get("untrained_val_loss") is not None:
            lines.append(
                f"validation loss {n['val_loss']:.2f} (untrained: {n['untrained_val_loss']:.2f})"
                + (
                    f", {n['val_bits_per_byte']:.3f} bits per byte on the held-out modules"
                    if n.get("val_bits_per_byte") is not None
                    else ""
                )
            )
        if n.get("sample"):
            lines.append(f"sample: {n['sample']!r}")
        if "own_lessons" in n:
            lines.append(f"own lessons: {own_lessons_text(n)}; {n['answer_sample']}")
        if self.activated:
            lines.append("it is now the active model")
        return "\n".join(lines)


def brew_starter(
    out: str | Path | None = None,
    device: str = "auto",
    *,
    force: bool = False,
    stages: list[Stage] | None = None,
    console=None,
    seed: int = SEED,
) -> StarterResult:
    """Run the stages, then save the last model to `out` and register it."""
    from rich.console import Console

    from data.paths import models_dir, runs_dir

    stages = STAGES if stages is None else stages
    out = Path(out).expanduser() if out else models_dir() / "starter"
    if (out.exists() or out.is_symlink()) and not force:
        raise KettleError(f"{out}: a starter model already exists (--force replaces it)")
    check_target(out, folder=True)  # --force replaces a folder, never a file or a device
    if out.is_dir():
        from gpt.checkpoint import CONFIG_FILE

        check_ours(out, [CONFIG_FILE])  # a model's, never a folder of the user's, before the brew
    check_writable(out)  # before the brew, not once its minutes are spent
    started = time.monotonic()
    work = runs_dir() / f"starter-{time.strftime('%Y%m%d-%H%M%S')}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    brew = Brew(work, device, console or Console(stderr=True), seed=seed)
    for stage in stages:
        brew.console.rule(f"starter: {stage.name}")
        stage_started = time.monotonic()
        stage.run(brew)
        brew.notes[f"{stage.name}_seconds"] = round(time.monotonic() - stage_started, 1)  # the ETA's figures
    if brew.model_dir is None:
        raise KettleError("the starter stages produced no model")
    from data.store import open_store

    passed = passed_own_check(brew.notes)
    refused = (
        ""
        if passed
        else f"the starter answers only {own_lessons_text(brew.notes)} of its own lessons, below the "
        f"{OWN_LESSONS_REQUIRED:.0%} it must: it is not made active"
    )
    with open_store() as store:
        active = store.active_model()
    # --force on the active starter: the model chatted with is not replaced by a failed one
    keep_active = not passed and active is not None and Path(active.path).resolve() == out.resolve()
    if keep_active:
        out = brew.model_dir
        refused += f" (the active starter is kept; this one is in {out})"
    else:
        with atomic_directory(out, overwrite=force) as tmp:
            shutil.copytree(brew.model_dir, tmp, dirs_exist_ok=True)
    seconds = time.monotonic() - started
    brew.notes["seconds"] = round(seconds, 1)
    if "eta_at" in brew.notes:  # how far off the estimate was, for the record
        brew.notes["eta_actual_s"] = round(time.monotonic() - brew.notes.pop("eta_at"), 1)
    activated = False
    if not keep_active:
        with open_store() as store:
            _, activated = store.register_model(
                out,
                "starter",
                metrics=brew.notes,
                hparams={"stages": [s.name for s in stages], "seed": seed},
                status="ok" if passed else "failed",
                note=refused,
            )
    return StarterResult(out, seconds, brew.notes, activated, refused)


# --- the corpus ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    group: str  # what is held out together: a top-level module with its tests, a topic, ...
    text: str


def held_out_groups(docs) -> set[str]:
    """The validation split's groups: taken in the order of a hash of their names (the same on
    every machine) until they hold HELD_OUT_SHARE of the text; never a group larger than a fifth
    of that (one big package would be the whole split), nor one the instruction data asks about."""
    sizes: dict[str, int] = {}
    for doc in docs:
        sizes[doc.group] = sizes.get(doc.group, 0) + len(doc.text)
    target = HELD_OUT_SHARE * sum(sizes.values())
    chosen, held = set(), 0
    for group in sorted(sizes, key=lambda g: hashlib.sha256(g.encode()).hexdigest()):
        if held >= target:
            break
        if group in HELD_IN or sizes[group] > target / 5:
            continue
        chosen.add(group)
        held += sizes[group]
    return chosen


@functools.lru_cache(maxsize=1)
def python_corpus() -> tuple[Document, ...]:
    """What ships with every Python: the language reference, the `help()` text of the builtins,
    and the standard library's source (code, comments and docstrings; tests and demos too),
    deduplicated by content."""
    from pydoc_data.topics import topics

    docs = [Document(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]
    docs += builtin_help()
    docs += stdlib_sources()
    seen, unique = set(), []
    for doc in docs:
        key = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).digest()
        if doc.text and key not in seen:
            seen.add(key)
            unique.append(doc)
    return tuple(unique)


def builtin_help() -> list[Document]:
    """`help()`'s plain text for each builtin function and type."""
    import pydoc

    out = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj):
            continue
        text = pydoc.render_doc(obj, title="Help on %s:", renderer=pydoc.plaintext)
        out.append(Document("builtins", text.strip()))
    return out


def stdlib_sources(root: str | Path | None = None) -> list[Document]:
    """Every source file of the standard library that reads as code: UTF-8, no line longer than
    MAX_LINE_CHARS (data tables and generated files have them), at most MAX_FILE_BYTES. Each is
    headed by its path; its group is the module it belongs to (a test file: the module it tests)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out: list[Document] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts):
            continue
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip() or max(map(len, text.splitlines()), default=0) > MAX_LINE_CHARS:
            continue
        out.append(Document(source_group(rel), f"# {rel.as_posix()}\n{text.strip()}"))
    return out


def source_group(rel: Path) -> str:
    """`json/decoder.py` -> json; `test/test_json/test_fail.py` and `test/test_json.py` -> json."""
    parts = [p.removesuffix(".py") for p in rel.parts]
    if parts[0] in ("test", "tests") and len(parts) > 1:
        parts = parts[1:]
    top = parts[0].lstrip("_")
    return top.removeprefix("test_") or top
