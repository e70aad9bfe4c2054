"""What the training loops share: pretraining (finetune.pretrain), instruction fine-tuning
(finetune.instruct, run by finetune.jobs) and classification (finetune.classify).

    dist, device = init_distributed("auto")     # torchrun's process group, or one process
    prepare_training(device)                    # TF32, and the CPU allocator kept warm
    optimizer = make_optimizer(model, OptimizerSettings(lr=3e-4), device)
    lr = lr_at(step, settings, max_steps=1000)  # linear warm-up, cosine decay
    with StopFlag() as stop: ...                # Ctrl-C / SIGTERM: checkpoint and stop
    save_checkpoint(path, {"optimizer": ..., "rng": [rng_state()]}, state={"step": n})

A resume checkpoint has one format, whichever loop wrote it: a directory, replaced in one atomic
rename, holding

    state.json   the step and whatever else of the loop's progress is plain JSON
    trainer.pt   tensors and plain values (read back without unpickling): the optimizer's state,
                 "rng" (one rng_state per rank, or one for all), and the loop's own
    model/       a model directory, when the loop trains a model of its own (pretraining; a
                 fine-tune keeps its trainable weights in trainer.pt and reloads its base)

Progress goes to a metrics log (metrics.jsonl, one JSON object per line, with its "step"), cut
back to the checkpoint's step on resume, and to a rich progress bar (Display).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.allocator import keep_freed_memory
from gpt.checkpoint import load_model, save_model
from gpt.device import allow_tf32, pick_device
from gpt.errors import KettleError
from gpt.files import atomic_directory, atomic_file, atomic_write_text
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

# --- processes and distribution -----------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
            value = value / self.world_size
        return value

    def any(self, flag: bool, device) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (a no-op without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_name)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if dist.enabled and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist, device


def prepare_training(device: torch.device) -> None:
    """Process-wide settings for training on `device`: TF32 tensor cores on Ampere and later
    GPUs; on Linux CPUs, glibc's allocator set for a training step (finetune.allocator)."""
    allow_tf32(device)
    if device.type == "cpu":
        keep_freed_memory()


# --- optimisation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW's settings (GPT.configure_optimizers) and its learning-rate schedule's (lr_at)."""

    lr: float
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio


def make_optimizer(model: GPT, settings: OptimizerSettings, *, device: torch.device, extra=()) -> torch.optim.AdamW:
    """The model's AdamW with these settings; `extra`: parameters of a module built on the model
    (a classification head) that train with it."""
    return model.configure_optimizers(
        settings.weight_decay, settings.lr, betas=(settings.beta1, settings.beta2), device_type=device.type, extra=extra
    )


def lr_at(
    step: int, settings: OptimizerSettings, *, max_steps: int, max_time: float | None = None, elapsed: float = 0.0
) -> float:
    """Linear warm-up to settings.lr, then cosine decay to lr * min_lr_ratio at max_steps.

    With a time budget (max_time, seconds) the decay follows whichever runs out first, steps or
    time (`elapsed`), so a run cut short by the clock still ends on a low learning rate.
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, max_steps - settings.warmup_steps)
    progress = min(1.0, (step - settings.warmup_steps) / span)
    if max_time:
        progress = max(progress, min(1.0, elapsed / max_time))
    min_lr = settings.lr * settings.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (settings.lr - min_lr)


# --- resuming -----------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random generator a training step draws from (torch, CUDA, numpy, Python's), as
    tensors and plain values that a checkpoint stores without pickling."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [int(x) for x in np.random.get_state()[1]] + [int(np.random.get_state()[2])],
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict) -> None:
    """Put back the generators `rng_state` recorded, so that the steps after a resume draw
    what they would have drawn without the stop."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", np.array(state["numpy"][:-1], dtype=np.uint32), state["numpy"][-1]))
    random.setstate((3, tuple(state["python"]), None))


def gathered_rng_states(dist: Dist) -> list[dict]:
    """Every rank's rng_state, in rank order (every rank must call it)."""
    if not dist.enabled:
        return [rng_state()]
    states = [None] * dist.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


