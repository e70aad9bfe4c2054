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
elif point == "register":  # the model directory is in place; its registration is next
    from data.store import Store
    Store.add_model_version = lambda *args, **kwargs: die()
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


def test_killed_between_writing_and_registering_the_model_nothing_lists_or_serves_it_and_resume_registers_it(
    store, snapshot, capsys
):
    """The model directory was renamed into models/ and the process died before the store knew
    of it: that folder used to be listed by /v1/models and served by `kettle generate`, and
    resume failed forever ("a model named ... already exists")."""
    import httpx

    from gpt.service import InProcessService
    from tests.gpt.test_server import RunningServer
    from tui.cli import main

    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    killed(run.id, "register")
    out = models_dir() / f"base-ft{run.id}"
    assert (out / "config.json").is_file() and store.model_versions()[0].name == "base"
    assert [m.name for m in StoreCatalog().models()] == ["base"]
    server = RunningServer(InProcessService("base", catalog=StoreCatalog()), None)
    try:
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == ["base"]
    finally:
        server.stop()
    with pytest.raises(KettleError, match=f"run {run.id} wrote this model but never registered it"):
        StoreCatalog().resolve(out.name)
    for model in (out.name, str(out)):
        assert main(["generate", model, "Hi", "--max-new-tokens", "1", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"`kettle finetune resume {run.id}`" in err, err

    resumed, steps = resume(run.id)
    assert steps == [] and resumed.status == "finished", resumed.error  # adopted, nothing trained again
    assert store.model_version(resumed.output_model_id).path == str(out)
    assert [m.name for m in StoreCatalog().models()] == [out.name, "base"]
    assert main(["generate", out.name, "Hi", "--max-new-tokens", "1", "--device", "cpu"]) == 0
    assert not (run_dir(run.id) / CHECKPOINT_DIR).exists() and temporaries() == []


# Runs `python -m finetune.jobs RUN_ID` as the app starts it, with the store failing from the
# moment the model directory is written: "locked" (another connection holds the write lock
# until this process ends) or "full" (every write transaction refused as on a full disk).
STORE_FAULT = r"""
import sqlite3, sys
import data.store, finetune.jobs as jobs

run_id, fault = int(sys.argv[1]), sys.argv[2]
data.store.BUSY_TIMEOUT_S = 0.2
jobs.STORE_WAIT_S = 0.5
write_model = jobs._write_model

def full(self):
    raise sqlite3.OperationalError("database or disk is full")

def write_then_fail(*args, **kwargs):
    write_model(*args, **kwargs)
    if fault == "locked":
        holder = sqlite3.connect(str(data.store.open_store().path), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        write_then_fail.holder = holder
    else:
        data.store.Store._begin_immediate = full

jobs._write_model = write_then_fail
sys.exit(jobs.main([str(run_id), "--no-progress"]))
"""


@pytest.mark.parametrize("fault, says", [("locked", "stayed locked"), ("full", "database or disk is full")])
def test_a_store_that_refuses_the_registration_fails_the_run_with_the_reason(store, snapshot, fault, says):
    """A store locked or full at registration used to print two lines and leave the run
    "running" until a reaper called it "killed?"; now the error is one line and the run ends
    failed with it (recorded by whoever reaps the process when the store could not be told)."""
    from finetune.jobs import reap_dead_runs

    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    done = subprocess.run(
        [sys.executable, "-c", STORE_FAULT, str(run.id), fault], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("kettle: error: the model could not be registered")
    assert says in done.stderr and f"kettle finetune resume {run.id}" in done.stderr
    assert reap_dead_runs(store) == [run.id]
    failed = store.run(run.id)
    assert failed.status == "failed" and says in failed.error and "killed" not in failed.error
    assert [m.name for m in StoreCatalog().models()] == ["base"]
    resumed, steps = resume(run.id)
    assert steps == [] and resumed.status == "finished"  # the finished training was kept


def test_a_store_locked_for_a_while_at_registration_only_delays_it(store, snapshot, monkeypatch):
    """An import holding the write lock past one busy timeout no longer costs a finished run."""
    import sqlite3
    import threading

    import data.store
    import finetune.jobs

    monkeypatch.setattr(data.store, "BUSY_TIMEOUT_S", 0.2)
    write_model = finetune.jobs._write_model
    holder = sqlite3.connect(str(store.path), isolation_level=None, check_same_thread=False)

    def write_then_lock(*args, **kwargs):
        write_model(*args, **kwargs)
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(1.0, holder.execute, ["ROLLBACK"]).start()

    monkeypatch.setattr(finetune.jobs, "_write_model", write_then_lock)
    run = create_run(store, JobSpec(model="base", snapshot_id=snapshot))
    assert execute(run.id, progress=False).status == "finished"
    holder.close()


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
