"""The store on a real SQLite file: tree, append-only labels, snapshots, models, runs, search."""

from __future__ import annotations

import gzip
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from data import schema
from data.records import DataFilter, content_hash
from data.store import open_store
from gpt.errors import KettleError
from tests.conftest import FIXTURES


def chat(store, system="", answer="Paris, I think."):
    conv = store.create_conversation("capitals", system_prompt=system)
    user = store.add_message(conv.id, "user", content="Capital of France?")
    bot = store.add_message(conv.id, "assistant", content=answer, parent_id=user.id)
    return conv, user, bot


def test_open_sets_wal_foreign_keys_and_records_migrations_by_name(tmp_path):
    names = [fn.__name__ for fn in schema.MIGRATIONS]
    with open_store(tmp_path / "k.db") as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10000
        assert s.applied_migrations() == names
    with open_store(tmp_path / "k.db") as s:  # reopening runs no migration twice
        assert s.conn.execute("SELECT name FROM _migrations ORDER BY rowid").fetchall() == [(name,) for name in names]


def test_default_path_is_under_kettle_home(kettle_home):
    with open_store() as s:
        assert s.path == kettle_home / "kettle.db"


def test_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KettleError, match="bad.db"):
        open_store(bad)


def test_newer_schema_is_refused(tmp_path):
    with open_store(tmp_path / "k.db") as s:
        s.conn.execute("INSERT INTO _migrations VALUES ('m999_from_a_newer_kettle', 0)")
    with pytest.raises(KettleError, match="newer"):
        open_store(tmp_path / "k.db")


def test_regenerating_makes_a_sibling_and_threads_follow_the_branch(store):
    conv, user, first = chat(store)
    second = store.add_message(conv.id, "assistant", content="Paris.", parent_id=user.id)
    assert [m.id for m in store.siblings(first.id)] == [first.id, second.id]
    assert store.conversation(conv.id).leaf_id == second.id
    follow = store.add_message(conv.id, "user", content="And Italy?", parent_id=first.id)
    store.set_leaf(conv.id, first.id)  # a mid-branch message: followed down to its reply
    assert [m.id for m in store.current_thread(conv.id)] == [user.id, first.id, follow.id]
    assert store.message(first.id).content == "Paris, I think."
    with pytest.raises(sqlite3.IntegrityError, match="never rewritten"):
        store.conn.execute("UPDATE messages SET content = 'changed' WHERE id = ?", (first.id,))


def test_message_records_generation_details(store):
    conv = store.create_conversation()
    user = store.add_message(conv.id, "user", content="hi")
    result = {
        "text": "hello",
        "finish_reason": "stop",
        "prompt_tokens": 5,
        "new_tokens": 2,
        "dropped_tokens": 0,
        "ttft_s": 0.01,
        "tokens_per_s": 50.0,
        "seed": 42,
    }
    version = store.add_model_version("base", "/models/base", kind="imported")
    msg = store.add_message(
        conv.id,
        "assistant",
        content="hello",
        parent_id=user.id,
        model_version_id=version.id,
        model="base",
        params={"temperature": 0.7},
        generation=result,
    )
    assert (msg.seed, msg.new_tokens, msg.finish_reason, msg.params) == (42, 2, "stop", {"temperature": 0.7})
    assert msg.model_version_id == version.id


def test_bad_messages_are_refused(store):
    conv = store.create_conversation()
    other = store.create_conversation()
    foreign = store.add_message(other.id, "user", content="elsewhere")
    with pytest.raises(KettleError, match="role"):
        store.add_message(conv.id, "robot", content="x")
    with pytest.raises(KettleError, match="not in conversation"):
        store.add_message(conv.id, "assistant", content="x", parent_id=foreign.id)
    with pytest.raises(KettleError, match="no conversation"):
        store.add_message(12345, "user", content="x")


