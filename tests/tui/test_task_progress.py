"""The dialog that runs a long command (the brew): its estimate of the time left, counted down
from the command's latest one, a bar for the whole task that moves between the command's own
bars, the line the command is on, and its log with long lines wrapped. The command here is a
real child process that prints what the brew prints."""

from __future__ import annotations

import sys
from pathlib import Path

from test_app import wait_until
from textual.app import App
from textual.widgets import ProgressBar, RichLog

import tui
from finetune.starter import BREW_TIME, eta_text, parse_eta
from tui.screens.modals import TaskModal

LONG = " ".join(f"w{i}" for i in range(60))  # 230 characters
SCRIPT = f"""
import sys, time
time.sleep(0.8)
for percent in range(0, 101, 20):
    sys.stdout.write(f"\\rstarter: pretraining {{percent}}%")
    sys.stdout.flush()
    time.sleep(0.05)
print()
print("starter: pretrained; {eta_text(4)}: the held-out measurement, then instruction tuning", flush=True)
time.sleep(2.5)
print({LONG!r}, flush=True)
time.sleep(1.5)  # the test reads the log before the dialog closes
"""


class ScriptedTask(TaskModal):
    def command(self) -> list[str]:
        return [sys.executable, "-c", SCRIPT]


class Host(App):
    CSS_PATH = Path(tui.__file__).parent / "app.tcss"


def shown(modal, selector: str) -> str:
    return str(modal.query_one(selector).render())


async def test_the_brews_dialog_counts_down_the_whole_brew_and_keeps_moving_after_100_percent():
    app = Host()
    results = []
    async with app.run_test(size=(100, 30)) as pilot:
        modal = ScriptedTask("Brewing starter (offline)", ["brew", "starter"], estimate=BREW_TIME, eta=parse_eta)
        app.push_screen(modal, callback=results.append)
        await wait_until(pilot, lambda: modal.is_mounted and modal.started, "the dialog")
        assert BREW_TIME in shown(modal, "#task-elapsed")  # until the brew has measured its speed
        assert BREW_TIME not in shown(modal, ".dialog-title")
        await wait_until(pilot, lambda: "pretrained" in shown(modal, "#task-live"), "the stage after pretraining")
        assert "100%" not in shown(modal, "#task-live")  # the finished bar gives way to what runs now
        status = shown(modal, "#task-elapsed")
        assert "left" in status and BREW_TIME not in status, status
        bar = modal.query_one(ProgressBar)
        first = bar.progress
        await pilot.pause(1.2)
        assert 0 < first < bar.progress < 1  # it moves while the command prints nothing
        # read while the dialog is up: it closes once the command has ended
        log = modal.query_one("#task-log", RichLog)

        def lines():
            return [strip.text.rstrip() for strip in log.lines]

        await wait_until(pilot, lambda: "w59" in " ".join(lines()), "the long line", timeout=20)
        assert max(map(len, lines())) <= log.size.width  # the long line whole, wrapped at the dialog's width
        await wait_until(pilot, lambda: results, "the command's end", timeout=20)
        assert results == [True]
