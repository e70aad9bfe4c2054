"""The app's screens, declared once: each one's mode, title, class, the key that shows it and its
command palette line. tui.app builds its MODES, its keys for switching screens and its palette
commands from SCREENS, and the help screen its list of places.

Classes are named "module:Class" and imported when first needed, so start-up stays fast and no
screen module has to import another to be listed.
"""

from __future__ import annotations

import importlib
from dataclasses import KW_ONLY, dataclass


@dataclass(frozen=True)
class ScreenEntry:
    mode: str  # the Textual mode, and the action go('MODE')
    title: str  # the key's description, and the screen's place in the help screen
    _: KW_ONLY
    screen: str  # "module:Class"
    key: str | None = None  # the key that shows it, binding id app.MODE; None: no key
    command: str = ""  # its command palette title (empty: the title)
    about: str = ""  # its command palette line, before the key
    # (place, "module:Class") of its widgets that have keys of their own: the help screen
    # lists their keys after the screen's.
    parts: tuple[tuple[str, str], ...] = ()
    # (title, palette line, the screen's action): its commands, which the palette offers on
    # every screen (run from another one, they show this screen first). Commands that depend
    # on what the screen shows (the selected model, a finished run) come from its commands().
    commands: tuple[tuple[str, str, str], ...] = ()


# In the keys' order: the footer and the help screen show them in this order.
SCREENS = (
    ScreenEntry(
        "chat",
        "Chat",
        screen="tui.screens.chat:ChatScreen",
        key="f2",
        about="Go to the chat",
        parts=(
            ("Prompt", "tui.widgets.chat:PromptArea"),
            ("A focused message", "tui.widgets.chat:MessageView"),
            ("Chat list", "tui.widgets.sidebar:ConversationList"),
        ),
        commands=(
            ("New chat", "Start a new conversation (ctrl+n)", "new_chat"),
            ("Sampling settings", "Temperature, top-k/p, min-p, seed, system prompt (ctrl+s)", "toggle_sampling"),
            ("Search chats", "Full-text search over every chat (ctrl+f)", "search"),
        ),
    ),
    ScreenEntry(
        "dataset",
        "Dataset",
        screen="tui.screens.dataset:DatasetScreen",
        key="f3",
        about="What would train now: counts, filters, snapshots, export",
        commands=(
            ("Dataset: create a snapshot", "Freeze what would train now (s)", "snapshot"),
            ("Dataset: export", "Write what would train now to a file (e)", "export"),
        ),
    ),
    ScreenEntry(
        "models",
        "Models",
        screen="tui.screens.models:ModelsScreen",
        key="f4",
        about="Versions, lineage, metrics; activate, import, download",
    ),
    ScreenEntry(
        "finetune",
        "Fine-tune",
        screen="tui.screens.finetune:FinetuneScreen",
        key="f5",
        about="Fine-tune the active model on your labels",
        commands=(("Fine-tune: start", "Train on your labels now (ctrl+g)", "start"),),
    ),
    ScreenEntry(
        "compare",
        "Compare",
        screen="tui.screens.compare:CompareScreen",
        key="f6",
        command="Compare models",
        about="One prompt, two models, side by side",
    ),
    ScreenEntry(
        "docs",
        "Docs",
        screen="tui.screens.docs:DocsScreen",
        key="f8",
        command="Documents",
        about="What answers are grounded in: add, see and remove documents",
        commands=(
            ("Docs: re-index", "Re-read the files that changed since they were added (ctrl+r)", "reindex"),
            ("Docs: index Python's documentation", "Names, signatures, docstrings (ctrl+y)", "index_python"),
        ),
    ),
    ScreenEntry("welcome", "Welcome", screen="tui.screens.welcome:WelcomeScreen"),
)


def load(path: str):
    """The class a "module:Class" path names, its module imported if it is not yet."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)
