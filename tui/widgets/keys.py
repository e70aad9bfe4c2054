"""Keys that wait for what they asked for.

Textual delivers a key to the widget focused when the key arrives, and checks most bindings only
after the key has gone round that widget: keys typed faster than the app answers reached what
was focused before (a message behind a dialog that was opening, an input about to close). The
chat's keys that open, close or change something are priority bindings, which run as the app
takes the key, and they wait for their result to be on screen before the next key is delivered.
"""

from __future__ import annotations

import asyncio

from textual.message_pump import MessagePump

# A key waits at most this long for what it asked for (a dialog, another alternative, a saved
# label); a store locked by another program must not freeze the keyboard for longer.
KEY_WAIT_S = 2.0


async def wait_shown(shown: asyncio.Event) -> None:
    """Wait (up to KEY_WAIT_S) until `shown` is set; after that the next key goes on."""
    try:
        await asyncio.wait_for(shown.wait(), KEY_WAIT_S)
    except asyncio.TimeoutError:
        pass  # the screen carries on; the next key goes where the focus is now


async def caught_up(pump: MessagePump) -> None:
    """Wait until `pump` has handled what was sent to it so far: a priority binding runs as the
    app takes its key, while the keys typed just before it may still wait in the focused
    input's queue (Enter would save a note without its last letters)."""
    done = asyncio.Event()
    pump.call_later(done.set)
    await wait_shown(done)
