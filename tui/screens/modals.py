"""Small dialogs: confirm, one line of text, a multi-line editor, a choice."""

from __future__ import annotations

import asyncio
import codecs
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, OptionList, ProgressBar, RichLog, Static, TextArea
from textual.widgets.option_list import Option

from tui.screens.dialog import Dialog


class ConfirmModal(Dialog[bool]):
    BINDINGS = [
        Binding("escape", "dismiss(False)", "Cancel", id="modal.cancel"),
        Binding("y", "dismiss(True)", "Yes", show=False, id="modal.yes"),
    ]

    INPUT = "#no"

    def __init__(self, question: str, yes: str = "Yes", no: str = "Cancel"):
        super().__init__()
        self.question, self.yes, self.no = question, yes, no

    def compose(self):
        with Vertical(classes="dialog"):
            yield Static(self.question, classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(self.yes, variant="error", id="yes")
                yield Button(self.no, id="no")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class TextModal(Dialog[str | None]):
    """One line of text; Enter accepts, Esc cancels. Enter is the dialog's priority binding: as
    the input's it ran after the letters typed right after it had gone into the input."""

    BINDINGS = [
        Binding("enter", "accept", "Save", priority=True, id="text.accept"),
        Binding("escape", "dismiss(None)", "Cancel", id="modal.cancel"),
    ]
    INPUT = "#text"

    def __init__(self, title: str, value: str = "", placeholder: str = "", hint: str = ""):
        super().__init__()
        self.title_text, self.value, self.placeholder, self.hint = title, value, placeholder, hint

    def compose(self):
        with Vertical(classes="dialog"):
            yield Static(f"[b]{self.title_text}[/]", classes="dialog-title")
            yield Input(self.value, placeholder=self.placeholder, id="text")
            yield Static(f"[dim]{self.hint or 'Enter saves · Esc cancels'}[/]", classes="dialog-hint")

    async def action_accept(self) -> None:
        await self.caught_up()
        await self.finish(self.query_one("#text", Input).value)


class EditorModal(Dialog[str | None]):
    """A multi-line editor; Ctrl+S saves, Esc cancels, F7 selects all.

    Priority bindings: the editor itself takes Esc (it moves the focus on, and the dialog stayed)
    and F7 (as the editor's own binding it ran only after the key had gone round the editor,
    behind the letters typed right after it)."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", priority=True, id="editor.save"),
        Binding("escape", "dismiss(None)", "Cancel", priority=True, id="modal.cancel"),
        Binding("f7", "select_all", "Select all", priority=True, id="editor.select_all"),
    ]
    INPUT = "#editor"

    def __init__(self, title: str, text: str, hint: str = ""):
        super().__init__()
        self.title_text, self.text, self.hint = title, text, hint

    def compose(self):
        with Vertical(classes="dialog editor-dialog"):
            yield Static(f"[b]{self.title_text}[/]", classes="dialog-title")
            yield TextArea(self.text, soft_wrap=True, id="editor", tab_behavior="indent")
            yield Static(
                f"[dim]{self.hint}Ctrl+S saves · Esc cancels · F7 selects all (type to replace)[/]",
                classes="dialog-hint",
            )

    def on_mount(self) -> None:
        editor = self.query_one("#editor", TextArea)
        editor.move_cursor(editor.document.end)

    async def action_select_all(self) -> None:
        await self.caught_up()
        self.query_one("#editor", TextArea).select_all()

    async def action_save(self) -> None:
        await self.caught_up()
        text = self.query_one("#editor", TextArea).text
        if not text.strip():
            self.notify("Nothing to save: the text is empty.", severity="warning")
            return
        await self.finish(text)


class ChoiceModal(ModalScreen[str | None]):
    """Pick one of a few options (id, text)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="modal.cancel")]

    def __init__(self, title: str, options: list[tuple[str, str]], *, hint: str = "Enter chooses · Esc cancels"):
        super().__init__()
        self.title_text, self.options, self.hint = title, options, hint

    def compose(self):
        with Vertical(classes="dialog"):
            yield Static(f"[b]{self.title_text}[/]", classes="dialog-title")
            yield OptionList(*[Option(text, id=oid) for oid, text in self.options], id="choices")
            yield Static(f"[dim]{self.hint}[/]", classes="dialog-hint")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def minutes_and_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class TaskModal(ModalScreen[bool]):
    """Runs one `kettle ...` command as a child process and shows its output as it comes (its
    progress bar live, on the line above the log, long lines wrapped); the app stays responsive,
    and Cancel stops the process. Dismisses with True on success.

    With `eta`, a function that reads the time left (seconds) from a line of the command's
    output, the dialog counts down the command's latest estimate and shows a bar for the whole
    task, which keeps moving between the command's own bars; `estimate` is what it says before
    the command's first estimate."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="task.cancel")]

    def __init__(
        self, title: str, args: list[str], *, estimate: str = "", eta: Callable[[str], float | None] | None = None
    ):
        super().__init__()
        self.title_text, self.args, self.estimate, self.eta = title, args, estimate, eta
        self.process = None
        self.started = 0.0
        self.deadline: float | None = None  # when the latest estimate says the command ends

    def command(self) -> list[str]:
        return [sys.executable, "-m", "tui.cli", *self.args]

    def compose(self):
        with Vertical(classes="dialog task-dialog"):
            yield Static(f"[b]{self.title_text}[/]", classes="dialog-title")
            yield Static("", id="task-elapsed", markup=False)
            if self.eta is not None:
                yield ProgressBar(total=1, show_eta=False, id="task-progress")
            yield Static("starting…", id="task-live", markup=False)
            yield RichLog(id="task-log", max_lines=2000, wrap=True, markup=False, highlight=False, min_width=20)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Cancel", variant="error", id="task-cancel")

    def on_mount(self) -> None:
        self.started = time.monotonic()
        self.set_interval(1.0, self._tick)
        self._tick()
        self.run_command()

    def _tick(self) -> None:
        now = time.monotonic()
        parts = [f"{minutes_and_seconds(now - self.started)} elapsed"]
        if self.deadline is not None:
            left = self.deadline - now
            parts.append(
                f"about {minutes_and_seconds(left)} left" if left >= 1 else "finishing (longer than estimated)…"
            )
            elapsed = now - self.started
            # Never full before the command ends: a late finish holds it just short.
            self.query_one(ProgressBar).update(progress=min(0.99, elapsed / (elapsed + max(left, 0))))
        elif self.estimate:
            parts.append(self.estimate)
        self.query_one("#task-elapsed", Static).update("  ·  ".join(parts))

    def _line(self, text: str) -> None:
        """A finished line of the command's output."""
        self.query_one("#task-log", RichLog).write(text)
        seconds = self.eta(text) if self.eta is not None else None
        if seconds is not None:
            self.deadline = time.monotonic() + seconds
            self._tick()

    @work(exclusive=True)
    async def run_command(self) -> None:
        live = self.query_one("#task-live", Static)
        root = Path(__file__).resolve().parent.parent.parent
        # The child's rich progress bars draw as in a terminal (no colour), 100 columns wide.
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "100",
            "TTY_INTERACTIVE": "1",
            "TTY_COMPATIBLE": "1",
            "NO_COLOR": "1",
        }
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                cwd=str(root),
                env=env,
            )
        except OSError as exc:
            self.notify(f"could not start kettle {' '.join(self.args)}: {exc}", severity="error")
            self.dismiss(False)
            return
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending, last = "", ""
        while chunk := await self.process.stdout.read(65536):
            *lines, pending = (pending + decoder.decode(chunk)).split("\n")
            for line in lines:
                # A redrawn line keeps only its last state (after the last carriage return).
                text = ANSI.sub("", line).split("\r")[-1].rstrip()
                if text.strip():
                    self._line(text)
                    last = text
            current = ANSI.sub("", pending).split("\r")[-1].strip()
            # A bar being drawn, else the latest line: a finished bar stays no longer than
            # its work (a bar at 100% stood there through minutes of the brew's next stage).
            if current or last:
                live.update(current or last)
        code = await self.process.wait()
        if code == 0:
            self.dismiss(True)
        else:
            if code > 0:
                self.notify(
                    last.removeprefix("kettle: error: ") or f"kettle {self.args[0]} failed",
                    title="Failed",
                    severity="error",
                    timeout=10,
                )
            self.dismiss(False)

    def action_cancel(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
        else:
            self.dismiss(False)

    @on(Button.Pressed, "#task-cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()
