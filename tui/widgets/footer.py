"""The footer every screen shows: the places first (F1 help, F2-F6 the screens), then the keys
of the screen and the focused widget, then quit.

Textual's footer lists the focused widget's keys first and the app's last, so at 80 columns it
showed none of F1-F5, and on the chat it began with F6 (the prompt's own F6 comes first there)."""

from __future__ import annotations

from textual.widgets import Footer
from textual.widgets._footer import FooterKey

from tui.screens.table import SCREENS

PLACES = ("help", *(f"go('{entry.mode}')" for entry in SCREENS if entry.key))


class KettleFooter(Footer):
    def compose(self):
        keys = list(super().compose())
        places = sorted(
            (key for key in keys if isinstance(key, FooterKey) and key.action in PLACES),
            key=lambda key: PLACES.index(key.action),
        )
        yield from places + [key for key in keys if key not in places]
