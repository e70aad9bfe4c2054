"""Fine-tuning under faults: a process SIGKILLed between steps, half-way through a checkpoint
or half-way through writing its model loses at most the work since its last checkpoint, leaves
no temporary behind, and a full disk is one line with the run failed and resumable."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.paths import models_dir
from data.registry import StoreCatalog
from finetune.jobs import CHECKPOINT_DIR, JobSpec, create_run, execute, run_dir
from gpt.errors import KettleError
from gpt.files import is_temporary

ROOT = Path(__file__).resolve().parents[2]

# Runs `execute(run_id)` with the product's code, but SIGKILLs itself at a chosen point:
# "step N" (before the N-th training step), "checkpoint N" (half-way through writing the N-th
# checkpoint) or "model" (half-way through writing the model's weights).
KILLED_RUN = r"""
import os, signal, sys
import torch
import finetune.jobs as jobs
import gpt.checkpoint
from finetune.instruct import SFTTrainer

run_id, point, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
count = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def half_written(path):
    with open(path, "wb") as f:
        f.write(b"half a file")
        f.flush()
        os.fsync(f.fileno())

if point == "step":
    train_step = SFTTrainer._train_step
    def step(self, batch):
        count[0] += 1
        if count[0] == n:
            die()
        return train_step(self, batch)
    SFTTrainer._train_step = step
elif point == "checkpoint":
    save = torch.save
    def killing_save(obj, path, *args, **kwargs):
        count[0] += 1
        if count[0] == n:
            half_written(path)
            die()
        return save(obj, path, *args, **kwargs)
    torch.save = killing_save
elif point == "model":
    def killing_save_file(state, path, metadata=None):
        half_written(path)
        die()
    gpt.checkpoint.save_file = killing_save_file