def test_label_edited_three_times_has_three_rows_and_one_current(store):
    _, _, bot = chat(store)
    store.set_label(bot.id, thumb=1, tags=["geo"])
    store.set_label(bot.id, score=4)
    store.set_label(bot.id, ideal="Paris.", note="too unsure")
    history = store.label_history(bot.id)
    assert len(history) == 3
    current = store.label(bot.id)
    assert (current.thumb, current.score, current.tags, current.ideal, current.note) == (
        1,
        4,
        ["geo"],
        "Paris.",
        "too unsure",
    )
    assert store.conn.execute("SELECT COUNT(*) FROM current_labels WHERE message_id = ?", (bot.id,)).fetchone()[0] == 1
    assert store.message(bot.id).content == "Paris, I think."  # the original is kept


def test_removing_a_label_appends_a_row_and_history_cannot_be_rewritten(store):
    _, _, bot = chat(store)
    store.set_label(bot.id, thumb=-1)
    store.clear_label(bot.id)
    assert store.label(bot.id) is None
    assert [h.thumb for h in store.label_history(bot.id)] == [-1, None]
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.conn.execute("UPDATE labels SET thumb = 1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.conn.execute("DELETE FROM labels")


def test_label_validation(store):
    _, user, bot = chat(store)
    for kwargs in ({"thumb": 2}, {"score": 6}, {"score": True}, {"tags": "geo"}):
        with pytest.raises(KettleError):
            store.set_label(bot.id, **kwargs)
    with pytest.raises(KettleError, match="only assistant"):
        store.set_label(user.id, ideal="x")
    assert store.label_history(bot.id) == []


def test_snapshot_is_unchanged_by_a_later_label_edit(store):
    _, _, bot = chat(store, system="Be terse.")
    store.set_label(bot.id, ideal="Paris.")
    snap = store.create_snapshot(name="v1")
    before = store.snapshot_examples(snap.id)
    assert before == [
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
            ]
        }
    ]
    store.set_label(bot.id, ideal="It is Paris.")
    store.set_label(bot.id, excluded=True)
    assert store.snapshot_examples(snap.id) == before
    assert store.snapshot(snap.id).content_hash == snap.content_hash
    assert store.verify_snapshot(snap.id)
    assert store.create_snapshot().n_examples == 0  # excluded now
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        store.conn.execute("UPDATE snapshot_rows SET data = '{}'")
    with pytest.raises(sqlite3.IntegrityError, match="immutable"):
        store.conn.execute("DELETE FROM snapshots")


def test_content_hash_is_the_same_for_the_same_content_and_differs_for_different_content(store):
    _, _, bot = chat(store)
    store.set_label(bot.id, thumb=1)
    first = store.create_snapshot()
    assert store.create_snapshot().content_hash == first.content_hash
    # The stored digest is the sha256 of the canonical JSON of what was frozen.
    assert first.content_hash == content_hash(
        {"examples": store.snapshot_examples(first.id), "pairs": store.snapshot_pairs(first.id)}
    )
    store.set_label(bot.id, ideal="Paris.")  # one answer's text changes
    second = store.create_snapshot()
    assert second.content_hash != first.content_hash
    # reuse looks snapshots up by hash: different content must not be taken for the old one
    assert store.create_snapshot(reuse=True).id == second.id
    store.set_label(bot.id, ideal="Paris, I think.")  # back to the first text: the first hash
    assert store.create_snapshot(reuse=True).id == first.id
    assert content_hash({"a": 1, "b": [2]}) == content_hash({"b": [2], "a": 1})
    assert len({content_hash(v) for v in ({"a": 1}, {"a": 2}, {"b": 1}, [1], "é")}) == 5


def test_filter_thumbs_scores_tags_and_exclusions(store):
    conv = store.create_conversation()
    answers = {}
    for name in ("up", "down", "scored", "tagged", "private", "plain"):
        user = store.add_message(conv.id, "user", content=f"q {name}")
        answers[name] = store.add_message(conv.id, "assistant", content=f"a {name}", parent_id=user.id)
    store.set_label(answers["up"].id, thumb=1, tags=["geo"])
    store.set_label(answers["down"].id, thumb=-1)
    store.set_label(answers["scored"].id, score=4)
    store.set_label(answers["tagged"].id, thumb=1, tags=["skip"])
    store.set_label(answers["private"].id, thumb=1, excluded=True)

    def chosen(**kw):
        return [e["example"]["messages"][-1]["content"] for e in store.dataset(DataFilter(**kw))[0]]

    assert chosen() == ["a up", "a tagged"]
    assert chosen(min_score=4) == ["a up", "a scored", "a tagged"]
    assert chosen(tags_exclude=["skip"]) == ["a up"]
    assert chosen(tags_include=["skip"]) == ["a tagged"]
    assert chosen(all_answers=True) == ["a up", "a scored", "a tagged", "a plain"]
    with pytest.raises(KettleError):
        DataFilter(min_score=9)


