"""The database's tables, built by named migrations (in the style of simonw/llm's migrations.py).

Each migration is a function of a sqlite_utils.Database, registered with @migration in the order
it runs. `migrate` applies the ones a database lacks and records each by name, with its time, in
the `_migrations` table, inside the caller's write transaction. Append new migrations at the end;
never edit, reorder or rename one that has shipped, since databases record them by name.

Kettle before named migrations kept a `schema_version` table of numbers instead: version n was
the n-th of NUMBERED_MIGRATIONS. `migrate` carries that record into `_migrations` first.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []
NUMBERED_MIGRATIONS = ("m001_core", "m002_search", "m003_search_corrections")
# Migrations that only writers need: a database without them reads the same, so a read-only
# command (`data stats`, `data export`) run first after an upgrade works without them.
READ_WITHOUT = frozenset({"m006_pending_imports"})


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


def applied(db: sqlite_utils.Database) -> list[str]:
    """The names of the migrations this database has had, oldest first."""
    if db["_migrations"].exists():
        return [row["name"] for row in db.query("SELECT name FROM _migrations ORDER BY rowid")]
    if db["schema_version"].exists():
        return [
            _numbered_name(row["version"]) for row in db.query("SELECT version FROM schema_version ORDER BY version")
        ]
    return []


def unknown(db: sqlite_utils.Database) -> list[str]:
    """Migrations the database has had that this Kettle does not know: a newer Kettle's."""
    known = {fn.__name__ for fn in MIGRATIONS}
    return [name for name in applied(db) if name not in known]


def pending(db: sqlite_utils.Database) -> list[Migration]:
    """The migrations this database still needs, in order."""
    done = set(applied(db))
    return [fn for fn in MIGRATIONS if fn.__name__ not in done]


def pending_for_reading(db: sqlite_utils.Database) -> list[Migration]:
    """The pending migrations a read-only open cannot do without (see READ_WITHOUT)."""
    return [fn for fn in pending(db) if fn.__name__ not in READ_WITHOUT]


def is_current(db: sqlite_utils.Database) -> bool:
    """Whether opening this database for writing changes nothing."""
    return db["_migrations"].exists() and not pending(db)


def migrate(db: sqlite_utils.Database) -> None:
    """Apply the pending migrations in order, each recorded by name as it is applied. Run it
    inside a write transaction, so that all of it lands or none does."""
    _carry_numbered_record_forward(db)
    for fn in pending(db):
        fn(db)
        db["_migrations"].insert({"name": fn.__name__, "applied_at": time.time()})


def _numbered_name(version: int) -> str:
    if 1 <= version <= len(NUMBERED_MIGRATIONS):
        return NUMBERED_MIGRATIONS[version - 1]
    return f"schema version {version}"  # no Kettle numbered this one: it shows as unknown


def _carry_numbered_record_forward(db: sqlite_utils.Database) -> None:
    """Create `_migrations`, holding the old `schema_version` record (times kept) when there is
    one, which then goes: one record of what was applied, not two that could disagree."""
    if db["_migrations"].exists():
        return
    db["_migrations"].create({"name": str, "applied_at": float}, pk="name")
    if db["schema_version"].exists():
        db["_migrations"].insert_all(
            {"name": _numbered_name(row["version"]), "applied_at": row["applied_at"]}
            for row in db.query("SELECT * FROM schema_version ORDER BY version")
        )
        db["schema_version"].drop()


