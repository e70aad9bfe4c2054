"""How the app and the command line talk to a model: one interface, two implementations.

    service = InProcessService("my-model")          # or RemoteService("http://127.0.0.1:8000")
    async for event in service.stream_chat(messages, SamplingParams(temperature=0)):
        if isinstance(event, Delta): show(event.text)
        elif isinstance(event, Done): record(event.result, event.model)   # a GenerationResult
        else: complain(event.message)                                     # an Error

Every request ends with exactly one Done (finish_reason "stop", "length" or "cancelled") or one
Error. `cancel(request_id)` stops a request within one token (a queued one never starts); leaving
the `async for` early (break, task cancelled) cancels it too.

InProcessService runs its models on ONE worker thread that decodes every request in flight together,
one batched step at a time (gpt.batching): a new request is prefilled and joins at the next step, a
finished or cancelled one leaves at once. Beyond the batch's room (`max_batch` rows, and the KV
budget) requests wait, in the order they came. A request names a model (`find_model`: one
`list_models` lists) or gets the active one (`active_model`, changed by `switch_model`; a request
sent before a switch is answered by the model it was sent to). A model is loaded on the worker at
its first request (decoding pauses meanwhile); at most `max_loaded` stay loaded, the one used
least recently with nothing in flight making room. Events reach the caller's asyncio loop through
`loop.call_soon_threadsafe`, so it is safe to use from the Textual app's event loop; nothing blocks
the loop.

Model names: the service asks its catalog (gpt.catalog) which models exist. The app and
`kettle serve` pass data.registry's, over the store: a store model version's name or the name
of a directory under KETTLE_HOME/models, looked up in that order; a service given no catalog
knows models by their directory's path alone. `InProcessService(MODEL)` (a command-line
argument) also takes a model directory path, and a bare name that is neither. `switch_model`
takes only names `list_models` lists, never a path: a name may come from an HTTP client.
`InProcessService()` with no model serves the catalog's active model and follows the catalog:
switching it to a store version records the activation there, so the app and the next start
agree. A service given a model, or `follow_catalog=False` (`kettle serve`), leaves the store alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import queue
import threading
import traceback
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable

from gpt.batching import KV_BUDGET_BYTES, MAX_BATCH, Batch, Request
from gpt.catalog import ModelCatalog, ModelInfo, PathCatalog
from gpt.engine import Engine, GenerationResult
from gpt.errors import KettleError
from gpt.sampling import PARAMS, SamplingParams


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    result: GenerationResult
    model: str  # the model that generated the answer
    references_used: int = 0  # how many of the references given (best first) the answer saw


@dataclass(frozen=True)
class Error:
    message: str
    # "invalid_request" (the request or model is at fault) | "context_length_exceeded" (the
    # prompt does not fit and was not to be trimmed) | "internal"
    code: str = "invalid_request"


Event = Delta | Done | Error


@dataclass(frozen=True)
class ContextUse:
    """How much of a model's context window a conversation takes (GenerationService.context_use)."""

    tokens: int  # the prompt the model would see, after trimming
    dropped: int  # the conversation's tokens left out to fit (its oldest messages first)
    context: int  # the model's context length


