"""The Kettle app: chat with the active model, label answers, curate a dataset, fine-tune, switch.

    kettle                                  # in-process model (the store's active one)
    kettle --server URL [--api-key KEY]     # a running `kettle serve`

Structure: one Screen per area (tui/screens/), switched as Textual "modes" so each keeps its state
(a fine-tune keeps being followed while the user chats). Widgets (tui/widgets/) only draw and post
Messages; screens handle those messages and do every piece of I/O in workers — database calls go
through `App.db` (a thread), generation through the async `GenerationService`.

Settings live in config.json under kettle_home(): "theme" (remembered when changed) and "keys", a
map from binding id to keys that replaces the default keys, e.g. {"keys": {"chat.stop": "escape,ctrl+c"}},
and "quantize": "int8" to run the in-process model with int8 weights (gpt/quantize.py).
The help screen (F1) lists every binding id with its current keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.signal import Signal
from textual.widgets import LoadingIndicator, Static

from data.paths import config_path, kettle_home
from gpt.files import atomic_write_text, read_regular_text
from tui.errors import error_text
from tui.screens.table import SCREENS, load

log = logging.getLogger("kettle.app")


# --- settings --------------------------------------------------------------------------------


def load_config(path: Path | None = None) -> tuple[dict, str | None]:
    """(settings, problem): a missing file is empty settings; an unreadable one is reported and
    never overwritten (so a typo in a hand-edited file loses nothing)."""
    path = path or config_path()
    if not path.exists():
        return {}, None
    try:
        data = json.loads(read_regular_text(path))
    except RecursionError:
        return {}, f"{path}: JSON nested too deeply to read; using default settings"
    except ValueError as exc:  # bad JSON or UTF-8
        return {}, f"{path}: not valid JSON ({exc}); using default settings"
    except OSError as exc:  # a folder, a named pipe (read_regular_text refuses to wait on one)
        return {}, f"{path}: cannot read it ({exc.strerror or exc}); using default settings"
    if not isinstance(data, dict):
        return {}, f"{path}: expected a JSON object; using default settings"
    return data, None


def write_setting(key: str, value: Any) -> None:
    """Set one key of config.json; a file the user must fix by hand is never overwritten."""
    config, problem = load_config()
    if problem:
        return
    config[key] = value
    atomic_write_text(config_path(), json.dumps(config, indent=2) + "\n")


def quantize_setting(config: dict) -> tuple[str | None, str | None]:
    """(mode, problem): config.json's "quantize" (absent or null: full precision); any other
    value than gpt.quantize's modes is a problem line, and full precision."""
    value = config.get("quantize")
    if value is None:
        return None, None
    from gpt.quantize import MODES

    if isinstance(value, str) and value in MODES:
        return value, None
    modes = " or ".join(json.dumps(m) for m in MODES)
    return None, (f'{config_path()}: "quantize" must be {modes} or null, got {json.dumps(value)}; using full precision')


QUIT = "app.quit"
MODIFIERS = {"ctrl", "shift", "alt", "meta", "super", "hyper"}


def is_key(key: str) -> bool:
    """Whether Textual can ever match `key` (one of a binding's comma-separated keys): known
    modifiers, then a key name, or a character; a character other than a letter or digit only
    alone, or by its name ("ctrl+comma": Textual never reports "ctrl+,")."""
    from textual.keys import KEY_NAME_REPLACEMENTS, Keys, _character_to_key, key_to_character

    *modifiers, name = key.split("+")
    if not name or not set(modifiers) <= MODIFIERS or len(set(modifiers)) < len(modifiers):
        return False
    if len(name) == 1:
        return name.isprintable() and not name.isspace() and (name.isalnum() or not modifiers)
    named = {k.value.rpartition("+")[2] for k in Keys} | set(KEY_NAME_REPLACEMENTS.values())
    character = key_to_character(name)
    return name in named or (character is not None and _character_to_key(character) == name)


