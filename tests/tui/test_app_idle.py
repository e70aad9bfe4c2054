"""The app at rest wakes for nothing: a chat open, nothing streaming, nothing typed, no timer runs
(each one woke the UI thread: 2% of a core while idle). benchmarks/app.py measures the CPU."""

from __future__ import annotations

import asyncio
import gc

from test_app import SIZE, open_chat, press_nowait, wait_until
from textual.timer import Timer

from tui.app import KettleApp
from tui.widgets.blink import BlinkThenRest

BLINK_S = 0.6  # the cursors' blink time here, so the test waits under a second for the rest
# On a loaded machine the model can take seconds to load, and its task modal ticks until then.
SETTLE_S = 30


def running_timers(app) -> list[str]:
    """Every Textual timer of `app` (its widgets, screens and itself) that is started and not
    paused. Ownership is the target's chain of parents up to `app`: a widget's `.app` is the
    *active* app, so a timer left by an app an earlier test ran in this worker would pass for
    this one's; its task also belongs to that test's event loop, not this one's."""
    loop = asyncio.get_running_loop()

    def ours(timer: Timer) -> bool:
        node = timer._target()
        while node is not None and node is not app:
            node = getattr(node, "_parent", None)
        return node is app and timer._task.get_loop() is loop

    return [
        t.name
        for t in gc.get_objects()
        if isinstance(t, Timer) and t._task is not None and not t._task.done() and t._active.is_set() and ours(t)
    ]


async def test_idle_chat_runs_no_timer_and_a_key_restarts_the_blink(app_model, monkeypatch):
    monkeypatch.setattr(BlinkThenRest, "blink_for_s", BLINK_S)
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        prompt = app.screen.query_one("#prompt")
        await wait_until(
            pilot,
            lambda: not running_timers(app),
            lambda: f"every timer to stop (running: {running_timers(app)})",
            timeout=BLINK_S + SETTLE_S,
        )
        assert prompt._cursor_visible  # the cursor rests lit, not hidden mid-blink
        press_nowait(app, "h", "h")  # Pilot's press waits for every queue, longer than a blink
        await wait_until(pilot, lambda: prompt.text == "h", "the key")
        assert prompt.blink_timer._active.is_set()  # typing blinks again, then rests again
        await wait_until(
            pilot,
            lambda: not running_timers(app),
            lambda: f"the blink to rest again (running: {running_timers(app)})",
            timeout=BLINK_S + SETTLE_S,
        )
        assert prompt._cursor_visible
