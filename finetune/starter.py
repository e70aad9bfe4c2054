"""The starter model's instruction stage: it learns to answer questions about Python.

Question/answer pairs are made offline from the documentation the starter was pretrained on:
"What does str.upper do?" is answered with the first sentence of `str.upper`'s docstring. The
builtins come first (their docstrings are in the interpreter), then the functions and classes of
commonly used standard-library modules (from `gpt.starter.stdlib_docstrings`, the pretraining
corpus), with how-to questions made from the same first sentences ("How do I get a copy of the
string converted to uppercase?") and examples with code from the docstrings' doctests. The
pretrained model is fine-tuned on them in the chat format for a fixed number of epochs; the pairs
go with the model (replay.jsonl) so that fine-tuning it later can replay them.
"""
from __future__ import annotations

import builtins
import random
import re

from gpt.starter import COMMON_MODULES

BUILTIN_TYPES = (str, bytes, list, dict, set, frozenset, tuple, int, float, complex, range,
                 bytearray, memoryview, object)
QUESTIONS = ("What does {} do?", "What does {} do?", "What is {} for?", "Explain {} in one sentence.")
EXAMPLE_QUESTIONS = ("Show me an example of {}.", "How do I use {}?", "Give an example with {}.")
# "Return a copy of the string converted to uppercase." -> "How do I get a copy of the string ...?"
HOWTO_VERBS = {"Return": "get", "Returns": "get", "Compute": "compute", "Convert": "convert",
               "Create": "create", "Remove": "remove", "Split": "split", "Join": "join",
               "Make": "make", "Test": "test", "Check": "check", "Count": "count", "Find": "find",
               "Read": "read", "Write": "write", "Copy": "copy", "Sort": "sort", "Open": "open",
               "Delete": "delete", "Insert": "insert", "Append": "append", "Change": "change",
               "Encode": "encode", "Decode": "decode", "Parse": "parse", "Format": "format"}
HELDOUT_SHARE = 0.05
INSTRUCT_LR = 1e-3
INSTRUCT_EPOCHS = 4
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


def howto_pairs(seed: int = 0) -> list[list[dict]]:
    """"How do I get a copy of the string converted to uppercase?" -> "Call str.upper(): it
    returns a copy of ..." for docstrings whose first sentence starts with a verb of HOWTO_VERBS."""
    rng = random.Random(seed)
    pairs, seen = [], set()
    for name, doc in builtin_docs() + stdlib_docs():
        sentence = first_sentence(doc)
        if sentence is None or "__" in name or name in seen:
            continue
        verb, _, rest = sentence.partition(" ")
        if verb not in HOWTO_VERBS or not rest:
            continue
        seen.add(name)
        question = f"How do I {HOWTO_VERBS[verb]} {rest.rstrip('.')}?"
        answer = f"Call {name}(): {sentence[0].lower()}{sentence[1:]}"
        pairs.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    rng.shuffle(pairs)
    return pairs


def example_pairs(seed: int = 0) -> list[list[dict]]:
    """"Show me an example of bin." -> a short answer with the docstring's doctest as code."""
    import doctest

    from gpt.starter import stdlib_docstrings

    rng = random.Random(seed)
    parser = doctest.DocTestParser()
    documented = builtin_docs() + [(h.removeprefix("class ").split("(")[0], d) for h, _, d in
                                   (t.partition("\n\n") for t in stdlib_docstrings())]
    pairs, seen = [], set()
    for name, doc in documented:
        if not doc or name in seen or "__" in name:
            continue
        try:
            examples = parser.get_examples(doc)
        except ValueError:
            continue
        examples = [e for e in examples if "\n" not in e.source.strip()
                    and len(e.source) + len(e.want) < 120][:3]
        if not any(e.want for e in examples):
            continue
        seen.add(name)
        code = "".join(f">>> {e.source}{e.want}" for e in examples)
        lead = first_sentence(doc)
        answer = (f"{lead} " if lead else "") + f"For example:\n\n```python\n{code}```"
        question = rng.choice(EXAMPLE_QUESTIONS).format(name)
        pairs.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return pairs


def instruction_pairs(seed: int = 0) -> list[list[dict]]:
    """Everything the instruction stage teaches: what X does, how to do Y, examples of Z."""
    return python_qa_pairs(seed=seed) + howto_pairs(seed) + example_pairs(seed)


def instruct_stage(brew) -> None:
    """Fine-tune `brew.model_dir` on the Python Q/A pairs (fixed work, the brew's seed); the
    pairs go with the model as its replay data (finetune.replay), a held-out share marked so."""
    import torch

    from finetune.instruct import SFTConfig, SFTTrainer, evaluate_loss, holdout, prepare, resolve
    from finetune.replay import REPLAY_FILE, replay_text
    from gpt.checkpoint import load_model, save_model
    from gpt.engine import Engine, pick_device
    from gpt.pretrain import Display
    from gpt.sampling import SamplingParams

    device = pick_device(brew.device)
    model, tokenizer = load_model(brew.model_dir, device=device, dtype=torch.float32)
    train_pairs, heldout_pairs = holdout(instruction_pairs(), HELDOUT_SHARE, seed=brew.seed)
    context = model.config.context_length
    train, stats = prepare(train_pairs, tokenizer, context, model.config.vocab_size)
    val, _ = prepare(heldout_pairs, tokenizer, context, model.config.vocab_size)
    config = resolve(SFTConfig(lr=INSTRUCT_LR, epochs=INSTRUCT_EPOCHS, seed=brew.seed,
                               until_learned=False), len(train), model.config)
    torch.manual_seed(brew.seed)
    trainer = SFTTrainer(model, train, val, config, tokenizer.eot_id, device)
    before = evaluate_loss(model, val, tokenizer.eot_id, device)
    display = Display(True, trainer.total_steps, None, "starter: instruction tuning", brew.console)
    try:
        trainer.run(on_progress=lambda p: display.step(p.step, p.loss, p.tokens_per_s, None))
    finally:
        display.close()
    out = brew.work / "instruct"
    save_model(model, out, tokenizer, overwrite=True,
               extra_files={REPLAY_FILE: replay_text(train_pairs, heldout_pairs)})
    brew.model_dir = out
    question = [{"role": "user", "content": "What does str.upper do?"}]
    answer = Engine(model, tokenizer).generate_chat(question, SamplingParams(temperature=0, max_new_tokens=40))
    after = evaluate_loss(model, val, tokenizer.eot_id, device)
    brew.notes.update(instruct_pairs=stats["examples"] + len(val), instruct_steps=trainer.step,
                      instruct_val_loss_before=before, instruct_val_loss=after,
                      answer_sample=answer.text)
    brew.console.print(f"instruction tuning: {stats['examples'] + len(val)} Python Q/A pairs, "
                       f"{trainer.step} steps, held-out loss {before:.2f} -> {after:.2f}; "
                       f"'What does str.upper do?' -> {answer.text!r}")
