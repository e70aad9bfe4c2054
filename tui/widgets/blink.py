"""Text inputs whose cursor blinks for a while after the last key, click or focus, then rests lit.

Textual's cursors blink forever: each blink redraws a line, twice a second, for as long as the
app is open, which was all the app did while idle (2% of a core with a chat open and nothing
streaming). Terminals and desktops stop the blink the same way (GNOME's cursor-blink-timeout)."""

from __future__ import annotations

import time

from textual.widgets import Input, TextArea

BLINK_FOR_S = 10.0


class BlinkThenRest:
    """Mixin for Textual's Input and TextArea (both restart the blink through _restart_blink
    and stop it through _pause_blink)."""

    blink_for_s = BLINK_FOR_S
    _blink_until = 0.0

    def _restart_blink(self) -> None:
        self._blink_until = time.monotonic() + self.blink_for_s
        super()._restart_blink()

    def _rested(self) -> bool:
        """At a blink past the time: stop the timer with the cursor shown, and say so."""
        if time.monotonic() < self._blink_until:
            return False
        self._pause_blink(visible=True)
        return True


class RestingInput(BlinkThenRest, Input):
    def _toggle_cursor(self) -> None:
        if not self._rested():
            super()._toggle_cursor()


class RestingTextArea(BlinkThenRest, TextArea):
    def _toggle_cursor_blink_visible(self) -> None:
        if not self._rested():
            super()._toggle_cursor_blink_visible()