def keymap_from(config: dict, defaults: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The "keys" setting as a Textual keymap over `defaults` (binding id -> its own keys), and
    one problem line per entry that is unusable, which keeps its binding's default keys. The
    quit key is never given away: the app must always be able to quit."""
    keys = config.get("keys", {})
    if not isinstance(keys, dict):
        return {}, ['"keys" in config.json must be an object of binding id -> keys']
    keymap, problems = {}, []
    for binding_id, value in keys.items():
        if binding_id not in defaults:
            problems.append(f"config.json keys: unknown binding id {binding_id!r} (see the help screen)")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f'config.json keys: {binding_id} needs keys like "ctrl+k" or "f9,ctrl+k"')
        else:
            value = value.replace(" ", "")
            bad = [k for k in value.split(",") if not is_key(k)]
            if bad:
                problems.append(
                    f"config.json keys: {binding_id}: {bad[0]!r} in {value!r} is not a "
                    f'key (like "ctrl+k", "f9" or "question_mark"); it keeps '
                    f"{defaults[binding_id]}"
                )
            else:
                keymap[binding_id] = value

    def owners(key: str) -> list[str]:
        return [b for b, k in (defaults | keymap).items() if b != QUIT and key in k.split(",")]

    if QUIT in keymap and (shared := [k for k in keymap[QUIT].split(",") if owners(k)]):
        problems.append(
            f"config.json keys: {QUIT}: {shared[0]} is also {owners(shared[0])[0]}'s key; quit keeps {defaults[QUIT]}"
        )
        del keymap[QUIT]
    quit_keys = set(keymap.get(QUIT, defaults[QUIT]).split(","))
    for binding_id in [b for b in keymap if b != QUIT and quit_keys & set(keymap[b].split(","))]:
        problems.append(
            f"config.json keys: {binding_id}: {keymap[binding_id]} takes the quit "
            f"key ({QUIT}); it keeps {defaults[binding_id]}"
        )
        del keymap[binding_id]
    return keymap, problems


def _screen(path: str) -> Screen:
    """A screen ("module:Class"), imported when first shown (start-up stays fast)."""
    return load(path)()


class StartingScreen(Screen):
    """Shown for the moment between launch and the first real screen."""

    def compose(self) -> ComposeResult:
        yield Static("Kettle is starting…", id="starting-text")
        yield LoadingIndicator()

    def on_screen_suspend(self) -> None:
        # Modes keep this screen under the first real one for the whole session, where its
        # spinner would go on waking the app 16 times a second to draw nothing (1% of a core).
        self.query(LoadingIndicator).remove()


class KettleApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "Kettle"
    ENABLE_COMMAND_PALETTE = True
    MODES = {entry.mode: partial(_screen, entry.screen) for entry in SCREENS}
    # Priority: the prompt's TextArea has its own use for some function keys (F6 selects a line).
    BINDINGS = [
        Binding("f1", "help", "Help", id="app.help", priority=True),
        *(
            Binding(entry.key, f"go('{entry.mode}')", entry.title, id=f"app.{entry.mode}", priority=True)
            for entry in SCREENS
            if entry.key
        ),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
    ]

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        store=None,
        service=None,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__()
        self.server = server
        self.api_key = api_key
        self.store = store
        self.service = service
        self.clock = clock  # "now" for relative times (fixed in snapshot tests)
        self.config, config_problem = load_config()
        self._startup_problems = [config_problem] if config_problem else []
        self.ready = asyncio.Event()  # set once the store and service are up
        self.load_failed = False
        # Published (with the model's name) when the service loads or switches a model.
        self.model_changed: Signal[str] = Signal(self, "model-changed")

    # -- start-up ---------------------------------------------------------------------------

    def get_default_screen(self) -> Screen:
        return StartingScreen()

    def on_mount(self) -> None:
        self._setup_logging()
        theme = self.config.get("theme")
        if isinstance(theme, str) and theme in self.available_themes:
            self.theme = theme
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        self._apply_keymap()
        for problem in self._startup_problems:
            self.notify(problem, severity="warning", timeout=10)
        self.start()

    def _setup_logging(self) -> None:
        handler = logging.FileHandler(kettle_home() / "app.log", encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    def _apply_keymap(self) -> None:
        defaults = {b.id: b.key for b in self._all_bindings() if b.id}
        keymap, problems = keymap_from(self.config, defaults)
        for problem in problems:
            self.notify(problem, severity="warning", timeout=10)
        if keymap:
            self.set_keymap(keymap)

    def _all_bindings(self) -> list[Binding]:
        """Every binding the app declares, on the app, its screens and widgets (for the keymap
        check and the help screen)."""
        from tui.screens.help import declared_bindings

        return [b for _, b in declared_bindings(self)]

    @work(exclusive=True, group="startup")
    async def start(self) -> None:
        try:
            await self._open()
        except Exception as exc:  # noqa: BLE001
            self.notify(error_text(exc), title="Kettle could not start", severity="error", timeout=30)
            return
        self.ready.set()

    async def _open(self) -> None:
        from data.store import open_store

        if self.store is None:
            self.store = await asyncio.to_thread(open_store)
        if self.service is None and self.server:
            from gpt.service import RemoteService

            self.service = RemoteService(self.server, api_key=self.api_key)
        if self.service is None:
            if await self.db(self.store.active_model) is None:
                await self.switch_mode("welcome")
                return
            await self.load_service()
        await self.switch_mode("chat")

    async def load_service(self) -> None:
        """Start the in-process service on the store's active model; its weights load in the
        background so the chat is usable at once (a first message waits for them)."""
        from data.registry import StoreCatalog
        from gpt.service import InProcessService

        quantize, problem = quantize_setting(self.config)
        if problem:
            self.notify(problem, severity="warning", timeout=10)
        self.service = await asyncio.to_thread(InProcessService, catalog=StoreCatalog(), quantize=quantize)
        self.preload()

    @work(group="preload")
    async def preload(self) -> None:
        load = getattr(self.service, "load", None)
        if load is None:
            return
        self.load_failed = False
        await self.remember_lessons()
        try:
            await asyncio.to_thread(load)
        except Exception as exc:  # noqa: BLE001
            self.load_failed = True
            self.notify(error_text(exc), title="The model did not load", severity="error", timeout=15)
        self.model_changed.publish(self.model_name())

    async def remember_lessons(self) -> None:
        """Index the lessons the model about to answer carries (data.memory): before its weights
        load, so that the first question already finds them (a few milliseconds)."""
        from tui.commands.docs import remember_lessons

        try:
            info = await asyncio.to_thread(lambda: self.service.active_model)
            if info is not None and info.path and self.store is not None:
                await self.db(remember_lessons, self.store, info.name, info.path)
        except Exception as exc:  # noqa: BLE001 (the load that follows says what is wrong)
            log.warning("indexing the model's lessons failed: %s", exc)

    def model_name(self) -> str:
        if self.service is None:
            return "no model"
        if self.load_failed:
            return "the model did not load (F4: models)"
        info = self.service.active_model
        where = f" @ {self.server}" if self.server else ""
        if info is not None:
            return info.name + where
        return f"server {self.server}" if self.server else "loading the model…"

    async def db(self, fn: Callable, *args, **kwargs):
        """Run a blocking call (the store, the file system) off the UI thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity="information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Notifications carry user text (titles, paths, error messages with brackets), so
        they are plain text unless a caller asks for markup."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def action_help_quit(self) -> None:
        """Ctrl+C, where no input copies with it: Textual's own hint, in plain text (its markup
        showed as [b]...[/b] here), and what stops an answer, which is what Ctrl+C often means."""
        quit_keys = [key for key, b in self.active_bindings.items() if b.binding.action in ("quit", "app.quit")]
        if quit_keys:
            self.notify(
                f"Press {quit_keys[0]} to quit the app; Esc stops an answer being written.",
                title="Do you want to quit?",
            )

    def _handle_exception(self, error: Exception) -> None:
        """A bug past start-up becomes a notification and a traceback in app.log, not the end
        of the user's session. Headless runs (tests) keep Textual's behaviour, so bugs fail
        loudly there."""
        if self.is_headless or not self.ready.is_set():
            super()._handle_exception(error)
            return
        self.notify(
            f"Something went wrong: {error_text(error)}. Details are in {kettle_home() / 'app.log'}.",
            title="Error",
            severity="error",
            timeout=15,
        )

    # -- settings ---------------------------------------------------------------------------

    def _remember_theme(self, theme) -> None:
        self.config["theme"] = theme.name
        self.save_setting("theme", theme.name)

    @work(group="settings", exclusive=True)
    async def save_setting(self, key: str, value: Any) -> None:
        """Change one setting in config.json (atomically, off the UI thread), keeping every
        other key as it was."""
        try:
            await asyncio.to_thread(write_setting, key, value)
        except OSError as exc:
            self.notify(f"could not save settings: {exc}", severity="warning")

    # -- navigation and commands ------------------------------------------------------------

    async def action_go(self, mode: str) -> None:
        if not self.ready.is_set() and mode != "welcome":
            self.notify("Kettle is still starting…")
            return
        if mode != "welcome" and self.service is None:
            self.notify("There is no model yet: brew the starter, download GPT-2 or import one.", severity="warning")
            mode = "welcome"
        if self.current_mode != mode:
            await self.switch_mode(mode)

    async def action_go_and(self, mode: str, action: str) -> None:
        """Show the screen of `mode`, then run one of its actions (a palette command)."""
        await self.action_go(mode)
        if self.current_mode == mode:
            await self.screen.run_action(action)

    def action_help(self) -> None:
        from tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen):
        yield from super().get_system_commands(screen)
        for entry in SCREENS:
            if entry.key:
                yield SystemCommand(
                    entry.command or entry.title,
                    f"{entry.about} ({entry.key.upper()})",
                    partial(self.run_action, f"go('{entry.mode}')"),
                )
        for entry in SCREENS:  # every screen's commands, wherever the palette is opened
            for title, about, action in entry.commands:
                yield SystemCommand(title, about, partial(self.run_action, f"go_and({entry.mode!r}, {action!r})"))
        yield SystemCommand("Help: keys", "Every key binding and how to change it (F1)", self.action_help)
        from tui.screens.models import model_commands

        yield from model_commands(self)
        if hasattr(screen, "commands"):
            yield from screen.commands()

    def on_unmount(self) -> None:
        """Release the model thread and the database however the app ends."""
        if self.service is not None:
            try:
                self.service.close()
            except Exception as exc:  # noqa: BLE001 - exiting anyway
                log.warning("closing the service failed: %s", exc)
        if self.store is not None:
            self.store.close()


def run_app(server: str | None = None, api_key: str | None = None) -> int:
    KettleApp(server=server, api_key=api_key).run()
    return 0
