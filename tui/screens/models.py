"""The models screen: every model version with its lineage and metrics; activate, import,
download GPT-2, brew the starter. The actions are shared with the welcome screen and the palette."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import DataTable, Static

from data.paths import kettle_home, models_dir
from data.records import ModelVersion
from data.registry import resolve_model_dir, unique_name
from data.store import Store
from finetune.starter import BREW_TIME, own_lessons_text, parse_eta
from finetune.verdict import summary_lines
from gpt.errors import KettleError
from tui.errors import error_text, guarded
from tui.screens.modals import ChoiceModal, TaskModal, TextModal
from tui.widgets.footer import KettleFooter
from tui.widgets.sidebar import when

GPT2_SIZES = [
    ("gpt2", "GPT-2 124M (≈500 MB download)"),
    ("gpt2-medium", "GPT-2 355M (≈1.5 GB)"),
    ("gpt2-large", "GPT-2 774M (≈3.2 GB)"),
    ("gpt2-xl", "GPT-2 1558M (≈6.4 GB)"),
]


def shown_path(path: str) -> str:
    """A model's directory, relative to KETTLE_HOME when it lives there."""
    try:
        return str(Path(path).relative_to(kettle_home()))
    except ValueError:
        return path


def loss_of(version: ModelVersion) -> float | None:
    """The held-out loss a version was measured at, whichever step recorded it: a fine-tune on
    fewer examples than it holds out from has none on the user's examples, and is measured on
    its base's held-out instruction data (replay)."""
    for key in ("gate_new_loss", "val_loss", "best_val_loss", "replay_loss_after"):
        value = version.metrics.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def describe(store: Store, version: ModelVersion, *, active_id: int | None) -> str:
    """The detail pane: lineage, metrics, where it lives."""
    chain = escape(" → ".join(v.name for v in reversed(store.lineage(version.id))))
    lines = [
        f"[b]{escape(version.name)}[/]" + ("  [b $success]● active[/]" if version.id == active_id else ""),
        f"[dim]kind[/] {version.kind}   [dim]status[/] {version.status}",
        f"[dim]lineage[/] {chain}",
        f"[dim]directory[/] {escape(shown_path(version.path))}",
    ]
    if version.snapshot_id is not None:
        lines.append(f"[dim]trained on snapshot[/] #{version.snapshot_id}")
    loss = loss_of(version)
    if loss is not None:
        lines.append(f"[dim]held-out loss[/] {loss:.3f}")
    if "own_lessons" in version.metrics:  # a starter: how many of its lessons it answers
        lines.append(f"[dim]own lessons[/] {own_lessons_text(version.metrics)}")
    if "gate" in version.metrics:  # a fine-tune: its verdict, as the sheet and its card word it
        lines += ["[dim]verdict[/]", *(f"  {escape(line)}" for line in summary_lines(version.metrics))]
    for key in (  # what the verdict does not already say
        "val_loss",
        "first_loss",
        "last_loss",
        "steps",
        "train",
        "held_out",
        "train_seconds",
        "seconds",
    ):
        value = version.metrics.get(key)
        if value is not None:
            lines.append(
                f"[dim]{key.replace('_', ' ')}[/] {value:.4g}"
                if isinstance(value, float)
                else f"[dim]{key.replace('_', ' ')}[/] {value}"
            )
    if version.note:
        lines.append(escape(version.note))
    return "\n".join(lines)


def register(store: Store, path: Path, *, kind: str, name: str | None = None) -> tuple[ModelVersion, bool]:
    """Record a model directory unless the store already knows it (the brew and download
    commands may have), and make it active when no model is. Returns (version, is it active)."""
    version, _ = store.register_model(path, kind, name=unique_name(store, name or path.name, own=path))
    return version, store.active_model().id == version.id


def import_model(store: Store, source: str) -> tuple[ModelVersion, bool]:
    """A Kettle model directory is registered where it is, once it passes every check loading
    it makes (a broken one registered would become the active model); a Hugging Face GPT-2
    directory is converted into KETTLE_HOME/models first, checked as `kettle import-hf` does;
    a LoRA adapter (Kettle's or PEFT's) is merged into its base there, as `finetune merge` does."""
    from finetune.lora import is_adapter_dir, merge_adapter
    from gpt.checkpoint import check_model_dir
    from gpt.hf import import_hf, is_hf_dir

    path = Path(source).expanduser()
    if not path.is_dir():
        raise KettleError(f"{path}: not a directory")
    if is_adapter_dir(path):
        base = adapter_base(store, path)
        out = models_dir() / unique_name(store, f"{base.resolve().name}-{path.resolve().name}")
        merge_adapter(base, path, out_dir=out)
        return register(store, out, kind="imported")
    if not is_hf_dir(path):
        check_model_dir(path, values=True)
        return register(store, path.resolve(), kind="imported")
    out = models_dir() / unique_name(store, path.resolve().name)
    import_hf(path, out)
    return register(store, out, kind="imported")