class GenerationService(ABC):
    """The one way the app and the command line generate text (see the module docstring)."""

    @abstractmethod
    def stream_chat(
        self,
        messages: list[dict],
        params: SamplingParams,
        *,
        model: str | None = None,
        request_id: str | None = None,
        truncate: bool = True,
    ) -> AsyncIterator[Event]:
        """Answer a conversation as the assistant: Delta events, then one Done or Error.
        `params` is a SamplingParams or a dict of its fields; `model` a name list_models lists
        (None: the active one, loaded on request); `request_id` (unique among the
        requests in flight) is what `cancel` takes. A conversation too long for the context
        loses its oldest messages (gpt.engine), or with truncate=False is an Error with code
        "context_length_exceeded"."""

    @abstractmethod
    def complete(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        model: str | None = None,
        request_id: str | None = None,
        truncate: bool = True,
    ) -> AsyncIterator[Event]:
        """Continue raw text (or token ids): the same events as stream_chat."""

    @abstractmethod
    def cancel(self, request_id: str | None = None) -> None:
        """Stop one request (None: every request in flight or queued). Safe from any thread."""

    @abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """Every model this service can switch to; the one in use has active=True."""

    async def find_model(self, name: str) -> ModelInfo:
        """The model list_models lists as `name` (never a path: a name may come from an HTTP
        client); KettleError when none is."""
        info = next((m for m in await self.list_models() if m.name == name), None)
        if info is None:
            raise KettleError(f"{name}: no such model (not a store model version, nor a model in the models folder)")
        return info

    @abstractmethod
    async def switch_model(self, name: str) -> ModelInfo:
        """Answer the following requests with the model `list_models` lists as `name`. On
        failure (KettleError) the old model stays in use."""

    @property
    @abstractmethod
    def active_model(self) -> ModelInfo | None:
        """The model in use (None before the first one is loaded or seen)."""

    def loaded_models(self) -> list[ModelInfo]:
        """The models loaded now, the one used last first (a remote service knows its active one)."""
        return [self.active_model] if self.active_model else []

    @abstractmethod
    def load(self) -> ModelInfo:
        """Get ready now, blocking (run it off the event loop): the in-process service loads
        the weights, the remote one asks the server which model it serves. KettleError if not."""

    def close(self) -> None:  # noqa: B027 - a service holding nothing has nothing to release
        """Release the model and the worker thread; the service cannot be used afterwards."""

    async def tokenizer(self, model: str | None = None):
        """The gpt.tokenizer.Tokenizer and Engine (for `tokenize`) of `model` (a listed name;
        None: the active one), loaded if need be; only a service with the model in this
        process has them."""
        raise KettleError("tokenizing needs the model in this process")

    async def context_use(
        self, messages: list[dict], params: SamplingParams, *, model: str | None = None
    ) -> ContextUse:
        """How much of `model`'s context window (None: the active one's) `messages` take as the
        prompt stream_chat builds for them (Engine.chat_prompt: the answer's budget kept free,
        the oldest messages dropped to fit), leaving out the passages grounding adds to a newest
        question. Built off the worker (the engine's prompt building only reads), so the
        answers in flight keep decoding; needs the model in this process, as `tokenizer`."""
        _, engine = await self.tokenizer(model)
        ids, dropped = await asyncio.to_thread(engine.chat_prompt, messages, _checked(params))
        return ContextUse(len(ids), dropped, engine.context_length)


# --- model names -----------------------------------------------------------------------------------


def _same_model(a: ModelInfo, b: ModelInfo) -> bool:
    # A version and the directory it points at are one model (served by path, it would be
    # listed twice otherwise).
    if a.version_id is not None and b.version_id is not None:
        return a.version_id == b.version_id
    return Path(a.path).resolve() == Path(b.path).resolve()


# --- in process ------------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "chat" | "complete"
    model: ModelInfo  # the model asked for, or the served one when the request was sent
    payload: object  # messages or prompt
    params: SamplingParams
    cancel: threading.Event
    emit: Callable[[Event], None]
    options: dict  # the engine's keyword arguments: truncate, logprobs, echo
    prompt: tuple[list[int], int, dict] | None = None  # _prompt's, built off the worker if big


@dataclass
class _Call:
    fn: Callable
    model: ModelInfo  # runs once this model is loaded or there is room to load it
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Loaded:
    info: ModelInfo
    engine: Engine
    batch: Batch  # the requests in flight on this engine

    @property
    def idle(self) -> bool:
        return not self.batch.rows


# Models `kettle serve` keeps loaded at once: a request for another loads it and lets go of the
# one used least recently that has nothing in flight (as Ollama does); beyond that, requests wait
# in order. The app keeps one (the default): its switch lets the old model go.
MAX_LOADED = 2
# A prompt longer than this (characters, or token ids) is built into token ids on a thread of
# its own, not on the worker, so that the requests in flight keep decoding meanwhile. Smaller
# ones take a millisecond or so and are built on the worker, in the order they came.
BIG_PROMPT = 32_000


