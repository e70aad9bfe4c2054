"""Chat widgets: one message (with its label and branch position), the message list, the prompt.

They only draw and post Messages; the chat screen does the work (store, service)."""

from __future__ import annotations

import asyncio
import re

from markdown_it import MarkdownIt
from textual import on
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.markup import escape
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea

from data.records import Label
from data.records import Message as StoredMessage
from tui.widgets.blink import RestingTextArea
from tui.widgets.keys import wait_shown

CODE_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_repl(state, start: int, end: int, silent: bool) -> bool:
    """A block rule: lines from one starting ">>>" to the next blank line are a Python session
    (doctest's rule), shown as code as typed; Markdown read ">>>" as three nested quotes and
    dropped it, and collapsed the indentation of "..." lines."""
    if state.sCount[start] - state.blkIndent >= 4:  # an indented code block already
        return False
    if not state.src.startswith(">>>", state.bMarks[start] + state.tShift[start]):
        return False
    if silent:
        return True
    line = start + 1
    while line < end and not state.isEmpty(line) and state.sCount[line] >= state.blkIndent:
        line += 1
    token = state.push("fence", "code", 0)
    token.info, token.markup, token.map = "pycon", "```", [start, line]
    token.content = state.getLines(start, line, state.blkIndent, True)
    state.line = line
    return True


def literal_backticks(state, silent: bool) -> bool:
    """An inline rule: a run of two or more backticks is text, as written. Python's docstrings
    (reStructuredText) write ``literal``, which Markdown made a code span without its backticks;
    a lone `` vanished the same way. A single backtick still starts a code span."""
    start = end = state.pos
    while end < state.posMax and state.src[end] == "`":
        end += 1
    if end - start < 2:
        return False
    if not silent:
        state.pending += state.src[start:end]
    state.pos = end
    return True


def chat_markdown() -> MarkdownIt:
    """The Markdown of chat messages: shown as written where Markdown would change Python text
    (">>>" sessions, ``literals``), and a single line break stays one (a message's lines are
    meant as typed, not joined into one paragraph line as in a document)."""

    def hard_breaks(state) -> None:
        # Textual draws the tokens itself, so markdown-it's "breaks" option (an HTML renderer
        # setting) does nothing here: the soft breaks are made hard ones.
        for token in state.tokens:
            for child in token.children or ():
                if child.type == "softbreak":
                    child.type = "hardbreak"

    parser = MarkdownIt("gfm-like")
    parser.block.ruler.before(
        "blockquote", "python_repl", python_repl, {"alt": ["paragraph", "reference", "blockquote", "list"]}
    )
    parser.inline.ruler.before("backticks", "literal_backticks", literal_backticks)
    parser.core.ruler.push("hard_breaks", hard_breaks)
    return parser


def label_text(label: Label | None, markup: bool = True) -> str:
    """A label as one short line, e.g. "▲ up  ★4  #tone  ✎ corrected  ✉ note" (Textual markup,
    user text escaped; plain text with markup=False)."""
    if label is None:
        return ""
    parts: list[tuple[str, str]] = []
    if label.thumb == 1:
        parts.append(("▲ up", "b $success"))
    elif label.thumb == -1:
        parts.append(("▼ down", "b $error"))
    if label.score is not None:
        parts.append((f"★{label.score}", "b $warning"))
    parts += [(f"#{tag}", "$accent") for tag in label.tags]
    if label.ideal is not None:
        parts.append(("✎ corrected", "b $primary"))
    if label.note:
        parts.append(("✉ note", ""))
    if label.excluded:
        parts.append(("⊘ excluded", "$text-muted"))
    if not markup:
        return "  ".join(text for text, _ in parts)
    return "  ".join(f"[{style}]{escape(text)}[/]" if style else escape(text) for text, style in parts)