jobs.execute(run_id, progress=False)
print("finished without being killed")
"""


@pytest.fixture
def snapshot(store, make_model_dir, tmp_path) -> int:
    """A tiny base model (the store's "base") and 12 corrected answers to teach it."""
    make_model_dir(tmp_path / "base", context_length=64)
    store.add_model_version("base", tmp_path / "base", kind="pretrained")
    for i in range(12):
        conv = store.create_conversation()
        q = store.add_message(conv.id, "user", content=f"What is thing {i}?")
        a = store.add_message(conv.id, "assistant", content="I do not know.", parent_id=q.id)
        store.set_label(a.id, ideal=f"Thing {i} is the {i}th thing.")
    return store.create_snapshot(name="corrections").id


def killed(run_id: int, point: str, n: int = 0) -> None:
    out = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(run_id), point, str(n)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr[-3000:]


def temporaries() -> list[str]:
    found = []
    for folder in (models_dir(), *models_dir().parent.glob("runs/*")):
        if folder.is_dir():
            found += [f"{folder.name}/{p.name}" for p in folder.iterdir() if is_temporary(p.name)]
    return found


def resume(run_id: int) -> tuple[object, list[int]]:
    """Resume (as `kettle finetune resume` does) and the steps it trained."""
    steps = []
    run = execute(run_id, resume=True, progress=False, on_step=lambda p: steps.append(p.step))
    return run, steps


def checkpoint_step(run_id: int) -> int:
    return json.loads((run_dir(run_id) / CHECKPOINT_DIR / "state.json").read_text())["step"]


def test_killed_between_steps_resumes_from_the_last_checkpoint(store, snapshot):
    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    killed(run.id, "step", 8)
    assert store.run(run.id).status == "running"  # nobody has looked yet
    at = checkpoint_step(run.id)
    assert at == 1  # the first checkpoint comes after the first step
    resumed, steps = resume(run.id)  # resume reaps the dead run itself
    assert resumed.status == "finished" and steps[0] == at + 1
    assert temporaries() == []


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(store, snapshot):
    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    killed(run.id, "checkpoint", 2)  # the second: the one at the end of training
    assert any(is_temporary(p.name) for p in run_dir(run.id).iterdir())  # what the kill left
    assert checkpoint_step(run.id) == 1
    resumed, steps = resume(run.id)
    assert resumed.status == "finished" and steps[0] == 2
    assert temporaries() == []


def test_killed_while_writing_the_model_loses_no_training_and_never_lists_the_half_model(store, snapshot):
    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    killed(run.id, "model")
    half = [p.name for p in models_dir().iterdir() if is_temporary(p.name)]
    assert half and all(p.name not in half for p in map(Path, (m.path for m in StoreCatalog().models())))
    assert [m.name for m in StoreCatalog().models()] == ["base"]
    trained = checkpoint_step(run.id)
    resumed, steps = resume(run.id)
    assert steps == [] and resumed.step == trained  # nothing trained again
    assert resumed.status == "finished" and store.model_version(resumed.output_model_id)
    assert temporaries() == []
    assert not (run_dir(run.id) / CHECKPOINT_DIR).exists()  # a finished run needs none


def test_a_full_disk_at_the_model_write_fails_the_run_in_one_line_and_resume_finishes_it(
    store, snapshot, monkeypatch, capsys
):
    import finetune.jobs
    from tui.cli import main

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(models_dir()))

    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    with monkeypatch.context() as patch:
        patch.setattr(finetune.jobs, "_write_model", full_disk)
        assert main(["finetune", "run", "--run-id", str(run.id), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kettle: error: No space left on device") and err.count("\n") == 1
    assert f"kettle finetune resume {run.id}" in err
    failed = store.run(run.id)
    assert failed.status == "failed" and "No space left" in failed.error
    assert (run_dir(run.id) / CHECKPOINT_DIR).exists() and temporaries() == []
    resumed, steps = resume(run.id)
    assert steps == [] and resumed.status == "finished"


def test_a_full_disk_at_a_checkpoint_fails_the_run_and_keeps_the_last_one(store, snapshot, monkeypatch):
    import finetune.train

    saves, real_save = [], torch.save

    def save(obj, path):
        saves.append(path)
        if len(saves) == 2:  # torch.save's own report of a failed write
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        real_save(obj, path)

    monkeypatch.setattr(finetune.train.torch, "save", save)
    monkeypatch.setattr(finetune.train, "FULL_DISK_BYTES", 1 << 62)  # as if the disk were full
    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    with pytest.raises(KettleError, match="No space left on device"):
        execute(run.id, progress=False)
    assert store.run(run.id).status == "failed"
    assert checkpoint_step(run.id) == 1 and temporaries() == []


@pytest.mark.slow
def test_twenty_kills_at_random_points_lose_nothing_committed(store, snapshot):
    """20 runs killed at random points (between steps, in checkpoint and model writes), each
    resumed: every one finishes, from its last checkpoint, with nothing temporary left."""
    rng = random.Random(12)
    for attempt in range(20):
        run = create_run(store, JobSpec(model="base", snapshot_id=snapshot, name=f"m{attempt}"))
        point = rng.choice(["step", "checkpoint", "model"])
        n = rng.randint(2, 60) if point == "step" else rng.randint(1, 2)
        killed(run.id, point, n)
        before = checkpoint_step(run.id) if (run_dir(run.id) / CHECKPOINT_DIR).exists() else 0
        assert all(not is_temporary(Path(m.path).name) for m in StoreCatalog().models())
        resumed, steps = resume(run.id)
        assert resumed.status == "finished", (point, n, resumed.error)
        assert steps[:1] in ([], [before + 1]), (point, n)
        assert temporaries() == [], (point, n)
    assert json.dumps(store.run(run.id).config)  # the runs table is still readable


def test_the_app_sees_a_killed_run_as_failed_not_running(store, snapshot):
    from tui.screens.finetune import read_run

    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    killed(run.id, "step", 3)
    shown, _, _ = read_run(store, run.id)
    assert shown.status == "failed" and "finetune resume" in shown.error


def test_a_finished_background_run_leaves_no_zombie_process(store, snapshot):
    import time

    from finetune.jobs import start_finetune

    run_id = start_finetune(JobSpec(model="base", snapshot_id=snapshot), store)
    pid = store.run(run_id).pid
    deadline = time.monotonic() + 120
    while store.run(run_id).status in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert store.run(run_id).status == "finished", store.run(run_id).error
    gone_by = time.monotonic() + 5  # the process exits right after recording the result
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), "the finished run's process stays a zombie"


def test_a_background_run_killed_by_a_signal_says_so(store, snapshot):
    import time

    from finetune.jobs import start_finetune

    run_id = start_finetune(
        JobSpec(model="base", snapshot_id=snapshot, sft={"epochs": 1000, "until_learned": False}), store
    )
    deadline = time.monotonic() + 120
    while store.run(run_id).step < 1:
        assert time.monotonic() < deadline and store.run(run_id).status in ("queued", "running")
        time.sleep(0.1)
    os.kill(store.run(run_id).pid, signal.SIGKILL)
    while store.run(run_id).status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "killed (SIGKILL, out of memory?)" in store.run(run_id).error