# torch.save reports a failed write as an enforce failure ("unexpected pos 576 vs 534"); with
# less than this free beside the file, the disk was full.
FULL_DISK_BYTES = 16 << 20


def save_state(obj, path: Path) -> None:
    """torch.save `obj` to `path`, a failed write raised as the OSError it was (a full disk)."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if shutil.disk_usage(path.parent).free < FULL_DISK_BYTES:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise OSError(errno.EIO, f"cannot write ({exc})", str(path)) from None


CHECKPOINT_MODEL, CHECKPOINT_TRAINER, CHECKPOINT_STATE = "model", "trainer.pt", "state.json"


def save_checkpoint(
    path: Path, trainer: dict, *, state: dict, model: GPT | None = None, tokenizer: Tokenizer | None = None
) -> None:
    """Write the resume checkpoint `path` (the format is in the module docstring): `trainer`
    as trainer.pt, `state` (its "step" at least) as state.json, and `model` with its tokenizer
    as model/ when given; an existing checkpoint is replaced in one atomic rename."""
    with atomic_directory(path, overwrite=True) as tmp:
        if model is not None:
            save_model(model, tmp / CHECKPOINT_MODEL, tokenizer=tokenizer)
        save_state(trainer, tmp / CHECKPOINT_TRAINER)
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def load_checkpoint(path: Path, device: torch.device) -> tuple[dict, dict, GPT | None]:
    """(trainer, state, model or None) of the checkpoint save_checkpoint wrote at `path`, the
    tensors on `device`, the model in fp32 (training keeps its weights in fp32); never
    unpickles."""
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text(encoding="utf-8"))
        trainer = torch.load(path / CHECKPOINT_TRAINER, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise KettleError(f"{path}: no checkpoint to resume from") from None
    except Exception as exc:  # torch.load raises several types for damaged files
        raise KettleError(f"{path}: the checkpoint cannot be read ({exc})") from None
    model = None
    if (path / CHECKPOINT_MODEL).is_dir():
        model, _ = load_model(path / CHECKPOINT_MODEL, device=device, dtype=torch.float32)
    return trainer, state, model


# --- the metrics log ----------------------------------------------------------------------------


def append_metrics(path: Path, record: dict) -> None:
    """Add one record (with its "step") to the metrics log."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log records past the checkpoint (steps trained after it but lost in a crash)."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png: Path) -> None:
    """The training and validation loss against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# --- stopping and progress ---------------------------------------------------------------------


class Display:
    """A rich progress bar with loss, tokens/s, MFU and ETA; lines for evaluations and samples.

    The bar measures steps, or time where a time budget runs out first, so that the ETA of a
    time-limited run is its real end.
    """

    def __init__(
        self, enabled: bool, max_steps: int, max_time: float | None = None, label: str = "pretraining", console=None
    ):
        self.enabled, self.max_steps, self.max_time = enabled, max_steps, max_time
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # `console`: the caller's, when it prints lines of its own while the bar runs (a line
        # printed through another console breaks the bar, and leaves a copy of it each time).
        # Each time labelled, and a bar short enough that the line fits 100 columns (the app
        # shows a brew's bar at that width): a wrapped line put "ETA" beside the elapsed time.
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=10),
            TaskProgressColumn(),
            TextColumn("step {task.fields[step]}/{task.fields[max_steps]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(label, total=1.0, step=0, max_steps=max_steps, loss="-", speed="")
        self.progress.start()

    def step(
        self, step: int, loss: float | None, *, tokens_per_s: float | None, mfu: float | None, elapsed: float = 0.0
    ) -> None:
        if not self.enabled:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        if tokens_per_s is not None:
            fields["speed"] = f"{tokens_per_s:,.0f} tok/s" + (f" MFU {mfu:.0%}" if mfu is not None else "")
        done = step / self.max_steps
        if self.max_time:
            done = max(done, elapsed / self.max_time)
        self.progress.update(self.task, completed=min(1.0, done), step=step, **fields)

    def print(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save a checkpoint and stop after this step;
    a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the caller stops us another way
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