def test_multi_turn_branch_makes_one_example_and_unchosen_turns_get_weight_zero(store):
    conv = store.create_conversation()
    u1 = store.add_message(conv.id, "user", content="one")
    a1 = store.add_message(conv.id, "assistant", content="bad one", parent_id=u1.id)
    u2 = store.add_message(conv.id, "user", content="two", parent_id=a1.id)
    a2 = store.add_message(conv.id, "assistant", content="good two", parent_id=u2.id)
    store.set_label(a2.id, thumb=1)
    examples, _ = store.dataset()
    assert [e["example"] for e in examples] == [
        {
            "messages": [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "bad one", "weight": 0},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "good two"},
            ]
        }
    ]
    store.set_label(a1.id, ideal="good one")
    examples, _ = store.dataset()
    assert len(examples) == 1 and examples[0]["example"]["messages"][1] == {"role": "assistant", "content": "good one"}
    store.set_label(u1.id, excluded=True)  # excluding a message drops every example through it
    assert store.dataset()[0] == []


def test_preference_pairs_from_corrections_and_sibling_votes(store):
    conv, user, bot = chat(store)
    other = store.add_message(conv.id, "assistant", content="London.", parent_id=user.id)
    store.set_label(bot.id, thumb=1)
    store.set_label(other.id, thumb=-1)
    _, pairs = store.dataset()
    assert [p["pair"] for p in pairs] == [
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris, I think."}],
            "rejected": [{"role": "assistant", "content": "London."}],
        }
    ]
    store.set_label(bot.id, ideal="Paris.")
    _, pairs = store.dataset()
    assert [(p["pair"]["chosen"][0]["content"], p["pair"]["rejected"][0]["content"]) for p in pairs] == [
        ("Paris.", "Paris, I think."),
        ("Paris.", "London."),
    ]


def test_deleted_conversations_leave_lists_search_and_datasets(store):
    conv, _, bot = chat(store)
    store.set_label(bot.id, thumb=1)
    store.delete_conversation(conv.id)
    assert store.list_conversations() == []
    assert store.search("France") == []
    assert store.dataset()[0] == []
    assert store.label(bot.id).thumb == 1
    store.restore_conversation(conv.id)
    assert [c.id for c in store.list_conversations()] == [conv.id]


def test_list_conversations_newest_first_with_counts(store):
    first, _, _ = chat(store)
    second = store.create_conversation("later")
    assert [c.id for c in store.list_conversations()] == [second.id, first.id]
    store.add_message(first.id, "user", content="bump")  # new activity moves it to the top
    listed = store.list_conversations()
    assert [c.id for c in listed] == [first.id, second.id]
    assert listed[0].message_count == 3
    updated = store.update_conversation(second.id, title="renamed", params={"temperature": 0})
    assert (updated.title, updated.params) == ("renamed", {"temperature": 0})


def test_search_matches_words_and_ignores_fts_syntax(store):
    chat(store, answer="The capital is Paris.")
    assert sorted(h.role for h in store.search("capitals")) == ["assistant", "user"]  # stemmed
    hits = store.search("capital paris")  # every word required
    assert [h.role for h in hits] == ["assistant"]
    assert "[Paris]" in hits[0].snippet
    assert store.search('paris" OR -(') == []
    assert store.search("   ") == []


