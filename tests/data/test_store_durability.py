"""Crashes and concurrent processes against a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

from data.formats import import_file
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


IMPORTER = textwrap.dedent("""
    import sys
    from data.formats import import_file
    from data.store import open_store
    import_file(open_store(sys.argv[1]), sys.argv[2])
""")


def alpaca_file(path, n: int):
    path.write_text(
        json.dumps([{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(n)])
    )
    return path


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


def test_a_long_import_lets_other_writers_in_and_shows_nothing_until_it_ends(tmp_path):
    """An import held the write lock from its first record to its last (11,000 records: a
    minute), so a fine-tune logging its metrics failed and the app's label writes were refused.
    Now it commits in short batches, its conversations hidden until the last one."""
    path = tmp_path / "kettle.db"
    with open_store(path) as store:
        conv = store.create_conversation("mine")
        user = store.add_message(conv.id, "user", content="q")
        answer = store.add_message(conv.id, "assistant", content="a", parent_id=user.id)
        run = store.create_run("finetune")
    source = alpaca_file(tmp_path / "long.json", 10_000)  # seconds on a fast machine, so several writes land
    started, written, finished, errors = threading.Event(), threading.Event(), threading.Event(), []

    def progress(done: int, total: int) -> None:
        started.set()
        if done == total:  # the last record is written: the import shows them all next
            written.set()

    def run_import():
        try:
            with open_store(path) as importer:
                import_file(importer, source, progress=progress)
        except BaseException as exc:
            errors.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=run_import)
    thread.start()
    assert started.wait(60), errors
    waits, landed, shown = [], 0, set()
    with open_store(path) as other:  # another connection: the app, or a training run
        while not finished.is_set():
            begun = time.monotonic()
            other.set_label(answer.id, score=1 + len(waits) % 5)
            other.log_metrics(run.id, len(waits) + 1, metrics={"loss": 1.0})
            waits.append(time.monotonic() - begun)
            landed += not finished.is_set()
            seen = (len(other.list_conversations()), len(other.dataset()[0]), len(other.search("Question")))
            if not written.is_set():  # so certainly read before the import ended
                shown.add(seen)
            time.sleep(0.05)
        thread.join()
        assert errors == []
        assert landed >= 3 and max(waits) < 2.0, waits  # they got in while the import ran
        assert shown == {(1, 0, 0)}  # and saw none of it
        assert len(other.list_conversations(limit=20_000)) == 10_001 and len(other.dataset()[0]) == 10_000
        assert len(other.label_history(answer.id)) == len(other.run_metrics(run.id)) == len(waits)
        assert other.integrity_check() == "ok"


def test_a_killed_import_shows_nothing_and_the_next_import_clears_it_away(tmp_path):
    path = tmp_path / "kettle.db"
    open_store(path).close()
    child = spawn(IMPORTER, path, alpaca_file(tmp_path / "long.json", 20_000))
    raw = sqlite3.connect(path)
    deadline = time.monotonic() + 60
    while raw.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] < 200:  # some batches are in
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with open_store(path) as store:
        assert store.list_conversations() == [] and store.dataset() == ([], []) and store.search("Question") == []
        # nor do its counts: `kettle data stats` and the dataset screen said thousands of deleted
        # conversations, messages and corrections the user never had
        assert {k: v for k, v in store.stats().items() if v} == {}
        report = import_file(store, alpaca_file(tmp_path / "short.json", 2))
        assert report.conversations == 2
        stats = store.stats()
        assert (stats["conversations"], stats["deleted_conversations"], stats["messages"], stats["label_rows"]) == (
            2,
            0,
            4,
            2,
        )
        assert raw.execute("SELECT COUNT(*) FROM pending_imports").fetchone()[0] == 0
        assert store.integrity_check() == "ok"
    raw.close()
