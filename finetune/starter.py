"""The starter model's instruction stage: it learns to answer questions about Python.

Question/answer pairs are made offline from the documentation the starter was pretrained on:
"What does str.upper do?" is answered with the first sentence of `str.upper`'s docstring. The
builtins come first (their docstrings are in the interpreter), then the functions and classes of
commonly used standard-library modules (from `gpt.starter.stdlib_docstrings`, the pretraining
corpus). The pretrained model is fine-tuned on them in the chat format within the stage's time.
"""
from __future__ import annotations

import builtins
import random
import re
import time

# Modules whose functions people ask about most; their docstrings come from the stdlib sources.
COMMON_MODULES = ("os", "posixpath", "json", "re", "math", "random", "itertools", "functools",
                  "collections", "pathlib", "datetime", "shutil", "subprocess", "string",
                  "textwrap", "statistics", "heapq", "bisect", "copy", "glob", "csv", "typing",
                  "dataclasses", "enum", "argparse", "logging", "urllib.parse", "base64", "uuid",
                  "tempfile", "zipfile", "gzip", "threading", "queue", "fractions", "decimal",
                  "difflib", "fnmatch", "inspect", "operator", "pprint", "secrets", "calendar")
BUILTIN_TYPES = (str, bytes, list, dict, set, frozenset, tuple, int, float, complex, range,
                 bytearray, memoryview, object)
QUESTIONS = ("What does {} do?", "What does {} do?", "What is {} for?", "Explain {} in one sentence.")
MAX_PAIRS = 3000
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


def builtin_docs() -> list[tuple[str, str]]:
    """(name, docstring) of the builtin functions and the public methods of builtin types."""
    docs = [(name, getattr(builtins, name).__doc__) for name in dir(builtins)
            if not name.startswith("_") and callable(getattr(builtins, name))
            and not isinstance(getattr(builtins, name), type)]
    for t in BUILTIN_TYPES:
        docs.append((t.__name__, t.__doc__))
        docs += [(f"{t.__name__}.{m}", getattr(t, m).__doc__) for m in dir(t) if not m.startswith("_")]
    return docs


def stdlib_docs() -> list[tuple[str, str]]:
    """(name, docstring) of the public functions and classes of COMMON_MODULES, read from their
    source files the way the starter's pretraining corpus reads them (nothing is imported)."""
    import ast
    import sysconfig
    from pathlib import Path

    from gpt.starter import _docstrings

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for module in COMMON_MODULES:
        base = root.joinpath(*module.split("."))
        path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)
        if path is None:
            continue
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for text in _docstrings(tree, module):
            head, _, doc = text.partition("\n\n")
            if not head.startswith("Module "):
                name = head.removeprefix("class ").split("(")[0]
                docs.append((name.replace("posixpath.", "os.path."), doc))
    return docs


def python_qa_pairs(limit: int = MAX_PAIRS, seed: int = 0) -> list[list[dict]]:
    """Chat conversations "What does X do?" -> the first sentence of X's docstring."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    for name, doc in builtin_docs() + stdlib_docs():
        answer = first_sentence(doc)
        if answer is None or name in seen or "__" in name:
            continue
        seen.add(name)
        question = rng.choice(QUESTIONS).format(name)
        pairs.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        if len(pairs) >= limit:
            break
    return pairs


def instruct_stage(brew) -> None:
    """Fine-tune `brew.model_dir` on the Python Q/A pairs until the stage's time is spent."""
    import torch

    from finetune.instruct import SFTConfig, SFTTrainer, evaluate_loss, holdout, prepare, resolve
    from gpt.checkpoint import load_model, save_model
    from gpt.engine import Engine, pick_device
    from gpt.pretrain import Display
    from gpt.sampling import SamplingParams

    # Training stops early enough to leave time for the evaluation, saving and sample after it.
    deadline = time.monotonic() + brew.stage_seconds * 0.9 - 5
    device = pick_device(brew.device)
    model, tokenizer = load_model(brew.model_dir, device=device, dtype=torch.float32)
    examples, stats = prepare(python_qa_pairs(), tokenizer, model.config.context_length,
                              model.config.vocab_size)
    train, val = holdout(examples, 0.05, seed=0)
    # A small model pretrained for minutes takes a larger rate than the size-derived default.
    config = resolve(SFTConfig(lr=1e-3, epochs=10, patience=4), len(train), model.config.context_length)
    trainer = SFTTrainer(model, train, val, config, tokenizer.eot_id, device)
    before = evaluate_loss(model, val, tokenizer.eot_id, device)
    display = Display(True, trainer.total_steps, 0, "starter: instruction tuning")
    try:
        trainer.run(should_stop=lambda: time.monotonic() > deadline,
                    on_progress=lambda p: display.step(p.step, p.loss, p.tokens_per_s, None))
    finally:
        display.close()
    trainer.restore_best()
    out = brew.work / "instruct"
    save_model(model, out, tokenizer, overwrite=True)
    brew.model_dir = out
    question = [{"role": "user", "content": "What does str.upper do?"}]
    answer = Engine(model, tokenizer).generate_chat(question, SamplingParams(temperature=0, max_new_tokens=40))
    after = evaluate_loss(model, val, tokenizer.eot_id, device)
    brew.notes.update(instruct_pairs=stats["examples"], instruct_steps=trainer.step,
                      instruct_val_loss_before=before, instruct_val_loss=after,
                      answer_sample=answer.text)
    brew.console.print(f"instruction tuning: {stats['examples']} Python Q/A pairs, {trainer.step} "
                       f"steps, held-out loss {before:.2f} -> {after:.2f}; "
                       f"'What does str.upper do?' -> {answer.text!r}")
