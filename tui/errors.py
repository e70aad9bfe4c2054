"""Errors in the app: a notification, never a traceback. Screens and widgets import these from here,
not from tui.app, so that nothing under tui/screens or tui/widgets needs the app module."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable

from gpt.errors import KettleError

log = logging.getLogger("kettle.app")


def error_text(exc: BaseException) -> str:
    """What the user reads: KettleError messages as they are, anything else with its type (the
    traceback goes to app.log under kettle_home())."""
    if isinstance(exc, KettleError):
        return str(exc)
    log.error("unexpected error", exc_info=exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def guarded(method: Callable) -> Callable:
    """Wrap an async screen/app method so that any failure becomes an error notification."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user sees it as a notification
            self.app.notify(error_text(exc), title="Error", severity="error", timeout=8)
            return None

    return wrapper
