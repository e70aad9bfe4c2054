"""The dataset screen: what would train now, by label and tag; filters; exclude / include;
snapshots; export to any supported format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen, Screen
from textual.widgets import Checkbox, DataTable, Input, Label, Markdown, Select, Static

from data.formats import FORMAT_TABLE, export_file
from data.paths import kettle_home
from data.records import DataFilter
from data.store import Store
from tui.errors import guarded
from tui.screens.modals import ChoiceModal, TextModal
from tui.widgets.chat import chat_markdown, counted, label_text
from tui.widgets.footer import KettleFooter
from tui.widgets.sidebar import when

# The examples table: the id and turns columns are this wide; prompt, answer and label share
# the rest (each column also has a cell of padding either side, and the scrollbar takes 2).
ID_WIDTH, TURNS_WIDTH = 5, 5


def export_choices() -> list[tuple[str, str]]:
    """The export dialog's (format, line) options: every entry of data.formats.FORMAT_TABLE."""
    return [(f.name, f"{f.name}: {f.help}") for f in FORMAT_TABLE.values()]


@dataclass
class DatasetView:
    """Everything the screen shows, read in one go off the UI thread."""

    rows: list[dict]  # {"message_id", "example", "label", "excluded"}
    pairs: int
    stats: dict
    tags: Counter
    snapshots: list


def export_suggestion(fmt: str) -> Path:
    """Where an export is offered to go: ~/Downloads where there is one, else KETTLE_HOME/exports
    (never the folder the app was started in, which may be a git checkout), under a name that
    is not taken yet."""
    downloads = Path.home() / "Downloads"
    folder = downloads if downloads.is_dir() else kettle_home() / "exports"
    suffix = FORMAT_TABLE[fmt].suffix
    path, n = folder / f"kettle-{fmt}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"kettle-{fmt}-{n}{suffix}"
    return path


def read_dataset(store: Store, filt: DataFilter, *, shown_excluded: set[int]) -> DatasetView:
    examples, pairs = store.dataset(filt)
    ids = [e["message_id"] for e in examples] + sorted(shown_excluded)
    labels = store.labels(ids)
    rows = [
        {
            "message_id": e["message_id"],
            "example": e["example"],
            "label": labels.get(e["message_id"]),
            "excluded": False,
        }
        for e in examples
    ]
    # Answers excluded here stay listed (marked) so that one key brings them back.
    for mid in sorted(shown_excluded - {e["message_id"] for e in examples}):
        label = labels.get(mid)
        if label is not None and label.excluded:
            rows.append(
                {"message_id": mid, "example": {"messages": store.chat_messages(mid)}, "label": label, "excluded": True}
            )
    tags = Counter(t for r in rows if r["label"] and not r["excluded"] for t in r["label"].tags)
    return DatasetView(rows, len(pairs), store.stats(), tags, store.snapshots())


