"""`kettle data ...`: statistics, dataset import/export, snapshots and search over the store."""

from __future__ import annotations

import argparse
import json
import sys

from data.formats import FORMATS
from tui.commands import flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="conversations, labels and datasets in the store")
    data = p.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = data.add_parser("stats", help="counts of conversations, messages, labels, snapshots")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=stats_command)

    p = data.add_parser("import", help="import a dataset file as conversations (all or nothing)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=FORMAT_CHOICES, help="the file's format (default: detected)")
    p.add_argument("--again", action="store_true", help="import a file that was imported before as a second copy")
    p.set_defaults(func=import_command)

    p = data.add_parser("export", help="write a snapshot, or what the filter chooses now, to a file")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--format", choices=FORMAT_CHOICES, required=True)
    p.add_argument(
        "--snapshot",
        type=flags.record_id,
        metavar="ID",
        help="export this snapshot (default: what the filter chooses now)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--no-weights",
        dest="weights",
        action="store_false",
        help='leave out answers marked "weight": 0 (context only) with the question '
        "each answers, for tools that train on every answer (TRL ignores weight)",
    )
    add_filter_options(p)
    p.set_defaults(func=export_command)

    p = data.add_parser("snapshot", help="freeze what would train now")
    snap = p.add_subparsers(dest="snapshot_command", metavar="COMMAND", required=True)
    p = snap.add_parser("create", help="materialise the filter into an immutable snapshot")
    p.add_argument("--name", default="", help="a name to remember it by")
    add_filter_options(p)
    p.set_defaults(func=snapshot_create_command)
    p = snap.add_parser("list", help="list snapshots, newest first")
    p.set_defaults(func=snapshot_list_command)

    p = data.add_parser("backup", help="copy the database safely, even while Kettle runs")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=backup_command)

    p = data.add_parser("search", help="full-text search over messages")
    p.add_argument("query", metavar="QUERY", nargs="+")
    p.add_argument("--limit", type=flags.positive_int, default=20)
    p.set_defaults(func=search_command)


FORMAT_CHOICES = list(FORMATS)  # one entry each in data.formats.FORMAT_TABLE


def add_filter_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filter (which answers are chosen)")
    g.add_argument(
        "--thumbs-up", action=argparse.BooleanOptionalAction, default=True, help="answers voted up (default: yes)"
    )
    g.add_argument(
        "--ideal",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answers with a corrected answer (default: yes)",
    )
    g.add_argument("--min-score", type=flags.integer(1, 5), metavar="N", help="answers scored N (1-5) or more")
    g.add_argument("--all-answers", action="store_true", help="every answer not voted down")
    g.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="only answers with one of these tags (repeatable)"
    )
    g.add_argument(
        "--exclude-tag", action="append", default=[], metavar="TAG", help="leave out answers with this tag (repeatable)"
    )


def data_filter(args):
    from data.records import DataFilter

    return DataFilter(
        thumbs_up=args.thumbs_up,
        ideal=args.ideal,
        min_score=args.min_score,
        all_answers=args.all_answers,
        tags_include=tuple(args.tag),
        tags_exclude=tuple(args.exclude_tag),
    )


def print_skipped(skipped) -> None:
    for reason, count in sorted(skipped.items()):
        print(f"  skipped {count}: {reason}")


def stats_command(args) -> int:
    from data.store import open_store

    with open_store(read_only=True) as store:
        counts = store.stats()
        path = store.path
    if args.json:
        print(json.dumps({"database": str(path), **counts}, indent=2))
        return 0
    print(
        f"database: {path} ({path.stat().st_size / 1e6:.1f} MB)"
        if path.exists()
        else f"database: {path} (nothing stored yet)"
    )
    width = max(map(len, counts))
    for name, value in counts.items():
        print(f"  {name.replace('_', ' '):<{width}}  {value:>8,}")
    return 0


