"""The chat screen: conversations, streamed answers, branches, labels, sampling settings."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from textual import on, work
from textual.app import SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Input, Static

from data import memory
from data.records import Conversation, Label, Message
from data.store import Store
from gpt.errors import KettleError
from gpt.sampling import SamplingParams, get_preset
from gpt.service import Delta, Done
from tui.errors import guarded
from tui.screens.modals import ChoiceModal, ConfirmModal, Dialog, EditorModal, TextModal
from tui.widgets.chat import MessageList, MessageView, PromptArea, counted, source_name
from tui.widgets.footer import KettleFooter
from tui.widgets.sampling import SamplingPanel
from tui.widgets.sidebar import ConversationList

TITLE_CHARS = 48
# While an answer streams, the Markdown and the live counter redraw at most every FRAME_S, plus
# FRAME_S_PER_CHAR for every character already shown: the deltas in between are batched, and a
# long answer (whose re-layout costs more each time) redraws less often, so key presses stay
# quick and the UI thread leaves the CPU (and the GIL) to the model.
FRAME_S = 1 / 20
FRAME_S_PER_CHAR = 1 / 40_000
MAX_FRAME_S = 0.5
# Below this many columns the chat list and the sampling panel do not both fit beside the chat
# (at 80 they left it 18 wide): they take turns, and the panel is narrower.
WIDE_COLUMNS = 120


@dataclass
class ThreadData:
    """What the screen shows of one conversation, read in one go off the UI thread."""

    conversation: Conversation
    thread: list[Message]
    labels: dict[int, Label]
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    sources: dict[int, list] = field(default_factory=dict)  # answer id -> data.memory.Passage list


def read_thread(store: Store, conversation_id: int) -> ThreadData:
    conv = store.conversation(conversation_id)
    thread = store.current_thread(conversation_id)
    by_parent: dict[int | None, list[int]] = {}
    for m in store.messages(conversation_id):
        by_parent.setdefault(m.parent_id, []).append(m.id)
    positions = {}
    for m in thread:
        group = by_parent.get(m.parent_id, [m.id])
        positions[m.id] = (group.index(m.id) + 1, len(group))
    sources = {m.id: memory.answer_sources(store, m.id) for m in thread if m.role == "assistant"}
    return ThreadData(conv, thread, store.labels([m.id for m in thread]), positions, sources)


def current_chat(store: Store, conversation: Conversation | None, system_prompt: str) -> list[dict]:
    """The shown branch as a model reads it (Store.chat_messages); a new chat: its system prompt."""
    thread = store.current_thread(conversation.id) if conversation is not None else []
    if thread:
        return store.chat_messages(thread[-1].id)
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def title_from(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


def default_params(config: dict) -> SamplingParams:
    """Settings for a new chat: the balanced preset, changed by config.json's "sampling" object
    (e.g. {"sampling": {"temperature": 0.2, "max_new_tokens": 512}})."""
    try:
        return SamplingParams.from_dict({**get_preset("balanced").to_dict(), **(config.get("sampling") or {})})
    except (KettleError, TypeError) as exc:
        raise KettleError(f'config.json "sampling": {exc}') from None


# The per-chat grounding switch, kept beside the chat's sampling settings (on unless turned off).
GROUND = "ground"


def grounding(conv: Conversation | None) -> bool:
    return conv is None or not conv.params or conv.params.get(GROUND, True) is not False


def conversation_params(conv: Conversation | None, default: SamplingParams) -> SamplingParams:
    """The conversation's saved settings; `default` for a new one (or unusable ones)."""
    if conv is not None and conv.params:
        try:
            return SamplingParams.from_dict({k: v for k, v in conv.params.items() if k != GROUND})
        except KettleError:
            pass
    return default


