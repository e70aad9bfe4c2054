"""Classification fine-tuning (the book's chapter 6): a GPT with an N-class head.

The head replaces the language-model output: it reads the final hidden state of each text's
**last real token** (with causal attention, the only position that has seen the whole text).

Data is a CSV or TSV file of text and label, read by `read_labeled`:
- a tab in the first line makes it TSV, read with no quoting at all (SMS texts contain stray
  quote characters that a CSV reader would swallow across lines); otherwise it is CSV;
- a header naming the columns `text` and `label` picks them; without one the file has two columns
  and the label column is the one with fewer distinct values (so "text,label" and the SMS
  Spam Collection's "label<TAB>text" both work).

Texts longer than `max_length` tokens keep their beginning. A trained classifier is a directory:

    classifier.json     {"kettle_classifier": 1, "labels": [...], "max_length": N, ...}
    head.safetensors    the head's weight and bias
    model/              the body as a Kettle model directory (LoRA already merged into it)
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from finetune import read_manifest
from finetune.lora import LoRAConfig, apply_lora, merge_lora
from gpt.checkpoint import save_weights
from gpt.errors import KettleError
from gpt.files import atomic_directory
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
BODY_DIR = "model"
FORMAT_VERSION = 1
SPLITS = (0.7, 0.1, 0.2)  # train, validation, test: the book's split


@dataclass
class ClassifyConfig:
    # "head", "last-N" (the last N blocks, final norm and head), "all", or "lora".
    trainable: str = "last-1"
    epochs: int = 5
    lr: float = 5e-5
    batch_size: int = 8
    weight_decay: float = 0.1
    max_length: int | None = None  # default: the longest training text, up to the context length
    balance: bool = False  # downsample every class to the size of the smallest
    seed: int = 123
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def validate(self, n_layer: int) -> None:
        if self.trainable not in ("head", "all", "lora"):
            n = self.trainable.removeprefix("last-")
            if not self.trainable.startswith("last-") or not n.isdigit() or not 1 <= int(n) <= n_layer:
                raise KettleError(
                    f"--trainable must be head, all, lora or last-N with N from 1 to {n_layer}, got {self.trainable!r}"
                )
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise KettleError(f"--{name.replace('_', '-')} must be positive")
        if not self.lr > 0:
            raise KettleError(f"--lr must be positive, got {self.lr}")


class Classifier(nn.Module):
    def __init__(self, gpt: GPT, n_classes: int):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, n_classes)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits [B, N] for right-padded ids [B, T] whose real lengths are `lengths`."""
        hidden = self.gpt.hidden_states(idx)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.head(last)


# --- data -----------------------------------------------------------------------------------


def read_labeled(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) rows of a CSV or TSV file (see the module docstring for the rules)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KettleError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise KettleError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise KettleError(f"{path}: cannot read ({exc.strerror})") from None
    lines = raw.splitlines()
    if not any(line.strip() for line in lines):
        raise KettleError(f"{path}: empty file")
    if "\t" in lines[0]:
        rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    else:
        rows = list(csv.reader(lines))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    header = [c.strip().lower() for c in numbered[0][1]]
    if "text" in header and "label" in header:
        text_col, label_col = header.index("text"), header.index("label")
        numbered = numbered[1:]
        width = len(header)
    else:
        width = 2
    for line, row in numbered:
        if len(row) != width:
            raise KettleError(f"{path}: line {line} has {len(row)} columns, expected {width}")
    if not numbered:
        raise KettleError(f"{path}: no rows after the header")
    if width == 2 and not ("text" in header and "label" in header):
        distinct = [len({r[c] for _, r in numbered}) for c in (0, 1)]
        label_col = 0 if distinct[0] < distinct[1] else 1
        text_col = 1 - label_col
    examples = []
    for line, row in numbered:
        text, label = row[text_col].strip(), row[label_col].strip()
        if not text or not label:
            raise KettleError(f"{path}: line {line} has an empty {'text' if not text else 'label'}")
        examples.append((text, label))
    if len({label for _, label in examples}) < 2:
        raise KettleError(f"{path}: only one label ({examples[0][1]!r}); a classifier needs two or more")
    return examples