def test_model_versions_lineage_and_activation(store):
    assert store.active_model() is None
    base = store.add_model_version("gpt2", "/m/gpt2", kind="downloaded")
    _, _, bot = chat(store)
    store.set_label(bot.id, thumb=1)
    snap = store.create_snapshot()
    run = store.create_run("finetune", model_version_id=base.id, snapshot_id=snap.id)
    tuned = store.add_model_version(
        "gpt2-ft1",
        "/m/ft1",
        kind="finetuned",
        parent_id=base.id,
        snapshot_id=snap.id,
        run_id=run.id,
        hparams={"lr": 5e-5},
    )
    store.activate_model(base.id)
    store.activate_model(tuned.id)
    assert store.active_model().name == "gpt2-ft1"
    assert [v.name for v, _ in store.activations()] == ["gpt2-ft1", "gpt2"]
    assert [v.name for v in store.lineage(tuned.id)] == ["gpt2-ft1", "gpt2"]
    updated = store.update_model_version(tuned.id, metrics={"val_loss": 2.5}, status="regressed")
    assert (updated.status, updated.metrics, updated.hparams) == ("regressed", {"val_loss": 2.5}, {"lr": 5e-5})
    assert store.model_version("gpt2").id == base.id
    with pytest.raises(KettleError, match="already exists"):
        store.add_model_version("gpt2", "/elsewhere", kind="imported")
    with pytest.raises(KettleError, match="kind"):
        store.add_model_version("x", "/x", kind="magic")
    with pytest.raises(KettleError, match="unknown parent"):
        store.add_model_version("orphan", "/x", kind="finetuned", parent_id=999)


def test_a_model_registered_as_failed_is_never_made_active_on_its_own(store, tmp_path):
    """A starter that failed its own check: recorded, not chatted with; brewed again and passing,
    the same directory's version becomes ok and, with no model active, the active one."""
    version, activated = store.register_model(tmp_path / "starter", "starter", status="failed", note="too few")
    assert not activated and store.active_model() is None
    assert (version.status, version.note) == ("failed", "too few")
    version, activated = store.register_model(tmp_path / "starter", "starter", metrics={"own": 9}, status="ok", note="")
    assert activated and store.active_model().id == version.id
    assert (version.status, version.note, version.metrics) == ("ok", "", {"own": 9})


def test_run_lifecycle_and_metrics(store, tmp_path):
    run = store.create_run("lora", config={"r": 8}, total_steps=3, log_path=tmp_path / "log")
    assert run.status == "queued" and run.started_at is None
    run = store.update_run(run.id, status="running", pid=1234)
    assert run.started_at is not None and run.pid == 1234
    for step, loss in enumerate([3.0, 2.5, 2.0], start=1):
        store.log_metrics(run.id, step, metrics={"loss": loss})
    assert store.run(run.id).step == 3
    assert store.run_metrics(run.id) == [(1, {"loss": 3.0}), (2, {"loss": 2.5}), (3, {"loss": 2.0})]
    run = store.update_run(run.id, status="failed", error="out of memory")
    assert (run.status, run.error, run.finished_at is not None) == ("failed", "out of memory", True)
    assert [r.id for r in store.runs(status="failed")] == [run.id]
    with pytest.raises(KettleError, match="status"):
        store.update_run(run.id, status="exploded")
    with pytest.raises(KettleError, match="no training run"):
        store.log_metrics(999, 1, metrics={"loss": 1.0})


def test_transaction_rolls_back_everything(store):
    conv = store.create_conversation()
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_message(conv.id, "user", content="lost")
            store.add_message(conv.id, "user", content="lost too")
            raise RuntimeError
    assert store.messages(conv.id) == []


def test_store_is_shared_safely_by_threads(store):
    conv = store.create_conversation()
    errors = []

    def writer(n):
        try:
            for i in range(50):
                msg = store.add_message(conv.id, "user", content=f"{n}-{i}")
                store.set_label(msg.id, score=1 + i % 5)
                store.list_conversations()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.messages(conv.id)) == 200
    assert store.stats()["scored"] == 200


def test_forward_migrations_run_on_open(tmp_path, monkeypatch):
    path = tmp_path / "old.db"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    with open_store(path) as old:  # a database from before full-text search existed
        assert old.applied_migrations() == ["m001_core"]
        conv = old.create_conversation()
        old.add_message(conv.id, "user", content="an old kettle message")
    monkeypatch.undo()
    with open_store(path) as new:
        assert new.applied_migrations() == [fn.__name__ for fn in schema.MIGRATIONS]
        assert [h.snippet for h in new.search("kettle")] == ["an old [kettle] message"]