class ChatScreen(Screen):
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE_COLUMNS, "-wide")]
    BINDINGS = [
        Binding("ctrl+n", "new_chat", "New chat", id="chat.new"),
        Binding("ctrl+s", "toggle_sampling", "Sampling", id="chat.sampling"),
        Binding("ctrl+f", "search", "Search", id="chat.search"),
        Binding("ctrl+b", "toggle_sidebar", "Chats", show=False, id="chat.sidebar"),
        Binding("escape", "stop", "Stop", priority=True, id="chat.stop"),
        Binding("escape", "to_prompt", "Back to the prompt", priority=True, id="chat.to_prompt"),
        Binding("ctrl+l", "focus_messages", "Messages", show=False, id="chat.messages"),
        Binding("ctrl+o", "focus_prompt", "Prompt", show=False, id="chat.prompt"),
        Binding("ctrl+g", "toggle_grounding", "Grounding", priority=True, id="chat.grounding"),
    ]

    def __init__(self):
        super().__init__()
        self.conversation: Conversation | None = None
        self.ground_new = True  # grounding for the chat the next first question starts
        self.default_params = get_preset("balanced")
        self.params = self.default_params
        self.system_prompt = ""
        self.request_id: str | None = None  # set from the moment an answer is asked for
        self.stop_requested = False  # Esc before the request reached the service
        self.streamed_tokens = 0
        self.sidebar_wanted = True  # the chat list, unless Ctrl+B hid it

    @property
    def store(self) -> Store:
        return self.app.store

    def compose(self):
        with Horizontal(id="chat-body"):
            yield ConversationList(id="sidebar")
            with Vertical(id="chat-main"):
                yield MessageList(id="messages")
                with Horizontal(id="chat-status-row"):
                    yield Static("", id="chat-status")
                    yield Static("", id="context-meter")
                yield PromptArea(id="prompt", placeholder="Message Kettle…  (Enter sends, Ctrl+J new line)")
            yield SamplingPanel(id="sampling")
        yield KettleFooter()

    def on_mount(self) -> None:
        try:
            self.default_params = default_params(self.app.config)
        except KettleError as exc:
            self.notify(f"{exc}; using the balanced preset", severity="warning", timeout=10)
        self.params = self.default_params
        self.query_one(SamplingPanel).show(self.params, "")
        self.query_one("#sampling").display = False
        self.query_one("#prompt").focus()
        self.refresh_list()
        self.show_status()
        self.measure_context()
        self.app.model_changed.subscribe(self, self._model_changed)
        self.app.mode_change_signal.subscribe(self, self._mode_changed, immediate=True)
        self.mention_running_jobs()

    def _mode_changed(self, _mode: str) -> None:
        """Back from another screen, the keys go to the prompt: the focus left on a message
        (which is hard to see) turned the next words typed into labels, dialogs and a
        regenerated answer. Called as the mode switches, before the next key is delivered."""
        if self.app.screen is self:
            self.set_focus(self.query_one(PromptArea))

    def _model_changed(self, _name: str) -> None:
        self.show_status()
        self.measure_context()  # another model: another tokenizer and context length

    def on_screen_resume(self) -> None:
        self.show_status()

    @property
    def generating(self) -> bool:
        return self.request_id is not None

    def refuse_if_generating(self) -> bool:
        if self.generating:
            self.notify("Kettle is still answering: Esc stops it.", severity="warning")
        return self.generating

    def claim(self) -> bool:
        """Reserve the screen for one answer, before any await: a Ctrl+N, another chat or a
        second Enter pressed before the first token is refused like one pressed later, instead
        of pulling the conversation from under the answer. `release` ends the claim."""
        if self.refuse_if_generating():
            return False
        self.request_id = uuid.uuid4().hex
        self.stop_requested = False
        self.refresh_bindings()
        return True

    def release(self) -> None:
        self.request_id = None
        self.refresh_bindings()
        self.show_status()

    def show_status(self, text: str | None = None) -> None:
        if text is None:
            model = self.app.model_name() if hasattr(self.app, "model_name") else ""
            text = f"[b]{escape(model)}[/]  [dim]Shift+Tab: to the messages (↑↓ move, u/d/1-5/c/t/n label) · F1 keys[/]"
        self.query_one("#chat-status", Static).update(text)

    @work(exclusive=True, group="chat-context")
    @guarded
    async def measure_context(self) -> None:
        """Show how much of the model's context window the shown conversation takes, counted as
        its prompt is built (GenerationService.context_use), and how many of its oldest tokens
        no longer fit: the model answers without them."""
        meter = self.query_one("#context-meter", Static)
        service = self.app.service
        if service is None or self.app.load_failed:
            meter.update("")
            return
        chat = await self.app.db(current_chat, self.store, self.conversation, self.system_prompt)
        try:
            use = await service.context_use(chat, self.params)
        except KettleError:  # a server's model (its tokenizer is there), or one that did not load (said elsewhere)
            meter.update("")
            return
        meter.set_class(use.dropped > 0, "-dropping")
        meter.update(
            f"ctx {use.tokens:,}/{use.context:,}" + (f" · {use.dropped:,} oldest dropped to fit" if use.dropped else "")
        )

    # -- the conversation list --------------------------------------------------------------

    @work(exclusive=True, group="chat-list")
    @guarded
    async def refresh_list(self, query: str = "") -> None:
        sidebar = self.query_one(ConversationList)
        if query:
            sidebar.show_hits(await self.app.db(self.store.search, query, 50))
        else:
            conversations = await self.app.db(self.store.list_conversations, 200)
            sidebar.show_conversations(
                conversations, self.conversation.id if self.conversation else None, now=self.app.clock()
            )

    @work(group="chat-jobs")
    @guarded
    async def mention_running_jobs(self) -> None:
        """A fine-tune started before the app was closed keeps running: say so."""
        runs = await self.app.db(self.store.runs, "running", 5)
        if any(r.kind == "finetune" for r in runs):
            self.notify("A fine-tune is running: F5 shows its progress.", timeout=8)

    @on(ConversationList.SearchChanged)
    def _search(self, event: ConversationList.SearchChanged) -> None:
        self.refresh_list(event.query)

    @on(ConversationList.Left)
    def _left_list(self) -> None:
        self.query_one(PromptArea).focus()

    @on(ConversationList.Selected)
    def _selected(self, event: ConversationList.Selected) -> None:
        if self.refuse_if_generating():
            return
        self.open_conversation(event.conversation_id, event.message_id)

    @on(ConversationList.RenameRequested)
    @work(group="chat-edit")
    @guarded
    async def _rename(self, event: ConversationList.RenameRequested) -> None:
        conv = await self.app.db(self.store.conversation, event.conversation_id)
        title = await self.app.push_screen_wait(TextModal("Rename chat", conv.title))
        if title is None or not title.strip():
            return
        await self.app.db(self.store.update_conversation, conv.id, title=title.strip())
        if self.conversation and self.conversation.id == conv.id:
            self.conversation = await self.app.db(self.store.conversation, conv.id)
        self.refresh_list()

    @on(ConversationList.DeleteRequested)
    @work(group="chat-edit")
    @guarded
    async def _delete(self, event: ConversationList.DeleteRequested) -> None:
        conv = await self.app.db(self.store.conversation, event.conversation_id)
        question = (
            f"Delete the chat [b]{escape(conv.title or 'New chat')}[/] ({conv.message_count} messages)?\n"
            "[dim]It leaves the list, search and new datasets; labels and snapshots "
            "keep their history.[/]"
        )
        if not await self.app.push_screen_wait(ConfirmModal(question, yes="Delete")):
            return
        await self.app.db(self.store.delete_conversation, conv.id)
        if self.conversation and self.conversation.id == conv.id:
            self._clear()
        self.refresh_list()
        self.notify(f"Deleted {conv.title or 'the chat'}.")

    def _clear(self) -> None:
        self.conversation = None
        self.ground_new = True
        self.query_one(MessageList).remove_children()
        self.params = self.default_params
        self.system_prompt = ""
        self.query_one(SamplingPanel).show(self.params, "")
        self.measure_context()

    # -- showing a conversation -------------------------------------------------------------

    @work(exclusive=True, group="chat-open")
    @guarded
    async def open_conversation(self, conversation_id: int, message_id: int | None = None) -> None:
        if message_id is not None:
            await self.app.db(self.store.set_leaf, conversation_id, message_id)
        data = await self.app.db(read_thread, self.store, conversation_id)
        if self.conversation is None or self.conversation.id != conversation_id:
            self.params = conversation_params(data.conversation, self.default_params)
            self.system_prompt = data.conversation.system_prompt
            self.query_one(SamplingPanel).show(self.params, self.system_prompt)
        self.conversation = data.conversation
        await self.show_thread(data)
        if message_id is not None:
            for view in self.query_one(MessageList).views():
                if view.message_id == message_id:
                    view.focus()
                    view.scroll_visible()

    async def reload(self) -> None:
        if self.conversation is not None:
            await self.show_thread(await self.app.db(read_thread, self.store, self.conversation.id))

    async def show_thread(self, data: ThreadData) -> None:
        """Make the message list show `data.thread`: views of messages still on the branch are
        updated in place, the rest replaced (so a long chat is not re-rendered for one label,
        and a focused answer keeps the focus: a regenerated one was shown below the old one,
        and replaced, with the focus, when the old one left)."""
        self.conversation = data.conversation
        messages = self.query_one(MessageList)
        shown = 0  # how many of the thread's messages have a view, in order
        for view in messages.views():
            if shown < len(data.thread) and view.message_id == data.thread[shown].id:
                m = data.thread[shown]
                view.sources = data.sources.get(m.id, [])
                view.update(m, data.labels.get(m.id), position=data.positions[m.id])
                shown += 1
            else:
                await view.remove()
        new = [
            MessageView(m.role, m.content, m, data.labels.get(m.id), data.positions[m.id]) for m in data.thread[shown:]
        ]
        for view in new:
            view.sources = data.sources.get(view.message_id, [])
        if new:
            await messages.mount_all(new)
            messages.anchor()
        self.measure_context()  # a turn added, another branch or chat shown

    # -- sending and generating -------------------------------------------------------------

    @on(PromptArea.Submitted)
    def _submitted(self, event: PromptArea.Submitted) -> None:
        problems = self.query_one(SamplingPanel).errors()
        if problems:
            self.notify("Fix the sampling settings first: " + "; ".join(problems), severity="error")
            return
        if not self.claim():
            return
        self.query_one(PromptArea).clear()
        self.send(event.text)

    @work(group="chat-send")
    @guarded
    async def send(self, text: str) -> None:
        """Store the question and answer it (the screen is claimed)."""
        try:
            if self.app.service is None:
                raise KettleError("there is no model to answer yet (F4 opens the models screen)")
            if self.conversation is None:
                self.conversation = await self.app.db(
                    self.store.create_conversation,
                    title_from(text),
                    self.system_prompt,
                    params={**self.params.to_dict(), GROUND: self.ground_new},
                    model=None,
                )
            shown = self.query_one(MessageList).views()
            parent = shown[-1].message_id if shown else None
            user = await self.app.db(
                self.store.add_message, self.conversation.id, "user", content=text, parent_id=parent
            )
            await self.reload()
            self.refresh_list()
            await self.generate(user.id)
        finally:
            self.release()

    async def generate(self, parent_id: int, shown: asyncio.Event | None = None) -> None:
        """Stream an answer to the branch ending at `parent_id` into a new message view, then
        store it (a cancelled answer is kept with what was written so far). The caller has
        claimed the screen, so the shown conversation is the question's until it releases.
        With `shown` (a message's key asked for the answer) the new answer takes the focus,
        and `shown` is set once it has it."""
        service = self.app.service
        conversation_id = self.conversation.id
        chat = await self.app.db(self.store.chat_messages, parent_id)
        params = self.params
        found = await self.references(chat) if grounding(self.conversation) else []
        view = MessageView("assistant")
        messages = self.query_one(MessageList)
        await messages.mount(view)
        messages.anchor()
        if shown is not None:
            self.set_focus(view)
            shown.set()
        stream = view.body.get_stream(view.body)
        request_id = self.request_id
        self.streamed_tokens = 0
        parts: list[str] = []
        shown = chars = 0  # how many of the parts (and characters) are on screen
        result = model = None
        started = last_frame = time.monotonic()
        try:
            async for event in service.stream_chat(
                chat,
                params,
                request_id=request_id,
                references=[p.reference for p in found],
                taught=memory.taught_count(found),
            ):
                if self.stop_requested:  # also an Esc from before the service knew the request
                    service.cancel(request_id)
                if isinstance(event, Delta):
                    parts.append(event.text)
                    self.streamed_tokens += 1
                    # Getting from a non-empty queue never yields: when the model outruns the
                    # screen, let key presses and redraws in between every delta.
                    await asyncio.sleep(0)
                    now = time.monotonic()
                    if now - last_frame >= min(MAX_FRAME_S, FRAME_S + chars * FRAME_S_PER_CHAR):
                        last_frame = now
                        fresh = "".join(parts[shown:])
                        await stream.write(fresh)
                        shown, chars = len(parts), chars + len(fresh)
                        self.show_status(
                            f"[b]writing…[/] {counted(self.streamed_tokens, 'piece')} · "
                            f"{self.streamed_tokens / (now - started):.0f}/s  "
                            "[dim]Esc stops[/]"
                        )
                elif isinstance(event, Done):
                    result, model = event.result, event.model
                    found = found[: event.references_used]
                else:
                    raise KettleError(event.message)
        finally:
            await stream.stop()
            if result is None:
                service.cancel(request_id)
            self.show_status()
            if result is None and not parts:
                await view.remove()  # nothing was written: no empty answer left behind
        text = "".join(parts)
        if result is not None:
            text = result.text
        view.content = text
        await view.body.update(text)
        if result is None:
            return
        saved = await self.app.db(
            self._save_answer, conversation_id, parent_id, text=text, params=params, result=result, model=model
        )
        if found:
            await self.app.db(memory.record_sources, self.store, saved.id, found)
        view.sources = found
        view.update(message=saved)
        await self.reload()

    async def references(self, chat: list[dict]) -> list:
        """The passages for the newest question: the user's corrections and approved answers,
        their documents, and Python's documentation once indexed (by the brew, `kettle docs
        python` or the Docs screen, each in a process of its own: ast.parse on a thread beside
        the app's raised SystemError in CPython 3.11)."""
        return await self.app.db(memory.references_for, self.store, chat)

    def _save_answer(
        self, conversation_id: int, parent_id: int, *, text: str, params: SamplingParams, result, model
    ) -> Message:
        version = self.store.find_model_version(model) if model else None
        return self.store.add_message(
            conversation_id,
            "assistant",
            content=text,
            parent_id=parent_id,
            model_version_id=version.id if version else None,
            model=model,
            params=params.to_dict(),
            generation=result,
        )

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":  # otherwise Esc keeps its usual meaning
            return self.generating
        if action == "to_prompt":
            return not self.generating and isinstance(self.focused, MessageView)
        return True

    def action_stop(self) -> None:
        if self.request_id is not None:
            self.stop_requested = True
            self.app.service.cancel(self.request_id)

    def action_to_prompt(self) -> None:
        """Esc on a message, nothing being written: a user who typed a question there after a
        correction got its letters taken as label keys ('t' opened the tags, the rest of the
        question became a tag)."""
        self.query_one(PromptArea).focus()

    # -- message actions ----------------------------------------------------------------------

    @on(MessageView.LabelChange)
    @work(group="chat-label")
    @guarded
    async def _label(self, event: MessageView.LabelChange) -> None:
        try:
            await self._set_label(event.view.message_id, **event.changes)
        finally:
            event.shown.set()

    @on(MessageView.Requested)
    @work(group="chat-request")
    @guarded
    async def _requested(self, event: MessageView.Requested) -> None:
        try:
            await self._request(event)
        finally:
            event.shown.set()  # also when refused or failed: the next key need not wait

    async def _request(self, event: MessageView.Requested) -> None:
        view, what = event.view, event.what
        message = view.message
        if message is None:
            return
        if what == "sibling":
            siblings = await self.app.db(self.store.siblings, message.id)
            ids = [s.id for s in siblings]
            target = ids[(ids.index(message.id) + event.step) % len(ids)]
            await self.app.db(self.store.set_leaf, message.conversation_id, target)
            await self.reload()
            self._focus_message(target)
        elif what == "sources":
            if not view.sources:
                self.notify("This answer was not grounded in any passage.", timeout=4)
                return
            choices = [(str(i), f"{source_name(p)}\n{p.text[:600]}") for i, p in enumerate(view.sources)]
            await self.app.push_screen(ChoiceModal("Where this answer came from", choices, hint="Esc closes"))
        elif what == "regenerate":
            if not self.claim():
                return
            try:  # a question (e.g. after a failed answer) is answered again; an answer replaced
                await self.generate_from(message.id if message.role == "user" else message.parent_id, event.shown)
            finally:
                self.release()
        elif what == "edit":
            if self.refuse_if_generating():  # before the editor opens
                return
            text = await self.dialog(
                EditorModal("Edit your message and ask again (the old branch stays)", message.content), event
            )
            if text is None or not self.claim():
                return
            try:
                user = await self.app.db(
                    self.store.add_message, message.conversation_id, "user", content=text, parent_id=message.parent_id
                )
                await self.reload()
                await self.generate(user.id, event.shown)  # focus on the new answer
            finally:
                self.release()
        elif what == "correct":
            text = await self.dialog(
                EditorModal("Correct the answer: what should Kettle have said? (the original stays)", view.shown_text),
                event,
            )
            if text is not None:
                await self._set_label(message.id, ideal=text)
        elif what == "tags":
            tags = ", ".join(view.label.tags) if view.label else ""
            text = await self.dialog(
                TextModal("Tags", tags, "tone, facts, code", "Comma-separated · Enter saves · Esc cancels"), event
            )
            if text is not None:
                await self._set_label(message.id, tags=[t for t in text.split(",") if t.strip()])
        elif what == "note":
            note = view.label.note if view.label else ""
            text = await self.dialog(TextModal("Note", note, "why this answer is good or bad"), event)
            if text is not None:
                await self._set_label(message.id, note=text.strip())

    async def dialog(self, dialog: Dialog, event: MessageView.Requested):
        """Show a message's dialog and return its result. `event.shown` is set once the dialog
        has the keys, and then becomes what the key that closes the dialog waits for: the
        result shown (set by the caller, or as the request ends). One at a time: a key that
        reached the chat while a dialog was up (none should) does not stack a second one."""
        if self.app.screen is not self:
            return None
        result = self.app.push_screen(dialog, wait_for_dismiss=True)
        await dialog.opened.wait()
        event.shown.set()
        event.shown = dialog.handled = asyncio.Event()
        return await result

    async def generate_from(self, parent_id: int | None, shown: asyncio.Event | None = None) -> None:
        if parent_id is None:
            raise KettleError("this answer has no question to regenerate from")
        await self.app.db(self.store.set_leaf, self.conversation.id, parent_id)
        await self.reload()
        await self.generate(parent_id, shown)

    async def _set_label(self, message_id: int, **changes) -> None:
        """Save a label and show it on the message's view, if it is still shown (a dialog's
        answer can come back after its message left the screen)."""
        label = await self.app.db(self.store.set_label, message_id, **changes)
        for view in self.query_one(MessageList).views():
            if view.message_id == message_id:
                view.update(label=None if label.is_empty else label)

    def _focus_message(self, message_id: int) -> None:
        for view in self.query_one(MessageList).views():
            if view.message_id == message_id:
                self.set_focus(view)  # at once: the next key is for this message

    # -- sampling -------------------------------------------------------------------------------

    @on(SamplingPanel.Changed)
    @work(exclusive=True, group="chat-params")
    @guarded
    async def _params_changed(self, event: SamplingPanel.Changed) -> None:
        self.params = event.params
        self.system_prompt = event.system_prompt
        if self.conversation is not None:
            self.conversation = await self.app.db(
                self.store.update_conversation,
                self.conversation.id,
                params={**event.params.to_dict(), GROUND: grounding(self.conversation)},
                system_prompt=event.system_prompt,
            )
        self.measure_context()  # the system prompt and the answer's budget (max_new_tokens) count

    # -- keys -------------------------------------------------------------------------------------

    async def action_toggle_grounding(self) -> None:
        """Answer this chat from the model alone, or beside the passages memory finds."""
        if self.conversation is None:  # kept for the chat its first question starts
            on = self.ground_new = not self.ground_new
        else:
            on = not grounding(self.conversation)
            params = {**self.params.to_dict(), GROUND: on}
            self.conversation = await self.app.db(self.store.update_conversation, self.conversation.id, params=params)
        self.notify(
            "Grounding on: answers use your corrections and documents, sources shown"
            if on
            else "Grounding off: answers come from the model alone",
            timeout=4,
        )

    def action_new_chat(self) -> None:
        if self.refuse_if_generating():
            return
        self._clear()
        self.query_one(ConversationList).clear_search()  # a new chat is not among an old search's hits
        self.refresh_list()
        self.query_one(PromptArea).focus()

    def action_toggle_sampling(self) -> None:
        panel = self.query_one(SamplingPanel)
        self.show_side(sampling=not panel.display)
        if panel.display:
            panel.query_one("#param-temperature", Input).focus()

    def action_toggle_sidebar(self) -> None:
        self.show_side(sidebar=not self.query_one(ConversationList).display)

    def action_search(self) -> None:
        self.show_side(sidebar=True)
        self.query_one("#chat-search", Input).focus()

    def on_resize(self) -> None:
        self.show_side()

    def show_side(self, sidebar: bool | None = None, sampling: bool | None = None) -> None:
        """Show or hide the chat list and the sampling panel. On a narrow screen (below
        WIDE_COLUMNS) the one shown last takes the place of the other, and the list comes
        back when the panel closes; focus in a part that hides goes to the prompt."""
        narrow = self.app.size.width < WIDE_COLUMNS
        panel, chats = self.query_one(SamplingPanel), self.query_one(ConversationList)
        if sidebar is not None:
            self.sidebar_wanted = sidebar
        if sampling is not None:
            panel.display = sampling
        elif sidebar and narrow:
            panel.display = False
        chats.display = self.sidebar_wanted and not (narrow and panel.display)
        if any(not part.display and part.has_focus_within for part in (panel, chats)):
            self.query_one(PromptArea).focus()

    def action_focus_messages(self) -> None:
        views = self.query_one(MessageList).views()
        if views:
            views[-1].focus()

    def action_focus_prompt(self) -> None:
        self.query_one(PromptArea).focus()

    def commands(self):
        view = self.focused if isinstance(self.focused, MessageView) else None
        if view is not None:  # the focused message's keys, by name
            for binding in MessageView.BINDINGS:
                action, _, args = binding.action.partition("(")
                if view.check_action(action, tuple(a.strip("'\"") for a in args.rstrip(")").split(",") if a)):
                    yield SystemCommand(
                        f"Message: {binding.description}",
                        f"key {binding.key}",
                        lambda b=binding: view.call_later(view.run_action, b.action),
                    )