def _key(info: ModelInfo) -> str:
    return str(Path(info.path).resolve())


def _prompt_size(kind: str, payload) -> int:
    if kind == "chat" and isinstance(payload, list):
        return sum(len(m.get("content") or "") + 1 for m in payload if isinstance(m, dict))
    return len(payload) if isinstance(payload, (str, list)) else 0


class InProcessService(GenerationService):
    """The models in this process, driven by one worker thread (see the module docstring)."""

    def __init__(
        self,
        model: str | None = None,
        *,
        catalog: ModelCatalog | None = None,
        device: str | None = None,
        max_batch: int = MAX_BATCH,
        kv_budget: int = KV_BUDGET_BYTES,
        quantize: str | None = None,
        follow_catalog: bool = True,
        max_loaded: int = 1,
    ):
        """`follow_catalog=False`: the catalog's active model is only where a service without
        a model starts; switching never records it (kettle serve: the server's choice is its
        own, the app's active model stays the app's)."""
        self._catalog = catalog or PathCatalog()
        self._follows_catalog = model is None and follow_catalog
        # Resolve now, so a bad name fails where it was given; the weights load on the worker.
        self._default = self._catalog.active() if model is None else self._catalog.resolve(model)
        self._device = device
        self._quantize = quantize  # every model it loads (gpt.quantize)
        self._loaded: collections.OrderedDict[str, _Loaded] = collections.OrderedDict()  # least recent first
        self._max_batch, self._kv_budget, self._max_loaded = max_batch, kv_budget, max(1, max_loaded)
        self._served: list[ModelInfo] = []  # listed even when not found elsewhere: switch back
        self._jobs: queue.Queue = queue.Queue()
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="kettle-generation", daemon=True)
        self._worker.start()

    # -- the interface ----------------------------------------------------------------------------

    def stream_chat(
        self,
        messages,
        params,
        *,
        model=None,
        request_id=None,
        truncate=True,
        logprobs=None,
        references=None,
        taught=0,
    ):
        """Also `model` (a name list_models lists; None: the served one) and `logprobs`: each
        answer token's log-probability and the N most likely (GenerationResult.logprobs), which
        only the in-process service returns; `references`: passages to ground the answer in
        (best first; Engine.ground keeps those that fit, and Done says how many), the first
        `taught` of them answers the user taught."""
        return self._events(
            "chat",
            messages,
            model=model,
            params=params,
            request_id=request_id,
            options={"truncate": truncate, "logprobs": logprobs, "references": references, "taught": taught},
        )

    def complete(
        self, prompt, params, *, model=None, request_id=None, truncate=True, logprobs=None, echo=False, score_only=False
    ):
        """Also `model` and `logprobs` (as in stream_chat) and `echo`: score the prompt's tokens
        too (GenerationResult.prompt_logprobs; a prompt longer than the context is scored whole,
        and the answer continues from its end that fits); `score_only`: generate nothing."""
        return self._events(
            "complete",
            prompt,
            model=model,
            params=params,
            request_id=request_id,
            options={"truncate": truncate, "logprobs": logprobs, "echo": echo, "score_only": score_only},
        )

    async def tokenizer(self, model: str | None = None):
        info = self._default if model is None else await self.find_model(model)
        engine = await asyncio.wrap_future(self._call(lambda: self._use(info).engine, info))
        return engine.tokenizer, engine

    def cancel(self, request_id: str | None = None) -> None:
        with self._lock:
            events = (
                list(self._cancels.values())
                if request_id is None
                else [e for rid, e in self._cancels.items() if rid == request_id]
            )
        for event in events:
            event.set()

    async def list_models(self) -> list[ModelInfo]:
        models = await asyncio.to_thread(self._catalog.models)
        for served in [self._default, *self._served]:
            if not any(_same_model(m, served) for m in models):
                models.insert(0, served)
        return [_with_active(m, _same_model(m, self._default)) for m in models]

    async def switch_model(self, name: str) -> ModelInfo:
        """Requests sent before the switch are still answered by the model they were sent to."""
        info = await self.find_model(name)
        return await asyncio.wrap_future(self._call(lambda: self._switch(info), info))

    @property
    def active_model(self) -> ModelInfo:
        """The model answering requests that name none (resolved at once, loaded on first use)."""
        return _with_active(self._default, True)

    def loaded_models(self) -> list[ModelInfo]:
        loaded = list(self._loaded.values())  # one C call: the worker may change it meanwhile
        return [_with_active(m.info, _same_model(m.info, self._default)) for m in reversed(loaded)]

    @property
    def _engine(self) -> Engine | None:
        """The served model's engine, once loaded."""
        loaded = self._loaded.get(_key(self._default))
        return loaded.engine if loaded else None

    def load(self) -> ModelInfo:
        """Load the served model now and wait for it (the first request would otherwise do it)."""
        info = self._default
        self._call(lambda: self._use(info), info).result()
        return self.active_model

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self.cancel()
        self._worker.join(timeout=30)
        self._loaded.clear()

    # -- the caller's side ------------------------------------------------------------------------

    async def _events(self, kind, payload, *, model, params, request_id, options) -> AsyncIterator[Event]:
        if self._closed:
            yield Error("the generation service is closed", "internal")
            return
        try:
            params = _checked(params)
            info = self._default if model is None else await self.find_model(model)
        except KettleError as exc:
            yield Error(str(exc))
            return
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, event)
            except RuntimeError:  # the caller's loop is gone; the request is cancelled anyway
                cancel.set()

        cancel = threading.Event()
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            self._cancels[request_id] = cancel
        try:
            job = _Job(kind, info, payload, params, cancel, emit, dict(options))
            if _prompt_size(kind, payload) > BIG_PROMPT:
                try:
                    engine = await asyncio.wrap_future(self._call(lambda: self._use(info).engine, info))
                    job.prompt = await asyncio.to_thread(_prompt, engine, job)
                except Exception as exc:
                    yield _error_event(exc)
                    return
            with self._lock:  # never after close()'s None: nobody would answer it
                if self._closed:
                    yield Error("the generation service is closed", "internal")
                    return
                self._jobs.put(job)
            while True:
                event = await inbox.get()
                yield event
                if not isinstance(event, Delta):
                    return
        finally:
            # Reached early when the caller stops listening (break, aclose, task cancelled):
            # the generation must not run on for nobody.
            cancel.set()
            with self._lock:
                if self._cancels.get(request_id) is cancel:
                    del self._cancels[request_id]

    def _call(self, fn: Callable, model: ModelInfo) -> concurrent.futures.Future:
        """Run fn on the worker thread once `model` is loaded or has room to be."""
        call = _Call(fn, model)
        with self._lock:
            if self._closed:
                raise KettleError("the generation service is closed")
            self._jobs.put(call)
        return call.future

    # -- the worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        waiting: collections.deque = collections.deque()  # jobs and calls not started yet
        closing = False
        while not closing or self._running():
            idle = not waiting and not self._running()
            items = [self._jobs.get()] if idle else []  # nothing to do: sleep until asked
            while True:
                try:
                    items.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    closing = True  # close() cancelled everything: the rows leave at the next step
                elif isinstance(item, _Call) and (
                    _key(item.model) in self._loaded or not waiting and self._room_for(item.model)
                ):
                    _run_call(item)
                else:
                    waiting.append(item)
            self._admit(waiting)
            if self._running():
                self._step()
        for item in waiting:  # calls never run: their callers must not wait forever
            if isinstance(item, _Call):
                item.future.set_exception(KettleError("the generation service is closed"))

    def _running(self) -> bool:
        return any(not m.idle for m in self._loaded.values())

    def _room_for(self, info: ModelInfo) -> bool:
        return (
            _key(info) in self._loaded
            or len(self._loaded) < self._max_loaded
            or any(m.idle for m in self._loaded.values())
        )

    def _admit(self, waiting: collections.deque) -> None:
        """Start what waits, in order, while there is room; a request cancelled while it waits
        is answered at once and never starts."""
        for job in [j for j in waiting if isinstance(j, _Job) and j.cancel.is_set()]:
            waiting.remove(job)
            job.emit(
                Done(
                    GenerationResult(
                        text="", finish_reason="cancelled", prompt_tokens=0, new_tokens=0, seed=job.params.seed or 0
                    ),
                    job.model.name,
                )
            )
        while waiting:
            head = waiting[0]
            if not self._room_for(head.model):
                return
            if isinstance(head, _Call):
                _run_call(waiting.popleft())
                continue
            loaded = self._loaded.get(_key(head.model))
            if loaded is not None and loaded.batch.full:
                return
            self._start(waiting.popleft())

    def _start(self, job: _Job) -> None:
        try:
            loaded = self._use(job.model)
            engine, name = loaded.engine, loaded.info.name
            if engine.device.type == "cpu":
                engine.threads = 1 if self._catalog.busy() else None
            ids, dropped, options = job.prompt or _prompt(engine, job)
            used = options.pop("references_used", 0)
            loaded.batch.add(
                Request(
                    ids,
                    dropped,
                    job.params,
                    job.cancel,
                    lambda text: job.emit(Delta(text)),
                    lambda result: job.emit(Done(result, name, used)),
                    lambda message: job.emit(Error(message, "internal")),
                    **options,
                )
            )
        except Exception as exc:  # a bug must not take the worker (and every later request) down
            job.emit(_error_event(exc))

    def _step(self) -> None:
        for loaded in list(self._loaded.values()):
            if loaded.idle:
                continue
            try:
                loaded.batch.step()
            except Exception as exc:  # as in _start: every request in flight is told, the worker stays
                traceback.print_exc()
                loaded.batch.fail(f"internal error: {type(exc).__name__}: {exc}")

    def _use(self, info: ModelInfo) -> _Loaded:
        """`info` loaded (now, if need be: the model used least recently with nothing in flight
        makes room), as the most recently used."""
        key = _key(info)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        # The new model loads before an old one is let go: a broken one leaves the others.
        engine = Engine.load(info.path, device=self._device, quantize=self._quantize)
        engine.name = info.name
        while len(self._loaded) >= self._max_loaded:
            self._loaded.pop(next(k for k, m in self._loaded.items() if m.idle))
        self._loaded[key] = _Loaded(info, engine, Batch(engine, self._max_batch, self._kv_budget))
        if not any(_same_model(m, info) for m in self._served):
            self._served.append(info)
        return self._loaded[key]

    def _switch(self, info: ModelInfo) -> ModelInfo:
        self._use(info)
        self._default = info
        if self._follows_catalog:
            self._catalog.activate(info)
        return self.active_model


