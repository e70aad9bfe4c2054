"""Everything a user says, labels and trains, in one SQLite file (sqlite-utils, no ORM).

What lives here:
- conversations, and their messages as a tree: every message knows its parent, so regenerating
  or editing an answer adds a sibling branch and never overwrites. Message content can never be
  changed (a trigger refuses it); assistant messages record the model, sampling parameters, seed,
  token counts and timings that produced them.
- labels as an append-only history (thumb, 1-5 score, tags, note, corrected "ideal" answer,
  excluded). Triggers refuse UPDATE and DELETE; changing or removing a label appends a row, and
  the `current_labels` view is the newest row per message.
- dataset snapshots: a `DataFilter` materialised into immutable, content-hashed examples in the one
  chat format, plus preference pairs (data/datasets.py renders them).
- model versions with lineage and an activation history; training runs with per-step metrics.
- full-text search over message content and corrected answers (FTS5, kept in sync by triggers).

Durability: WAL, synchronous=FULL (a committed label survives a crash or power loss), foreign keys
on, a 10 s busy timeout, and every write transaction starts with BEGIN IMMEDIATE, so two processes
(the app and a training job) wait for each other instead of failing with "database is locked".

Threads: one Store holds one connection, opened with check_same_thread=False; every public method
takes the Store's lock, so a Store may be shared by the app's worker threads. Separate processes
each open their own Store. `with store.transaction():` groups several calls into one atomic write.

The tables and their migrations are in data/schema.py, and the records the methods return
(dataclasses, times in Unix seconds, JSON columns decoded) in data/records.py. Get a Store with
`open_store()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import sqlite_utils

from data import schema
from data.datasets import render_dataset
from data.records import (
    Conversation,
    DataFilter,
    Label,
    Message,
    ModelVersion,
    Run,
    SearchHit,
    Snapshot,
    canonical_json,
    clean_tags,
    storable_text,
)
from gpt.errors import KettleError
from gpt.files import atomic_file, process_alive, remove_stale_temporaries

ROLES = ("system", "user", "assistant")
MODEL_KINDS = ("imported", "downloaded", "pretrained", "finetuned", "starter")
RUN_STATUSES = ("queued", "running", "finished", "failed", "cancelled")
FINISHED_RUN_STATUSES = ("finished", "failed", "cancelled")
BUSY_TIMEOUT_S = 10.0
SQLITE_MAX_INTEGER = 2**63 - 1
# Fields of a generation result (gpt.engine.GenerationResult) recorded on an assistant message.
GENERATION_FIELDS = ("finish_reason", "prompt_tokens", "new_tokens", "dropped_tokens", "ttft_s", "tokens_per_s", "seed")


def _dumps(value: Any) -> str | None:
    return None if value is None else canonical_json(value)


_UNSET: Any = object()


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection. SQLite reads a WAL database through its -shm index, which it
    must create when the last writer removed it; where the folder is read-only too, the file
    is read as immutable (no locks, no index), which is exact when no -wal file holds changes."""
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(
        f"{uri}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        wal = path.with_name(path.name + "-wal")
        if wal.exists() and wal.stat().st_size:
            raise sqlite3.OperationalError(
                f"{wal.name} holds changes not yet in the database, "
                "and they cannot be read where nothing can be written"
            ) from None
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)


def _fts_query(text: str) -> str:
    """Plain words -> an FTS5 query that matches all of them; user text is never FTS syntax. A
    NUL separates words (inside a quoted FTS5 string it would end the query: a syntax error)."""
    words = text.replace("\0", " ").split()
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


