"""Compare: one prompt to two models, answers side by side, same sampling settings and seed."""

from __future__ import annotations

import asyncio

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import Screen
from textual.widgets import Input, Markdown, Select, Static

from gpt.errors import KettleError
from gpt.sampling import get_preset
from gpt.service import Delta, Done, ModelInfo
from tui.errors import guarded
from tui.screens.finetune import CompareRequest
from tui.widgets.chat import chat_markdown
from tui.widgets.footer import KettleFooter

SEED = 1234  # both sides sample with the same seed, so differences come from the models


class CompareScreen(Screen):
    BINDINGS = [Binding("escape", "stop", "Stop", id="compare.stop")]

    def __init__(self):
        super().__init__()
        self.models: list[ModelInfo] = []
        self.services: dict[str, object] = {}  # model path -> a service of our own

    def compose(self):
        yield Static(
            f"[b]Compare[/]  [dim]one prompt, two models, the same settings and seed ({SEED})[/]",
            classes="screen-title",
        )
        with Horizontal(id="compare-top"):
            yield Select([], id="left-model", prompt="model A")
            yield Select([], id="right-model", prompt="model B")
        yield Input(placeholder="Prompt for both models; Enter sends", id="compare-prompt")
        with Horizontal(id="compare-answers"):
            for side in ("left", "right"):
                with Vertical(classes="compare-column"):
                    yield Static("", id=f"{side}-title")
                    with VerticalScroll():
                        yield Markdown("", id=f"{side}-answer", parser_factory=chat_markdown)
                    yield Static("", id=f"{side}-stats", classes="compare-stats")
        yield KettleFooter()

    def on_mount(self) -> None:
        self.load_models()
        self.query_one("#compare-prompt").focus()

    @work(exclusive=True, group="compare-models")
    @guarded
    async def load_models(self, left: str | None = None, right: str | None = None) -> None:
        await self._fill_models(left, right)

    async def _fill_models(self, left: str | None, right: str | None) -> None:
        self.models = await self.app.service.list_models()
        options = [(f"{m.name}{'  ● active' if m.active else ''}", m.name) for m in self.models]
        for sel_id, wanted in (("#left-model", left), ("#right-model", right)):
            select = self.query_one(sel_id, Select)
            current = select.value
            select.set_options(options)
            names = [m.name for m in self.models]
            if wanted in names:
                select.value = wanted
            elif current in names:
                select.value = current
        left_sel, right_sel = self.query_one("#left-model", Select), self.query_one("#right-model", Select)
        if left_sel.value is Select.NULL and self.models:
            active = next((m for m in self.models if m.active), self.models[0])
            left_sel.value = active.name
        if right_sel.value is Select.NULL:
            other = next((m for m in self.models if m.name != left_sel.value), None)
            if other is not None:
                right_sel.value = other.name

    @on(CompareRequest)
    def _requested(self, event: CompareRequest) -> None:
        self.preselect(event)

    @work(exclusive=True, group="compare-models")
    @guarded
    async def preselect(self, event: CompareRequest) -> None:
        parent = None
        if event.parent_id is not None:
            version = await self.app.db(self.app.store.find_model_version, event.parent_id)
            parent = version.name if version else None
        await self._fill_models(parent, event.name)

    def service_for(self, info: ModelInfo):
        """The app's service when it runs this model; otherwise one of our own (kept while the
        screen lives, so a second prompt does not reload the weights)."""
        active = self.app.service.active_model
        if active is not None and active.name == info.name:
            return self.app.service
        from data.registry import StoreCatalog
        from gpt.service import InProcessService, RemoteService

        if isinstance(self.app.service, RemoteService):
            raise KettleError(
                "comparing needs the models on this machine; the app is connected "
                "to a server that runs one model at a time"
            )
        if info.path not in self.services:
            self.services[info.path] = InProcessService(info.path, catalog=StoreCatalog())
        return self.services[info.path]

    @on(Input.Submitted, "#compare-prompt")
    @work(exclusive=True, group="compare-run")
    @guarded
    async def _send(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt:
            return
        chosen = []
        for side in ("left", "right"):
            name = self.query_one(f"#{side}-model", Select).value
            info = next((m for m in self.models if m.name == name), None)
            if info is None:
                raise KettleError("choose two models first")
            chosen.append((side, info))
        services = [await asyncio.to_thread(self.service_for, info) for _, info in chosen]
        messages = [{"role": "user", "content": prompt}]
        params = get_preset("balanced").replace(seed=SEED)
        await asyncio.gather(
            *[
                self._answer(side, info, service=service, messages=messages, params=params)
                for (side, info), service in zip(chosen, services)
            ]
        )

    async def _answer(self, side: str, info: ModelInfo, *, service, messages, params) -> None:
        self.query_one(f"#{side}-title", Static).update(f"[b]{escape(info.name)}[/]")
        md = self.query_one(f"#{side}-answer", Markdown)
        await md.update("")
        stats = self.query_one(f"#{side}-stats", Static)
        stats.update("writing…")
        stream = Markdown.get_stream(md)
        parts = []
        try:
            async for event in service.stream_chat(messages, params, request_id=f"compare-{side}"):
                if isinstance(event, Delta):
                    parts.append(event.text)
                    await stream.write(event.text)
                elif isinstance(event, Done):
                    r = event.result
                    await stream.stop()
                    await md.update(r.text)
                    stats.update(f"{r.new_tokens} tokens · {r.tokens_per_s:.1f} tok/s · {r.finish_reason}")
                else:
                    stats.update(f"[$error]{escape(event.message)}[/]")
        finally:
            await stream.stop()

    def action_stop(self) -> None:
        for service in [self.app.service, *self.services.values()]:
            for side in ("left", "right"):
                service.cancel(f"compare-{side}")

    def on_unmount(self) -> None:
        for service in self.services.values():
            service.close()