def counted(n: int, noun: str) -> str:
    """'1 token', '2 tokens', '1,024 tokens'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def source_name(passage) -> str:
    """A retrieved passage in a few words: which correction, document or name it is."""
    if passage.kind in ("correction", "answer"):
        return f"your {passage.kind}: {' '.join(passage.name.split())[:60]}"
    if passage.kind == "lesson":
        return f"{passage.source}'s lesson: {' '.join(passage.name.split())[:60]}"
    if passage.kind == "python":
        return f"Python docs: {passage.name}"
    where = passage.source.rsplit("/", 1)[-1]
    return f"{where}: {passage.name}" if passage.name else where


def usage_text(message: StoredMessage) -> str:
    """The figures of a finished answer: model, tokens, speed, why it stopped."""
    parts = []
    if message.model:
        parts.append(message.model)
    if message.new_tokens is not None:
        parts.append(counted(message.new_tokens, "token"))
    if message.tokens_per_s:
        parts.append(f"{message.tokens_per_s:.1f} tok/s")
    if message.prompt_tokens is not None:
        parts.append(f"prompt {message.prompt_tokens}")
    if message.dropped_tokens:
        parts.append(f"{message.dropped_tokens} dropped to fit")
    if message.finish_reason and message.finish_reason != "stop":
        parts.append(
            {"length": "stopped at the token limit", "cancelled": "stopped by you"}.get(
                message.finish_reason, message.finish_reason
            )
        )
    return escape(" · ".join(parts))


class MessageView(Vertical, can_focus=True):
    """One message. Focus it (Tab / Up / Down in the list) and press a key to label it."""

    # Priority bindings, each waiting for what it asked of the screen (tui.widgets.keys): keys
    # pressed faster than the screen answers reach what the previous one opened or showed (the
    # editor after c, the alternative after a left arrow), not the message they were aimed past.
    BINDINGS = [
        Binding("u", "thumb(1)", "Good", priority=True, id="message.up"),
        Binding("d", "thumb(-1)", "Bad", priority=True, id="message.down"),
        *[
            Binding(str(n), f"score({n})", f"Score {n}", show=False, priority=True, id=f"message.score{n}")
            for n in range(1, 6)
        ],
        Binding("c", "request('correct')", "Correct", priority=True, id="message.correct"),
        Binding("t", "request('tags')", "Tags", priority=True, id="message.tags"),
        Binding("n", "request('note')", "Note", priority=True, id="message.note"),
        Binding("x", "exclude", "Exclude", show=False, priority=True, id="message.exclude"),
        Binding("r", "request('regenerate')", "Regenerate", priority=True, id="message.regenerate"),
        Binding("e", "request('edit')", "Edit & re-ask", priority=True, id="message.edit"),
        Binding("y", "copy", "Copy", priority=True, id="message.copy"),
        Binding("Y", "copy_code", "Copy code", show=False, priority=True, id="message.copy_code"),
        Binding("o", "request('sources')", "Sources", show=False, priority=True, id="message.sources"),
        Binding("left,[", "sibling(-1)", "◀ branch", priority=True, id="message.previous"),
        Binding("right,]", "sibling(1)", "branch ▶", priority=True, id="message.next"),
        Binding("up,k", "move(-1)", "Previous", show=False, priority=True, id="message.focus_previous"),
        Binding("down,j", "move(1)", "Next", show=False, priority=True, id="message.focus_next"),
        Binding("pageup", "page(-1)", "Page up", show=False, priority=True, id="message.page_up"),
        Binding("pagedown", "page(1)", "Page down", show=False, priority=True, id="message.page_down"),
    ]

    class Asked(Message):
        """Something the screen does for the view; the screen sets `shown` once its result is
        on screen (the label saved and drawn, the dialog ready for keys, the branch shown)."""

        def __init__(self, view: "MessageView"):
            super().__init__()
            self.view = view
            self.shown = asyncio.Event()

    class LabelChange(Asked):
        """The user labelled the message; `changes` are Store.set_label keyword arguments."""

        def __init__(self, view: "MessageView", changes: dict):
            super().__init__(view)
            self.changes = changes

    class Requested(Asked):
        """The user asked for something that needs the screen: regenerate, edit, correct, tags,
        note, or a sibling (`step` -1 / +1)."""

        def __init__(self, view: "MessageView", what: str, step: int = 0):
            super().__init__(view)
            self.what = what
            self.step = step

    def __init__(
        self,
        role: str,
        content: str = "",
        message: StoredMessage | None = None,
        label: Label | None = None,
        position: tuple[int, int] = (1, 1),
    ):
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.message = message
        self.label = label
        self.position = position  # (index among siblings from 1, number of siblings)
        self.copy_when_written = False  # y was pressed while the answer was being written
        self.sources: list = []  # the passages an answer was grounded in (data.memory.Passage)

    @property
    def message_id(self) -> int | None:
        return self.message.id if self.message else None

    def compose(self):
        yield Static(self._header(), classes="message-header")
        yield Markdown(self.content, classes="message-body", parser_factory=chat_markdown)
        yield Static(self._corrected(), classes="message-ideal")
        yield Static(self._footer(), classes="message-footer")

    # -- drawing ----------------------------------------------------------------------------

    def _header(self) -> str:
        who = "You" if self.role == "user" else ("System" if self.role == "system" else "Kettle")
        parts = [f"[b]{who}[/]"]
        index, count = self.position
        if count > 1:
            parts.append(f"[$accent]◀ {index}/{count} ▶[/]")
        if self.writing:
            parts.append("[$text-muted]writing…[/]")
        lab = label_text(self.label)
        if lab:
            parts.append(lab)
        return "  ".join(parts)

    def _footer(self) -> str:
        if not (self.message and self.role == "assistant"):
            return ""
        usage = usage_text(self.message)
        if not self.sources:
            return usage
        names = " · ".join(escape(source_name(p)) for p in self.sources)
        return f"{usage}\n[$text-muted]from {names}  (o opens them)[/]"

    def _corrected(self) -> str:
        if not self.corrected:
            return ""
        return f"[b]Corrected answer:[/]\n{escape(self.label.ideal)}"

    def refresh_parts(self) -> None:
        self.query_one(".message-header", Static).update(self._header())
        ideal = self._corrected()
        self.query_one(".message-ideal", Static).update(ideal)
        self.query_one(".message-ideal").display = bool(ideal)
        footer = self._footer()
        self.query_one(".message-footer", Static).update(footer)
        self.query_one(".message-footer").display = bool(footer)

    def on_mount(self) -> None:
        self.refresh_parts()

    def update(
        self,
        message: StoredMessage | None = None,
        label: Label | None = None,
        *,
        position: tuple[int, int] | None = None,
    ) -> None:
        """New facts about the same message (finished, labelled, a sibling added)."""
        if message is not None:
            self.message = message
        self.label = label
        if position is not None:
            self.position = position
        self.refresh_parts()
        if self.copy_when_written and not self.writing:
            self.copy_when_written = False
            self.action_copy()

    @property
    def body(self) -> Markdown:
        return self.query_one(".message-body", Markdown)

    @property
    def writing(self) -> bool:
        """An answer still being written (it is stored, with its id, once done)."""
        return self.message is None and self.role == "assistant"

    @property
    def corrected(self) -> bool:
        return self.label is not None and self.label.ideal is not None

    @property
    def shown_text(self) -> str:
        """What the message says now: the correction when there is one (what y copies)."""
        return self.label.ideal if self.corrected else self.content

    # -- actions ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action in ("thumb", "score", "exclude") or (
            action == "request" and parameters and parameters[0] in ("correct", "tags", "note")
        ):
            return self.role == "assistant" and self.message is not None
        if action == "request" and parameters and parameters[0] == "edit":
            return self.role == "user" and self.message is not None
        if action == "request" and parameters and parameters[0] == "regenerate":
            return self.role in ("assistant", "user") and self.message is not None
        if action == "sibling":
            return self.position[1] > 1
        return True

    async def ask(self, message: Asked) -> None:
        """Post `message` and wait until the screen has shown its result."""
        self.post_message(message)
        await wait_shown(message.shown)

    async def action_thumb(self, value: int) -> None:
        current = self.label.thumb if self.label else None
        await self.ask(self.LabelChange(self, {"thumb": None if current == value else value}))

    async def action_score(self, value: int) -> None:
        current = self.label.score if self.label else None
        await self.ask(self.LabelChange(self, {"score": None if current == value else value}))

    async def action_exclude(self) -> None:
        excluded = bool(self.label and self.label.excluded)
        await self.ask(self.LabelChange(self, {"excluded": not excluded}))

    async def action_request(self, what: str) -> None:
        await self.ask(self.Requested(self, what))

    async def action_sibling(self, step: int) -> None:
        await self.ask(self.Requested(self, "sibling", step))

    def action_copy(self) -> None:
        if self.writing:  # copy the whole answer, not the part written when y was pressed
            self.copy_when_written = True
            self.notify("Kettle is still writing this answer: it is copied once written.", timeout=3)
            return
        self.app.copy_to_clipboard(self.shown_text)
        what = "the corrected answer" if self.corrected else "the message"
        self.notify(f"Copied {what} (your terminal must allow clipboard access, OSC 52).", timeout=3)

    def action_copy_code(self) -> None:
        blocks = CODE_BLOCK.findall(self.shown_text)
        if not blocks:
            self.notify("This message has no code block (y copies the whole message).", timeout=3)
            return
        self.app.copy_to_clipboard(blocks[-1])
        self.notify(f"Copied the last code block ({len(blocks[-1].splitlines())} lines).", timeout=3)

    def action_page(self, step: int) -> None:
        if self.parent is not None:
            (self.parent.scroll_page_down if step > 0 else self.parent.scroll_page_up)()

    def action_move(self, step: int) -> None:
        views = list(self.parent.query_children(MessageView)) if self.parent else []
        index = views.index(self) + step
        if 0 <= index < len(views):
            self.screen.set_focus(views[index])  # at once: the next key is for that message
        elif step > 0:
            self.screen.focus_next()  # past the last message: the prompt


class MessageList(VerticalScroll, can_focus=False):
    """The shown branch of a conversation. Sticks to the bottom while an answer streams, until
    the user scrolls up. Not a Tab stop itself: Tab goes to the messages (which scroll it)."""

    def views(self) -> list[MessageView]:
        return list(self.query_children(MessageView))


class PromptArea(RestingTextArea):
    """The multi-line prompt: Enter sends; Ctrl+J (every terminal) or Shift+Enter / Alt+Enter
    (terminals that report them) insert a new line.

    The keys are handled in the widget's own key handler, in the order they arrive: a priority
    binding would run before the characters typed just ahead of it were inserted (a fast typist
    or a paste-like burst would send half a line). The bindings below declare the keys for the
    help screen and the keymap; a remapped key is honoured here."""

    BINDINGS = [
        Binding("enter", "submit", "Send", id="prompt.send"),
        Binding("ctrl+j,shift+enter,alt+enter", "newline", "New line", id="prompt.newline"),
    ]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, **kwargs):
        super().__init__(soft_wrap=True, tab_behavior="focus", show_line_numbers=False, **kwargs)

    def _keys(self, binding_id: str) -> set[str]:
        binding = next(b for b in self.BINDINGS if b.id == binding_id)
        keymap = getattr(self.app, "_keymap", {}) or {}
        return set(keymap.get(binding_id, binding.key).split(","))

    async def _on_key(self, event) -> None:
        if event.key in self._keys("prompt.send"):
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif event.key in self._keys("prompt.newline"):
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)

    def action_submit(self) -> None:
        text = self.text.strip()
        if text:
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")

    @on(TextArea.Changed)
    def _grow(self) -> None:
        # Grow with the text up to a third of the screen, so a long prompt stays readable.
        self.styles.height = min(max(3, self.document.line_count + 2), max(3, self.app.size.height // 3))
