"""The help screen: every key, where it works, its binding id, and how to change it."""
from __future__ import annotations

import importlib

from textual.binding import Binding
from textual.markup import escape
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from data.paths import config_path

# Where each group of keys works, and the class that declares them ("module:Class").
PLACES = [
    ("Everywhere", "tui.app:KettleApp"),
    ("Chat", "tui.screens.chat:ChatScreen"),
    ("Prompt", "tui.widgets.chat:PromptArea"),
    ("A focused message", "tui.widgets.chat:MessageView"),
    ("Chat list", "tui.widgets.sidebar:ConversationList"),
    ("Dataset", "tui.screens.dataset:DatasetScreen"),
    ("Fine-tune", "tui.screens.finetune:FinetuneScreen"),
    ("Models", "tui.screens.models:ModelsScreen"),
    ("Compare", "tui.screens.compare:CompareScreen"),
    ("Welcome", "tui.screens.welcome:WelcomeScreen"),
    ("Editor", "tui.screens.modals:EditorModal"),
]

TIPS = """\
[b]Keys[/]  Enter sends; [b]Ctrl+J[/] inserts a new line (Shift+Enter and Alt+Enter too, in terminals
that report them). Esc stops an answer. Tab moves between the chat list, the messages and the prompt;
Up/Down move between messages, then a single key labels the focused answer.
[b]Everything[/] is also in the command palette: [b]Ctrl+P[/].
[b]Change a key[/]: add it to {config} under "keys", by binding id, then restart Kettle:
  {{"keys": {{"chat.stop": "escape,ctrl+c", "message.up": "plus"}}}}
[b]Theme[/]: Ctrl+P → "Change theme"; Kettle remembers it.
"""


def _load(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def declared_bindings(app=None) -> list[tuple[str, Binding]]:
    """(place, binding) for every binding with an id, in PLACES order."""
    out = []
    for place, path in PLACES:
        for binding in _load(path).BINDINGS:
            if isinstance(binding, Binding) and binding.id:
                out.append((place, binding))
    return out


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="help.close")]

    def compose(self):
        with VerticalScroll(classes="dialog help-dialog"):
            yield Static("[b]Kettle keys[/]  [dim]Esc closes[/]", classes="dialog-title")
            yield Static(TIPS.format(config=escape(str(config_path()))), classes="help-tips")
            yield DataTable(id="keys", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#keys", DataTable)
        table.add_columns("Where", "Keys", "Does", "Binding id")
        keymap = getattr(self.app, "_keymap", {}) or {}
        for place, binding in declared_bindings(self.app):
            keys = keymap.get(binding.id, binding.key)
            shown = ", ".join(self.app.get_key_display(Binding(k, "")) for k in keys.split(","))
            table.add_row(place, shown, binding.description or binding.action, binding.id)
        scroll = self.query_one(VerticalScroll)
        scroll.focus()  # the tips first; arrows and PageDown scroll down to the table
        scroll.scroll_home(animate=False)