def _prompt(engine: Engine, job: _Job) -> tuple[list[int], int, dict]:
    """The job's prompt ids, how many of its tokens were dropped, and the Request's other
    keyword arguments."""
    options = dict(job.options)
    truncate = options.pop("truncate", True)
    if job.kind == "chat":
        references, taught = options.pop("references") or [], options.pop("taught", 0)
        messages, options["references_used"] = engine.ground(job.payload, references, job.params, taught=taught)
        ids, dropped = engine.chat_ids(messages, job.params, truncate=truncate)
        options["copy"] = engine.copy_bias(messages)
        return ids, dropped, options
    if not isinstance(job.payload, (str, list)):
        raise KettleError("prompt must be a string or a list of token ids")
    prompt = engine.prompt_ids(job.payload)
    # An echoed prompt is scored whole, however long (Engine.score_prompt); what the answer
    # continues from is its end that fits.
    options["echo"] = prompt if options.pop("echo", False) else None
    ids, dropped = engine.completion_ids(prompt, job.params, truncate=truncate or options["echo"] is not None)
    return ids, dropped, options


def _error_event(exc: Exception) -> Error:
    if isinstance(exc, KettleError):
        return Error(str(exc), getattr(exc, "code", "invalid_request"))
    traceback.print_exc()
    return Error(f"internal error: {type(exc).__name__}: {exc}", "internal")