def adapter_base(store: Store, adapter: Path) -> Path:
    """The Kettle model an adapter is merged into: the one it names (a model's name or
    directory; a hub id "org/gpt2" by its last part), else the active model."""
    from finetune.lora import recorded_base
    from gpt.hf import is_hf_dir

    named = recorded_base(adapter)
    for candidate in [named, named.rstrip("/").rpartition("/")[2]] if named else []:
        try:
            found = resolve_model_dir(candidate)
        except KettleError:
            continue
        if found.is_dir() and not is_hf_dir(found):  # an export's adapter: its Kettle model instead
            return found
    active = store.active_model()
    if active is None:
        raise KettleError(
            f"{adapter}: its base model {named or '(not named)'} is not one of "
            "yours and no model is active to merge it into"
        )
    return Path(active.path)


async def after_new_model(app, version: ModelVersion | None, *, activated: bool) -> None:
    """Tell the user, and start chatting when this was the first model."""
    if version is None:
        return
    app.notify(
        f"Model {version.name} is ready" + (" and active." if activated else " (activate it on the models screen, F4).")
    )
    if app.service is None:
        await app.load_service()
        await app.switch_mode("chat")
    elif activated:
        await app.service.switch_model(version.name)
        app.model_changed.publish(app.model_name())


async def brew_starter(app) -> None:
    """Brew into models/starter; when one is there, the user picks a new name or replacing it."""
    path, args = models_dir() / "starter", ["brew", "starter"]
    if path.exists():
        other = await app.db(unique_name, app.store, "starter")
        choice = await app.push_screen_wait(
            ChoiceModal(
                "A starter model already exists",
                [
                    ("new", f"Brew another one as {other} (the first one stays)"),
                    ("replace", "Replace the starter: its weights are deleted (models fine-tuned from it keep theirs)"),
                ],
            )
        )
        if choice is None:
            return
        if choice == "new":
            path = models_dir() / other
            args += ["--out", str(path)]
        else:
            args.append("--force")
    task = TaskModal(f"Brewing {path.name} (offline)", args, estimate=BREW_TIME, eta=parse_eta)
    if not await app.push_screen_wait(task):
        return
    # A replaced starter that is active counts as activated: the service reloads its weights.
    version, activated = await app.db(register, app.store, path, kind="starter", name=path.name)
    await after_new_model(app, version, activated=activated)


async def download_gpt2(app) -> None:
    size = await app.push_screen_wait(ChoiceModal("Download which GPT-2?", GPT2_SIZES))
    if size is None:
        return
    out = models_dir() / size
    if not out.exists() and not await app.push_screen_wait(
        TaskModal(f"Downloading {size} from Hugging Face", ["download", size, "--out", str(out)])
    ):
        return
    version, activated = await app.db(register, app.store, out, kind="downloaded", name=size)
    await after_new_model(app, version, activated=activated)


async def import_dir(app) -> None:
    source = await app.push_screen_wait(
        TextModal(
            "Import a model directory",
            "",
            "/path/to/model",
            "A Kettle model directory, a Hugging Face GPT-2 one (config.json + weights), or a LoRA "
            "adapter (Kettle's or PEFT's) to merge into its base",
        )
    )
    if not source:
        return
    app.notify("Importing…", timeout=2)
    version, activated = await app.db(import_model, app.store, source)
    await after_new_model(app, version, activated=activated)


GGUF_TYPES = [
    ("q8_0", "q8_0: 8-bit, a quarter of f32's size, what Ollama users usually run"),
    ("f16", "f16: half size, near-identical answers"),
    ("f32", "f32: full precision, the same greedy answers as Kettle"),
]


async def export_gguf(app, version: ModelVersion) -> None:
    """Pick a weight type and a file; `kettle export-gguf` writes the GGUF file and the Ollama
    Modelfile beside it in a child process, as brewing does, so the app stays responsive."""
    from gpt.gguf_export import MODELFILE

    kind = await app.push_screen_wait(ChoiceModal(f"Export {version.name} to GGUF (llama.cpp, Ollama)", GGUF_TYPES))
    if kind is None:
        return
    default = kettle_home() / "exports" / f"{version.name}-{kind}" / f"{version.name}.gguf"
    out = await app.push_screen_wait(
        TextModal("Export to", str(default), "/path/to/model.gguf", f"An Ollama {MODELFILE} is written beside it")
    )
    if not out:
        return
    out = Path(out).expanduser()
    args = ["export-gguf", version.path, str(out), "--type", kind]
    if out.exists() or (out.parent / MODELFILE).exists():
        choice = await app.push_screen_wait(
            ChoiceModal(f"{out.name} or its {MODELFILE} exists", [("replace", "Replace them"), ("keep", "Cancel")])
        )
        if choice != "replace":
            return
        args.append("--force")
    if await app.push_screen_wait(TaskModal(f"Exporting {version.name} to {out.name} ({kind})", args)):
        app.notify(
            f"Exported to {out}. `ollama create {version.name} -f {out.parent / MODELFILE}` adds it to Ollama.",
            timeout=12,
        )


