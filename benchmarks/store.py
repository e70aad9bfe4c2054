"""Store speed at 100,000 messages: inserts, opening + listing, full-text search, threads, snapshots.

    .venv/bin/python benchmarks/store.py [--messages 100000] [--per-conversation 10] [--db PATH]

Builds a fresh database (in a temporary folder unless --db) of synthetic chats through the Store
API, in transactions of 1,000 messages, with a label on every fifth answer. The peer is plain
sqlite3 writing the same rows into a bare table (no tree checks, no FTS, no labels), printed side by
side with the ratio. Then, on the full database: open + list the 50 newest conversations (a fresh
connection each time, as the app does on start; target < 50 ms), full-text searches for a rare
word, a common word and two words (target < 100 ms), one conversation's thread, stats, a snapshot
of every labelled answer, and single-message commits (each one fsynced: what a chat turn costs).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data.records import DataFilter  # noqa: E402
from data.store import open_store  # noqa: E402

COMMON = "the and a to of in is that it for you with on as this be are have not".split()
TOPICS = (
    "kettle tea water paris france python sqlite garden river music painting portrait "
    "window winter summer bread coffee train station library".split()
)


def vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "sa", "tor", "vi", "ne", "qu", "ba", "el", "dru", "po"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(size)]


def sentence(rng: random.Random, words: list[str], n: int) -> str:
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(rng.choice(COMMON) if r < 0.4 else rng.choice(TOPICS) if r < 0.45 else rng.choice(words))
    return " ".join(out).capitalize() + "."


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median, max) milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


def fill_store(
    path: Path, n_messages: int, per_conv: int, rng: random.Random, words: list[str]
) -> tuple[float, list[tuple]]:
    rows = []
    start = time.perf_counter()
    with open_store(path) as store:
        done = 0
        while done < n_messages:
            with store.transaction():
                for _ in range(1000 // per_conv):
                    conv = store.create_conversation(sentence(rng, words, 5))
                    parent = None
                    for turn in range(per_conv):
                        role = "user" if turn % 2 == 0 else "assistant"
                        text = sentence(rng, words, rng.randint(10, 60))
                        msg = store.add_message(
                            conv.id,
                            role,
                            content=text,
                            parent_id=parent,
                            generation={"seed": turn, "new_tokens": 40} if role == "assistant" else None,
                        )
                        rows.append((conv.id, parent, role, text, msg.created_at))
                        parent = msg.id
                        if role == "assistant" and msg.id % 10 == 0:
                            store.set_label(msg.id, thumb=1, score=4, tags=["bench"])
                        done += 1
    return time.perf_counter() - start, rows


def fill_raw(path: Path, rows: list[tuple]) -> float:
    start = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER, "
        "parent_id INTEGER, role TEXT, content TEXT, created_at REAL)"
    )
    for i in range(0, len(rows), 1000):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO messages (conversation_id, parent_id, role, content, created_at) VALUES (?, ?, ?, ?, ?)",
            rows[i : i + 1000],
        )
        conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--per-conversation", type=int, default=10)
    parser.add_argument("--db", type=Path, help="database file to create (must not exist)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="kettle-bench-"))
    path = args.db or folder / "kettle.db"
    if path.exists():
        sys.exit(f"{path} exists; give a new path")
    rng = random.Random(0)
    words = vocabulary(rng)

    print(f"database: {path}")
    store_s, rows = fill_store(path, args.messages, args.per_conversation, rng, words)
    raw_s = fill_raw(folder / "raw.db", rows)
    n = len(rows)
    print(f"\ninsert {n:,} messages (transactions of 1,000)")
    print(f"  {'kettle Store':<28}{n / store_s:>10,.0f} msg/s  ({store_s:.1f} s, with tree checks, FTS, labels)")
    print(f"  {'plain sqlite3 executemany':<28}{n / raw_s:>10,.0f} msg/s  ({raw_s:.1f} s)")
    print(f"  ratio store / plain: {raw_s / store_s:.2f}x the speed")
    print(f"  file size: {path.stat().st_size / 1e6:.1f} MB (+ WAL)")

    def open_and_list():
        with open_store(path) as s:
            assert len(s.list_conversations(limit=50)) == 50

    print("\nqueries (median / max ms)")
    results = {"open + list 50 newest conversations": (timed(open_and_list, 20), 50)}
    with open_store(path) as store:
        for label, q in (
            ("search rare word", words[1234]),
            ("search common word", "kettle"),
            ("search two words", "paris tea"),
            ("search a phrase-like query", "the and"),
        ):
            hits = len(store.search(q))
            results[f"{label} ({q!r}, {hits} hits)"] = (timed(lambda q=q: store.search(q), 20), 100)
        mid_conv = store.list_conversations(limit=1, offset=500)[0]
        results["thread of one conversation"] = (timed(lambda: store.current_thread(mid_conv.id), 20), None)
        results["stats"] = (timed(store.stats, 5), None)
        results["dataset preview (all labelled answers)"] = (timed(lambda: store.dataset(DataFilter()), 3), None)
        snap_ms = timed(lambda: store.create_snapshot(DataFilter()), 1)
        results[f"create snapshot ({store.snapshots()[0].n_examples:,} examples)"] = (snap_ms, None)
        conv = store.create_conversation("single commits")
        parent = None

        def one_commit():
            nonlocal parent
            parent = store.add_message(conv.id, "user", content="one chat turn, committed", parent_id=parent).id

        results["add one message (own fsynced commit)"] = (timed(one_commit, 200), None)
        assert store.integrity_check() == "ok"
    for label, ((median, worst), target) in results.items():
        verdict = "" if target is None else ("  ok" if median < target else f"  OVER the {target} ms target")
        print(f"  {label:<58}{median:>8.2f} / {worst:>7.2f}{verdict}")


if __name__ == "__main__":
    main()
