"""The Docs screen: the documents the assistant answers from (data.memory). Add a file or folder,
see what is indexed, remove a source; Python's own documentation is indexed on first use."""

from __future__ import annotations

import asyncio
import time

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Button, DataTable, Input, ProgressBar, Static

from data import memory
from tui.errors import guarded
from tui.widgets.footer import KettleFooter


class DocsScreen(Screen):
    BINDINGS = [
        Binding("delete", "remove", "Remove", id="docs.remove"),
        Binding("ctrl+r", "reindex", "Re-index all", id="docs.reindex"),
        Binding("ctrl+y", "index_python", "Index Python's docs", id="docs.python"),
    ]

    def compose(self):
        yield Static(
            "[b]Docs[/]  [dim]what answers are grounded in: your corrections, the model's own lessons, "
            "Python's documentation, and the files you add here[/]",
            classes="screen-title",
        )
        with Horizontal(id="docs-add"):
            yield Input(placeholder="A file or folder to add (.md .txt .rst .py .html); Enter adds", id="docs-path")
            yield Button("Add", id="docs-add-button", variant="primary")
        yield ProgressBar(id="docs-progress", show_eta=True)
        yield Static("", id="docs-status")
        yield DataTable(id="docs-table", cursor_type="row", zebra_stripes=True)
        yield KettleFooter()

    def on_mount(self) -> None:
        self.query_one("#docs-table", DataTable).add_columns("Passages", "Source", "Added")
        self.query_one("#docs-progress").display = False
        self.refresh_sources()
        self.query_one("#docs-path").focus()

    @work(exclusive=True, group="docs-list")
    @guarded
    async def refresh_sources(self) -> None:
        store = self.app.store
        files, python = await self.app.db(
            lambda: (memory.doc_sources(store, kind="file"), memory.doc_sources(store, kind="python"))
        )
        table = self.query_one("#docs-table", DataTable)
        table.clear()
        for s in files:
            added = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.added_at))
            table.add_row(f"{s.n_passages:,}", Text(s.path), added, key=s.path)
        python_line = (
            f"Python's documentation: {len(python):,} modules, {sum(s.n_passages for s in python):,} passages"
            if python
            else "Python's documentation is not indexed yet: ctrl+y indexes it (the brew does too)"
        )
        self.query_one("#docs-status", Static).update(f"{python_line}; {len(files):,} of your files")

    @on(Input.Submitted, "#docs-path")
    @on(Button.Pressed, "#docs-add-button")
    def _add(self) -> None:
        path = self.query_one("#docs-path", Input).value.strip()
        if path:
            self.add_path(path)

    @work(exclusive=True, group="docs-index")
    @guarded
    async def add_path(self, path: str) -> None:
        files = await asyncio.to_thread(memory.doc_files, path)  # a bad path is refused before any work
        bar = self.query_one("#docs-progress", ProgressBar)
        bar.update(total=len(files), progress=0)
        bar.display = True

        def progress(done: int, _path) -> None:
            self.app.call_from_thread(bar.update, progress=done)

        try:
            report = await self.app.db(memory.index_documents, self.app.store, files, progress=progress)
        finally:
            bar.display = False
        self.query_one("#docs-path", Input).value = ""
        self.app.notify(
            f"{report.added:,} new and {report.updated:,} changed files indexed ({report.passages:,} passages); "
            f"{report.unchanged:,} unchanged, {report.duplicates:,} duplicates"
        )
        self.refresh_sources()

    def action_remove(self) -> None:
        table = self.query_one("#docs-table", DataTable)
        if table.row_count:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            self.remove_source(key)

    @work(exclusive=True, group="docs-index")
    @guarded
    async def remove_source(self, path: str) -> None:
        gone = await self.app.db(memory.remove_documents, self.app.store, path)
        self.app.notify(f"removed {path}" if gone else f"{path} was not indexed")
        self.refresh_sources()

    @work(exclusive=True, group="docs-index")
    @guarded
    async def action_index_python(self) -> None:
        """`kettle docs python` in a process of its own (it parses every standard module)."""
        from tui.screens.modals import TaskModal

        if await self.app.push_screen_wait(TaskModal("Indexing Python's documentation", ["docs", "python"])):
            self.refresh_sources()

    def action_reindex(self) -> None:
        table = self.query_one("#docs-table", DataTable)
        paths = [str(row.value) for row in table.rows]
        if paths:
            self.reindex(paths)

    @work(exclusive=True, group="docs-index")
    @guarded
    async def reindex(self, paths: list[str]) -> None:
        from pathlib import Path

        present = [Path(p) for p in paths if Path(p).is_file()]
        report = await self.app.db(memory.index_documents, self.app.store, present)
        for gone in set(paths) - {str(p) for p in present}:  # deleted since: forgotten
            await self.app.db(memory.remove_documents, self.app.store, gone)
        self.app.notify(f"{report.updated:,} changed files re-indexed, {report.unchanged:,} unchanged")
        self.refresh_sources()