def preview(text: str, width: int) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def column_widths(table_width: int) -> tuple[int, int, int]:
    """(prompt, answer, label) widths that fill a table `table_width` wide, so that every
    column stays in view however narrow the terminal (at 80 columns, preview-wide columns
    pushed the label and turns out of sight)."""
    free = max(30, table_width - ID_WIDTH - TURNS_WIDTH - 2 * 5 - 2)
    label = max(8, free // 4)
    prompt = (free - label) // 2
    return prompt, free - label - prompt, label


def example_markdown(example: dict) -> str:
    parts = []
    for m in example["messages"]:
        note = " *(context, not learned)*" if m.get("weight") == 0 else ""
        parts.append(f"**{m['role']}**{note}\n\n{m['content']}")
    return "\n\n---\n\n".join(parts)


class ExampleModal(ModalScreen):
    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close", id="example.close")]

    def __init__(self, example: dict):
        super().__init__()
        self.example = example

    def compose(self):
        with VerticalScroll(classes="dialog help-dialog"):
            yield Static("[b]Training example[/]  [dim]Esc closes[/]", classes="dialog-title")
            yield Markdown(example_markdown(self.example), parser_factory=chat_markdown)


class DatasetScreen(Screen):
    BINDINGS = [
        Binding("enter,o", "open", "Open", id="dataset.open"),
        Binding("x", "exclude", "Exclude/include", id="dataset.exclude"),
        Binding("s", "snapshot", "Snapshot", id="dataset.snapshot"),
        Binding("e", "export", "Export", id="dataset.export"),
        Binding("ctrl+r", "reload", "Reload", show=False, id="dataset.reload"),
    ]

    def __init__(self):
        super().__init__()
        self.view: DatasetView | None = None
        self.shown_excluded: set[int] = set()

    def compose(self):
        yield Static(
            "[b]Dataset[/]  [dim]what would train now · Enter open · x exclude/include · s snapshot · e export[/]",
            classes="screen-title",
        )
        with Horizontal(id="dataset-body"):
            with VerticalScroll(id="dataset-filters"):
                yield Static("[b]Train on answers that…[/]")
                yield Checkbox("are voted up", True, id="f-thumbs")
                yield Checkbox("were corrected", True, id="f-ideal")
                yield Checkbox("any not voted down", False, id="f-all")
                yield Label("or scored at least")
                yield Select([(str(n), n) for n in range(1, 6)], prompt="any score", id="f-score")
                yield Label("with a tag (comma-separated)")
                yield Input(placeholder="any tag", id="f-tags-in")
                yield Label("without the tags")
                yield Input(placeholder="none", id="f-tags-out")
            with Vertical(id="dataset-main"):
                yield Static("", id="dataset-counts")
                yield DataTable(id="dataset-table", cursor_type="row", zebra_stripes=True)
                yield Static("[b]Snapshots[/] [dim](frozen, content-hashed; fine-tuning uses one)[/]")
                yield DataTable(id="snapshots-table", cursor_type="row", zebra_stripes=True)
        yield KettleFooter()

    def on_mount(self) -> None:
        self.query_one("#snapshots-table", DataTable).add_columns("#", "Name", "Examples", "Pairs", "Hash", "Made")
        self.load()

    def on_screen_resume(self) -> None:
        self.load()

    def on_resize(self) -> None:
        self.load()  # the columns follow the table's width

    # -- reading --------------------------------------------------------------------------------

    def current_filter(self) -> DataFilter:
        score = self.query_one("#f-score", Select).value
        return DataFilter(
            thumbs_up=self.query_one("#f-thumbs", Checkbox).value,
            ideal=self.query_one("#f-ideal", Checkbox).value,
            all_answers=self.query_one("#f-all", Checkbox).value,
            min_score=None if score is Select.NULL else int(score),
            tags_include=tuple(t for t in self.query_one("#f-tags-in", Input).value.split(",") if t.strip()),
            tags_exclude=tuple(t for t in self.query_one("#f-tags-out", Input).value.split(",") if t.strip()),
        )

    @on(Checkbox.Changed)
    @on(Select.Changed)
    @on(Input.Changed)
    def _filter_changed(self) -> None:
        self.load()

    @work(exclusive=True, group="dataset-load")
    @guarded
    async def load(self) -> None:
        view = await self.app.db(
            read_dataset, self.app.store, self.current_filter(), shown_excluded=set(self.shown_excluded)
        )
        self.view = view
        s = view.stats
        active = [r for r in view.rows if not r["excluded"]]
        tags = escape("  ".join(f"#{t} {n}" for t, n in view.tags.most_common(8)) or "no tags")
        self.query_one("#dataset-counts", Static).update(
            f"[b]{counted(len(active), 'example')}[/] and [b]{counted(view.pairs, 'preference pair')}[/] "
            "would train now.\n"
            f"[dim]labels:[/] ▲ {s['thumbs_up']} up · ▼ {s['thumbs_down']} down · ★ {s['scored']} scored · "
            f"✎ {s['corrected']} corrected · ⊘ {s['excluded']} excluded   [dim]tags:[/] {tags}"
        )
        table = self.query_one("#dataset-table", DataTable)
        row = table.cursor_row
        widths = column_widths(table.size.width)
        table.clear(columns=True)
        for title, width in zip(("#", "Prompt", "Answer", "Label", "Turns"), (ID_WIDTH, *widths, TURNS_WIDTH)):
            table.add_column(title, width=width)
        for r in view.rows:
            messages = r["example"]["messages"]
            prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            answer = messages[-1]["content"] if messages else ""
            label = "⊘ excluded" if r["excluded"] else label_text(r["label"], markup=False)
            # user text goes in as Text: a DataTable reads plain strings as markup
            table.add_row(
                str(r["message_id"]),
                *(Text(preview(text, width)) for text, width in zip((prompt, answer, label), widths)),
                str(sum(m["role"] == "assistant" for m in messages)),
                key=str(r["message_id"]),
            )
        if view.rows:
            table.move_cursor(row=min(row, len(view.rows) - 1))
        snaps = self.query_one("#snapshots-table", DataTable)
        snaps.clear()
        now = self.app.clock()
        for snap in view.snapshots:
            snaps.add_row(
                str(snap.id),
                Text(snap.name),
                str(snap.n_examples),
                str(snap.n_pairs),
                snap.content_hash[:12],
                when(snap.created_at, now),
            )

    def selected_row(self) -> dict | None:
        table = self.query_one("#dataset-table", DataTable)
        if self.view is None or not self.view.rows or table.cursor_row >= len(self.view.rows):
            return None
        return self.view.rows[table.cursor_row]

    # -- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("open", "exclude"):
            return self.query_one("#dataset-table", DataTable).has_focus
        return True

    @on(DataTable.RowSelected, "#dataset-table")
    def _row_chosen(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        row = self.selected_row()
        if row is not None:
            self.app.push_screen(ExampleModal(row["example"]))

    @work(group="dataset-edit")
    @guarded
    async def action_exclude(self) -> None:
        row = self.selected_row()
        if row is None:
            return
        excluded = not row["excluded"]
        await self.app.db(self.app.store.set_label, row["message_id"], excluded=excluded)
        self.shown_excluded.add(row["message_id"])
        self.notify(
            f"Answer {row['message_id']} " + ("excluded from every dataset." if excluded else "included again.")
        )
        self.load()

    @work(group="dataset-edit")
    @guarded
    async def action_snapshot(self) -> None:
        name = await self.app.push_screen_wait(TextModal("Name the snapshot", "", "e.g. first 50 labels"))
        if name is None:
            return
        snap = await self.app.db(self.app.store.create_snapshot, self.current_filter(), name.strip())
        self.notify(
            f"Snapshot #{snap.id}: {snap.n_examples} examples, {snap.n_pairs} pairs (hash {snap.content_hash[:12]})."
        )
        self.load()

    @work(group="dataset-edit")
    @guarded
    async def action_export(self) -> None:
        fmt = await self.app.push_screen_wait(ChoiceModal("Export what would train now as…", export_choices()))
        if fmt is None:
            return
        default = await self.app.db(export_suggestion, fmt)
        out = await self.app.push_screen_wait(TextModal("Export to file", str(default)))
        if not out:
            return
        out = Path(out).expanduser()
        if out.parent == kettle_home() / "exports":  # the suggested folder is made on first use
            await self.app.db(out.parent.mkdir, exist_ok=True)
        report = await self.app.db(export_file, self.app.store, out, fmt=fmt, filt=self.current_filter())
        skipped = sum(report.skipped.values())
        self.notify(
            f"Wrote {report.written} records to {report.path}"
            + (f"; {skipped} skipped ({', '.join(report.skipped)})" if skipped else "."),
            timeout=10,
        )

    def action_reload(self) -> None:
        self.load()