def test_each_migration_runs_once(tmp_path, monkeypatch):
    calls = []

    def counted(fn):
        def run(db):
            calls.append(fn.__name__)
            fn(db)

        run.__name__ = fn.__name__
        return run

    monkeypatch.setattr(schema, "MIGRATIONS", [counted(fn) for fn in schema.MIGRATIONS])
    for _ in range(3):
        open_store(tmp_path / "k.db").close()
    assert calls == [fn.__name__ for fn in schema.MIGRATIONS]


@pytest.fixture
def numbered_db(tmp_path) -> Path:
    """A database as Kettle wrote it before named migrations (commit d84083b, schema_version 3):
    a chat with a corrected, up-voted answer, a snapshot of it, a model version made active, and
    a finished fine-tuning run with one logged step."""
    path = tmp_path / "kettle.db"
    path.write_bytes(gzip.decompress((FIXTURES / "kettle-schema-3.db.gz").read_bytes()))
    return path


def test_a_database_from_numbered_migrations_opens_with_its_rows(numbered_db):
    old = sqlite3.connect(numbered_db)
    versions = old.execute("SELECT version, applied_at FROM schema_version").fetchall()
    old.close()
    with open_store(numbered_db) as store:
        assert store.conn.execute("SELECT * FROM _migrations ORDER BY rowid").fetchall()[: len(versions)] == [
            (schema.NUMBERED_MIGRATIONS[v - 1], at) for v, at in versions
        ]  # times kept (the named migrations since follow)
        assert not store.db["schema_version"].exists()  # one record of what was applied
        assert store.applied_migrations() == [fn.__name__ for fn in schema.MIGRATIONS]
        assert store.integrity_check() == "ok"
        conv = store.list_conversations()[0]
        user, bot = store.current_thread(conv.id)
        assert (conv.title, conv.system_prompt) == ("capitals", "Be brief.")
        assert (user.content, bot.content, bot.model, bot.params) == (
            "Capital of France?",
            "Paris, I think.",
            "tiny",
            {"temperature": 0.7},
        )
        label = store.label(bot.id)
        assert (label.thumb, label.tags, label.ideal) == (1, ["geo"], "Paris.")
        [snap] = store.snapshots()
        assert snap.name == "first" and store.verify_snapshot(snap.id)
        assert store.snapshot_examples(snap.id) == [e["example"] for e in store.dataset()[0]]
        assert store.active_model().name == "tiny"
        [run] = store.runs()
        assert run.status == "finished" and store.run_metrics(run.id) == [(1, {"loss": 1.5})]
        assert [h.message_id for h in store.search("Paris")] == [bot.id]
        new = store.add_message(conv.id, "user", content="And of Italy?", parent_id=bot.id)  # it still takes writes
    with open_store(numbered_db) as store:
        assert store.message(new.id).content == "And of Italy?"


def test_named_migrations_build_what_the_numbered_ones_did(numbered_db, tmp_path):
    def schema_sql(store):
        return store.conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE tbl_name != '_migrations' ORDER BY name"
        ).fetchall()

    with open_store(numbered_db) as old, open_store(tmp_path / "new.db") as new:
        assert schema_sql(old) == schema_sql(new)


def test_a_numbered_database_newer_than_the_numbering_is_refused(numbered_db):
    old = sqlite3.connect(numbered_db)
    old.execute("INSERT INTO schema_version VALUES (4, 0)")
    old.commit()
    old.close()
    with pytest.raises(KettleError, match="newer"):
        open_store(numbered_db)


def test_orphaned_running_runs_are_marked_failed(store):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = store.update_run(store.create_run("finetune").id, status="running", pid=gone.pid)
    live = store.update_run(store.create_run("finetune").id, status="running", pid=os.getpid())
    assert [r.id for r in store.fail_orphaned_runs()] == [dead.id]
    assert store.run(dead.id).status == "failed" and "ended without reporting" in store.run(dead.id).error
    assert store.run(live.id).status == "running"


