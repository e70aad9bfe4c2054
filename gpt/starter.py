"""`kettle brew starter`: a working model on a fresh machine with no internet.

The corpus is English that ships with every Python: the language reference (`pydoc_data.topics`)
and the docstrings of the standard library, read from the source files with `ast` (nothing is
imported, so no module's side effects run). A tokenizer and a small GPT are trained on it within a
time budget, and the result is registered as a model (the active one if none is).

The work is a list of stages, each a function of the shared `Brew` state that may replace
`brew.model_dir` with the model it produced. A later stage (e.g. instruction tuning) is added by
appending a `Stage` to `STAGES`; `brew_starter` then saves and registers what the last stage made.
"""
from __future__ import annotations

import ast
import functools
import json
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data.files import atomic_directory
from gpt.config import GPTConfig
from gpt.errors import KettleError

# Parts of the standard library that are not documentation: tests, GUI demos, vendored tools.
SKIP_PARTS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
              "site-packages", "dist-packages", "__pycache__", "venv", "pydoc_data", "msilib"}

# Model shapes per device kind: what trains to a useful loss within the pretraining budget. A
# few CPU minutes are ~1e13-5e13 FLOPs, for which a model of about a million parameters learns
# fastest (Chinchilla: N ~ sqrt(C / 120)); a wider one learns less in the same time.
MODEL_SHAPES = {
    "cpu": GPTConfig(vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_embd=128, qkv_bias=False),
    "mps": GPTConfig(vocab_size=4096, context_length=256, n_layer=6, n_head=6, n_embd=384, qkv_bias=False),
    "cuda": GPTConfig(vocab_size=8192, context_length=512, n_layer=8, n_head=8, n_embd=512, qkv_bias=False),
}
# Small batches on CPU: in a few minutes, more updates beat less noisy ones.
BATCH_TOKENS = {"cpu": 4096, "mps": 16384, "cuda": 65536}
SAMPLE_PROMPT = "Return the"
SETUP_SECONDS = 20


@dataclass
class Brew:
    """What the stages share."""

    work: Path                      # scratch folder for this brew
    device: str
    deadline: float                 # time.monotonic() by which every stage should be done
    console: object                 # a rich Console for stage headings and results
    model_dir: Path | None = None   # the newest model a stage produced
    corpus: Path | None = None
    stage_seconds: float = 0.0      # the running stage's time: its share plus what earlier ones left
    notes: dict = field(default_factory=dict)  # figures for the summary and the store

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class Stage:
    name: str
    run: Callable[[Brew], None]
    cpu_minutes: float   # its share of the budget on 2 CPU cores; shares scale with --minutes


