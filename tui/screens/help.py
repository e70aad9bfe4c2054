"""The help screen: every key, where it works, its binding id, and how to change it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from data.paths import config_path
from tui.screens.table import SCREENS, load

if TYPE_CHECKING:
    from textual.app import App

# The dialogs whose keys the help screen lists, after the screens' (place, "module:Class").
DIALOGS = [("Editor", "tui.screens.modals:EditorModal")]

TIPS = """\
[b]Keys[/]  Enter sends; [b]Ctrl+J[/] inserts a new line (Shift+Enter and Alt+Enter too, in terminals
that report them). Esc stops an answer. Tab moves between the chat list, the messages and the prompt;
Up/Down move between messages, then a single key labels the focused answer.
[b]Everything[/] is also in the command palette: [b]Ctrl+P[/].
[b]Change a key[/]: add it to {config} under "keys", by binding id, then restart Kettle:
  {{"keys": {{"chat.stop": "escape,ctrl+c", "message.up": "plus"}}}}
[b]Theme[/]: Ctrl+P → "Change theme"; Kettle remembers it.
"""


def places(app: App) -> list[tuple[str, type]]:
    """Where each group of keys works, and the class that declares them: the app, each screen
    followed by its widgets (tui.screens.table), then the dialogs."""
    out = [("Everywhere", type(app))]
    for entry in SCREENS:
        out.append((entry.title, load(entry.screen)))
        out.extend((place, load(path)) for place, path in entry.parts)
    return out + [(place, load(path)) for place, path in DIALOGS]


def declared_bindings(app: App) -> list[tuple[str, Binding]]:
    """(place, binding) for every binding with an id, in the order of `places`."""
    return [
        (place, binding)
        for place, owner in places(app)
        for binding in owner.BINDINGS
        if isinstance(binding, Binding) and binding.id
    ]


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