def test_down_votes_only_train_through_a_correction(store):
    conv, user, bot = chat(store)
    store.set_label(bot.id, thumb=-1, score=5)
    assert store.dataset(DataFilter(min_score=3, all_answers=True))[0] == []
    store.set_label(bot.id, ideal="Paris.")
    assert [e["message_id"] for e in store.dataset()[0]] == [bot.id]
    other = store.add_message(conv.id, "assistant", content="unlabelled", parent_id=user.id)
    assert other.id not in [
        e["message_id"] for e in store.dataset(DataFilter(all_answers=True, tags_include=("x",)))[0]
    ]
    with pytest.raises(KettleError, match="excluded"):
        store.set_label(bot.id, excluded="yes")


def test_an_error_caught_inside_a_transaction_undoes_only_the_inner_block(store):
    conv = store.create_conversation()
    with store.transaction():
        store.add_message(conv.id, "user", content="kept")
        with pytest.raises(KettleError):
            with store.transaction():
                store.add_message(conv.id, "user", content="undone")
                store.add_message(conv.id, "robot", content="bad role")
    assert [m.content for m in store.messages(conv.id)] == ["kept"]


def test_a_refused_write_is_a_clear_error(store, tmp_path):
    conv = store.create_conversation()
    store.conn.execute("PRAGMA query_only = ON")  # stands in for a read-only or full disk
    with pytest.raises(KettleError, match="refused a write"):
        store.add_message(conv.id, "user", content="x")
    store.conn.execute("PRAGMA query_only = OFF")
    store.add_message(conv.id, "user", content="x")


@pytest.fixture
def read_only_home(kettle_home, tmp_path):
    """KETTLE_HOME with a store in it, then made read-only: a read-only bind mount when
    running as root (which file modes do not stop), else the folders' and files' modes."""
    import subprocess

    with open_store() as store:
        conv = store.create_conversation()
        store.add_message(conv.id, "user", content="How do I brew tea in a kettle?")
    if os.geteuid() != 0:
        for path in [kettle_home, *kettle_home.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        yield kettle_home
        for path in [kettle_home, *kettle_home.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        return
    mount = tmp_path / "read-only-home"
    mount.mkdir()
    if subprocess.run(["mount", "--bind", str(kettle_home), str(mount)]).returncode:
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], check=True)
        os.environ["KETTLE_HOME"] = str(mount)
        yield mount
    finally:
        os.environ["KETTLE_HOME"] = str(kettle_home)
        subprocess.run(["umount", str(mount)], check=True)  # fails while a file stays open


def test_a_read_only_home_can_still_be_read(read_only_home, capsys):
    from tui.cli import main

    with pytest.raises(OSError):
        (read_only_home / "probe").write_text("x")  # it really is read-only
    assert main(["data", "stats"]) == 0
    assert main(["data", "search", "kettle"]) == 0
    assert "brew tea" in capsys.readouterr().out
    with open_store(read_only=True) as store:
        assert store.search("kettle")
    assert sorted(p.name for p in read_only_home.iterdir()) == ["kettle.db", "models"]
    with pytest.raises(KettleError, match="cannot|read-only|readonly"):
        with open_store() as store:
            store.create_conversation()


def test_reading_a_home_with_nothing_stored_yet_creates_nothing(kettle_home, capsys):
    from tui.cli import main

    assert main(["data", "stats"]) == 0 and main(["data", "search", "tea"]) == 0
    assert "no matches" in capsys.readouterr().out
    assert not (kettle_home / "kettle.db").exists()


def test_a_snapshot_refuses_every_change_from_the_sqlite3_shell(store):
    """A plain INSERT into snapshot_rows used to change what a snapshot exported and trained on
    while `snapshot list` showed the old count and hash. The sqlite3 shell enforces no foreign
    keys: the triggers must hold without them."""
    _, _, bot = chat(store)
    store.set_label(bot.id, ideal="Paris.")
    snap = store.create_snapshot()
    shell = sqlite3.connect(store.path)  # foreign_keys off, as the sqlite3 shell has it
    for sql in (
        f"INSERT INTO snapshot_rows (snapshot_id, kind, position, data) VALUES ({snap.id}, 'example', 1, '{{}}')",
        "UPDATE snapshot_rows SET position = 5",
        "DELETE FROM snapshot_rows",
        "UPDATE snapshots SET sealed = 0",
        "UPDATE snapshots SET id = 99",
        "DELETE FROM snapshots",
        "DELETE FROM conversations",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="immutable|never deleted"):
            shell.execute(sql)
    shell.close()
    assert store.verify_snapshot(snap.id) and len(store.snapshot_examples(snap.id)) == 1
    assert store.conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2