def import_command(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from data.formats import check_file, import_file, shown
    from data.store import open_store

    check_file(args.file)  # before the store is opened and the bar drawn: a refusal changes nothing
    with (
        open_store() as store,
        # Drawn in a terminal only: elsewhere a transient bar still leaves an empty line on stdout.
        Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
            disable=not sys.stdout.isatty(),
        ) as bar,
    ):
        task = bar.add_task("importing", total=None)
        report = import_file(
            store,
            args.file,
            fmt=args.format,
            again=args.again,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    print(
        f"imported {report.conversations:,} conversations ({report.messages:,} messages) "
        f"from {shown(report.path)} as {report.format}"
    )
    for name, count in sorted(report.ignored.items()):
        print(f"  ignored field {name!r} in {count:,} records (Kettle does not keep it)")
    return 0


def export_command(args) -> int:
    from pathlib import Path

    from data.formats import check_target, export_file
    from data.records import DataFilter
    from data.store import open_store
    from gpt.errors import KettleError

    filt = data_filter(args)
    if args.snapshot is not None and filt != DataFilter():
        raise KettleError("--snapshot exports the snapshot as it was made; drop the filter options")
    check_target(args.out)
    if Path(args.out).exists() and not args.force:
        raise KettleError(f"{args.out} exists; pass --force to replace it")
    with open_store(read_only=True) as store:
        report = export_file(
            store,
            args.out,
            fmt=args.format,
            snapshot_id=args.snapshot,
            filt=None if args.snapshot is not None else filt,
            weights=args.weights,
        )
    source = f"snapshot {args.snapshot}" if args.snapshot is not None else "the filter"
    print(f"wrote {report.written:,} {args.format} records from {source} to {report.path}")
    if report.context_dropped:
        print(
            f"  left out {report.context_dropped:,} answers marked weight 0 (context only), "
            "with the questions they answer"
        )
    print_skipped(report.skipped)
    return 0


def backup_command(args) -> int:
    from pathlib import Path

    from data.formats import check_target
    from data.store import open_store
    from gpt.errors import KettleError

    out = Path(args.out)
    check_target(out)
    if out.exists() and not args.force:
        raise KettleError(f"{args.out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise KettleError(f"{out.parent} is not a folder")
    with open_store(read_only=True) as store:
        store.backup(out)
    with open_store(out, read_only=True) as copy:  # the copy opens, and says what it holds
        counts = copy.stats()
    print(f"backed up {counts['conversations']:,} conversations, {counts['messages']:,} messages to {out}")
    return 0


def snapshot_create_command(args) -> int:
    from collections import Counter

    from data.store import open_store

    skipped = Counter()
    with open_store() as store:
        snap = store.create_snapshot(data_filter(args), name=args.name, skipped=skipped)
    print(
        f"snapshot {snap.id}{f' ({snap.name})' if snap.name else ''}: {snap.n_examples:,} "
        f"examples, {snap.n_pairs:,} preference pairs, sha256 {snap.content_hash[:16]}"
    )
    print_skipped(skipped)
    if not snap.n_examples and not snap.n_pairs:
        print("  nothing chosen: vote answers up, write corrected answers, or widen the filter")
    return 0


def snapshot_list_command(args) -> int:
    import time

    from data.store import open_store

    with open_store(read_only=True) as store:
        snaps = store.snapshots()
    if not snaps:
        print("no snapshots yet: `kettle data snapshot create`")
    for s in snaps:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at))
        print(f"{s.id:>5}  {when}  {s.n_examples:>7,} examples  {s.n_pairs:>6,} pairs  {s.content_hash[:12]}  {s.name}")
    return 0


def search_command(args) -> int:
    from data.store import open_store

    with open_store(read_only=True) as store:
        hits = store.search(" ".join(args.query), limit=args.limit)
    if not hits:
        print("no matches")
    for h in hits:
        snippet = " ".join(h.snippet.split())
        print(f"conversation {h.conversation_id} · message {h.message_id} · {h.role}: {snippet}")
    return 0