def model_commands(app):
    """Palette entries that work from any screen."""

    def run(action):
        async def task() -> None:
            try:
                await action(app)
            except Exception as exc:  # noqa: BLE001 - shown, not raised
                app.notify(error_text(exc), title="Error", severity="error", timeout=8)

        return lambda: app.run_worker(task(), group="model-task", exclusive=True)

    yield SystemCommand("Brew the starter model", "Train a small model offline on Python's docs", run(brew_starter))
    yield SystemCommand("Download GPT-2", "124M to 1558M, from Hugging Face", run(download_gpt2))
    yield SystemCommand(
        "Import a model", "A Kettle or Hugging Face GPT-2 directory, or a LoRA adapter", run(import_dir)
    )


class ModelsScreen(Screen):
    BINDINGS = [
        Binding("a", "activate", "Activate", id="models.activate"),
        Binding("i", "import", "Import", id="models.import"),
        Binding("g", "download", "Download GPT-2", id="models.download"),
        Binding("b", "brew", "Brew starter", id="models.brew"),
        Binding("e", "export_gguf", "Export GGUF", id="models.export-gguf"),
        Binding("ctrl+r", "reload", "Reload", show=False, id="models.reload"),
    ]

    def __init__(self):
        super().__init__()
        self.versions: list[ModelVersion] = []
        self.active_id: int | None = None

    def compose(self):
        yield Static(
            "[b]Models[/]  [dim]a activate · i import · g download GPT-2 · b brew starter[/]", classes="screen-title"
        )
        with Horizontal(id="models-body"):
            yield DataTable(id="models-table", cursor_type="row", zebra_stripes=True)
            with Vertical(id="models-detail-box"):
                yield Static("", id="models-detail")
        yield KettleFooter()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("", "Name", "Kind", "From", "Held-out loss", "Status", "Added")
        self.load()

    def on_screen_resume(self) -> None:
        self.load()

    @work(exclusive=True, group="models-load")
    @guarded
    async def load(self) -> None:
        store = self.app.store
        self.versions = await self.app.db(store.model_versions)
        active = await self.app.db(store.active_model)
        self.active_id = active.id if active else None
        names = {v.id: v.name for v in self.versions}
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        now = self.app.clock()
        for v in self.versions:
            loss = loss_of(v)
            table.add_row(
                "●" if v.id == self.active_id else "",
                Text(v.name),
                v.kind,
                Text(names.get(v.parent_id, "") if v.parent_id else ""),
                "" if loss is None else f"{loss:.3f}",
                v.status,
                when(v.created_at, now),
                key=str(v.id),
            )
        if self.versions:
            table.move_cursor(row=min(row, len(self.versions) - 1))
        await self.show_detail()

    @on(DataTable.RowHighlighted)
    async def _highlighted(self) -> None:
        await self.show_detail()

    def selected(self) -> ModelVersion | None:
        table = self.query_one(DataTable)
        if not self.versions or table.cursor_row is None or table.cursor_row >= len(self.versions):
            return None
        return self.versions[table.cursor_row]

    async def show_detail(self) -> None:
        version = self.selected()
        detail = self.query_one("#models-detail", Static)
        if version is None:
            detail.update("No models yet: b brews the starter, g downloads GPT-2, i imports one.")
            return
        detail.update(await self.app.db(describe, self.app.store, version, active_id=self.active_id))

    @work(exclusive=True, group="models-activate")
    @guarded
    async def action_activate(self) -> None:
        version = self.selected()
        if version is None:
            return
        await activate(self.app, version)
        self.load()

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_import(self) -> None:
        await import_dir(self.app)
        self.load()

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_download(self) -> None:
        await download_gpt2(self.app)
        self.load()

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_brew(self) -> None:
        await brew_starter(self.app)
        self.load()

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_export_gguf(self) -> None:
        version = self.selected()
        if version is not None:
            await export_gguf(self.app, version)

    def action_reload(self) -> None:
        self.load()

    def commands(self):
        version = self.selected()
        if version is not None:
            yield SystemCommand(
                f"Models: activate {version.name}", "Chat with it from now on (a)", self.action_activate
            )
            yield SystemCommand(
                f"Models: export {version.name} to GGUF",
                "For llama.cpp, Ollama, LM Studio (e)",
                self.action_export_gguf,
            )


async def activate(app, version: ModelVersion) -> None:
    """Chat with `version` from now on: the service swaps the model without a restart and
    records the activation in the store (a model that fails to load changes nothing)."""
    if version.status == "regressed":
        app.notify(
            f"{version.name} did worse than its parent on held-out data; activating it anyway.", severity="warning"
        )
    app.notify(f"Loading {version.name}…", timeout=2)
    if app.service is None:
        await app.db(app.store.activate_model, version.id)
        await app.load_service()
    else:
        await app.service.switch_model(version.name)  # the service records the activation
        app.load_failed = False
        app.model_changed.publish(app.model_name())
    app.notify(f"Now chatting with {version.name}.")