def test_a_replace_from_the_sqlite3_shell_changes_no_snapshot_and_no_history(store):
    """REPLACE (INSERT OR REPLACE) deletes the row it collides with without firing DELETE triggers:
    `REPLACE INTO snapshots` rewrote a sealed snapshot's count and hash and unsealed it, so a plain
    INSERT then added rows to it; a row moved to an unsealed snapshot left the sealed one."""
    _, user, bot = chat(store)
    label = store.set_label(bot.id, ideal="Paris.")
    snap = store.create_snapshot()
    shell = sqlite3.connect(store.path)  # foreign_keys off, as the sqlite3 shell has it
    row_id = shell.execute("SELECT id FROM snapshot_rows").fetchone()[0]
    shell.execute("INSERT INTO snapshots (filter, content_hash, n_examples, n_pairs, created_at, sealed)"
                  " VALUES ('{}', 'new', 0, 0, 0, 0)")  # fmt: skip
    new = shell.execute("SELECT MAX(id) FROM snapshots").fetchone()[0]
    for sql in (
        f"REPLACE INTO snapshots (id, filter, content_hash, n_examples, n_pairs, created_at, sealed)"
        f" VALUES ({snap.id}, '{{}}', 'forged', 7, 0, 0, 0)",
        f"REPLACE INTO snapshot_rows (id, snapshot_id, kind, position, data)"
        f" VALUES ({row_id}, {new}, 'example', 0, '{{}}')",
        f"REPLACE INTO conversations (id, created_at, updated_at) VALUES ({bot.conversation_id}, 0, 0)",
        f"REPLACE INTO messages (id, conversation_id, role, content, created_at)"
        f" VALUES ({user.id}, {bot.conversation_id}, 'user', 'Capital of Spain?', 0)",
        f"REPLACE INTO labels (id, message_id, ideal, created_at) VALUES ({label.id}, {bot.id}, 'Lyon.', 0)",
        f"UPDATE messages SET id = 999 WHERE id = {user.id}",
        f"UPDATE conversations SET id = 999 WHERE id = {bot.conversation_id}",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="immutable|never replaced|never renumbered"):
            shell.execute(sql)
    shell.close()
    assert store.verify_snapshot(snap.id) and len(store.snapshot_examples(snap.id)) == 1
    assert [s.content_hash for s in store.snapshots() if s.id == snap.id] == [snap.content_hash]
    assert (
        store.conn.execute("SELECT content FROM messages WHERE id = ?", (user.id,)).fetchone()[0]
        == "Capital of France?"
    )
    assert store.conn.execute("SELECT ideal FROM current_labels").fetchone()[0] == "Paris."


def test_a_snapshot_whose_rows_were_changed_is_an_error_on_read(store):
    _, _, bot = chat(store)
    store.set_label(bot.id, ideal="Paris.")
    snap = store.create_snapshot()
    # what only a damaged file or someone dropping the guard can do
    store.conn.execute("DROP TRIGGER snapshot_rows_no_update")
    store.conn.execute("""UPDATE snapshot_rows SET data = replace(data, 'Paris.', 'Lyon.')""")
    assert not store.verify_snapshot(snap.id)
    for read in (store.snapshot_examples, store.snapshot_pairs, store.snapshot_data):
        with pytest.raises(KettleError, match=f"snapshot {snap.id} no longer matches its sha256"):
            read(snap.id)


