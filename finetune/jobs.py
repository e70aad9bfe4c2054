"""Fine-tuning runs as their own processes, recorded in the store's runs table.

    run = create_run(store, JobSpec(model="starter", snapshot_id=3))   # status "queued"
    execute(run.id)                 # in this process (`kettle finetune run`), or:
    run_id = start_finetune(JobSpec(...))   # a detached `python -m finetune.jobs N`

What a run writes while it goes (the app polls `store.run(id)` and `store.run_metrics(id)`):
- runs.status: queued -> running -> finished | failed | cancelled; runs.pid; started_at,
  finished_at, updated_at; runs.step / runs.total_steps; runs.error (one line, when failed);
  runs.log_path (the process's output); runs.output_model_id (the registered model version).
- run_metrics rows: {"loss", "lr", "tokens_per_s", "eta_s", "epoch"} at most about once a second
  and at the last step, with "val_loss" added at each validation; at the end
  the verdict's figures (gate losses, corrections recalled, replay losses; the model version's
  metrics also hold "probe", finetune.probe's scores of answers to the base's own questions).
- The run directory KETTLE_HOME/runs/finetune-<id>/: data.json (the tokenised examples and the
  base's replay data, so a resume never depends on the data file still being there),
  checkpoint/ (finetune.train's resume checkpoint), metrics.jsonl, log.txt.

The checkpoint is written atomically after the first step, then whenever CHECKPOINT_EVERY_S
have passed (longer for a model slow to save, so that saving costs under CHECKPOINT_SHARE of
the time), on SIGTERM/SIGINT, and once training ends, before the model is written: a SIGKILL,
an out-of-memory kill or a power cut loses at most the work since the last one, and a model
write that fails (a full disk) loses no training. `reap_dead_runs` marks a "running" run whose
process is gone as failed; every command that checks a run's status reaps first. SIGTERM or
Ctrl-C marks the run "cancelled"; `resume` continues a cancelled or failed run exactly (same
batches, optimizer moments, RNG) from its checkpoint. Any error marks the run "failed" with
the reason; out-of-memory and a full disk are reported as such with what to do.

On success the model directory (models/<name>: the weights, card.md, loss.png, training.json,
the base's replay.jsonl, and adapter/ for LoRA runs) is written atomically, then registered as a
model version with its lineage in one transaction. The verdict (finetune.verdict) says how many of
the user's corrections now come back and whether the base's skills survived; a model that
regressed is registered with status "regressed" and is never activated automatically; one that
passed is activated (unless `activate` is off).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data.paths import models_dir, runs_dir
from data.records import Run
from data.registry import RUN_RECORD, check_model_name, name_taken, unregistered_run
from data.store import Store, open_store
from finetune.allocator import process_env
from finetune.instruct import (
    Example,
    Progress,
    SFTConfig,
    SFTTrainer,
    check_vocabulary,
    default_val_fraction,
    evaluate_loss,
    holdout,
    prepare,
    recalled,
    resolve,
)
from finetune.lessons import IN_CONTEXT, LESSONS_FILE, last_question, lessons_text
from finetune.probe import Probe
from finetune.verdict import judge, summary_lines
from gpt.errors import KettleError
from gpt.files import atomic_directory, atomic_write_text, remove_stale_temporaries

RUN_KIND = "finetune"
LOG_EVERY_S = 1.0
CHECKPOINT_EVERY_S = 30.0
CHECKPOINT_SHARE = 0.05
CHECKPOINT_DIR = "checkpoint"
LEGACY_CHECKPOINT = "checkpoint.pt"  # what runs kept before finetune.train's one format
FAILURE_FILE = "failure.txt"  # why the run failed, when the store could not be told
STORE_WAIT_S = 60.0  # how long a finished run waits for a locked store to register its model


@dataclass
class JobSpec:
    """What a run was asked to do (stored as the run's config)."""

    model: str  # base: a model version name or id, a model directory, or a name under models/
    snapshot_id: int | None = None
    data: str | None = None  # a dataset file (Alpaca, ShareGPT, OpenAI JSONL, DPO pairs)
    sft: dict = field(default_factory=dict)  # SFTConfig fields
    name: str | None = None  # the new model's name (default: <base>-ft<run id>)
    device: str = "auto"
    activate: bool = True

    def validate(self) -> None:
        if (self.snapshot_id is None) == (self.data is None):
            raise KettleError("give exactly one of --snapshot ID or --data FILE")
        if self.name is not None:
            check_model_name(self.name)
        SFTConfig.from_dict(self.sft)  # unknown or bad fields fail now, not in the process


def check_spec(store: Store, spec: JobSpec) -> None:
    """Refuse now what the run would refuse as it starts, before its run row and folder exist:
    the settings, the base model (checked as an imported one is), a --name already taken, the
    data, and what is left to train on under the settings (--max-length, --val-fraction)."""
    from gpt.checkpoint import check_model_dir

    spec.validate()
    base, _, _ = resolve_base(store, spec.model)
    _, config, tokenizer = check_model_dir(base)
    if spec.name is not None and name_taken(store, spec.name):
        raise KettleError(f"a model named {spec.name!r} already exists; choose another --name")
    conversations, _ = load_conversations(store, spec)
    sft = SFTConfig.from_dict(spec.sft)
    resolve(sft, len(conversations), model=config)
    split_examples(conversations, tokenizer, sft, config=config)


def split_examples(
    conversations: list[list[dict]], tokenizer, sft: SFTConfig, *, config
) -> tuple[list, list, dict, list[list[dict]]]:
    """The conversations as (training examples, held-out examples, stats, the training
    conversations) under the settings; refused when none is left to train on."""
    examples, stats = prepare(
        conversations, tokenizer, max_length=sft.max_length or config.context_length, vocab_size=config.vocab_size
    )
    fraction = sft.val_fraction if sft.val_fraction is not None else default_val_fraction(len(examples))
    train, val = holdout(examples, fraction, seed=sft.seed)
    if not train:
        raise KettleError(
            f"no training examples left after holding out {len(val)} of {len(examples)} (--val-fraction {fraction:g})"
        )
    return train, val, stats, [conversations[e.source] for e in train]


def run_dir(run_id: int) -> Path:
    return runs_dir() / f"finetune-{run_id}"


def create_run(store: Store, spec: JobSpec) -> Run:
    """Record a queued run for `spec` (checked for shape; the model and data are checked when
    the run starts, so that their problems are recorded on the run)."""
    spec.validate()
    if spec.data is not None:
        spec.data = str(Path(spec.data).expanduser().resolve())
    base = store.find_model_version(int(spec.model) if spec.model.isdigit() else spec.model)
    run = store.create_run(
        RUN_KIND,
        snapshot_id=spec.snapshot_id,
        model_version_id=base.id if base else None,
        config={"spec": dataclasses.asdict(spec)},
    )
    path = run_dir(run.id)
    path.mkdir(parents=True, exist_ok=True)
    return store.update_run(run.id, log_path=path / "log.txt")


def start_finetune(spec: JobSpec, store: Store | None = None) -> int:
    """Create a run and start it as a detached `python -m finetune.jobs N`; returns its id.

    The process records itself in the runs table (see the module docstring); its output goes to
    the run's log_path. Cancel it with `cancel_run`.
    """
    own = store is None
    store = store or open_store()
    try:
        check_spec(store, spec)  # a run that could only fail is refused, not recorded
        run = create_run(store, spec)
        with open(run.log_path, "ab") as log:
            proc = subprocess.Popen(  # -X faulthandler: a hard crash leaves its trace in the log
                [sys.executable, "-X", "faulthandler", "-m", "finetune.jobs", str(run.id), "--no-progress"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=process_env(),
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        # Collect its exit status when it ends: a child nobody waits for stays a zombie
        # (<defunct>) for as long as this process (the app) runs.
        threading.Thread(
            target=_watch, args=(proc, run.id, store.path), name=f"finetune-{run.id}-reaper", daemon=True
        ).start()
        store.update_run(run.id, pid=proc.pid)
        return run.id
    finally:
        if own:
            store.close()


def _watch(proc: subprocess.Popen, run_id: int, db: Path) -> None:
    """Wait for a run's process; if a signal ended it before it could report, say which."""
    import signal

    code = proc.wait()
    if code == 0:
        return
    try:
        with open_store(db) as store:
            if store.run(run_id).status != "running":
                return
            if code > 0:  # it failed, and could not record why at the time
                reap_dead_runs(store)
                return
            name = signal.Signals(-code).name
            why = f"{name}, out of memory?" if name == "SIGKILL" else name
            store.update_run(
                run_id,
                status="failed",
                error=(
                    f"the run's process was killed ({why}); `kettle finetune resume {run_id}` "
                    "continues it from its last checkpoint"
                ),
            )
    except (KettleError, ValueError, sqlite3.Error):  # the store is gone (a test's home, say)
        pass


def cancel_run(store: Store, run_id: int) -> bool:
    """Ask a running run's process to checkpoint and stop (SIGTERM); False if it is not running."""
    import signal

    reap_dead_runs(store)
    run = store.run(run_id)
    if run.status not in ("queued", "running") or not run.pid:
        return False
    os.kill(run.pid, signal.SIGTERM)
    return True


def reap_dead_runs(store: Store) -> list[int]:
    """Mark running fine-tuning runs whose process is gone (killed, crashed) as failed; their ids."""
    return [
        run.id
        for run in store.fail_orphaned_runs(
            kind=RUN_KIND,
            error=lambda run: (
                _last_words(run.id)
                or "the run's process ended without reporting (killed?); "
                "`kettle finetune resume` continues it from its last checkpoint"
            ),
        )
    ]


# --- inputs ----------------------------------------------------------------------------------------


def resolve_base(store: Store, model: str) -> tuple[Path, int | None, str]:
    """(model directory, model version id or None, display name) of a base model."""
    from data.registry import resolve_model_dir

    version = store.find_model_version(int(model) if model.isdigit() else model)
    if version is not None:
        path = Path(version.path)
        if not path.exists():
            raise KettleError(f"model version {version.name!r}: its directory {path} is missing")
        return path, version.id, version.name
    path = resolve_model_dir(model)
    for v in store.model_versions():  # a directory the store knows keeps its lineage
        if Path(v.path).resolve() == path.resolve():
            return path, v.id, v.name
    return path, None, path.name


def load_conversations(store: Store, spec: JobSpec) -> tuple[list[list[dict]], dict]:
    """The training conversations and a description of where they came from (for the card)."""
    from data.formats import learnable, parse_file

    if spec.snapshot_id is not None:
        snap = store.snapshot(spec.snapshot_id)
        skipped: Counter = Counter()  # what an older Kettle's snapshot may hold, as its export skips
        examples = learnable(store.snapshot_examples(snap.id), lambda e: e["messages"], "", skipped)
        source = {"snapshot_id": snap.id, "snapshot_name": snap.name, "hash": snap.content_hash}
        return [e["messages"] for e in examples], source | ({"skipped": dict(skipped)} if skipped else {})

    path = Path(spec.data)
    fmt, records, _ = parse_file(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return [_record_conversation(r) for r in records], {"file": str(path), "format": fmt, "hash": digest}


def _record_conversation(record) -> list[dict]:
    """A parsed record as one conversation: the path to its last ideal (chosen) answer."""
    nodes = record.nodes
    last = max((i for i, n in enumerate(nodes) if n.label and "ideal" in n.label), default=len(nodes) - 1)
    path = []
    while last is not None:
        path.append(nodes[last])
        last = nodes[last].parent
    messages = [{"role": "system", "content": record.system_prompt}] if record.system_prompt else []
    for n in reversed(path):
        messages.append({"role": n.role, "content": n.content})
        if n.role == "assistant" and not (n.label and "ideal" in n.label):
            messages[-1]["weight"] = 0  # context the file did not mark as an answer to learn
    return messages


# The tokenised parts of a run's data.json: the user's examples (trained on, held out), the
# lessons its base's lineage learned (trained again, checked), the other forms of every lesson
# (finetune.lessons: reworded; asked in chats, a few of them each epoch), the base's own
# conversations asked most like them (anchors) and the base's replay data (mixed in, held out to
# measure what the base knew).
PARTS = ("train", "val", "lessons", "variants", "contexts", "anchors", "replay", "replay_heldout")


def _save_examples(
    path: Path, tokenizer, *, parts: dict[str, list[Example]], stats: dict, source: dict, lessons: list
) -> None:
    data = {
        "tokenizer": tokenizer.name,
        "n_vocab": tokenizer.n_vocab,
        "stats": stats,
        "source": source,
        "lesson_conversations": lessons,
        **{name: [[e.input_ids, e.labels, e.source] for e in parts[name]] for name in PARTS},
    }
    atomic_write_text(path, json.dumps(data, separators=(",", ":")))


def _load_examples(path: Path, tokenizer, *, vocab_size: int):
    """({part: examples}, stats, source, lessons) from the run's data.json, checked against the model."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        parts = {name: [Example(*row) for row in data.get(name, [])] for name in PARTS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KettleError(f"{path}: the run's tokenised data cannot be read ({exc})") from None
    if data.get("tokenizer") != tokenizer.name or data.get("n_vocab") != tokenizer.n_vocab:
        raise KettleError(
            f"{path}: the data was tokenised for another vocabulary "
            f"({data.get('tokenizer')}, {data.get('n_vocab')} tokens); the model "
            f"uses {tokenizer.name} ({tokenizer.n_vocab} tokens)"
        )
    check_vocabulary([e for part in parts.values() for e in part], vocab_size)
    return parts, data.get("stats", {}), data.get("source", {}), data.get("lesson_conversations", [])


def _as_the_chat_asks(model, tokenizer, taught: list[list[dict]], base_path: Path) -> dict:
    """finetune.lessons.as_the_chat_asks with the chat's default sampling and the base's own
    conversations as the earlier turns."""
    from finetune.lessons import as_the_chat_asks
    from finetune.replay import read_replay
    from gpt.sampling import CHAT_PRESET, get_preset

    pool = (read_replay(base_path) or {}).get("train", []) or taught
    return as_the_chat_asks(model, tokenizer, taught, pool, params=get_preset(CHAT_PRESET))


def _lesson_examples(
    base_path: Path, taught: list[list[dict]], model, tokenizer, *, max_length: int, seed: int
) -> tuple[list[list[dict]], dict[str, list[Example]]]:
    """(every lesson the new model will know: its lineage's and `taught`, {"lessons": the
    lineage's examples, "variants": every lesson reworded, "contexts": every lesson asked in
    chats}) (finetune.lessons)."""
    from finetune.lessons import (
        CHATTER,
        OPENERS,
        chatter,
        contrasts,
        last_question,
        merge,
        neighbours,
        read_lessons,
        variants,
    )
    from finetune.replay import read_replay
    from gpt.sampling import AS_TRAINED, CHAT_PRESET, get_preset

    vocab_size = model.config.vocab_size
    lessons = merge(read_lessons(base_path), taught)
    earlier = lessons[: len(lessons) - len(taught)]
    pool = (read_replay(base_path) or {}).get("train", [])
    own = [q for c in random.Random(seed).sample(pool, min(len(pool), CHATTER)) if (q := last_question(c))]
    asked = list(OPENERS) + own[: CHATTER - len(OPENERS)]
    said = chatter(model, tokenizer, asked, params=get_preset(CHAT_PRESET)) if lessons else []
    # What the base says to a chat's small talk, kept (trained every epoch, never required
    # back): fine-tuned on 10 corrections, the starter answered "Hi! Can you help me with
    # Python?" with one of them, and every later answer of that chat copied from it.
    kept = list(OPENERS) + contrasts(lessons, pool, seed=seed)
    small_talk = chatter(model, tokenizer, kept, params=get_preset(AS_TRAINED)) if lessons else []

    def encode(conversations: list[list[dict]]) -> list[Example]:
        try:
            return prepare(conversations, tokenizer, max_length=max_length, vocab_size=vocab_size)[0]
        except KettleError:  # none left (or none fits this model): train without them
            return []

    alone, chats = variants(lessons, pool, chatter=said, seed=seed)
    return lessons, {
        "lessons": encode(earlier) if earlier else [],
        "variants": encode(alone) if alone else [],
        "contexts": encode(chats) if chats else [],
        "anchors": encode(near) if (near := neighbours(lessons, pool) + small_talk) else [],
    }


def _replay_examples(base_path: Path, tokenizer, *, max_length: int, vocab_size: int) -> dict[str, list[Example]]:
    """The base's own instruction data (finetune.replay) as examples; none when it has none."""
    from finetune.replay import read_replay

    replay = read_replay(base_path)
    if replay is None:
        return {"replay": [], "replay_heldout": []}
    out = {}
    for part, split in (("replay", "train"), ("replay_heldout", "heldout")):
        try:
            out[part] = (
                prepare(replay[split], tokenizer, max_length=max_length, vocab_size=vocab_size)[0]
                if replay[split]
                else []
            )
        except KettleError:  # replay data that does not fit this model: train without it
            return {"replay": [], "replay_heldout": []}
    return out


# --- the run ---------------------------------------------------------------------------------------


def execute(
    run_id: int, resume: bool = False, *, progress: bool = True, on_step: Callable[[Progress], None] | None = None
) -> Run:
    """Run (or resume) fine-tuning run `run_id` in this process; returns the final Run row.

    Raises KettleError when the run fails (after marking it failed with the reason).
    `on_step` is called after every step (a hook for tests and embedding).
    """
    from finetune.train import init_distributed, prepare_training

    store = open_store()
    try:
        run = store.run(run_id)
        if run.kind != RUN_KIND:
            raise KettleError(f"run {run_id} is a {run.kind} run, not a fine-tuning run")
        spec = JobSpec(**run.config["spec"])
        dist, device = init_distributed(spec.device)
        prepare_training(device)
        # Under torchrun only rank 0 checks: it marks the run running before the others read it.
        if dist.main and run.status == "running" and run_id in reap_dead_runs(store):
            run = store.run(run_id)
        if dist.main and resume and run.status not in ("cancelled", "failed"):
            raise KettleError(f"run {run_id} is {run.status}; only cancelled or failed runs resume")
        if dist.main and not resume and run.status != "queued":
            raise KettleError(f"run {run_id} is {run.status} (resume it with `kettle finetune resume {run_id}`)")
        if dist.main:
            (run_dir(run_id) / FAILURE_FILE).unlink(missing_ok=True)  # an earlier attempt's
            store.update_run(run_id, status="running", pid=os.getpid(), error="")
        try:
            # SIGTERM (Ctrl+X) stays a request to stop for the whole run, not only its training
            # loop: a run that learned early and was measuring its model was killed instead
            from finetune.train import StopFlag

            with StopFlag() as cancel:
                _run(
                    store,
                    run_id,
                    spec=spec,
                    resume=resume,
                    progress=progress,
                    on_step=on_step,
                    dist=dist,
                    device=device,
                    cancel=cancel,
                )
        except KettleError as exc:
            _fail(store, run_id, reason=str(exc), dist=dist)
            raise
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not isinstance(exc, torch.OutOfMemoryError) and "out of memory" not in str(exc):
                _fail(store, run_id, reason=f"{type(exc).__name__}: {exc}", dist=dist)
                raise
            message = (
                "out of memory while training; try --lora, a smaller --batch-tokens or --max-length, or a smaller model"
            )
            _fail(store, run_id, reason=message, dist=dist)
            raise KettleError(message) from None
        except OSError as exc:  # a full disk, a folder made read-only: what, where, what to do
            message = (
                f"{_os_error(exc)}; fix that, then `kettle finetune resume {run_id}` continues from the last checkpoint"
            )
            _fail(store, run_id, reason=message, dist=dist)
            raise KettleError(message) from None
        except KeyboardInterrupt:  # a second Ctrl-C: stopped before a checkpoint could be saved
            if dist.main:
                store.update_run(run_id, status="cancelled", error="interrupted without a checkpoint")
            raise
        except BaseException as exc:
            _fail(store, run_id, reason=f"{type(exc).__name__}: {exc}".strip(": "), dist=dist)
            raise
        return store.run(run_id)
    finally:
        store.close()


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _fail(store: Store, run_id: int, *, reason: str, dist) -> None:
    """Record the run as failed with the first line of `reason`. When the store cannot take it
    (still locked after STORE_WAIT_S, or the disk is full for it too), the reason goes beside the
    run (FAILURE_FILE), where whoever reaps the dead run reads it."""
    if not dist.main:
        return
    reason = reason.splitlines()[0] if reason else "failed"
    try:
        _patiently(lambda: store.update_run(run_id, status="failed", error=reason))
    except (KettleError, OSError, sqlite3.Error):
        try:
            atomic_write_text(run_dir(run_id) / FAILURE_FILE, reason + "\n")
        except OSError:
            pass  # the command's own error line is all that is left to say it


def _patiently(write: Callable[[], object]):
    """`write()`, tried again while another process holds the store's lock (an import, the app)
    for up to STORE_WAIT_S: a trained model is worth a longer wait than one busy timeout."""
    deadline = time.monotonic() + STORE_WAIT_S
    while True:
        try:
            return write()
        except KettleError as exc:
            cause = exc.__cause__
            locked = isinstance(cause, sqlite3.OperationalError) and ("locked" in str(cause) or "busy" in str(cause))
            if not locked or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _last_words(run_id: int) -> str | None:
    """The reason a run's process left beside the run when the store would not take it."""
    try:
        return (run_dir(run_id) / FAILURE_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _run(store: Store, run_id: int, *, spec: JobSpec, resume: bool, progress: bool, on_step, dist, device, cancel=None):
    from finetune.train import Display, StopFlag, append_metrics, load_checkpoint, read_metrics, truncate_metrics
    from gpt.checkpoint import load_model

    rdir = run_dir(run_id)
    rdir.mkdir(parents=True, exist_ok=True)
    if dist.main:
        remove_stale_temporaries(rdir)  # what a killed checkpoint write left
    if resume and (rdir / LEGACY_CHECKPOINT).exists():
        raise KettleError(
            f"run {run_id} was checkpointed by an older Kettle ({LEGACY_CHECKPOINT}), "
            "which this one cannot resume; start it again as a new run"
        )
    base_path, parent_id, base_name = resolve_base(store, spec.model)
    name = spec.name or f"{base_name}-ft{run_id}"
    out = models_dir() / name
    if resume and unregistered_run(store, out) == run_id:  # killed after writing it, before registering it
        if dist.main:
            record = json.loads((out / RUN_RECORD).read_text(encoding="utf-8"))
            _register(
                store,
                run_id,
                spec=spec,
                out=out,
                parent_id=parent_id,
                hparams=record["hparams"],
                metrics=record["metrics"],
            )
            shutil.rmtree(rdir / CHECKPOINT_DIR, ignore_errors=True)
        return
    if name_taken(store, name):
        raise KettleError(f"a model named {name!r} already exists; choose another --name")
    model, tokenizer = load_model(base_path, device=device, dtype=torch.float32)
    sft = SFTConfig.from_dict(spec.sft)
    max_length = sft.max_length or model.config.context_length
    data_path = rdir / "data.json"
    if resume and data_path.exists():
        parts, stats, source, lessons = _load_examples(data_path, tokenizer, vocab_size=model.config.vocab_size)
    else:
        conversations, source = load_conversations(store, spec)
        train, val, stats, taught = split_examples(conversations, tokenizer, sft, config=model.config)
        vocab = model.config.vocab_size
        lessons, lesson_parts = _lesson_examples(
            base_path, taught, model, tokenizer, max_length=max_length, seed=sft.seed
        )
        parts = {
            "train": train,
            "val": val,
            **lesson_parts,
            **_replay_examples(base_path, tokenizer, max_length=max_length, vocab_size=vocab),
        }
        if dist.main:
            _save_examples(data_path, tokenizer, parts=parts, stats=stats, source=source, lessons=lessons)
    train, val, earlier, forms, chats, anchors, replay, replay_heldout = (parts[name] for name in PARTS)
    stats = {**stats, "train": len(train), "held_out": len(val), "lessons": len(earlier), "variants": len(forms)}
    taught_all = train + earlier + forms
    per_epoch = min(len(chats), IN_CONTEXT * (len(train) + len(earlier)))  # each lesson IN_CONTEXT times
    config = resolve(
        sft,
        len(train) + len(earlier),
        model=model.config,
        n_replay=len(replay),
        n_variants=len(forms) + per_epoch + len(anchors),
    )
    config.val_fraction = len(val) / (len(train) + len(val))

    # The base's figures, before any training (a resumed run's model is still the base here).
    pad = tokenizer.eot_id
    parent_loss = evaluate_loss(model, val, pad_id=pad, device=device) if val else None
    replay_before = evaluate_loss(model, replay_heldout, pad_id=pad, device=device) if replay_heldout else None
    recall_base = sum(recalled(model, train, pad_id=pad, device=device))
    lessons_base = recalled(model, earlier, pad_id=pad, device=device)
    train_before = evaluate_loss(model, train, pad_id=pad, device=device)
    probe = Probe(tokenizer, heldout=replay_heldout, train=replay, corrections=train + earlier)
    probe_before = probe.answers(model) if dist.main else []  # only the main rank scores
    trainer = SFTTrainer(
        model,
        taught_all,
        val,
        config,
        pad,
        device,
        dist,
        replay=replay,
        contexts=chats,
        contexts_per_epoch=per_epoch,
        anchors=anchors,
    )
    checkpoint_path = rdir / CHECKPOINT_DIR
    metrics_path = rdir / "metrics.jsonl"
    if resume and checkpoint_path.exists():
        trainer.load_state_dict(load_checkpoint(checkpoint_path, device)[0])
    elif dist.main:
        shutil.rmtree(checkpoint_path, ignore_errors=True)  # a fresh start (or a resume before any step)
    if dist.main:
        truncate_metrics(metrics_path, trainer.step)
        store.truncate_run_metrics(run_id, trainer.step)
        store.update_run(run_id, total_steps=trainer.total_steps, step=trainer.step)

    display = Display(progress and dist.main, trainer.total_steps, None, "fine-tuning")
    last_log = [0.0]
    checkpoints = _Checkpoints(checkpoint_path, trainer)

    def report(p: Progress) -> None:
        if on_step:
            on_step(p)
        if not dist.main:
            return
        record = {
            "step": p.step,
            "loss": p.loss,
            "lr": p.lr,
            "tokens_per_s": p.tokens_per_s,
            "eta_s": p.eta_s,
            "epoch": p.epoch,
        }
        if p.val_loss is not None:
            record["val_loss"] = p.val_loss
            display.print(f"step {p.step}: validation loss {p.val_loss:.4f}")
        append_metrics(metrics_path, record)
        display.step(p.step, p.loss, tokens_per_s=p.tokens_per_s, mfu=None)
        now = time.monotonic()
        if now - last_log[0] >= LOG_EVERY_S or p.val_loss is not None or p.step == p.total_steps:
            last_log[0] = now
            store.log_metrics(run_id, p.step, metrics={k: v for k, v in record.items() if k != "step"})
        if not math.isfinite(p.loss):
            raise KettleError(f"the loss became {p.loss} at step {p.step}; lower --lr and start again")
        if p.step < p.total_steps:
            checkpoints.maybe_save()

    try:
        with StopFlag() as stop:
            finished = trainer.run(should_stop=lambda: stop.requested, on_progress=report)
    finally:
        display.close()
    if dist.main:
        checkpoints.save()  # stopped: to resume; finished: so a failed model write costs no training
    if not finished:
        if dist.main:
            store.update_run(run_id, status="cancelled", step=trainer.step)
        dist.barrier()
        return

    new_loss = evaluate_loss(model, val, pad_id=pad, device=device) if val else None
    replay_after = evaluate_loss(model, replay_heldout, pad_id=pad, device=device) if replay_heldout else None
    recall = sum(recalled(model, train, pad_id=pad, device=device))
    lessons_after = recalled(model, earlier, pad_id=pad, device=device)
    asked = _as_the_chat_asks(model, tokenizer, lessons[len(lessons) - len(train) :], base_path)
    train_after = evaluate_loss(model, train, pad_id=pad, device=device)
    if not dist.main:
        return
    losses = [r["loss"] for r in read_metrics(metrics_path) if "loss" in r]
    metrics = {
        "gate_parent_loss": parent_loss,
        "gate_new_loss": new_loss,
        "recall_base": recall_base,
        "recall": recall,
        "recall_of": len(train),
        "lessons_of": len(earlier),
        "lessons_recall_base": sum(lessons_base),
        "lessons_recall": sum(lessons_after),
        # the lineage's corrections this model no longer gives back (their questions)
        "lessons_forgotten": [
            last_question(lessons[e.source])
            for e, before, after in zip(earlier, lessons_base, lessons_after)
            if before and not after
        ],
        **asked,
        "train_loss_before": train_before,
        "train_loss_after": train_after,
        "learned_epoch": trainer.learned_epoch,
        "best_recall_epoch": trainer.best_recall and trainer.best_recall["epoch"],  # whose weights it kept
        "probe": probe.score(probe_before, probe.answers(model)),
        "replay_examples": config.replay,
        "replay_loss_before": replay_before,
        "replay_loss_after": replay_after,
        "best_val_loss": None if math.isinf(trainer.best_val) else trainer.best_val,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": trainer.step,
        "stopped_early": trainer.stopped_early,
        "tokens": trainer.tokens,
        "train_seconds": round(trainer.elapsed, 2),
        "tokens_per_s": trainer.tokens / trainer.elapsed if trainer.elapsed else None,
        **stats,
    }
    verdict, reasons = judge(metrics)
    metrics.update(gate=verdict, gate_reasons=reasons)
    store.log_metrics(
        run_id,
        trainer.step,
        metrics={
            k: metrics[k]
            for k in (
                "gate_parent_loss",
                "gate_new_loss",
                "recall_base",
                "recall",
                "replay_loss_before",
                "replay_loss_after",
            )
        },
    )
    hparams = {
        **config.to_dict(),
        "base": str(base_path),
        "base_name": base_name,
        "source": source,
        "mode": "lora" if config.lora else "full",
    }
    if cancel is not None and cancel.requested:  # after training: the checkpoint is saved, resume writes it
        store.update_run(run_id, status="cancelled", step=trainer.step)
        return
    _write_model(
        out,
        model,
        tokenizer=tokenizer,
        trainer=trainer,
        name=name,
        base_name=base_name,
        run_id=run_id,
        hparams=hparams,
        metrics=metrics,
        metrics_path=metrics_path,
        lessons=lessons,
    )
    try:
        _register(store, run_id, spec=spec, out=out, parent_id=parent_id, hparams=hparams, metrics=metrics)
    except BaseException as exc:
        shutil.rmtree(out, ignore_errors=True)  # nothing unregistered stays (and a full disk gets its room back)
        if isinstance(exc, KettleError):
            raise KettleError(
                f"the model could not be registered: {exc}; `kettle finetune resume {run_id}` "
                "writes it again from the finished training"
            ) from exc
        raise
    shutil.rmtree(checkpoint_path, ignore_errors=True)


def _register(store: Store, run_id: int, *, spec: JobSpec, out: Path, parent_id, hparams: dict, metrics: dict) -> None:
    """The model directory `out` (written with its RUN_RECORD) as a model version, and the run
    finished with it, in one transaction; made active if it passed the gate and the run may."""
    verdict = metrics["gate"]

    def register() -> None:
        with store.transaction():
            version = store.add_model_version(
                out.name,
                out,
                kind="finetuned",
                parent_id=parent_id,
                snapshot_id=spec.snapshot_id,
                run_id=run_id,
                hparams=hparams,
                metrics=metrics,
                status="regressed" if verdict == "regressed" else "ok",
            )
            store.update_run(run_id, status="finished", step=metrics["steps"], output_model_id=version.id)
            if spec.activate and verdict == "passed":
                store.activate_model(version.id)

    _patiently(register)


class _Checkpoints:
    """Writes the trainer's state atomically: after the first step, then when enough time has
    passed (CHECKPOINT_EVERY_S, or long enough that saving takes under CHECKPOINT_SHARE of it)."""

    def __init__(self, path: Path, trainer: SFTTrainer):
        self.path, self.trainer = path, trainer
        self.saved_at: float | None = None
        self.interval = CHECKPOINT_EVERY_S

    def maybe_save(self) -> None:
        if self.saved_at is None or time.monotonic() - self.saved_at >= self.interval:
            self.save()

    def save(self) -> None:
        from finetune.train import save_checkpoint

        started = time.monotonic()
        save_checkpoint(self.path, self.trainer.state_dict(), state={"step": self.trainer.step})
        self.saved_at = time.monotonic()
        self.interval = max(CHECKPOINT_EVERY_S, (self.saved_at - started) / CHECKPOINT_SHARE)


def _write_model(
    out: Path, model, *, tokenizer, trainer, name, base_name, run_id, hparams, metrics, metrics_path: Path, lessons
) -> None:
    """The model directory with its card, loss curve and (LoRA) adapter, in one atomic rename."""
    from finetune.lora import lora_layers, merge_lora, save_adapter
    from finetune.replay import REPLAY_FILE
    from finetune.train import plot_losses
    from gpt.checkpoint import save_model

    with atomic_directory(out) as tmp:
        base_replay = Path(hparams["base"], REPLAY_FILE)
        if base_replay.is_file():  # the base's skills stay replayable for the next fine-tune
            shutil.copyfile(base_replay, tmp / REPLAY_FILE)
        if lessons:  # its lineage's corrections and this run's, for the next fine-tune to keep
            (tmp / LESSONS_FILE).write_text(lessons_text(lessons), encoding="utf-8")
        if lora_layers(model):
            save_adapter(model, tmp / "adapter", base=hparams["base"])
            merge_lora(model)
        weights = tmp / "weights"
        save_model(model, weights, tokenizer=tokenizer)
        for item in weights.iterdir():
            os.replace(item, tmp / item.name)
        weights.rmdir()
        plot_losses(metrics_path, tmp / "loss.png")
        (tmp / RUN_RECORD).write_text(
            json.dumps({"run_id": run_id, "hparams": hparams, "metrics": metrics}, indent=2) + "\n", encoding="utf-8"
        )
        card = model_card(name, base_name, run_id=run_id, hparams=hparams, metrics=metrics)
        (tmp / "card.md").write_text(card, encoding="utf-8")


def model_card(name: str, base_name: str, *, run_id: int, hparams: dict, metrics: dict) -> str:
    source = hparams["source"]
    data = (
        f"snapshot #{source['snapshot_id']} {source.get('snapshot_name') or ''}".rstrip()
        if "snapshot_id" in source
        else f"{source['file']} ({source['format']})"
    )

    def num(x, fmt=".4f"):
        return "—" if x is None else format(x, fmt)

    lora = hparams.get("lora")
    mode = (
        f"LoRA (rank {lora['rank']}, alpha {lora['alpha']}, dropout {lora['dropout']}, on {', '.join(lora['targets'])})"
        if lora
        else "full fine-tuning"
    )
    rows = [
        ("Base model", f"{base_name} (`{hparams['base']}`)"),
        ("Data", f"{data}, content hash `{source['hash'][:16]}`"),
        (
            "Examples",
            f"{metrics['train']} trained on, {metrics['held_out']} held out, "
            f"{metrics.get('skipped_too_long', 0)} skipped as too long",
        ),
        ("Method", mode),
        (
            "Settings",
            f"{hparams['epochs']} epochs max, lr {hparams['lr']:g}, warm-up "
            f"{hparams['warmup_steps']} steps, weight decay {hparams['weight_decay']}, "
            f"≤{hparams['max_batch_size']} examples / {hparams['batch_tokens']} tokens a "
            f"batch, max length {hparams['max_length']}, seed {hparams['seed']}",
        ),
        ("Steps", f"{metrics['steps']}" + (" (early-stopped)" if metrics["stopped_early"] else "")),
        ("Time", f"{metrics['train_seconds']:.1f} s, {num(metrics['tokens_per_s'], ',.0f')} tokens/s"),
        ("Training loss", f"{num(metrics['first_loss'])} → {num(metrics['last_loss'])}"),
    ]
    rows += [("Verdict", line) for line in summary_lines(metrics)]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"# {name}\n\nFine-tuned by Kettle run {run_id} on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime())}.\n\n| | |\n|---|---|\n{table}\n\n"
        f"![loss curve](loss.png)\n"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.jobs RUN_ID`: execute a queued run in this process, what
    start_finetune's detached process does (the run's log is its output). Errors are one line,
    as the kettle command's are; the exit status is 0 when the run finished, 130 when stopped."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune.jobs", description="Execute a queued fine-tuning run.")
    parser.add_argument("run_id", type=int, metavar="RUN_ID")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    args = parser.parse_args(argv)
    try:
        run = execute(args.run_id, progress=not args.no_progress)
    except KettleError as exc:
        print(f"kettle: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder that cannot be written: what and where
        print(f"kettle: error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kettle: interrupted", file=sys.stderr)
        return 130
    if run.status == "cancelled":
        print(
            f"run {run.id} stopped at step {run.step}/{run.total_steps}; "
            f"continue it with `kettle finetune resume {run.id}`"
        )
        return 130
    print(f"run {run.id} {run.status} at step {run.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
