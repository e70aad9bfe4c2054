"""The base of the dialogs that keys open and close (tui/screens/modals.py)."""

from __future__ import annotations

import asyncio

from textual.screen import ModalScreen, ScreenResultType

from tui.widgets.keys import caught_up, wait_shown


class Dialog(ModalScreen[ScreenResultType]):
    """A dialog that gives the keys to its input (`INPUT`, a selector) as it is shown and then
    sets `opened`: whoever opens it from a key can wait for that, so the keys typed right after
    reach the dialog rather than what was focused behind it. An opener that sets `handled` (an
    Event) to be told when it has shown what it did with the result makes the key that closes
    the dialog wait for that too."""

    INPUT = ""

    def __init__(self):
        super().__init__()
        self.opened = asyncio.Event()
        self.handled: asyncio.Event | None = None

    def on_screen_resume(self) -> None:
        # set_focus, not focus(): the focus must move now, before the next key is delivered.
        self.set_focus(self.query_one(self.INPUT))
        self.opened.set()

    async def caught_up(self) -> None:
        """Wait for the keys typed into the input before the key being handled."""
        await caught_up(self.query_one(self.INPUT))

    async def finish(self, result) -> None:
        """Close with `result` (from a priority binding: before the next key is delivered)."""
        self.dismiss(result)
        if self.handled is not None:
            await wait_shown(self.handled)