def balance(examples: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Downsample every class at random to the size of the smallest."""
    rng = random.Random(seed)
    by_label: dict[str, list] = {}
    for ex in examples:
        by_label.setdefault(ex[1], []).append(ex)
    n = min(len(v) for v in by_label.values())
    kept = [ex for label in sorted(by_label) for ex in rng.sample(by_label[label], n)]
    rng.shuffle(kept)
    return kept


def split(examples: list, seed: int, *, fractions=SPLITS) -> tuple[list, list, list]:
    """Shuffle and cut into train / validation / test."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_train = int(len(examples) * fractions[0])
    n_val = int(len(examples) * fractions[1])
    return examples[:n_train], examples[n_train : n_train + n_val], examples[n_train + n_val :]


def encode(examples, tokenizer: Tokenizer, *, labels: list[str], max_length: int):
    """[(ids, class index)], each text's ids cut to `max_length` (its beginning kept)."""
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for text, label in examples:
        if label not in index:
            raise KettleError(f"label {label!r} is not one the classifier knows ({', '.join(labels)})")
        ids = tokenizer.encode(text)[:max_length] or [tokenizer.eot_id]
        out.append((ids, index[label]))
    return out


def batches(encoded, batch_size: int, *, pad_id: int, shuffle_seed: int | None = None):
    """Yield (ids [B, T], lengths [B], targets [B]), each batch padded to its own longest text."""
    order = list(range(len(encoded)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, (seq, _) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
        lengths = torch.tensor([len(seq) for seq, _ in chunk])
        targets = torch.tensor([t for _, t in chunk])
        yield ids, lengths, targets


# --- model -----------------------------------------------------------------------------------


def make_classifier(gpt: GPT, n_classes: int, *, config: ClassifyConfig) -> Classifier:
    """Wrap `gpt` with a fresh head and leave trainable only what `config.trainable` says."""
    config.validate(gpt.config.n_layer)
    if config.trainable == "lora":
        apply_lora(gpt, config.lora)
    else:
        for p in gpt.parameters():
            p.requires_grad_(config.trainable == "all")
        if config.trainable.startswith("last-"):
            n = int(config.trainable.removeprefix("last-"))
            for module in [*gpt.h[-n:], gpt.ln_f]:
                for p in module.parameters():
                    p.requires_grad_(True)
    model = Classifier(gpt, n_classes)
    return model.to(next(gpt.parameters()).device)


@torch.no_grad()
def evaluate(model: Classifier, encoded, *, n_classes: int, batch_size: int = 32, device="cpu") -> dict:
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted)."""
    model.eval()
    confusion = [[0] * n_classes for _ in range(n_classes)]
    total_loss, n = 0.0, 0
    for ids, lengths, targets in batches(encoded, batch_size, pad_id=0):
        ids, lengths, targets = ids.to(device), lengths.to(device), targets.to(device)
        logits = model(ids, lengths)
        total_loss += F.cross_entropy(logits, targets, reduction="sum").item()
        for t, p in zip(targets.tolist(), logits.argmax(-1).tolist()):
            confusion[t][p] += 1
        n += len(targets)
    correct = sum(confusion[i][i] for i in range(n_classes))
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "n": n, "confusion": confusion}


def default_checkpoint_dir(out: str | Path) -> Path:
    """Where `kettle classify train --out OUT` keeps its resume checkpoint: a run directory
    under KETTLE_HOME/runs named after OUT (its name and a hash of its full path, as pretraining
    names its runs)."""
    from data.paths import runs_dir

    out = Path(out).expanduser()
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]
    # Not created here: the first checkpoint's write makes its folders (gpt.files.atomic_directory).
    return runs_dir(create=False) / f"classify-{out.name}-{key}" / "checkpoint"


def train_classifier(
    gpt: GPT,
    tokenizer: Tokenizer,
    *,
    examples: list[tuple[str, str]],
    config: ClassifyConfig,
    device="cpu",
    on_step: Callable[[int, int, float], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
):
    """Train on `examples`; returns (classifier, labels, max_length, metrics).

    metrics holds per-epoch validation results and the final test evaluation.
    `on_step(step, total_steps, loss)` reports progress.

    With `checkpoint_dir`, finetune.train's resume checkpoint is written there after every epoch
    and when Ctrl-C or SIGTERM asks to stop (then metrics has "interrupted": True and no test
    evaluation); with `resume` the run continues from it, with the same examples and settings
    (`config.epochs` may grow), and ends with the weights and history an unstopped run has.
    """
    from finetune.train import (
        OptimizerSettings,
        StopFlag,
        load_checkpoint,
        make_optimizer,
        prepare_training,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )

    if resume and checkpoint_dir is None:
        raise KettleError("resume needs the checkpoint directory to resume from")
    prepare_training(torch.device(device))
    torch.manual_seed(config.seed)
    labels = sorted({label for _, label in examples})
    if config.balance:
        examples = balance(examples, config.seed)
    train, val, test = split(examples, config.seed)
    if not train or not test:
        raise KettleError(f"{len(examples)} examples are too few to split into train and test")
    max_length = config.max_length or min(gpt.config.context_length, max(len(tokenizer.encode(t)) for t, _ in train))
    if max_length > gpt.config.context_length:
        raise KettleError(f"--max-length {max_length} exceeds the model's context length {gpt.config.context_length}")
    enc = {
        name: encode(part, tokenizer, labels=labels, max_length=max_length)
        for name, part in (("train", train), ("val", val), ("test", test))
    }
    model = make_classifier(gpt, len(labels), config=config)
    optimizer = make_optimizer(
        gpt,
        OptimizerSettings(lr=config.lr, weight_decay=config.weight_decay),
        device=torch.device(device),
        extra=model.head.parameters(),
    )
    steps_per_epoch = -(-len(train) // config.batch_size)
    total, step, history = steps_per_epoch * config.epochs, 0, []
    # What a resumed run must share with the one that wrote the checkpoint (all but the epochs).
    run = {
        "settings": {k: v for k, v in _settings(config).items() if k != "epochs"},
        "labels": labels,
        "max_length": max_length,
        "counts": {k: len(v) for k, v in enc.items()},
    }
    run = json.loads(json.dumps(run))  # as state.json gives it back (lists, not tuples)
    elapsed_before = 0.0
    if resume:
        trainer, state, _ = load_checkpoint(Path(checkpoint_dir), torch.device(device))
        if state.get("run") != run:
            raise KettleError(
                f"{checkpoint_dir}: the checkpoint is of a run with other data or settings "
                "(resume with the same ones, or start without --resume)"
            )
        model.load_state_dict(trainer["model"])
        optimizer.load_state_dict(trainer["optimizer"])
        set_rng_state(trainer["rng"][0])
        step, history, elapsed_before = state["step"], state["history"], state.get("elapsed", 0.0)
    started = time.perf_counter()

    def checkpoint() -> None:
        save_checkpoint(
            Path(checkpoint_dir),
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": [rng_state()]},
            state={
                "step": step,
                "epoch": step // steps_per_epoch,
                "history": history,
                "run": run,
                "elapsed": elapsed_before + time.perf_counter() - started,
            },
        )

    interrupted = False
    with StopFlag() if checkpoint_dir is not None else contextlib.nullcontext() as stop:
        for epoch in range(step // steps_per_epoch, config.epochs):
            model.train()
            done = step - epoch * steps_per_epoch  # batches of this epoch trained before a stop
            epoch_batches = batches(enc["train"], config.batch_size, pad_id=0, shuffle_seed=config.seed + epoch)
            for ids, lengths, targets in itertools.islice(epoch_batches, done, None):
                logits = model(ids.to(device), lengths.to(device))
                loss = F.cross_entropy(logits, targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if on_step:
                    on_step(step, total, loss.item())
                if stop is not None and stop.requested and step % steps_per_epoch:
                    interrupted = True  # mid-epoch: the checkpoint records how far into it
                    break
            if interrupted:
                checkpoint()
                break
            if enc["val"]:
                result = evaluate(model, enc["val"], n_classes=len(labels), device=device)
                history.append({"epoch": epoch + 1, "val_loss": result["loss"], "val_accuracy": result["accuracy"]})
            if checkpoint_dir is not None:
                checkpoint()
            if stop is not None and stop.requested and epoch + 1 < config.epochs:
                interrupted = True
                break
    metrics = {
        "labels": labels,
        "counts": run["counts"],
        "history": history,
        "train_seconds": elapsed_before + time.perf_counter() - started,
    }
    if interrupted:
        metrics.update(interrupted=True, step=step, total_steps=total)
    else:
        metrics["test"] = evaluate(model, enc["test"], n_classes=len(labels), device=device)
    return model, labels, max_length, metrics


# --- saving and loading -------------------------------------------------------------------------


def save_classifier(
    model: Classifier,
    tokenizer: Tokenizer,
    *,
    labels: list[str],
    max_length: int,
    directory: str | Path,
    config: ClassifyConfig | None = None,
    metrics: dict | None = None,
    overwrite: bool = False,
) -> Path:
    from gpt.checkpoint import save_model

    if hasattr(model.gpt, "lora_config"):
        merge_lora(model.gpt)
    meta = {
        "kettle_classifier": FORMAT_VERSION,
        "labels": labels,
        "max_length": max_length,
        "settings": _settings(config),
        "metrics": metrics or {},
    }
    try:
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_model(model.gpt, tmp / BODY_DIR, tokenizer=tokenizer)
            head = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
            save_weights(head, tmp / HEAD_FILE)
            (tmp / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        raise KettleError(f"{directory}: already exists (choose another directory, or --overwrite)") from None
    return Path(directory)


def _settings(config: ClassifyConfig | None) -> dict:
    if config is None:
        return {}
    settings = asdict(config)
    settings["lora"] = config.lora.to_dict()
    return settings


def load_classifier(directory: str | Path, device="cpu") -> tuple[Classifier, Tokenizer, dict]:
    """(classifier in eval mode, tokenizer, classifier.json contents)."""
    from gpt.checkpoint import load_model

    directory = Path(directory)
    path = directory / CLASSIFIER_FILE
    meta = read_manifest(path, "kettle_classifier", version=FORMAT_VERSION, what="a Kettle classifier")
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not isinstance(meta.get("max_length"), int):
        raise KettleError(f"{path}: labels (two or more) and max_length are required")
    gpt, tokenizer = load_model(directory / BODY_DIR, device=device, dtype=torch.float32)
    model = Classifier(gpt, len(labels))
    try:
        head = load_file(str(directory / HEAD_FILE))
        model.head.load_state_dict(head)
    except (SafetensorError, FileNotFoundError, RuntimeError) as exc:
        raise KettleError(
            f"{directory / HEAD_FILE}: missing or does not fit {len(labels)} labels ({str(exc).splitlines()[0]})"
        ) from None
    return model.to(device).eval(), tokenizer, meta


@torch.no_grad()
def predict(
    model: Classifier, tokenizer: Tokenizer, *, meta: dict, texts: list[str], device="cpu"
) -> list[tuple[str, float]]:
    """(label, probability) for each text."""
    model.eval()
    labels = meta["labels"]
    fake = [(t, labels[0]) for t in texts]
    results = []
    encoded = encode(fake, tokenizer, labels=labels, max_length=meta["max_length"])
    for ids, lengths, _ in batches(encoded, 32, pad_id=0):
        probs = model(ids.to(device), lengths.to(device)).softmax(-1)
        for p in probs:
            i = int(p.argmax())
            results.append((labels[i], float(p[i])))
    return results


def format_confusion(confusion: list[list[int]], labels: list[str]) -> str:
    """A plain-text confusion matrix: rows are true labels, columns predicted ones."""
    width = max(8, *(len(label) + 2 for label in labels))
    lines = ["true \\ pred".ljust(width) + "".join(label.rjust(width) for label in labels)]
    for label, row in zip(labels, confusion):
        lines.append(label.ljust(width) + "".join(str(n).rjust(width) for n in row))
    return "\n".join(lines)


def class_counts(examples: list[tuple[str, str]]) -> dict[str, int]:
    return dict(sorted(Counter(label for _, label in examples).items()))