def execute_each(db: sqlite_utils.Database, script: str) -> None:
    """Run a script's statements one by one: executescript() would first commit the caller's
    transaction, so a migration that failed halfway would stay half-applied."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""
    if statement.strip():
        raise ValueError(f"an incomplete statement in a migration: {statement.strip()[:60]}")


# ---------------------------------------------------------------------------------------------
# Views: they hold no data, so one that is missing (a hand-run DROP VIEW, a tool that "cleaned"
# the file) is made again from its definition when the store opens, instead of every read
# that needs it failing.

CURRENT_LABELS_VIEW = """CREATE VIEW current_labels AS
    SELECT l.* FROM labels l
    JOIN (SELECT message_id, MAX(id) AS id FROM labels GROUP BY message_id) newest
    ON l.id = newest.id;"""
VIEWS = {"current_labels": CURRENT_LABELS_VIEW}


def missing_views(db: sqlite_utils.Database) -> list[str]:
    """The views a migrated database should have and lacks."""
    present = set(db.view_names())
    return [name for name in VIEWS if name not in present]


def restore_views(db: sqlite_utils.Database, *, temporary: bool = False) -> list[str]:
    """Make the missing views again; `temporary`: for this connection only (TEMP views), where
    the file cannot be written. Returns their names."""
    missing = missing_views(db)
    for name in missing:
        sql = VIEWS[name]
        db.execute(sql.replace("CREATE VIEW", "CREATE TEMP VIEW", 1) if temporary else sql)
    return missing


# ---------------------------------------------------------------------------------------------
# The migrations, in order.

CORE_SCHEMA = (
    """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    params TEXT,                      -- default sampling parameters (JSON) for new answers
    model TEXT,                       -- preferred model name for new answers
    leaf_id INTEGER,                  -- the message at the end of the branch being shown
    source TEXT NOT NULL DEFAULT 'chat',
    external_id TEXT,                 -- id in an imported file (ShareGPT "id")
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deleted_at REAL                   -- deleting hides a conversation; its labels stay
);
CREATE INDEX idx_conversations_updated ON conversations(deleted_at, updated_at DESC, id DESC);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    parent_id INTEGER REFERENCES messages(id),
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    model_version_id INTEGER REFERENCES model_versions(id),
    model TEXT,                       -- model name or path that wrote an assistant message
    params TEXT,                      -- sampling parameters (JSON)
    seed INTEGER,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    new_tokens INTEGER,
    dropped_tokens INTEGER,
    ttft_s REAL,
    tokens_per_s REAL,
    meta TEXT                         -- source fields an import needs to export exactly (JSON)
);
CREATE INDEX idx_messages_conversation ON messages(conversation_id, id);
CREATE INDEX idx_messages_parent ON messages(parent_id);
CREATE TRIGGER messages_no_rewrite BEFORE UPDATE OF conversation_id, parent_id, role, content
ON messages BEGIN
    SELECT RAISE(ABORT, 'messages are never rewritten: add a sibling instead');
END;
CREATE TRIGGER messages_no_delete BEFORE DELETE ON messages BEGIN
    SELECT RAISE(ABORT, 'messages are never deleted');
END;

CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id),
    thumb INTEGER CHECK (thumb IN (-1, 1)),
    score INTEGER CHECK (score BETWEEN 1 AND 5),
    tags TEXT NOT NULL DEFAULT '[]',   -- JSON list of strings
    note TEXT NOT NULL DEFAULT '',
    ideal TEXT,                        -- the user's corrected answer
    excluded INTEGER NOT NULL DEFAULT 0 CHECK (excluded IN (0, 1)),
    created_at REAL NOT NULL
);
CREATE INDEX idx_labels_message ON labels(message_id, id);
CREATE TRIGGER labels_no_update BEFORE UPDATE ON labels BEGIN
    SELECT RAISE(ABORT, 'labels are append-only: add a new label row');
END;
CREATE TRIGGER labels_no_delete BEFORE DELETE ON labels BEGIN
    SELECT RAISE(ABORT, 'labels are append-only: add a clearing label row');
END;
"""
    + CURRENT_LABELS_VIEW
    + """

CREATE TABLE snapshots (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    filter TEXT NOT NULL,              -- the DataFilter (JSON) it was made from
    content_hash TEXT NOT NULL,        -- sha256 of the canonical JSON of examples and pairs
    n_examples INTEGER NOT NULL,
    n_pairs INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE snapshot_rows (
    id INTEGER PRIMARY KEY,
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id),
    kind TEXT NOT NULL CHECK (kind IN ('example', 'pair')),
    position INTEGER NOT NULL,
    message_id INTEGER REFERENCES messages(id),   -- the answer it was rendered from
    data TEXT NOT NULL                            -- canonical JSON
);
CREATE INDEX idx_snapshot_rows ON snapshot_rows(snapshot_id, kind, position);
CREATE TRIGGER snapshots_frozen BEFORE UPDATE OF filter, content_hash, n_examples, n_pairs, created_at
ON snapshots BEGIN
    SELECT RAISE(ABORT, 'snapshots are immutable');
END;
CREATE TRIGGER snapshots_no_delete BEFORE DELETE ON snapshots BEGIN
    SELECT RAISE(ABORT, 'snapshots are immutable');
END;
CREATE TRIGGER snapshot_rows_no_update BEFORE UPDATE ON snapshot_rows BEGIN
    SELECT RAISE(ABORT, 'snapshots are immutable');
END;
CREATE TRIGGER snapshot_rows_no_delete BEFORE DELETE ON snapshot_rows BEGIN
    SELECT RAISE(ABORT, 'snapshots are immutable');
END;

CREATE TABLE model_versions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('imported', 'downloaded', 'pretrained', 'finetuned', 'starter')),
    parent_id INTEGER REFERENCES model_versions(id),
    snapshot_id INTEGER REFERENCES snapshots(id),
    run_id INTEGER REFERENCES runs(id),
    hparams TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'ok',            -- e.g. ok | regressed | failed
    note TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE activations (
    id INTEGER PRIMARY KEY,
    model_version_id INTEGER NOT NULL REFERENCES model_versions(id),
    activated_at REAL NOT NULL
);

CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,                           -- e.g. finetune | lora | pretrain | classify
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'finished', 'failed', 'cancelled')),
    model_version_id INTEGER REFERENCES model_versions(id),   -- the base model
    snapshot_id INTEGER REFERENCES snapshots(id),
    output_model_id INTEGER REFERENCES model_versions(id),
    config TEXT NOT NULL DEFAULT '{}',
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    log_path TEXT,
    error TEXT,
    pid INTEGER,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX idx_runs_status ON runs(status, id);
CREATE TABLE run_metrics (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    metrics TEXT NOT NULL,                        -- JSON {"loss": 1.23, ...}
    created_at REAL NOT NULL
);
CREATE INDEX idx_run_metrics ON run_metrics(run_id, step);
"""
)


@migration
def m001_core(db: sqlite_utils.Database) -> None:
    db.executescript(CORE_SCHEMA)


@migration
def m002_search(db: sqlite_utils.Database) -> None:
    # Message content never changes, but sqlite-utils' triggers also keep the index right if a
    # future migration ever rewrites rows.
    db["messages"].enable_fts(["content"], create_triggers=True, tokenize="porter unicode61")


@migration
def m003_search_corrections(db: sqlite_utils.Database) -> None:
    # The chat shows a corrected answer under the original, so search finds it too.
    db["labels"].enable_fts(["ideal"], create_triggers=True, tokenize="porter unicode61")


@migration
def m004_sealed_snapshots(db: sqlite_utils.Database) -> None:
    # The old triggers refused UPDATE and DELETE of a snapshot's rows but not INSERT, so a plain
    # INSERT (from the sqlite3 shell, say) changed what a snapshot trains on behind its hash. A
    # snapshot is now written unsealed, filled, then sealed in the same transaction; a sealed one
    # takes no new rows and never unseals. Snapshots made before this were complete: sealed.
    # Conversations are hidden, never deleted (their messages and labels are history), so a
    # DELETE is refused too: the sqlite3 shell does not enforce foreign keys and left orphans.
    execute_each(
        db,
        """
        ALTER TABLE snapshots ADD COLUMN sealed INTEGER NOT NULL DEFAULT 1 CHECK (sealed IN (0, 1));
        CREATE TRIGGER snapshot_rows_sealed BEFORE INSERT ON snapshot_rows
        WHEN (SELECT sealed FROM snapshots WHERE id = NEW.snapshot_id) IS NOT 0 BEGIN
            SELECT RAISE(ABORT, 'snapshots are immutable: this one is sealed');
        END;
        CREATE TRIGGER snapshots_stay_sealed BEFORE UPDATE OF id, sealed ON snapshots
        WHEN OLD.sealed = 1 OR NEW.id IS NOT OLD.id BEGIN
            SELECT RAISE(ABORT, 'snapshots are immutable');
        END;
        CREATE TRIGGER conversations_no_delete BEFORE DELETE ON conversations BEGIN
            SELECT RAISE(ABORT, 'conversations are hidden, never deleted: set deleted_at');
        END;
        """,
    )


@migration
def m005_memory(db: sqlite_utils.Database) -> None:
    # Documents the assistant answers from (data.memory): the installed Python's documentation
    # and the user's files, chunked into passages with their source and position. Removing a
    # source removes its passages (foreign keys are on in every Kettle connection).
    execute_each(
        db,
        """
        CREATE TABLE doc_sources (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('python', 'file')),
            path TEXT NOT NULL UNIQUE,     -- a file's absolute path, or python:MODULE
            sha256 TEXT NOT NULL,          -- of the file's bytes, or of the module's documentation
            size INTEGER,
            mtime REAL,
            n_passages INTEGER NOT NULL,
            added_at REAL NOT NULL
        );
        CREATE INDEX idx_doc_sources_sha ON doc_sources(sha256);
        CREATE TABLE doc_passages (
            id INTEGER PRIMARY KEY,
            source_id INTEGER NOT NULL REFERENCES doc_sources(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            name TEXT NOT NULL DEFAULT '',   -- the name it documents, or the heading it is under
            text TEXT NOT NULL
        );
        CREATE INDEX idx_doc_passages_source ON doc_passages(source_id, position);
        CREATE INDEX idx_doc_passages_name ON doc_passages(name);
        CREATE TABLE answer_sources (      -- the passages an answer was grounded in, as it saw them
            message_id INTEGER NOT NULL REFERENCES messages(id),
            position INTEGER NOT NULL,
            kind TEXT NOT NULL,            -- correction | answer | python | file
            source TEXT NOT NULL,
            name TEXT NOT NULL,
            text TEXT NOT NULL,
            ref INTEGER NOT NULL,          -- the answer's message id, or doc_passages.id
            PRIMARY KEY (message_id, position)
        );
        """,
    )
    db["doc_passages"].enable_fts(["name", "text"], create_triggers=True, tokenize="porter unicode61")


PENDING_IMPORTS_SCHEMA = (
    """CREATE TABLE pending_imports (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        pid INTEGER NOT NULL,             -- the importing process: once it is gone, its rows go
        started_at REAL NOT NULL
    )""",
    # set while the import runs (with deleted_at, which hides the conversation everywhere)
    "ALTER TABLE conversations ADD COLUMN pending_import_id INTEGER REFERENCES pending_imports(id)",
    "CREATE INDEX idx_conversations_pending ON conversations(pending_import_id) WHERE pending_import_id IS NOT NULL",
    "DROP TRIGGER messages_no_delete",
    """CREATE TRIGGER messages_no_delete BEFORE DELETE ON messages
    WHEN (SELECT pending_import_id FROM conversations WHERE id = OLD.conversation_id) IS NULL BEGIN
        SELECT RAISE(ABORT, 'messages are never deleted');
    END""",
    "DROP TRIGGER labels_no_delete",
    "DROP TRIGGER conversations_no_delete",
    """CREATE TRIGGER conversations_no_delete BEFORE DELETE ON conversations
    WHEN OLD.pending_import_id IS NULL BEGIN
        SELECT RAISE(ABORT, 'conversations are hidden, never deleted: set deleted_at');
    END""",
    """CREATE TRIGGER labels_no_delete BEFORE DELETE ON labels
    WHEN (SELECT c.pending_import_id FROM messages m JOIN conversations c ON c.id = m.conversation_id
          WHERE m.id = OLD.message_id) IS NULL BEGIN
        SELECT RAISE(ABORT, 'labels are append-only: add a clearing label row');
    END""",
)


@migration
def m006_pending_imports(db: sqlite_utils.Database) -> None:
    # A long import commits in short batches, so that it never holds the write lock for long; its
    # conversations stay hidden until the last batch shows them all at once, and what an import
    # that failed or was killed wrote can be deleted (only that: the rest stays append-only).
    # One statement at a time: executescript() would commit the migration's transaction.
    for statement in PENDING_IMPORTS_SCHEMA:
        db.execute(statement)


# Tables whose rows are history: REPLACE (INSERT OR REPLACE, or UPDATE OR REPLACE onto another
# row's id) deletes the row it collides with without firing its DELETE trigger, so each of them
# refuses an insert over an existing id, and those whose other columns may change refuse a new id.
HISTORY_TABLES = ("conversations", "messages", "labels", "snapshots", "snapshot_rows")


@migration
def m007_no_replaced_history(db: sqlite_utils.Database) -> None:
    # `REPLACE INTO snapshots` from the sqlite3 shell rewrote a sealed snapshot's count and hash
    # and unsealed it, so a plain INSERT then added rows to it; `REPLACE INTO messages` rewrote
    # a message the UPDATE trigger guards. (labels, snapshots and snapshot_rows already refuse
    # every UPDATE of their id.)
    for table in HISTORY_TABLES:
        db.execute(
            f"""CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table}
            WHEN EXISTS (SELECT 1 FROM {table} WHERE id = NEW.id) BEGIN
                SELECT RAISE(ABORT, '{table} rows are never replaced');
            END"""
        )
    for table in ("conversations", "messages"):
        db.execute(
            f"""CREATE TRIGGER {table}_no_renumber BEFORE UPDATE OF id ON {table}
            WHEN NEW.id IS NOT OLD.id BEGIN
                SELECT RAISE(ABORT, '{table} are never renumbered');
            END"""
        )


@migration
def m008_lessons(db: sqlite_utils.Database) -> None:
    # A model's own lessons (the instruction data a starter was taught, kept beside its weights)
    # as memory: grounded in its documentation, the starter answered its own "How do I ...?"
    # lessons in the documentation's words ("Return a copy ..." for "Call str.replace(): return
    # a copy ..."). One row per distinct lesson; `model` names the model that brought it first;
    # `lesson_sets` the sets already read (a model's whole file, by digest), read once.
    db.execute(
        """CREATE TABLE lessons (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            UNIQUE (question, answer)
        )"""
    )
    db.execute("CREATE TABLE lesson_sets (sha256 TEXT PRIMARY KEY, model TEXT NOT NULL, added_at REAL NOT NULL)")
