"""First run: no model yet. Three ways to get one, each a single key."""

from __future__ import annotations

from textual import on, work
from textual.binding import Binding
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Button, Static

from finetune.starter import BREW_TIME
from tui.errors import guarded
from tui.screens.models import brew_starter, download_gpt2, import_dir
from tui.widgets.footer import KettleFooter

WELCOME = """\
[b]Welcome to Kettle[/]

Chat with a GPT that lives on this machine, label its answers with single keys, \
and fine-tune it on your labels with one more.

There is no model yet. Pick one way to get one:"""


class WelcomeScreen(Screen):
    BINDINGS = [
        Binding("b", "brew", "Brew starter", id="welcome.brew"),
        Binding("g", "download", "Download GPT-2", id="welcome.download"),
        Binding("i", "import", "Import", id="welcome.import"),
    ]

    def compose(self):
        with Center(id="welcome-box"):
            with Vertical(id="welcome"):
                yield Static(WELCOME, id="welcome-text")
                yield Button(f"b  Brew the starter model — offline, {BREW_TIME}", id="brew", variant="primary")
                yield Button("g  Download GPT-2 from Hugging Face — 124M to 1.5B parameters", id="download")
                yield Button("i  Import a model directory — Kettle or Hugging Face GPT-2", id="import")
                yield Static("[dim]F1 keys · Ctrl+P every command · Ctrl+Q quit[/]", id="welcome-hint")
        yield KettleFooter()

    def on_mount(self) -> None:
        self.query_one("#brew", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.run_action(str(event.button.id))

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_brew(self) -> None:
        await brew_starter(self.app)

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_download(self) -> None:
        await download_gpt2(self.app)

    @work(group="model-task", exclusive=True)
    @guarded
    async def action_import(self) -> None:
        await import_dir(self.app)
