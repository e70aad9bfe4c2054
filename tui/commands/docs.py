"""`kettle docs ...`: the documents the assistant answers from (data.memory)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("docs", help="documents the assistant answers from, with their sources shown")
    docs = p.add_subparsers(dest="docs_command", metavar="COMMAND", required=True)

    p = docs.add_parser("add", help="index files or folders (.md .txt .rst .py .html); a changed file is re-indexed")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.set_defaults(func=add_command)

    p = docs.add_parser("list", help="the documents indexed, with their passages")
    p.set_defaults(func=list_command)

    p = docs.add_parser("remove", help="forget a file, or every file under a folder")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.set_defaults(func=remove_command)

    p = docs.add_parser("python", help="index the installed Python's documentation (done on first use otherwise)")
    p.set_defaults(func=python_command)

    p = docs.add_parser("search", help="the passages a question would be answered from")
    p.add_argument("question", metavar="QUESTION", nargs="+")
    p.set_defaults(func=search_command)


def progress_bar(description: str):
    """A transient bar with count, rate and time left, drawn only in a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    return Progress(
        description,
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stdout.isatty(),
    )


def add_command(args) -> int:
    from data import memory
    from data.store import open_store

    files = [f for path in args.paths for f in memory.doc_files(path)]  # every path checked first
    with open_store() as store, progress_bar("indexing {task.fields[name]}") as bar:
        task = bar.add_task("", total=len(files), name="")
        report = memory.index_documents(
            store, files, progress=lambda done, path: bar.update(task, completed=done, name=path.name)
        )
    print(
        f"indexed {report.added:,} new and {report.updated:,} changed files ({report.passages:,} passages); "
        f"{report.unchanged:,} unchanged, {report.duplicates:,} duplicates of files already indexed"
    )
    return 0


def list_command(args) -> int:
    from data import memory
    from data.store import open_store

    with open_store(read_only=True) as store:
        files = memory.doc_sources(store, kind="file")
        python = memory.doc_sources(store, kind="python")
        lessons = memory.lesson_counts(store)
    if python:
        print(f"Python's documentation: {len(python):,} modules, {sum(s.n_passages for s in python):,} passages")
    for model, n in lessons.items():
        print(f"{model}'s lessons: {n:,}")
    for source in files:
        print(f"{source.n_passages:>6,} passages  {source.path}")
    if not files and not python and not lessons:
        print("no documents yet: `kettle docs add PATH`")
    return 0


def remove_command(args) -> int:
    from data import memory
    from data.store import open_store
    from gpt.errors import KettleError

    with open_store() as store:
        for path in args.paths:
            gone = memory.remove_documents(store, path)
            if not gone:
                raise KettleError(f"{path}: no indexed document there (`kettle docs list` shows them)")
            print(f"removed {gone:,} {'file' if gone == 1 else 'files'} under {path}")
    return 0


def python_command(args) -> int:
    from data.store import open_store

    with open_store() as store:
        report = index_python(store)
    print(
        f"Python's documentation: {report.added + report.updated:,} modules indexed "
        f"({report.passages:,} passages), {report.unchanged:,} unchanged"
    )
    return 0


def remember(store, name: str, model_dir, *, bar: bool = True) -> None:
    """What a model's grounded answers draw on: the installed Python's documentation (indexed
    the first time, with a progress bar unless `bar` is False) and the model's own lessons."""
    from data import memory

    if not memory.has_python_docs(store):
        if bar:
            index_python(store)
        else:
            memory.index_python_docs(store)
    remember_lessons(store, name, model_dir)


def remember_lessons(store, name: str, model_dir) -> int:
    """Index the lessons of the model in `model_dir` (none when it has no replay file, or its
    files are on another machine); how many were new."""
    from data import memory
    from finetune.replay import lessons

    return memory.index_lessons(store, name, lessons(model_dir))


def index_python(store):
    """Index the installed Python's documentation with a progress bar."""
    from data import memory

    with progress_bar("Python's documentation: {task.fields[name]}") as bar:
        task = bar.add_task("", total=None, name="")
        return memory.index_python_docs(
            store, progress=lambda done, total, name: bar.update(task, completed=done, total=total, name=name)
        )


def search_command(args) -> int:
    from data import memory
    from data.store import open_store

    with open_store(read_only=True) as store:
        found = memory.retrieve(store, " ".join(args.question))
    if not found:
        print("nothing in the store answers that")
    for p in found:
        text = " ".join(p.text.split())
        print(f"[{p.kind}] {p.source} · {p.name}: {text[:200]}")
    return 0
