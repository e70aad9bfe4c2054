"""`kettle data ...` end to end on the KETTLE_HOME database."""

from __future__ import annotations

import json
from pathlib import Path

from data.store import open_store
from tests.conftest import SHARED_DATA
from tui.cli import main


def test_import_snapshot_export_search_and_stats(tmp_path, capsys):
    source = SHARED_DATA / "instruction-data.json"
    assert main(["data", "import", str(source)]) == 0
    assert "imported 1,100 conversations (2,200 messages)" in capsys.readouterr().out

    with open_store() as store:  # a label made in the app before freezing
        conv = store.list_conversations(limit=1)[0]
        answer = store.current_thread(conv.id)[-1]
        store.set_label(answer.id, tags=["skip"])

    assert main(["data", "snapshot", "create", "--name", "first", "--exclude-tag", "skip"]) == 0
    assert "snapshot 1 (first): 1,099 examples" in capsys.readouterr().out
    assert main(["data", "snapshot", "list"]) == 0
    assert "first" in capsys.readouterr().out

    out = tmp_path / "out.jsonl"
    assert main(["data", "export", "--format", "openai", "--snapshot", "1", str(out)]) == 0
    assert "wrote 1,099 openai records from snapshot 1" in capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1099 and json.loads(lines[0])["messages"][0]["role"] == "user"

    assert main(["data", "export", "--format", "dpo", str(tmp_path / "p.jsonl")]) == 0
    assert "skipped 1100: is an example, not a preference pair" in capsys.readouterr().out

    assert main(["data", "search", "spelling", "friend"]) == 0
    assert "[friend]" in capsys.readouterr().out

    assert main(["data", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["conversations"], stats["corrected"], stats["snapshots"]) == (1100, 1100, 1)


def test_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": 3}]}\n', encoding="utf-8")
    assert main(["data", "import", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kettle: error: ") and "bad.jsonl, line 1" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["data", "export", "--format", "alpaca", "--snapshot", "7", str(tmp_path / "x.json")]) == 1
    assert "no dataset snapshot with id 7" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_export_guards(tmp_path, capsys):
    out = tmp_path / "out.json"
    out.write_text("keep me")
    assert main(["data", "export", "--format", "alpaca", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["data", "export", "--format", "alpaca", "--force", str(out)]) == 0
    assert json.loads(out.read_text()) == []
    assert main(["data", "snapshot", "create"]) == 0
    assert "nothing chosen" in capsys.readouterr().out
    assert main(["data", "export", "--format", "alpaca", "--snapshot", "1", "--tag", "x", "--force", str(out)]) == 1
    assert "drop the filter options" in capsys.readouterr().err


def test_importing_twice_needs_again(tmp_path, capsys):
    source = tmp_path / "chat.jsonl"
    source.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
    )
    assert main(["data", "import", str(source)]) == 0
    assert main(["data", "import", str(source)]) == 1
    assert "--again" in capsys.readouterr().err
    assert main(["data", "import", "--again", str(source)]) == 0


def test_backup_and_a_tampered_snapshot(tmp_path, capsys):
    assert main(["data", "import", str(SHARED_DATA / "instruction-data.json")]) == 0
    assert main(["data", "snapshot", "create"]) == 0
    capsys.readouterr()

    out = tmp_path / "backup.db"
    assert main(["data", "backup", str(out)]) == 0
    assert capsys.readouterr().out == f"backed up 1,100 conversations, 2,200 messages to {out}\n"
    assert main(["data", "backup", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["data", "backup", str(tmp_path)]) == 1
    assert "is a folder; an export only replaces a regular file" in capsys.readouterr().err
    with open_store(out, read_only=True) as copy:
        assert copy.stats()["snapshots"] == 1 and copy.integrity_check() == "ok"

    with open_store() as store:  # rows changed where no trigger guards them any more
        store.conn.execute("DROP TRIGGER snapshot_rows_no_delete")
        store.conn.execute("DELETE FROM snapshot_rows WHERE position = 0")
    target = tmp_path / "out.jsonl"
    assert main(["data", "export", "--format", "openai", "--snapshot", "1", str(target)]) == 1
    err = capsys.readouterr().err
    assert "snapshot 1 no longer matches its sha256" in err and len(err.strip().splitlines()) == 1
    assert not target.exists()


def test_export_force_replaces_only_a_regular_file(tmp_path, capsys):
    """--force replaced whatever OUT was by a rename: a FIFO, a symbolic link (its target kept,
    the link gone), a device node (run as root, /dev/full became a file)."""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    target = tmp_path / "target.json"
    target.write_text("keep me")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "nowhere")
    folder = tmp_path / "folder"
    folder.mkdir()
    for out, kind in (
        (fifo, "a named pipe"),
        (link, "a symbolic link"),
        (dangling, "a symbolic link"),
        (folder, "a folder"),
        (Path("/dev/null"), "a device"),
    ):
        for force in (["--force"], []):
            assert main(["data", "export", "--format", "openai", *force, str(out)]) == 1
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"{out} is {kind}" in err[0] and "only replaces a regular file" in err[0]
    assert fifo.is_fifo() and link.is_symlink() and dangling.is_symlink() and folder.is_dir()
    assert target.read_text() == "keep me" and Path("/dev/null").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.json", "folder", "link.json", "pipe", "target.json"]


def test_search_takes_any_limit(capsys):
    """--limit 100000000000000000000 was an OverflowError traceback from sqlite3."""
    with open_store() as store:
        conv = store.create_conversation("tea")
        store.add_message(conv.id, "user", content="How do I brew tea in a kettle?")
    assert main(["data", "search", "kettle", "--limit", str(10**20)]) == 0
    assert "[kettle]" in capsys.readouterr().out


def test_stats_and_export_work_on_a_database_that_lost_its_view(kettle_home, tmp_path, capsys):
    """A database without its current_labels view: `data stats` and `data export` were
    tracebacks ("no such table: current_labels"); the view holds no data and is made again."""
    import sqlite3

    with open_store() as store:
        conv = store.create_conversation("tea")
        question = store.add_message(conv.id, "user", content="Tea?")
        answer = store.add_message(conv.id, "assistant", content="Boil water.", parent_id=question.id)
        store.set_label(answer.id, thumb=1)
    with sqlite3.connect(kettle_home / "kettle.db") as con:
        con.execute("DROP VIEW current_labels")
    assert main(["data", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["thumbs_up"] == 1
    out = tmp_path / "out.jsonl"
    assert main(["data", "export", "--format", "openai", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["messages"][-1]["content"] == "Boil water."