def test_backup_while_writing_holds_everything_committed(store, tmp_path):
    conv = store.create_conversation("busy")
    committed: list[int] = []
    stop = threading.Event()

    def write():
        with open_store(store.path) as writer:
            while not stop.is_set():
                committed.append(writer.add_message(conv.id, "user", content=f"q{len(committed)}").id)

    thread = threading.Thread(target=write)
    thread.start()
    while len(committed) < 20:
        time.sleep(0.01)
    before = list(committed)
    out = store.backup(tmp_path / "copy.db")
    stop.set()
    thread.join()
    assert not list(tmp_path.glob(".copy.db.*"))  # nothing temporary left beside it
    with open_store(out, read_only=True) as copy:
        assert copy.integrity_check() == "ok"
        ids = {row[0] for row in copy.conn.execute("SELECT id FROM messages")}
    assert set(before) <= ids and ids <= set(committed)
    assert not (tmp_path / "copy.db-wal").exists()  # one self-contained file


def test_a_reading_command_upgrades_an_older_database_it_can_write(numbered_db):
    with open_store(numbered_db, read_only=True) as store:
        assert store.applied_migrations() == [fn.__name__ for fn in schema.MIGRATIONS]
        assert store.verify_snapshot(store.snapshots()[0].id)


def test_a_nul_in_a_search_separates_words_instead_of_breaking_the_query(store):
    """A NUL inside FTS5's quoted word ended the query: "unterminated string" from sqlite."""
    chat(store, answer="The capital is Paris.")
    assert [h.role for h in store.search("capital\x00paris")] == ["assistant"]
    assert store.search("\x00") == [] and store.search("paris\x00") != []


def test_a_search_limit_past_sqlites_integers_is_no_limit(store):
    """limit=10**20 was an OverflowError from sqlite3 (`kettle data search --limit`)."""
    chat(store)
    assert len(store.search("capital", limit=10**20)) == 1


@pytest.mark.parametrize(
    "write, says",
    [
        (lambda s, conv, bot: s.set_label(bot.id, tags=["ok", "\ud800"]), "a tag holds a lone surrogate '\\ud800'"),
        (lambda s, conv, bot: s.set_label(bot.id, note="fine \udfff"), "the note holds a lone surrogate"),
        (lambda s, conv, bot: s.set_label(bot.id, ideal="\udc80"), "the corrected answer holds"),
        (lambda s, conv, bot: s.add_message(conv.id, "user", content="\ud83d"), "the message holds"),
        (lambda s, conv, bot: s.create_conversation("\ud800"), "the title holds"),
        (lambda s, conv, bot: s.update_conversation(conv.id, system_prompt="\ud800"), "the system prompt holds"),
        (lambda s, conv, bot: s.search("paris \ud800"), "the search holds"),
    ],
)
def test_text_holding_a_lone_surrogate_is_refused_by_name(store, write, says):
    """A lone surrogate (JSON's "\\ud800", a broken paste) reached sqlite3 as a
    UnicodeEncodeError from deep inside it; now the store names the field, and writes nothing."""
    conv, _, bot = chat(store)
    before = list(store.conn.iterdump())
    with pytest.raises(KettleError, match=says.replace("\\", "\\\\")) as refused:
        write(store, conv, bot)
    assert "(not a character)" in str(refused.value)
    assert list(store.conn.iterdump()) == before


def test_a_missing_current_labels_view_is_made_again(tmp_path):
    """Without its view (a hand-run DROP VIEW), `data stats`, `data export` and every label
    read failed with "no such table: current_labels". A view holds no data: the store makes it
    again, in the file when it may write, else for the reading connection only."""
    path = tmp_path / "k.db"
    with open_store(path) as s:
        _, _, bot = chat(s)
        s.set_label(bot.id, thumb=1)
        s.set_label(bot.id, score=4)
    with sqlite3.connect(path) as con:
        con.execute("DROP VIEW current_labels")
    views = "SELECT name FROM sqlite_master WHERE type = 'view'"
    with open_store(path, read_only=True) as s:
        assert (s.stats()["thumbs_up"], s.stats()["scored"], s.label(bot.id).score) == (1, 1, 4)
    with sqlite3.connect(path) as con:
        assert con.execute(views).fetchall() == []  # reading changed nothing
    with open_store(path) as s:
        assert s.label(bot.id).thumb == 1 and len(s.dataset()[0]) == 1
    with sqlite3.connect(path) as con:
        assert con.execute(views).fetchall() == [("current_labels",)]
