"""Crashes and concurrent processes against a real SQLite file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from data.store import open_store
from tests.conftest import ROOT

LABEL_WRITER = textwrap.dedent("""
    import sys
    from data.store import open_store
    store = open_store(sys.argv[1])
    message_id = int(sys.argv[2])
    i = 0
    while True:
        i += 1
        label = store.set_label(message_id, score=1 + i % 5, note=f"write {i}")
        print(label.id, i, flush=True)
""")

APP_LIKE_WRITER = textwrap.dedent("""
    import sys
    from data.store import open_store
    store = open_store(sys.argv[1])
    n = int(sys.argv[2])
    print("ready", flush=True)
    conv = store.create_conversation("from the other process")
    parent = None
    for i in range(n):
        msg = store.add_message(conv.id, "user" if i % 2 == 0 else "assistant",
                                content=f"other {i}", parent_id=parent)
        parent = msg.id
        if msg.role == "assistant":
            store.set_label(msg.id, thumb=1)
        store.list_conversations()
    print("done", flush=True)
""")


def spawn(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_sigkill_while_writing_labels_loses_no_returned_write(tmp_path):
    path = tmp_path / "kettle.db"
    with open_store(path) as store:
        conv = store.create_conversation()
        user = store.add_message(conv.id, "user", content="q")
        answer = store.add_message(conv.id, "assistant", content="a", parent_id=user.id)
    child = spawn(LABEL_WRITER, path, answer.id)
    returned = []
    deadline = time.monotonic() + 30
    while len(returned) < 150 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        returned.append(tuple(map(int, line.split())))
    child.send_signal(signal.SIGKILL)  # mid-write: it never stops writing on its own
    child.wait()
    assert len(returned) >= 150, child.stderr.read()
    with open_store(path) as store:
        assert store.integrity_check() == "ok"
        rows = {h.id: h.note for h in store.label_history(answer.id)}
        for label_id, i in returned:
            assert rows.get(label_id) == f"write {i}"
        assert store.label(answer.id).id == max(rows)


def test_two_processes_read_and_write_at_once(tmp_path):
    path = tmp_path / "kettle.db"
    open_store(path).close()
    n = 300
    child = spawn(APP_LIKE_WRITER, path, n)
    assert child.stdout.readline().strip() == "ready", child.stderr.read()
    with open_store(path) as store:  # this process plays the training job
        run = store.create_run("finetune", total_steps=n)
        store.update_run(run.id, status="running", pid=os.getpid())
        conv = store.create_conversation("this process")
        parent = None
        for step in range(1, n + 1):
            store.log_metrics(run.id, step, metrics={"loss": 1.0 / step})
            parent = store.add_message(conv.id, "user", content=f"mine {step}", parent_id=parent).id
            store.stats()
            if step % 50 == 0:
                store.create_snapshot()
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert "database is locked" not in err and out.strip() == "done"
        assert store.stats()["messages"] == 2 * n
        assert store.stats()["thumbs_up"] == n // 2
        assert len(store.run_metrics(run.id)) == n
        assert store.integrity_check() == "ok"
        # the two really ran at the same time: their writes interleave
        times = {c.title: [m.created_at for m in store.messages(c.id)] for c in store.list_conversations()}
        mine, other = times["this process"], times["from the other process"]
        assert min(other) < max(mine) and min(mine) < max(other)


def test_opening_does_not_wait_for_another_process_writing(tmp_path):
    path = tmp_path / "kettle.db"
    with open_store(path) as writer:
        with writer.transaction():  # e.g. a long import holds the write lock
            writer.create_conversation("in flight")
            start = time.monotonic()
            with open_store(path) as reader:
                assert reader.list_conversations() == []
            assert time.monotonic() - start < 1.0