def build_corpus(brew: Brew) -> None:
    """Python's language reference and stdlib docstrings as a JSONL corpus (one document each)."""
    docs = documentation_texts()
    brew.corpus = brew.work / "python-docs.jsonl"
    with open(brew.corpus, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    size = sum(len(t.encode("utf-8")) for t in docs)
    brew.notes["corpus_documents"] = len(docs)
    brew.notes["corpus_bytes"] = size
    brew.console.print(f"corpus: {len(docs):,} documents, {size / 1e6:.1f} MB of Python documentation")


def pretrain_stage(brew: Brew) -> None:
    """Train a tokenizer and a small GPT on the corpus until the stage's time is spent."""
    from gpt.engine import pick_device
    from gpt.pretrain import TrainConfig, pretrain

    kind = pick_device(brew.device).type
    config = MODEL_SHAPES.get(kind, MODEL_SHAPES["cpu"])
    # The clock in pretrain() starts after the tokenizer and the shards, and the final
    # evaluation and save come after it: keep time for them inside the stage's share.
    seconds = max(10.0, brew.stage_seconds - SETUP_SECONDS)
    cfg = TrainConfig(
        max_steps=_steps_for(seconds, kind), batch_tokens=BATCH_TOKENS.get(kind, 8192),
        micro_batch_size=16, lr=3e-3, warmup_steps=20, min_lr_ratio=0.05, eval_every=100,
        eval_batches=8, sample_every=200, sample_tokens=40, sample_prompt=SAMPLE_PROMPT,
        checkpoint_every=100, max_time=seconds, device=brew.device, val_fraction=0.05,
    )
    out = brew.work / "pretrained"
    result = pretrain(brew.corpus, out, config, cfg, run_dir=brew.work / "pretrain-run",
                      display_label="starter: pretraining", register=False)
    if result.interrupted:
        raise KeyboardInterrupt
    brew.model_dir = out
    brew.notes.update(pretrain_steps=result.step, pretrain_tokens=result.tokens,
                      val_loss=result.val_loss, untrained_val_loss=result.initial_val_loss,
                      sample=result.samples[-1] if result.samples else "")


# Steps per second to plan the schedule with: above what the shapes reach (2 idle CPU cores: 4.4
# steps/s, 18k tokens/s), so that the time limit (max_time) ends the run and the cosine decay
# follows the clock. Planned at the measured rate, the run ended at its last step with a
# quarter of the stage's time unused.
STEPS_PER_SECOND = {"cpu": 6.0, "mps": 3.0, "cuda": 8.0}


def _steps_for(seconds: float, kind: str) -> int:
    return max(50, int(seconds * STEPS_PER_SECOND.get(kind, 1.0)))


def instruct_stage(brew: Brew) -> None:
    """Teach the pretrained model to answer questions about Python (finetune.starter)."""
    from finetune.starter import instruct_stage as run

    run(brew)


STAGES: list[Stage] = [
    Stage("corpus", build_corpus, 0.2),
    Stage("pretrain", pretrain_stage, 6.0),
    Stage("instruct", instruct_stage, 2.0),
]


@dataclass
class StarterResult:
    out: Path
    seconds: float
    notes: dict
    activated: bool

    def summary(self) -> str:
        n = self.notes
        lines = [f"starter model: {self.out} ({self.seconds / 60:.1f} minutes)"]
        if n.get("val_loss") is not None and n.get("untrained_val_loss") is not None:
            lines.append(f"validation loss {n['val_loss']:.2f} (untrained: {n['untrained_val_loss']:.2f})")
        if n.get("sample"):
            lines.append(f"sample: {n['sample']!r}")
        if self.activated:
            lines.append("it is now the active model")
        return "\n".join(lines)


def brew_starter(out: str | Path | None = None, minutes: float | None = None,
                 device: str = "auto", force: bool = False, stages: list[Stage] | None = None,
                 console=None) -> StarterResult:
    """Run the stages, then save the last model to `out` and register it."""
    from rich.console import Console

    from data.paths import models_dir, runs_dir

    stages = STAGES if stages is None else stages
    out = Path(out).expanduser() if out else models_dir() / "starter"
    if out.exists() and not force:
        raise KettleError(f"{out}: a starter model already exists (--force replaces it)")
    total = sum(s.cpu_minutes for s in stages)
    scale = (minutes / total) if minutes else 1.0
    started = time.monotonic()
    work = runs_dir() / f"starter-{time.strftime('%Y%m%d-%H%M%S')}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    brew = Brew(work, device, started + total * scale * 60, console or Console(stderr=True))
    stage_end = started
    for stage in stages:
        stage_end += stage.cpu_minutes * scale * 60
        brew.stage_seconds = max(10.0, stage_end - time.monotonic())
        brew.console.rule(f"starter: {stage.name}")
        stage.run(brew)
    if brew.model_dir is None:
        raise KettleError("the starter stages produced no model")
    with atomic_directory(out, overwrite=force) as tmp:
        shutil.copytree(brew.model_dir, tmp, dirs_exist_ok=True)
    seconds = time.monotonic() - started
    brew.notes["seconds"] = round(seconds, 1)
    from data.store import Store

    with Store.open() as store:
        _, activated = store.register_model(out, "starter", metrics=brew.notes,
                                            hparams={"stages": [s.name for s in stages]})
    return StarterResult(out, seconds, brew.notes, activated)


# --- the corpus ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def documentation_texts() -> tuple[str, ...]:
    """The language reference topics, then every public docstring of the stdlib, deduplicated."""
    from pydoc_data.topics import topics

    texts = [topics[name].strip() for name in sorted(topics)] + stdlib_docstrings()
    return tuple(dict.fromkeys(texts))


def stdlib_docstrings(root: str | Path | None = None) -> list[str]:
    """Public module, class and function docstrings of the standard library's source files,
    each headed by the name (and signature) it documents."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS.intersection(rel.parts) or any(p.startswith(("_", ".")) for p in rel.parts[:-1]):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        if module.split(".")[-1].startswith("_") and not rel.name == "__init__.py":
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        out.extend(_docstrings(tree, module))
    return out


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    found = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) > 40:
        found.append(f"Module {module}\n\n{doc}")

    def visit(node, prefix: str) -> None:
        for child in node.body:
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_") and child.name != "__init__":
                    continue
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if isinstance(child, ast.ClassDef):
                    if doc:
                        found.append(f"class {name}\n\n{doc}")
                    visit(child, name)
                elif doc:
                    args = ast.unparse(child.args)
                    found.append(f"{name}({args})\n\n{doc}")

    visit(tree, module)
    return found
