"""What a chat message shows: Python text as written where Markdown would change it (">>>"
sessions read as nested quotes, ``literals`` losing their backticks), read off the drawn screen."""

from __future__ import annotations

from textual.app import App

from tui.widgets.chat import MessageView

SESSION = """Try this:
>>> for word in words:
...     print(word)
kettle
>>> ``not a code span``

Use ``None`` or an empty string: ``. A `name` is still code."""


def screen_text(app: App) -> str:
    """Every line of the screen as drawn (what a user reads)."""
    return "\n".join(strip.text.rstrip() for strip in app.screen._compositor.render_strips())


class OneMessage(App):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def compose(self):
        yield MessageView("assistant", self.text)


async def test_a_python_session_and_double_backticks_show_as_written():
    app = OneMessage(SESSION)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        shown = screen_text(app)
    assert ">>> for word in words:" in shown
    assert "...     print(word)" in shown  # its indentation kept
    assert "kettle" in shown and ">>> ``not a code span``" in shown
    assert "▌" not in shown  # no quote bars
    assert "Use ``None`` or an empty string: ``." in shown
    assert "A name is still code." in shown  # a single backtick is Markdown's code span


async def test_a_streamed_session_shows_as_written_while_it_streams():
    app = OneMessage("")
    async with app.run_test(size=(80, 24)) as pilot:
        body = app.query_one(MessageView).body
        stream = body.get_stream(body)
        for piece in (SESSION[i : i + 7] for i in range(0, len(SESSION), 7)):
            await stream.write(piece)
            await pilot.pause()
        await stream.stop()
        await pilot.pause()
        shown = screen_text(app)
    assert ">>> for word in words:" in shown and "...     print(word)" in shown
    assert "▌" not in shown
    assert "Use ``None`` or an empty string: ``." in shown