def _run_call(call: _Call) -> None:
    if call.future.set_running_or_notify_cancel():
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # handed to the caller, never kills the worker
            call.future.set_exception(exc)


def _checked(params: SamplingParams | dict) -> SamplingParams:
    """A validated copy: the caller may change its own object while the request waits."""
    return SamplingParams.from_dict(params if isinstance(params, dict) else params.to_dict())


def _with_active(info: ModelInfo, active: bool) -> ModelInfo:
    return replace(info, active=active)


# --- remote ------------------------------------------------------------------------------------------

_STREAM_TIMEOUT_S = 600.0  # the server may queue a request behind others for a while


class RemoteService(GenerationService):
    """An HTTP client of `kettle serve` (or any server with Kettle's extensions of OpenAI's API).

    Streams with server-sent events; cancelling closes the stream, which makes the server stop
    generating. The Done of a cancelled request holds the text received so far, but no token
    counts (the server never got to send them). One httpx client per request keeps the service
    usable from any event loop.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 10.0):
        base = base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.api_key = api_key
        self.timeout = timeout
        self._active: ModelInfo | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Task]] = {}
        self._lock = threading.Lock()

    def stream_chat(self, messages, params, *, model=None, request_id=None, truncate=True, references=None, taught=0):
        body = {"messages": messages, "truncate": truncate} | ({"model": model} if model else {})
        if references is not None:  # the passages to ground in, chosen here (Kettle's extension)
            body |= {"references": references, "taught": taught}
        return self._stream("/v1/chat/completions", body, params=params, request_id=request_id)

    def complete(self, prompt, params, *, model=None, request_id=None, truncate=True):
        body = {"prompt": prompt, "truncate": truncate} | ({"model": model} if model else {})
        return self._stream("/v1/completions", body, params=params, request_id=request_id)

    def cancel(self, request_id: str | None = None) -> None:
        with self._lock:
            streams = [s for rid, s in self._streams.items() if request_id in (None, rid)]
        for loop, task in streams:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # that loop has closed; so has its stream
                pass

    async def list_models(self) -> list[ModelInfo]:
        data = await self._request("GET", "/v1/models")
        models = [_remote_model(m) for m in data.get("data", [])]
        self._active = next((m for m in models if m.active), self._active)
        return models

    async def switch_model(self, name: str) -> ModelInfo:
        self._active = _remote_model(await self._request("POST", "/v1/models/switch", body={"model": name}))
        return self._active

    @property
    def active_model(self) -> ModelInfo | None:
        return self._active

    def load(self) -> ModelInfo:
        asyncio.run(self.list_models())  # off the caller's loop: this blocks, by contract
        if self._active is None:
            raise KettleError(f"the server at {self.base_url} says it serves no model")
        return self._active

    # -- HTTP -------------------------------------------------------------------------------------

    def _client(self, timeout):
        import httpx

        return httpx.AsyncClient(base_url=self.base_url, headers=self._headers(), timeout=timeout)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def _request(self, method: str, path: str, *, body: dict | None = None) -> dict:
        import httpx

        try:
            async with self._client(self.timeout) as client:
                response = await client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise KettleError(f"cannot reach the Kettle server at {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise KettleError(_error_message(response.status_code, response.content))
        return response.json()

    async def _stream(self, path, body, *, params, request_id) -> AsyncIterator[Event]:
        try:
            params = _checked(params)
        except KettleError as exc:
            yield Error(str(exc))
            return
        body = {**body, **params_to_openai(params), "stream": True, "stream_options": {"include_usage": True}}
        inbox: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._read_stream(path, body, inbox=inbox))
        task.add_done_callback(lambda t: _stream_ended(t, inbox))
        request_id = request_id or uuid.uuid4().hex
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), task)
        text: list[str] = []
        try:
            while True:
                event = await inbox.get()
                if event is None:  # the stream was closed by cancel()
                    yield Done(
                        GenerationResult(
                            text="".join(text),
                            finish_reason="cancelled",
                            prompt_tokens=0,
                            new_tokens=0,
                            seed=params.seed or 0,
                        ),
                        self._active.name if self._active else "",
                    )
                    return
                if isinstance(event, Delta):
                    text.append(event.text)
                elif isinstance(event, Done) and (self._active is None or self._active.name != event.model):
                    self._active = ModelInfo(name=event.model, active=True)
                yield event
                if not isinstance(event, Delta):
                    return
        finally:
            task.cancel()  # closes the HTTP stream: the server cancels the generation
            with self._lock:
                if self._streams.get(request_id, (None, task))[1] is task:
                    self._streams.pop(request_id, None)

    async def _read_stream(self, path: str, body: dict, *, inbox: asyncio.Queue) -> None:
        import httpx

        try:
            async with self._client(httpx.Timeout(self.timeout, read=_STREAM_TIMEOUT_S)) as client:
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        inbox.put_nowait(Error(_error_message(response.status_code, await response.aread())))
                        return
                    inbox.put_nowait(await _parse_events(response, inbox, path=path))
        except httpx.HTTPError as exc:
            inbox.put_nowait(Error(f"lost the Kettle server at {self.base_url}: {exc}", "internal"))
        except ValueError as exc:
            inbox.put_nowait(Error(f"the server at {self.base_url} sent a malformed event: {exc}", "internal"))


def _stream_ended(task: asyncio.Task, inbox: asyncio.Queue) -> None:
    """A cancelled stream (None: the caller reports "cancelled"), or one that failed oddly."""
    if task.cancelled():
        inbox.put_nowait(None)
    elif task.exception() is not None:
        inbox.put_nowait(Error(f"internal error: {task.exception()!r}", "internal"))


async def _parse_events(response, inbox: asyncio.Queue, *, path: str) -> Event:
    """Put each text delta of an SSE stream into inbox; returns the closing Done or Error."""
    text: list[str] = []
    model, finish, extra, usage = "", None, {}, {}
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"]
            return Error(
                error.get("message", str(error)),
                "internal" if error.get("type") == "server_error" else error.get("code") or "invalid_request",
            )
        model = chunk.get("model", model)
        usage = chunk.get("usage") or usage
        extra = chunk.get("kettle") or extra
        for choice in chunk.get("choices", []):
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if piece:
                text.append(piece)
                inbox.put_nowait(Delta(piece))
            finish = choice.get("finish_reason") or finish
    if finish is None:
        return Error(f"the server ended the stream of {path} without finishing the answer", "internal")
    return Done(
        GenerationResult(
            text="".join(text),
            finish_reason=finish,
            prompt_tokens=usage.get("prompt_tokens", 0),
            new_tokens=usage.get("completion_tokens", 0),
            **{
                k: extra[k] for k in ("dropped_tokens", "cached_tokens", "ttft_s", "tokens_per_s", "seed") if k in extra
            },
        ),
        model,
    )


def _error_message(status: int, body: bytes) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


def _remote_model(data: dict) -> ModelInfo:
    return ModelInfo(
        name=data["id"],
        source=data.get("source", "directory"),
        kind=data.get("kind", ""),
        status=data.get("status", ""),
        created=float(data.get("created", 0)),
        active=bool(data.get("active")),
    )


def params_to_openai(params: SamplingParams) -> dict:
    """SamplingParams as the server's request fields (each of gpt.sampling.PARAMS under its
    OpenAI name), the inverse of the server's parsing. No seed and no stop strings are left
    out: a field left out means just that to the server."""
    body = {}
    for p in PARAMS:
        value = getattr(params, p.name)
        if value is not None and value != []:
            body[p.openai] = value
    return body