# ---------------------------------------------------------------------------------------------
# The store


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _rows_hash(example_rows: list[str], pair_rows: list[str]) -> str:
    """content_hash({"examples": [...], "pairs": [...]}) of rows already in canonical JSON,
    without decoding and encoding them again."""
    body = '{"examples":[' + ",".join(example_rows) + '],"pairs":[' + ",".join(pair_rows) + "]}"
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def open_store(path: str | Path | None = None, *, read_only: bool = False) -> Store:
    """Open (creating if needed) the database at `path`, default data.paths.db_path(), and run
    any pending migrations. With `read_only` (for commands that only read), nothing is created
    or changed, so a KETTLE_HOME that cannot be written to can still be read. Close the store
    with `close()` or a `with` block."""
    if path is None:
        from data.paths import db_path, models_dir

        path = db_path()
        if not read_only:
            remove_stale_temporaries(models_dir())  # half-written models of killed processes
    path = Path(path)
    if read_only and not path.exists():  # nothing stored yet: an empty store, in memory
        store = Store(path, sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False))
        store._migrate()
        return store
    try:
        if read_only:
            conn = _connect_read_only(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; writes use BEGIN IMMEDIATE.
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise KettleError(f"{path}: cannot open the Kettle database: {exc}") from exc
    store = Store(path, conn)
    try:
        store._configure(read_only)
        if read_only and schema.pending(store.db) and not schema.unknown(store.db) and _writable(path):
            # an older database that a reading command meets first (a new Kettle's `data export`):
            # upgrade it where that is allowed rather than refuse to read it
            conn.close()
            open_store(path).close()
            return open_store(path, read_only=True)
        if read_only:
            store._check_current()
        else:
            store._migrate()
        store._restore_views(read_only)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise KettleError(f"{path}: cannot open the Kettle database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return store


class Store:
    """One SQLite database, opened by `open_store()`."""

    def __init__(self, path: Path, conn: sqlite3.Connection):
        self.path = path
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self._depth = 0

    def _configure(self, read_only: bool = False) -> None:
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if read_only:
            return
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise KettleError(f"{self.path}: could not switch the database to WAL mode ({mode})")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")

    def _check_current(self) -> None:
        """A database opened read-only cannot be migrated: it must be current already."""
        self._refuse_newer()
        if missing := schema.pending_for_reading(self.db):
            raise KettleError(
                f"{self.path}: the database needs upgrading ({len(missing)} of "
                f"{len(schema.MIGRATIONS)} migrations not applied); run Kettle once "
                "where it can write there"
            )

    def _migrate(self) -> None:
        """Run pending migrations. An up-to-date database is only read, so opening never waits
        for another process's write (a long import, say)."""
        self._refuse_newer()
        if schema.is_current(self.db):
            return
        with self.transaction():  # re-checked under the write lock: another process may have won
            self._refuse_newer()
            schema.migrate(self.db)

    def _restore_views(self, read_only: bool) -> None:
        """A missing view (they hold no data) is made again: in the file, or where it cannot
        be written, for this connection only."""
        if not schema.missing_views(self.db):
            return
        if read_only:
            schema.restore_views(self.db, temporary=True)
            return
        with self.transaction():  # re-checked under the write lock: another process may have won
            schema.restore_views(self.db)

    def _refuse_newer(self) -> None:
        if newer := schema.unknown(self.db):
            raise KettleError(
                f"{self.path}: the database has migrations newer than this Kettle "
                f"understands ({', '.join(newer)}); upgrade Kettle"
            )

    def applied_migrations(self) -> list[str]:
        """The names of the schema migrations this database has had, oldest first."""
        with self._lock:
            return schema.applied(self.db)

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator["Store"]:
        """One atomic write: everything inside commits together or not at all. Holds the Store's
        lock, and the database's write lock from the start (BEGIN IMMEDIATE). Nested blocks are
        savepoints: an error caught inside the outer block undoes only the inner one. SQLite
        failures such as a full disk become a KettleError after the rollback."""
        with self._lock:
            if self._depth:
                name = f"nested_{self._depth}"
                self.conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute(f"ROLLBACK TO {name}")
                        self.conn.execute(f"RELEASE {name}")
                    raise
                else:
                    self.conn.execute(f"RELEASE {name}")
                finally:
                    self._depth -= 1
                return
            try:
                self._begin_immediate()
                self._depth = 1
                yield self
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise KettleError(f"{self.path}: the database refused a write: {exc}") from exc
                raise
            finally:
                self._depth = 0

    def _begin_immediate(self) -> None:
        """Take the database's write lock, waiting up to BUSY_TIMEOUT_S. SQLite's own busy handler
        backs off to 100 ms sleeps, so a process that writes back to back (a fast training loop)
        could starve another for longer than the timeout; polling every millisecond or so gets a
        turn in the short gaps between its transactions."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        self.conn.execute("PRAGMA busy_timeout = 1")
        try:
            while True:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    if time.monotonic() > deadline:
                        raise KettleError(
                            f"{self.path}: the database stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s"
                        ) from exc
                    time.sleep(random.uniform(0.0002, 0.002))
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")

    def _rows(self, sql: str, params: Iterable = ()) -> list[dict]:
        with self._lock:
            return list(self.db.query(sql, tuple(params)))

    def _row(self, sql: str, params: Iterable = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _insert(self, sql: str, params: Iterable) -> int:
        with self.transaction():
            return self.conn.execute(sql, tuple(params)).lastrowid

    # -- conversations ------------------------------------------------------------------------

    def create_conversation(
        self,
        title: str = "",
        system_prompt: str = "",
        *,
        params: dict | None = None,
        model: str | None = None,
        source: str = "chat",
        external_id: str | None = None,
        pending_import: int | None = None,
    ) -> Conversation:
        """A new conversation; one of `pending_import` (see `begin_import`) stays hidden until
        that import finishes."""
        storable_text(title, "the title")
        storable_text(system_prompt, "the system prompt")
        now = time.time()
        row = {
            "title": title,
            "system_prompt": system_prompt,
            "params": _dumps(params),
            "model": model,
            "source": source,
            "external_id": external_id,
            "created_at": now,
            "updated_at": now,
        }
        if pending_import is not None:
            row |= {"deleted_at": now, "pending_import_id": pending_import}
        cid = self._insert(
            f"INSERT INTO conversations ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", row.values()
        )
        return self.conversation(cid)

    def conversation(self, conversation_id: int) -> Conversation:
        """The conversation with this id (deleted ones included); KettleError if there is none."""
        row = self._row(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)"
            " AS message_count FROM conversations c WHERE c.id = ?",
            (conversation_id,),
        )
        if row is None:
            raise KettleError(f"no conversation with id {conversation_id}")
        return Conversation.from_row(row)

    def list_conversations(
        self, limit: int = 50, offset: int = 0, *, include_deleted: bool = False
    ) -> list[Conversation]:
        """Newest (most recently updated) first."""
        where = "" if include_deleted else "WHERE c.deleted_at IS NULL"
        rows = self._rows(
            "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id)"
            f" AS message_count FROM conversations c {where}"
            " ORDER BY c.deleted_at, c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [Conversation.from_row(r) for r in rows]

    def conversations_from(self, source: str) -> int:
        """How many live conversations came from `source` (e.g. one imported file)."""
        return self._row("SELECT COUNT(*) AS n FROM conversations WHERE source = ? AND deleted_at IS NULL", (source,))[
            "n"
        ]

    def update_conversation(
        self,
        conversation_id: int,
        *,
        title: str = _UNSET,
        system_prompt: str = _UNSET,
        params: dict | None = _UNSET,
        model: str | None = _UNSET,
    ) -> Conversation:
        """Change a conversation's settings; arguments left out keep their value."""
        for value, what in ((title, "the title"), (system_prompt, "the system prompt")):
            if isinstance(value, str):
                storable_text(value, what)
        changes = {
            k: v
            for k, v in (
                ("title", title),
                ("system_prompt", system_prompt),
                ("params", _UNSET if params is _UNSET else _dumps(params)),
                ("model", model),
            )
            if v is not _UNSET
        }
        self.conversation(conversation_id)
        if changes:
            sets = ", ".join(f"{k} = ?" for k in changes)
            with self.transaction():
                self.conn.execute(
                    f"UPDATE conversations SET {sets}, updated_at = ? WHERE id = ?",
                    (*changes.values(), time.time(), conversation_id),
                )
        return self.conversation(conversation_id)

    def delete_conversation(self, conversation_id: int) -> None:
        """Hide a conversation from lists, searches and new snapshots. Nothing is erased (its
        labels are history, and snapshots may hold it); `restore_conversation` undoes it."""
        self.conversation(conversation_id)
        with self.transaction():
            self.conn.execute("UPDATE conversations SET deleted_at = ? WHERE id = ?", (time.time(), conversation_id))

    def restore_conversation(self, conversation_id: int) -> None:
        self.conversation(conversation_id)
        with self.transaction():
            self.conn.execute("UPDATE conversations SET deleted_at = NULL WHERE id = ?", (conversation_id,))

    # -- imports ------------------------------------------------------------------------------
    # An import writes in many short transactions, so that it never holds the write lock for
    # long, and stays all or nothing: its conversations are created hidden (deleted_at, and
    # pending_import_id naming the import) and appear together when it finishes. What an import
    # that failed or was killed wrote is deleted (schema m004 lets only such rows go).

    def begin_import(self, source: str) -> int:
        """Register an import from `source` by this process; its id goes to `create_conversation`."""
        return self._insert(
            "INSERT INTO pending_imports (source, pid, started_at) VALUES (?, ?, ?)",
            (source, os.getpid(), time.time()),
        )

    def finish_import(self, import_id: int) -> None:
        """Show the import's conversations, all in one short transaction."""
        with self.transaction():
            if self.conn.execute("SELECT 1 FROM pending_imports WHERE id = ?", (import_id,)).fetchone() is None:
                raise KettleError(f"import {import_id} is not in progress (its rows were cleared away)")
            self.conn.execute(
                "UPDATE conversations SET deleted_at = NULL, pending_import_id = NULL WHERE pending_import_id = ?",
                (import_id,),
            )
            self.conn.execute("DELETE FROM pending_imports WHERE id = ?", (import_id,))

    def discard_import(self, import_id: int, *, batch: int = 200) -> None:
        """Delete what an unfinished import wrote, `batch` conversations a transaction."""
        while True:
            with self.transaction():
                ids = [
                    row[0]
                    for row in self.conn.execute(
                        "SELECT id FROM conversations WHERE pending_import_id = ? LIMIT ?", (import_id, batch)
                    )
                ]
                if not ids:
                    self.conn.execute("DELETE FROM pending_imports WHERE id = ?", (import_id,))
                    return
                chosen = "IN (SELECT value FROM json_each(?))"
                self.conn.execute(
                    f"DELETE FROM labels WHERE message_id IN (SELECT id FROM messages WHERE conversation_id {chosen})",
                    (json.dumps(ids),),
                )
                self.conn.execute(f"DELETE FROM messages WHERE conversation_id {chosen}", (json.dumps(ids),))
                self.conn.execute(f"DELETE FROM conversations WHERE id {chosen}", (json.dumps(ids),))

    def discard_abandoned_imports(self) -> None:
        """Delete what imports whose process is gone (killed, crashed) left."""
        for row in self._rows("SELECT id, pid FROM pending_imports"):
            if not process_alive(row["pid"]):
                self.discard_import(row["id"])

    # -- messages -----------------------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        *,
        content: str,
        parent_id: int | None = None,
        model_version_id: int | None = None,
        model: str | None = None,
        params: dict | None = None,
        generation: Any = None,
        meta: dict | None = None,
    ) -> Message:
        """Append a message under `parent_id` (None: a root). A parent that already has children
        gets a sibling branch; nothing is overwritten. The new message becomes the conversation's
        shown leaf.

        `generation` is a gpt.engine.GenerationResult (or a dict with the same fields): its
        finish_reason, token counts, timings and seed are recorded. `params` is the sampling
        parameters dict (SamplingParams.to_dict()).
        """
        if role not in ROLES:
            raise KettleError(f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise KettleError(f"message content must be a string, got {type(content).__name__}")
        storable_text(content, "the message")
        gen = {}
        if generation is not None:
            source = generation if isinstance(generation, dict) else vars(generation)
            gen = {k: source.get(k) for k in GENERATION_FIELDS}
        with self.transaction():
            # plain cursor reads on this hot path: sqlite-utils' query() adds a savepoint each
            if self.conn.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise KettleError(f"no conversation with id {conversation_id}")
            if parent_id is not None:
                parent = self.conn.execute("SELECT conversation_id FROM messages WHERE id = ?", (parent_id,)).fetchone()
                if parent is None or parent[0] != conversation_id:
                    raise KettleError(f"message {parent_id} is not in conversation {conversation_id}")
            now = time.time()
            try:  # an unknown model_version_id
                mid = self.conn.execute(
                    "INSERT INTO messages (conversation_id, parent_id, role, content, created_at,"
                    " model_version_id, model, params, meta, finish_reason, prompt_tokens,"
                    " new_tokens, dropped_tokens, ttft_s, tokens_per_s, seed)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation_id,
                        parent_id,
                        role,
                        content,
                        now,
                        model_version_id,
                        model,
                        _dumps(params),
                        _dumps(meta),
                        *(gen.get(k) for k in GENERATION_FIELDS),
                    ),
                ).lastrowid
            except sqlite3.IntegrityError as exc:
                raise KettleError(f"cannot add the message to conversation {conversation_id}: {exc}") from exc
            self.conn.execute(
                "UPDATE conversations SET leaf_id = ?, updated_at = ? WHERE id = ?", (mid, now, conversation_id)
            )
        return Message(
            id=mid,
            conversation_id=conversation_id,
            parent_id=parent_id,
            role=role,
            content=content,
            created_at=now,
            model_version_id=model_version_id,
            model=model,
            params=params,
            meta=meta,
            **{k: gen.get(k) for k in GENERATION_FIELDS},
        )

    def message(self, message_id: int) -> Message:
        row = self._row("SELECT * FROM messages WHERE id = ?", (message_id,))
        if row is None:
            raise KettleError(f"no message with id {message_id}")
        return Message.from_row(row)

    def messages(self, conversation_id: int) -> list[Message]:
        """Every message of a conversation, all branches, oldest first."""
        return [
            Message.from_row(r)
            for r in self._rows("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        ]

    def thread(self, leaf_id: int) -> list[Message]:
        """The branch from the root down to `leaf_id`, in order."""
        rows = self._rows(
            "WITH RECURSIVE up(id, depth) AS (SELECT ?, 0 UNION ALL"
            " SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id"
            " WHERE m.parent_id IS NOT NULL)"
            " SELECT m.* FROM up JOIN messages m ON m.id = up.id ORDER BY up.depth DESC",
            (leaf_id,),
        )
        if not rows:
            raise KettleError(f"no message with id {leaf_id}")
        return [Message.from_row(r) for r in rows]

    def current_thread(self, conversation_id: int) -> list[Message]:
        """The branch the conversation shows (ending at its leaf); [] for an empty one."""
        conv = self.conversation(conversation_id)
        return self.thread(conv.leaf_id) if conv.leaf_id is not None else []

    def children(self, message_id: int | None, conversation_id: int | None = None) -> list[Message]:
        """Replies to a message, oldest first (message_id None: the roots of `conversation_id`)."""
        if message_id is None:
            rows = self._rows(
                "SELECT * FROM messages WHERE conversation_id = ? AND parent_id IS NULL ORDER BY id", (conversation_id,)
            )
        else:
            rows = self._rows("SELECT * FROM messages WHERE parent_id = ? ORDER BY id", (message_id,))
        return [Message.from_row(r) for r in rows]

    def siblings(self, message_id: int) -> list[Message]:
        """The message and its alternatives (same parent), oldest first."""
        msg = self.message(message_id)
        return self.children(msg.parent_id, msg.conversation_id)

    def set_leaf(self, conversation_id: int, message_id: int) -> None:
        """Show the branch ending at `message_id` (for example after picking a sibling). A message
        in the middle of a branch is followed down its newest replies to a leaf."""
        msg = self.message(message_id)
        if msg.conversation_id != conversation_id:
            raise KettleError(f"message {message_id} is not in conversation {conversation_id}")
        leaf = message_id
        while (child := self._row("SELECT MAX(id) AS id FROM messages WHERE parent_id = ?", (leaf,)))["id"] is not None:
            leaf = child["id"]
        with self.transaction():
            self.conn.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, conversation_id))

    def chat_messages(self, leaf_id: int) -> list[dict]:
        """The branch ending at `leaf_id` in the one chat format, with the conversation's system
        prompt first (when it has one) — what a model should see."""
        thread = self.thread(leaf_id)
        conv = self.conversation(thread[0].conversation_id)
        prefix = [{"role": "system", "content": conv.system_prompt}] if conv.system_prompt else []
        return prefix + [m.chat() for m in thread]

    # -- labels -------------------------------------------------------------------------------

    def label(self, message_id: int) -> Label | None:
        """The current label of a message, or None when it never had one or it was cleared."""
        row = self._row("SELECT * FROM labels WHERE message_id = ? ORDER BY id DESC LIMIT 1", (message_id,))
        label = Label.from_row(row) if row else None
        return None if label is None or label.is_empty else label

    def labels(self, message_ids: Iterable[int]) -> dict[int, Label]:
        """Current labels of many messages at once (cleared and missing ones left out)."""
        ids = list(message_ids)
        out: dict[int, Label] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._rows(f"SELECT * FROM current_labels WHERE message_id IN ({marks})", chunk):
                label = Label.from_row(row)
                if not label.is_empty:
                    out[label.message_id] = label
        return out

    def label_history(self, message_id: int) -> list[Label]:
        """Every label row of a message, oldest first."""
        return [
            Label.from_row(r)
            for r in self._rows("SELECT * FROM labels WHERE message_id = ? ORDER BY id", (message_id,))
        ]

    def set_label(
        self,
        message_id: int,
        *,
        thumb: int | None = _UNSET,
        score: int | None = _UNSET,
        tags: Iterable[str] = _UNSET,
        note: str = _UNSET,
        ideal: str | None = _UNSET,
        excluded: bool = _UNSET,
    ) -> Label:
        """Change a message's label by appending a history row. Fields left out keep their
        current value; pass None (or [] / "" / False) to clear one field.

        thumb: 1 (up), -1 (down) or None; score: 1-5 or None; ideal: the corrected answer
        (assistant messages only); excluded: keep this message out of every dataset.
        """
        if thumb is not _UNSET and thumb not in (None, 1, -1):
            raise KettleError(f"thumb must be 1 (up), -1 (down) or None, got {thumb!r}")
        if (
            score is not _UNSET
            and score is not None
            and (isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5)
        ):
            raise KettleError(f"score must be a whole number from 1 to 5, got {score!r}")
        if ideal is not _UNSET and ideal is not None and not isinstance(ideal, str):
            raise KettleError("the corrected answer must be text")
        if isinstance(ideal, str):
            storable_text(ideal, "the corrected answer")
        if excluded is not _UNSET and not isinstance(excluded, bool):
            raise KettleError(f"excluded must be true or false, got {excluded!r}")
        if note is not _UNSET and not isinstance(note, str):
            raise KettleError("a note must be text")
        if isinstance(note, str):
            storable_text(note, "the note")
        with self.transaction():
            msg = self.message(message_id)
            if ideal not in (_UNSET, None) and msg.role != "assistant":
                raise KettleError(
                    f"message {message_id} is a {msg.role} message; only assistant answers take a corrected answer"
                )
            old = self.label(message_id)
            row = {
                "thumb": old.thumb if old else None,
                "score": old.score if old else None,
                "tags": old.tags if old else [],
                "note": old.note if old else "",
                "ideal": old.ideal if old else None,
                "excluded": old.excluded if old else False,
            }
            for key, value in (
                ("thumb", thumb),
                ("score", score),
                ("note", note),
                ("ideal", ideal),
                ("excluded", excluded),
            ):
                if value is not _UNSET:
                    row[key] = value
            if tags is not _UNSET:
                row["tags"] = clean_tags(tags)
            return self._append_label(message_id, row)

    def clear_label(self, message_id: int) -> Label:
        """Remove a message's label: appends an empty row, so the history keeps the old one."""
        with self.transaction():
            self.message(message_id)
            return self._append_label(
                message_id, {"thumb": None, "score": None, "tags": [], "note": "", "ideal": None, "excluded": False}
            )

    def _append_label(self, message_id: int, row: dict) -> Label:
        lid = self.conn.execute(
            "INSERT INTO labels (message_id, thumb, score, tags, note, ideal, excluded, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                message_id,
                row["thumb"],
                row["score"],
                canonical_json(row["tags"]),
                row["note"],
                row["ideal"],
                int(bool(row["excluded"])),
                time.time(),
            ),
        ).lastrowid
        return Label.from_row(self._row("SELECT * FROM labels WHERE id = ?", (lid,)))

    # -- datasets -----------------------------------------------------------------------------

    def _dataset_messages(self, filt: DataFilter) -> tuple[dict[int, dict], dict[int, Label]]:
        """The current labels, and by id the messages of live conversations that examples can be
        made of: the conversations holding a labelled message (with `all_answers`, all)."""
        labels = {}
        for row in self._rows("SELECT * FROM current_labels"):
            label = Label.from_row(row)
            if not label.is_empty:
                labels[label.message_id] = label
        columns = "m.id, m.conversation_id, m.parent_id, m.role, m.content, m.meta, c.system_prompt, c.external_id"
        live = "JOIN conversations c ON c.id = m.conversation_id WHERE c.deleted_at IS NULL"
        if filt.all_answers:
            sql, params = f"SELECT {columns} FROM messages m {live} ORDER BY m.id", ()
        else:
            # whole conversations by index: a few times faster than a recursive walk up branches
            sql = (
                f"SELECT {columns} FROM messages m {live} AND m.conversation_id IN"
                " (SELECT conversation_id FROM messages WHERE id IN (SELECT value FROM json_each(?)))"
                " ORDER BY m.id"
            )
            params = (json.dumps(list(labels)),)
        with self._lock:
            cursor = self.conn.execute(sql, params)
            names = [d[0] for d in cursor.description]
            msgs = {row[0]: dict(zip(names, row)) for row in cursor}
        return msgs, {mid: label for mid, label in labels.items() if mid in msgs}

    def dataset(
        self, filt: DataFilter | None = None, *, skipped: Counter | None = None
    ) -> tuple[list[dict], list[dict]]:
        """What would train now: (examples, preference pairs) as data.datasets.render_dataset
        makes them from the store's current labels; what it leaves out is counted in `skipped`."""
        filt = filt or DataFilter()
        messages, labels = self._dataset_messages(filt)
        return render_dataset(messages, labels, filt=filt, skipped=skipped)

    def create_snapshot(
        self, filt: DataFilter | None = None, name: str = "", *, reuse: bool = False, skipped: Counter | None = None
    ) -> Snapshot:
        """Freeze what would train now under `filt` into an immutable, content-hashed snapshot;
        with `reuse`, an existing snapshot of the same content is returned instead of a copy.
        What `dataset` leaves out is counted in `skipped`."""
        filt = filt or DataFilter()
        with self.transaction():
            examples, pairs = self.dataset(filt, skipped=skipped)
            example_rows = [canonical_json(e["example"]) for e in examples]
            pair_rows = [canonical_json(p["pair"]) for p in pairs]
            digest = _rows_hash(example_rows, pair_rows)
            same = (
                self._row("SELECT id FROM snapshots WHERE content_hash = ? ORDER BY id LIMIT 1", (digest,))
                if reuse
                else None
            )
            if same is not None:
                return self.snapshot(same["id"])
            # written unsealed, filled, sealed: once sealed the database refuses new rows (m004)
            sid = self.conn.execute(
                "INSERT INTO snapshots (name, filter, content_hash, n_examples, n_pairs, created_at, sealed)"
                " VALUES (?, ?, ?, ?, ?, ?, 0)",
                (name, canonical_json(filt.to_dict()), digest, len(examples), len(pairs), time.time()),
            ).lastrowid
            rows = [
                (sid, "example", i, e["message_id"], text) for i, (e, text) in enumerate(zip(examples, example_rows))
            ]
            rows += [(sid, "pair", i, p["message_id"], text) for i, (p, text) in enumerate(zip(pairs, pair_rows))]
            self.conn.executemany(
                "INSERT INTO snapshot_rows (snapshot_id, kind, position, message_id, data) VALUES (?, ?, ?, ?, ?)", rows
            )
            self.conn.execute("UPDATE snapshots SET sealed = 1 WHERE id = ?", (sid,))
        return self.snapshot(sid)

    def snapshot(self, snapshot_id: int) -> Snapshot:
        row = self._row("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,))
        if row is None:
            raise KettleError(f"no dataset snapshot with id {snapshot_id}")
        return Snapshot.from_row(row)

    def snapshots(self) -> list[Snapshot]:
        """Newest first."""
        return [Snapshot.from_row(r) for r in self._rows("SELECT * FROM snapshots ORDER BY id DESC")]

    def snapshot_examples(self, snapshot_id: int) -> list[dict]:
        """The snapshot's examples, {"messages": [...]} (+ "meta"), in order."""
        return self.snapshot_data(snapshot_id)[0]

    def snapshot_pairs(self, snapshot_id: int) -> list[dict]:
        """The snapshot's preference pairs, {"prompt", "chosen", "rejected"}, in order."""
        return self.snapshot_data(snapshot_id)[1]

    def snapshot_data(self, snapshot_id: int) -> tuple[list[dict], list[dict]]:
        """(examples, pairs) as the snapshot froze them, checked against its content hash: rows
        changed behind the store's back (a database edited by hand, a damaged file) are an error
        here, not a silent change to what a fine-tune trains on or an export writes."""
        snap = self.snapshot(snapshot_id)
        texts: dict[str, list[str]] = {"example": [], "pair": []}
        for r in self._rows(
            "SELECT kind, data FROM snapshot_rows WHERE snapshot_id = ? ORDER BY kind, position", (snapshot_id,)
        ):
            texts[r["kind"]].append(r["data"])
        examples, pairs = texts["example"], texts["pair"]
        if (len(examples), len(pairs)) != (snap.n_examples, snap.n_pairs) or _rows_hash(
            examples, pairs
        ) != snap.content_hash:
            raise KettleError(
                f"snapshot {snapshot_id} no longer matches its sha256 {snap.content_hash[:12]}: its rows were "
                "changed outside Kettle; make a new snapshot"
            )
        return [json.loads(t) for t in examples], [json.loads(t) for t in pairs]

    def verify_snapshot(self, snapshot_id: int) -> bool:
        """True when the stored rows still hash to the snapshot's content hash."""
        try:
            self.snapshot_data(snapshot_id)
        except KettleError:
            self.snapshot(snapshot_id)  # an unknown id stays an error
            return False
        return True

    # -- model versions -----------------------------------------------------------------------

    def add_model_version(
        self,
        name: str,
        path: str | Path,
        *,
        kind: str,
        parent_id: int | None = None,
        snapshot_id: int | None = None,
        run_id: int | None = None,
        hparams: dict | None = None,
        metrics: dict | None = None,
        status: str = "ok",
        note: str = "",
    ) -> ModelVersion:
        """Record a model directory. `name` is unique (KettleError if taken)."""
        if kind not in MODEL_KINDS:
            raise KettleError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
        with self.transaction():
            if self._row("SELECT id FROM model_versions WHERE name = ?", (name,)):
                raise KettleError(f"a model version named {name!r} already exists")
            try:
                vid = self.conn.execute(
                    "INSERT INTO model_versions (name, path, kind, parent_id, snapshot_id, run_id,"
                    " hparams, metrics, status, note, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        str(path),
                        kind,
                        parent_id,
                        snapshot_id,
                        run_id,
                        canonical_json(hparams or {}),
                        canonical_json(metrics or {}),
                        status,
                        note,
                        time.time(),
                    ),
                ).lastrowid
            except sqlite3.IntegrityError as exc:
                raise KettleError(
                    f"cannot record model version {name!r}: unknown parent, snapshot or run ({exc})"
                ) from exc
        return self.model_version(vid)

    def model_version(self, id_or_name: int | str) -> ModelVersion:
        """A model version by id or by name."""
        column = "id" if isinstance(id_or_name, int) else "name"
        row = self._row(f"SELECT * FROM model_versions WHERE {column} = ?", (id_or_name,))
        if row is None:
            raise KettleError(f"no model version {id_or_name!r}")
        return ModelVersion.from_row(row)

    def find_model_version(self, id_or_name: int | str) -> ModelVersion | None:
        """Like `model_version`, but None when there is none."""
        try:
            return self.model_version(id_or_name)
        except KettleError:
            return None

    def model_versions(self) -> list[ModelVersion]:
        """Newest first."""
        return [ModelVersion.from_row(r) for r in self._rows("SELECT * FROM model_versions ORDER BY id DESC")]

    def update_model_version(
        self, version_id: int, *, metrics: dict | None = None, status: str | None = None, note: str | None = None
    ) -> ModelVersion:
        """Record evaluation results: `metrics` are merged into the stored ones."""
        old = self.model_version(version_id)
        with self.transaction():
            self.conn.execute(
                "UPDATE model_versions SET metrics = ?, status = ?, note = ? WHERE id = ?",
                (
                    canonical_json({**old.metrics, **(metrics or {})}),
                    status or old.status,
                    old.note if note is None else note,
                    version_id,
                ),
            )
        return self.model_version(version_id)

    def lineage(self, version_id: int) -> list[ModelVersion]:
        """The version and its ancestors, newest first."""
        out = [self.model_version(version_id)]
        while out[-1].parent_id is not None:
            out.append(self.model_version(out[-1].parent_id))
        return out

    def activate_model(self, version_id: int) -> None:
        """Make a version the one the app chats with (recorded in the activation history)."""
        self.model_version(version_id)
        self._insert(
            "INSERT INTO activations (model_version_id, activated_at) VALUES (?, ?)", (version_id, time.time())
        )

    def active_model(self) -> ModelVersion | None:
        row = self._row("SELECT model_version_id FROM activations ORDER BY id DESC LIMIT 1")
        return None if row is None else self.model_version(row["model_version_id"])

    def register_model(
        self,
        path: str | Path,
        kind: str,
        *,
        name: str | None = None,
        hparams: dict | None = None,
        metrics: dict | None = None,
        activate_if_none: bool = True,
        status: str | None = None,
        note: str | None = None,
    ) -> tuple[ModelVersion, bool]:
        """Record a model directory as a version, or merge `metrics` into the version already
        recorded for that path (and set `status` and `note`, when given). The name is the
        directory's (or `name`), made unique with -2, -3... Returns (version, whether it became the
        active model because none was: never one whose status is not "ok", e.g. a starter that
        failed its own check)."""
        path = Path(path).expanduser().resolve()
        with self.transaction():
            version = next((v for v in self.model_versions() if Path(v.path).resolve() == path), None)
            if version is not None:
                if metrics or status or note is not None:
                    version = self.update_model_version(version.id, metrics=metrics, status=status, note=note)
            else:
                wanted = name or path.name
                unique, n = wanted, 2
                while self.find_model_version(unique) is not None:
                    unique, n = f"{wanted}-{n}", n + 1
                version = self.add_model_version(
                    unique, path, kind=kind, hparams=hparams, metrics=metrics, status=status or "ok", note=note or ""
                )
            activated = activate_if_none and version.status == "ok" and self.active_model() is None
            if activated:
                self.activate_model(version.id)
        return version, activated

    def activations(self) -> list[tuple[ModelVersion, float]]:
        """(version, activated_at), newest first."""
        return [
            (self.model_version(r["model_version_id"]), r["activated_at"])
            for r in self._rows("SELECT * FROM activations ORDER BY id DESC")
        ]

    # -- runs ---------------------------------------------------------------------------------

    def create_run(
        self,
        kind: str,
        *,
        model_version_id: int | None = None,
        snapshot_id: int | None = None,
        config: dict | None = None,
        total_steps: int | None = None,
        log_path: str | Path | None = None,
    ) -> Run:
        """A new training run, status "queued"."""
        now = time.time()
        try:
            rid = self._insert(
                "INSERT INTO runs (kind, status, model_version_id, snapshot_id, config, total_steps,"
                " log_path, created_at, updated_at) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (
                    kind,
                    model_version_id,
                    snapshot_id,
                    canonical_json(config or {}),
                    total_steps,
                    None if log_path is None else str(log_path),
                    now,
                    now,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise KettleError(f"cannot create the run: unknown model version or snapshot ({exc})") from exc
        return self.run(rid)

    def run(self, run_id: int) -> Run:
        row = self._row("SELECT * FROM runs WHERE id = ?", (run_id,))
        if row is None:
            raise KettleError(f"no training run with id {run_id}")
        return Run.from_row(row)

    def runs(self, status: str | None = None, limit: int = 100) -> list[Run]:
        """Newest first, optionally only those with `status`."""
        if status is None:
            rows = self._rows("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._rows("SELECT * FROM runs WHERE status = ? ORDER BY id DESC LIMIT ?", (status, limit))
        return [Run.from_row(r) for r in rows]

    def update_run(
        self,
        run_id: int,
        *,
        status: str | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        error: str | None = None,
        pid: int | None = None,
        log_path: str | Path | None = None,
        output_model_id: int | None = None,
    ) -> Run:
        """Progress and status changes. Entering "running" stamps started_at; entering finished,
        failed or cancelled stamps finished_at."""
        if status is not None and status not in RUN_STATUSES:
            raise KettleError(f"run status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
        changes = {
            k: v
            for k, v in (
                ("status", status),
                ("step", step),
                ("total_steps", total_steps),
                ("error", error),
                ("pid", pid),
                ("log_path", None if log_path is None else str(log_path)),
                ("output_model_id", output_model_id),
            )
            if v is not None
        }
        now = time.time()
        if status == "running":
            changes["started_at"] = now
        if status in FINISHED_RUN_STATUSES:
            changes["finished_at"] = now
        with self.transaction():
            self.run(run_id)
            sets = ", ".join(f"{k} = ?" for k in changes)
            self.conn.execute(
                f"UPDATE runs SET {sets}{', ' if sets else ''}updated_at = ? WHERE id = ?",
                (*changes.values(), now, run_id),
            )
        return self.run(run_id)

    def training_in_progress(self) -> bool:
        """Whether some run's training process is alive now (it keeps the CPU busy)."""
        return any(run.pid is not None and process_alive(run.pid) for run in self.runs(status="running"))

    def fail_orphaned_runs(
        self,
        kind: str | None = None,
        error: str | Callable[[Run], str] = "the training process ended without reporting (killed or crashed)",
    ) -> list[Run]:
        """Mark "running" runs (of `kind`) whose process is gone (killed, machine restarted) as
        failed with `error` (or `error(run)`: what the run left to say), so nothing shows a run
        as live forever. Returns the runs it changed."""
        changed = []
        for run in self.runs(status="running", limit=1_000_000):
            if (kind is not None and run.kind != kind) or (run.pid is not None and process_alive(run.pid)):
                continue
            changed.append(self.update_run(run.id, status="failed", error=error(run) if callable(error) else error))
        return changed

    def truncate_run_metrics(self, run_id: int, step: int) -> None:
        """Forget the metrics logged after `step` (a run resumed from a checkpoint at `step`
        logs those steps again)."""
        with self.transaction():
            self.conn.execute("DELETE FROM run_metrics WHERE run_id = ? AND step > ?", (run_id, step))
            self.conn.execute("UPDATE runs SET step = ?, updated_at = ? WHERE id = ?", (step, time.time(), run_id))

    def log_metrics(self, run_id: int, step: int, *, metrics: dict[str, float]) -> None:
        """Record one step's metrics (e.g. {"loss": 1.2, "lr": 3e-4}) and advance the run's step."""
        now = time.time()
        with self.transaction():
            try:
                self.conn.execute(
                    "INSERT INTO run_metrics (run_id, step, metrics, created_at) VALUES (?, ?, ?, ?)",
                    (run_id, step, canonical_json(metrics), now),
                )
            except sqlite3.IntegrityError as exc:
                raise KettleError(f"no training run with id {run_id}") from exc
            self.conn.execute("UPDATE runs SET step = MAX(step, ?), updated_at = ? WHERE id = ?", (step, now, run_id))

    def run_metrics(self, run_id: int) -> list[tuple[int, dict]]:
        """(step, metrics) in step order."""
        return [
            (r["step"], json.loads(r["metrics"]))
            for r in self._rows("SELECT step, metrics FROM run_metrics WHERE run_id = ? ORDER BY step, id", (run_id,))
        ]

    # -- search and statistics ----------------------------------------------------------------

    def search(self, query: str, limit: int = 20) -> list[SearchHit]:
        """Messages containing all the words of `query` (plain words, stemmed; no FTS syntax),
        or whose current corrected answer does (its snippet starts with "✎ "), newest first (as
        chat apps do, and it stays fast however many messages match); deleted conversations are
        left out. A `limit` past SQLite's integers is no limit."""
        fts = _fts_query(storable_text(query, "the search"))
        limit = min(limit, SQLITE_MAX_INTEGER)
        if not fts:
            return []
        corrected = self._rows(
            "SELECT m.id, m.conversation_id, c.title, m.role, m.created_at,"
            " '✎ ' || snippet(labels_fts, 0, '[', ']', '…', 12) AS snippet"
            " FROM labels_fts JOIN labels l ON l.id = labels_fts.rowid"
            " JOIN messages m ON m.id = l.message_id"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE labels_fts MATCH ? AND c.deleted_at IS NULL"
            " AND l.id = (SELECT MAX(id) FROM labels WHERE message_id = l.message_id)"
            " ORDER BY m.id DESC LIMIT ?",
            (fts, limit),
        )
        said = self._rows(
            "SELECT m.id, m.conversation_id, c.title, m.role, m.created_at,"
            " snippet(messages_fts, 0, '[', ']', '…', 12) AS snippet"
            " FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid"
            " JOIN conversations c ON c.id = m.conversation_id"
            " WHERE messages_fts MATCH ? AND c.deleted_at IS NULL"
            " ORDER BY messages_fts.rowid DESC LIMIT ?",
            (fts, limit),
        )
        by_id = {r["id"]: r for r in said} | {r["id"]: r for r in corrected}  # the correction wins
        rows = sorted(by_id.values(), key=lambda r: r["id"], reverse=True)[:limit]
        return [
            SearchHit(
                message_id=r["id"],
                conversation_id=r["conversation_id"],
                conversation_title=r["title"],
                role=r["role"],
                snippet=r["snippet"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    def stats(self) -> dict[str, int]:
        """Counts for `kettle data stats` and the dataset screen. What an unfinished import wrote
        (hidden until it finishes; a killed one's until the next import clears it) is not
        counted: it is no conversation, message or label of the user's yet."""
        # a database opened read-only may predate m006_pending_imports: then nothing is pending
        pending = "pending_import_id" in {row[1] for row in self.conn.execute("PRAGMA table_info(conversations)")}
        hidden = "SELECT NULL WHERE 0"
        if pending:
            hidden = "SELECT id FROM conversations WHERE pending_import_id IS NOT NULL"
        hidden_messages = f"SELECT id FROM messages WHERE conversation_id IN ({hidden})"
        return self._row(
            "SELECT"
            " (SELECT COUNT(*) FROM conversations WHERE deleted_at IS NULL) AS conversations,"
            f" (SELECT COUNT(*) FROM conversations WHERE deleted_at IS NOT NULL AND id NOT IN ({hidden}))"
            "   AS deleted_conversations,"
            f" (SELECT COUNT(*) FROM messages WHERE id NOT IN ({hidden_messages})) AS messages,"
            " (SELECT COUNT(*) FROM messages WHERE role = 'assistant'"
            f"   AND id NOT IN ({hidden_messages})) AS assistant_messages,"
            " COALESCE(SUM(l.thumb = 1), 0) AS thumbs_up,"
            " COALESCE(SUM(l.thumb = -1), 0) AS thumbs_down,"
            " COUNT(l.score) AS scored,"
            " COUNT(l.ideal) AS corrected,"
            " COALESCE(SUM(l.excluded), 0) AS excluded,"
            f" (SELECT COUNT(*) FROM labels WHERE message_id NOT IN ({hidden_messages})) AS label_rows,"
            " (SELECT COUNT(*) FROM snapshots) AS snapshots,"
            " (SELECT COUNT(*) FROM model_versions) AS model_versions,"
            " (SELECT COUNT(*) FROM runs) AS runs"
            f" FROM current_labels l WHERE l.message_id NOT IN ({hidden_messages})"
        )

    def backup(self, out: str | Path) -> Path:
        """Copy the database to `out` through SQLite's online backup API: a consistent copy of
        everything committed, taken while others keep reading and writing (copying kettle.db
        alone misses what still sits in its -wal file). The copy is one self-contained file
        (rollback journal, not WAL), written beside `out` and renamed into place when complete."""
        out = Path(out)
        with atomic_file(out) as tmp:
            target = sqlite3.connect(tmp)
            try:
                with self._lock:
                    self.conn.backup(target)
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
        return out

    def integrity_check(self) -> str:
        """ "ok" when SQLite finds the file sound."""
        return self._row("PRAGMA integrity_check")["integrity_check"]
