"""The conversation list: newest first, with a full-text search box above it."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from tui.widgets.blink import RestingInput


def when(timestamp: float, now: float) -> str:
    """A short, human date: "14:05" today, "Mon 14:05" this week, else "2026-11-03"."""
    age = now - timestamp
    local = time.localtime(timestamp)
    if age < 86400 and time.localtime(now).tm_yday == local.tm_yday:
        return time.strftime("%H:%M", local)
    if age < 6 * 86400:
        return time.strftime("%a %H:%M", local)
    return time.strftime("%Y-%m-%d", local)


class ConversationList(Vertical):
    BINDINGS = [
        Binding("r", "rename", "Rename", id="chats.rename"),
        Binding("delete,x", "delete", "Delete", id="chats.delete"),
        Binding("escape", "leave", "Back to the prompt", id="chats.leave"),
    ]

    class Selected(Message):
        """Open a conversation; `message_id` (from a search hit) picks the branch to show."""

        def __init__(self, conversation_id: int, message_id: int | None = None):
            super().__init__()
            self.conversation_id = conversation_id
            self.message_id = message_id

    class RenameRequested(Message):
        def __init__(self, conversation_id: int):
            super().__init__()
            self.conversation_id = conversation_id

    class DeleteRequested(Message):
        def __init__(self, conversation_id: int):
            super().__init__()
            self.conversation_id = conversation_id

    class SearchChanged(Message):
        def __init__(self, query: str):
            super().__init__()
            self.query = query

    class Left(Message):
        """The user is done with the list (Esc): the search is cleared, the prompt wanted."""

    def compose(self):
        yield Static("[b]Chats[/]  [dim]ctrl+n new[/]", id="chats-title")
        yield RestingInput(placeholder="Search all chats (ctrl+f)", id="chat-search")
        yield OptionList(id="chat-options")

    @property
    def options(self) -> OptionList:
        return self.query_one("#chat-options", OptionList)

    def show_conversations(self, conversations, current_id: int | None, *, now: float) -> None:
        """Fill the list with conversations (store records), keeping the highlight on the
        current one."""
        options = [
            Option(self._row(c.title or "New chat", when(c.updated_at, now)), id=f"c{c.id}") for c in conversations
        ]
        first = options[0].id if options else None  # Enter opens the newest at once
        self._fill(options, f"c{current_id}" if current_id else first)

    def show_hits(self, hits) -> None:
        """Fill the list with search results (store SearchHit records)."""
        options = [
            Option(
                self._row(h.conversation_title or "New chat", h.snippet.replace("\n", " ")),
                id=f"m{h.message_id}:{h.conversation_id}",
            )
            for h in hits
        ]
        if not options:
            options = [Option("[dim]no matches[/]", disabled=True)]
        self._fill(options, None)

    @staticmethod
    def _row(title: str, detail: str) -> Text:
        row = Text(title.splitlines()[0][:60] if title else "", style="bold")
        row.append("\n")
        row.append(detail[:80], style="dim")
        return row

    def _fill(self, options: list[Option], highlight: str | None) -> None:
        ol = self.options
        ol.clear_options()
        ol.add_options(options)
        if highlight is not None:
            try:
                ol.highlighted = ol.get_option_index(highlight)
            except Exception:  # noqa: BLE001 - the current chat is not on this page
                pass

    def _highlighted_conversation(self) -> int | None:
        ol = self.options
        if ol.highlighted is None:
            return None
        option_id = ol.get_option_at_index(ol.highlighted).id or ""
        if option_id.startswith("c"):
            return int(option_id[1:])
        if option_id.startswith("m"):
            return int(option_id.split(":")[1])
        return None

    @on(OptionList.OptionSelected, "#chat-options")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        option_id = event.option.id or ""
        if option_id.startswith("c"):
            self.post_message(self.Selected(int(option_id[1:])))
        elif option_id.startswith("m"):
            message_id, conversation_id = option_id[1:].split(":")
            self.post_message(self.Selected(int(conversation_id), int(message_id)))

    @on(Input.Changed, "#chat-search")
    def _search(self, event: Input.Changed) -> None:
        self.post_message(self.SearchChanged(event.value.strip()))

    @on(Input.Submitted, "#chat-search")
    def _to_results(self) -> None:
        if self.options.option_count:
            self.options.highlighted = 0
        self.options.focus()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("rename", "delete"):
            return self.options.has_focus and self._highlighted_conversation() is not None
        return True

    def action_rename(self) -> None:
        cid = self._highlighted_conversation()
        if cid is not None:
            self.post_message(self.RenameRequested(cid))

    def action_delete(self) -> None:
        cid = self._highlighted_conversation()
        if cid is not None:
            self.post_message(self.DeleteRequested(cid))

    def clear_search(self) -> None:
        self.query_one("#chat-search", Input).value = ""  # the list shows the chats again

    def action_leave(self) -> None:
        self.clear_search()
        self.post_message(self.Left())
