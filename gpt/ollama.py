"""Ollama's API beside the OpenAI one (a router for gpt.server's create_app), so Ollama clients
(the `ollama` Python client, oterm's native Ollama connection) use `kettle serve` unchanged
(`kettle serve --ollama` listens on Ollama's port, 11434).

Endpoints (Ollama's shapes; with an API key every /api path needs `Authorization: Bearer KEY`,
which the ollama client sends from $OLLAMA_API_KEY):
    GET  /api/version     {"version": ...}
    GET  /api/tags        the models GET /v1/models lists, by the same names
    GET  /api/ps          the model in memory (the served one)
    POST /api/show        one model's details: its family, size, context length, chat template
                          (Ollama's Go template of Kettle's chat format) and stop tokens
    POST /api/chat        answer messages; NDJSON stream of {"message": {"content": delta}} lines
                          by default, then a line with "done": true and the counts and durations;
                          "stream": false for one object. Grounded as the OpenAI API's chat is
                          (gpt.server.Grounding: "ground", "references"; the passages used in
                          the last object's "sources")
    POST /api/generate    the same for a prompt (with `system`, as a one-turn chat; `raw`: the
                          text continued as it is); an empty prompt only loads the model

A request naming a model the server lists is answered by that one, loaded if need be (as Ollama
loads the model a request names; gpt.service keeps the ones used last, /api/ps lists them); the
server's own model, for requests naming none, stays as it is. "NAME:latest" is NAME. `options`
map onto Kettle's sampling (OPTIONS); options about memory and threads (IGNORED_OPTIONS) and
`keep_alive` change nothing here; a sampler Kettle does not have (mirostat, typical_p, tfs_z), tools,
images, thinking, a JSON format, a custom template or a suffix are a 400, never silently
dropped. A prompt too long for the context loses its oldest part, as Ollama truncates.
Errors are Ollama's shape, {"error": "message"}; mid-stream, an {"error": ...} line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, model_validator

from gpt.errors import KettleError
from gpt.sampling import SamplingParams
from gpt.server import (
    MAX_MESSAGES,
    APIError,
    Grounding,
    _event_error,
    _Run,
    grounded_options,
    grounding,
    parse_body,
    used_sources,
)
from gpt.service import Delta, Done, Error, GenerationService, ModelInfo

log = logging.getLogger("kettle.server")
# The Ollama version Kettle's API follows (clients check it for the features they may use).
VERSION = "0.12.0"
# Ollama's option -> Kettle's SamplingParams field.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "num_predict": "max_new_tokens",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# How Ollama runs a model (memory, threads, batching): nothing here changes an answer.
IGNORED_OPTIONS = (
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "num_keep",
    "use_mmap",
    "use_mlock",
    "numa",
    "low_vram",
    "f16_kv",
    "vocab_only",
    "penalize_newline",  # Ollama itself ignores it now
)
# Samplers Kettle does not have, each with the value at which it does nothing.
INERT_OPTIONS = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
KNOWN_OPTIONS = {*OPTIONS, *IGNORED_OPTIONS, *INERT_OPTIONS, "repeat_last_n"}
# num_predict -1 (until the context is full) and -2 (fill the context) are one case here.
UNTIL_FULL = (-1, -2)
NDJSON = "application/x-ndjson"


class _Body(BaseModel):
    # A misspelt field is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class OllamaMessage(_Body):
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None
    tool_name: str | None = None
    thinking: str | None = None  # an earlier answer's reasoning: Kettle's models have none to add


class _Generation(_Body):
    model: str = ""
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | float | None = None  # accepted: Kettle keeps its one model loaded
    think: bool | str | None = None
    truncate: bool | None = None  # Ollama's default (true) is the only behaviour here
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ChatBody(_Generation, Grounding):
    messages: list[OllamaMessage] = []
    tools: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _newest_messages(cls, data: Any) -> Any:
        """Ollama answers a chat longer than the context from its newest messages, so those
        past the newest MAX_MESSAGES (more than any context holds) are dropped, a system prompt
        kept, before they are validated: validating 200,000 held the event loop for 0.8 s."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or len(messages) <= MAX_MESSAGES:
            return data
        system = messages[:1] if isinstance(messages[0], dict) and messages[0].get("role") == "system" else []
        return {**data, "messages": system + messages[len(messages) - MAX_MESSAGES + len(system) :]}


class GenerateBody(_Generation):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    suffix: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ShowBody(_Body):
    model: str = ""
    name: str = ""  # older clients' name for it
    verbose: bool = False


def router(service: GenerationService) -> APIRouter:
    """Ollama's endpoints over `service` (see the module docstring), for gpt.server's
    create_app(routers=...)."""
    api = APIRouter()

    @api.api_route("/", methods=["GET", "HEAD"])
    async def root():
        # what clients probe for (the `ollama` CLI's heartbeat with HEAD), as Ollama answers it
        return PlainTextResponse("Ollama is running")

    @api.get("/api/version")
    async def version():
        return {"version": VERSION}

    @api.get("/api/tags")
    async def tags():
        return {"models": [e for m in await service.list_models() if (e := _listed_entry(m))]}

    @api.get("/api/ps")
    async def ps():
        return {
            "models": [
                {
                    **_model_entry(m),
                    "expires_at": "2318-11-17T20:00:00Z",  # never: Kettle keeps a model until another needs room
                    "size_vram": 0,
                    "context_length": _facts(m.path)["context_length"],
                }
                for m in service.loaded_models()
                if m.path
            ]
        }

    @api.post("/api/show")
    @_ollama_errors
    async def show(request: Request):
        body = await parse_body(request, ShowBody)
        info = await _listed(service, body.model or body.name)
        return _show(info)

    @api.post("/api/chat")
    @_ollama_errors
    async def chat(request: Request):
        body = await parse_body(request, ChatBody)
        _refuse_unsupported(body)
        if body.tools:
            raise APIError(400, f'"{body.model}" does not support tools')
        messages = [_message(i, m) for i, m in enumerate(body.messages)]
        loaded = time.perf_counter()
        name = await _use(service, body.model)
        load_s = time.perf_counter() - loaded
        if not messages:  # Ollama: an empty chat loads the model
            return _loaded(name, "message", body.stream)
        params = await _params(service, body.options, name)
        sources = await grounding(request, body, messages)
        request_id = uuid.uuid4().hex
        events = service.stream_chat(
            messages,
            params,
            model=name,
            request_id=request_id,
            truncate=True,
            **grounded_options(sources),
        )
        return await _answer(
            request, service, (request_id, events), name, "message", body.stream, load_s, sources=sources
        )

    @api.post("/api/generate")
    @_ollama_errors
    async def generate(request: Request):
        body = await parse_body(request, GenerateBody)
        _refuse_unsupported(body)
        for field, what in (
            ("images", "images"),
            ("template", "a custom template (Kettle's models have one chat format)"),
            ("suffix", "a suffix (fill-in-the-middle)"),
            ("context", "context from an earlier answer (send the conversation to /api/chat)"),
        ):
            if getattr(body, field):
                raise APIError(400, f"{field}: {what} is not supported by Kettle")
        loaded = time.perf_counter()
        name = await _use(service, body.model)
        load_s = time.perf_counter() - loaded
        if not body.prompt:  # Ollama: an empty prompt loads the model
            return _loaded(name, "response", body.stream)
        params = await _params(service, body.options, name)
        request_id = uuid.uuid4().hex
        if body.raw:
            events = service.complete(body.prompt, params, model=name, request_id=request_id, truncate=True)
        else:
            system = [{"role": "system", "content": body.system}] if body.system else []
            turn = system + [{"role": "user", "content": body.prompt}]
            events = service.stream_chat(turn, params, model=name, request_id=request_id, truncate=True)
        return await _answer(request, service, (request_id, events), name, "response", body.stream, load_s)

    return api


def _ollama_errors(handler):
    """The endpoint `handler` with an APIError raised inside answered in Ollama's shape,
    {"error": message} (the OpenAI API's own handler would give OpenAI's)."""

    @functools.wraps(handler)
    async def answer(request: Request):
        try:
            return await handler(request)
        except APIError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    return answer


# --- requests ------------------------------------------------------------------------------------


def _refuse_unsupported(body: _Generation) -> None:
    if body.think:
        raise APIError(400, f'"{body.model}" does not support thinking')
    if body.format:
        raise APIError(400, "format: a JSON format is not supported by Kettle")
    if body.logprobs:
        raise APIError(400, "logprobs: not supported on Kettle's Ollama API (the OpenAI API at /v1 has them)")


def _message(i: int, m: OllamaMessage) -> dict:
    if m.role not in ("system", "user", "assistant"):
        raise APIError(
            400, f"messages[{i}].role: must be system, user or assistant (Kettle has no tools), got {m.role!r}"
        )
    if m.images:
        raise APIError(400, f"messages[{i}].images: images are not supported by Kettle")
    if m.tool_calls:
        raise APIError(400, f"messages[{i}].tool_calls: tool calling is not supported by Kettle")
    return {"role": m.role, "content": m.content}


async def _params(service: GenerationService, options: dict | None, model: str) -> SamplingParams:
    """Ollama's options as Kettle's SamplingParams; a bad one is a 400 naming it."""
    fields = {}
    for key, value in (options or {}).items():
        if key in IGNORED_OPTIONS or (value is None and key in KNOWN_OPTIONS):
            continue  # a null option is one not given, as Ollama reads it
        if key in INERT_OPTIONS:
            if value != INERT_OPTIONS[key]:
                raise APIError(
                    400, f"options.{key}: Kettle has no such sampler (only {INERT_OPTIONS[key]} is accepted)"
                )
            continue
        if key == "repeat_last_n":  # Kettle's repetition penalty reads the whole context (-1)
            if value != -1 and (options.get("repeat_penalty") or 1) != 1:
                raise APIError(400, "options.repeat_last_n: Kettle's repeat_penalty covers the whole context (-1 only)")
            continue
        if key == "seed" and value == -1:  # Ollama's "a random seed", Kettle's None
            continue
        if key not in OPTIONS:
            raise APIError(400, f"options.{key}: unknown option")
        fields[OPTIONS[key]] = value
    if fields.get("max_new_tokens", -1) in UNTIL_FULL:
        _, engine = await service.tokenizer(model)
        fields["max_new_tokens"] = engine.context_length
    try:
        return SamplingParams.from_dict(fields)
    except (KettleError, TypeError) as exc:
        message = str(exc)
        for ollama_name, ours in OPTIONS.items():
            message = message.replace(ours, ollama_name) if ours != ollama_name else message
        raise APIError(400, f"options: {message}") from None


async def _listed(service: GenerationService, requested: str) -> ModelInfo:
    """The listed model `requested` names (NAME:latest is NAME; nothing: the served one)."""
    name = requested.removesuffix(":latest")
    if not name:
        return service.active_model
    for m in await service.list_models():
        if m.name == name:
            return m
    raise APIError(404, f'model "{requested}" not found (GET /api/tags lists the models)')


async def _use(service: GenerationService, requested: str) -> str:
    """The name of the model to answer with, `requested`, loaded (as Ollama loads the model a
    request names; the server's own model, for requests naming none, stays as it is)."""
    info = await _listed(service, requested)
    try:
        await service.tokenizer(info.name)
    except KettleError as exc:
        raise APIError(500, f"cannot load {info.name!r}: {exc}") from None
    return info.name


# --- responses -----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _piece(name: str, key: str, text: str) -> dict:
    content = {"role": "assistant", "content": text} if key == "message" else text
    return {"model": name, "created_at": _now(), key: content, "done": False}


def _loaded(name: str, key: str, stream: bool):
    last = {**_piece(name, key, ""), "done": True, "done_reason": "load"}
    return StreamingResponse(iter([_line(last)]), media_type=NDJSON) if stream else last


def _final(name: str, key: str, text: str, done: Done, *, started: float, load_s: float, sources: list[dict]) -> dict:
    """The answer's last object: Ollama's counts and durations, and for a chat the passages
    it was grounded in (Kettle's "sources", as in the OpenAI API; Ollama's clients ignore it)."""
    r = done.result
    total = time.perf_counter() - started + load_s
    decode_s = (r.new_tokens - 1) / r.tokens_per_s if r.tokens_per_s else 0.0
    return {
        **_piece(name, key, text),
        "done": True,
        "done_reason": "length" if r.finish_reason == "length" else "stop",
        "total_duration": int(total * 1e9),
        "load_duration": int(load_s * 1e9),
        "prompt_eval_count": r.prompt_tokens,
        "prompt_eval_duration": int(r.ttft_s * 1e9),
        "eval_count": r.new_tokens,
        "eval_duration": int(decode_s * 1e9),
        **({"sources": used_sources(sources, done)} if key == "message" else {}),
    }


async def _answer(
    request: Request, service, job: tuple, name: str, key: str, stream: bool, load_s: float, sources: list[dict] = ()
):
    """Ollama's answer from a request's (id, events): NDJSON lines while they come, or one
    object; `sources`: the passages offered to a chat answer (gpt.server.grounding). A client
    that goes away cancels the generation (gpt.server's _Run)."""
    started = time.perf_counter()
    request_id, events = job
    run = _Run(service, request, "chat" if key == "message" else "complete", request_id, events)
    head = await run.next()
    if isinstance(head, Error):  # nothing sent yet: a plain error status
        run.stop()
        raise _event_error(head, "chat")

    async def lines():
        event = head
        try:
            while isinstance(event, Delta):
                yield _line(_piece(name, key, event.text))
                event = await run.next()
            if isinstance(event, Error):
                yield _line({"error": _event_error(event, "chat").message})
            else:
                yield _line(_final(name, key, "", event, started=started, load_s=load_s, sources=sources))
        finally:
            run.stop()

    if stream:
        return StreamingResponse(lines(), media_type=NDJSON)
    text, event = [], head
    try:
        while isinstance(event, Delta):
            text.append(event.text)
            event = await run.next()
    finally:
        run.stop()
    if isinstance(event, Error):
        raise _event_error(event, "chat")
    return _final(name, key, "".join(text), event, started=started, load_s=load_s, sources=sources)


# --- what Ollama says about a model --------------------------------------------------------------


def _facts(path: str) -> dict:
    """What a model directory says about itself without loading the weights: the config, the
    safetensors header's parameter count and dtype, the files' size and a digest that changes
    when they do (Ollama's is a content hash; reading gigabytes for a listing is not worth it)."""
    from gpt.checkpoint import read_meta

    folder = Path(path)
    _, config = read_meta(folder)
    weights = folder / "model.safetensors"
    count, dtype = 0, "F32"
    with weights.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    for name, tensor in header.items():
        if name != "__metadata__":
            count += int(_product(tensor["shape"]))
            dtype = tensor["dtype"]
    files = [p for p in folder.iterdir() if p.is_file()]
    stamp = "".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns};" for p in sorted(files))
    return {
        "config": config,
        "context_length": config.context_length,
        "parameters": count,
        "dtype": dtype,
        "size": sum(p.stat().st_size for p in files),
        "digest": hashlib.sha256(stamp.encode()).hexdigest(),
        "modified": max(p.stat().st_mtime for p in files),
    }


def _product(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _size_text(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _details(facts: dict) -> dict:
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": "gpt2",
        "families": ["gpt2"],
        "parameter_size": _size_text(facts["parameters"]),
        "quantization_level": facts["dtype"],
    }


def _model_entry(m: ModelInfo) -> dict:
    facts = _facts(m.path)
    return {
        "name": m.name,
        "model": m.name,
        "modified_at": datetime.fromtimestamp(facts["modified"], timezone.utc).isoformat().replace("+00:00", "Z"),
        "size": facts["size"],
        "digest": facts["digest"],
        "details": _details(facts),
    }


def _listed_entry(m: ModelInfo) -> dict | None:
    """A model's /api/tags entry, or None (logged) for one whose files cannot be read: it could
    not be served either."""
    try:
        return _model_entry(m)
    except (KettleError, OSError, ValueError) as exc:
        log.warning("/api/tags leaves out %s: %s", m.name, exc)
        return None


def _show(m: ModelInfo) -> dict:
    from gpt.chat_template import stop_token_ids
    from gpt.tokenizer import load_tokenizer

    facts = _facts(m.path)
    config = facts["config"]
    tokenizer = load_tokenizer(m.path)
    stops = [tokenizer.decode([t]) for t in sorted(stop_token_ids(tokenizer))]
    parameters = "\n".join([f"num_ctx {config.context_length}"] + [f"stop {json.dumps(s)}" for s in stops])
    template = go_template(tokenizer)
    return {
        "modelfile": f"FROM {m.path}\nTEMPLATE {json.dumps(template)}\n"
        + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()),
        "parameters": parameters,
        "template": template,
        "details": _details(facts),
        "model_info": {
            "general.architecture": "gpt2",
            "general.parameter_count": facts["parameters"],
            "gpt2.context_length": config.context_length,
            "gpt2.embedding_length": config.n_embd,
            "gpt2.block_count": config.n_layer,
            "gpt2.attention.head_count": config.n_head,
            "gpt2.vocab_size": config.vocab_size,
        },
        "capabilities": ["completion"],
        "modified_at": _model_entry(m)["modified_at"],
    }


def go_template(tokenizer) -> str:
    """Kettle's chat format (gpt.chat_template) as an Ollama (Go) template: each message as
    header + content + end of turn, then the assistant's header."""
    from gpt.chat_template import END_OF_TURN, SPECIAL_HEADERS, TEXT_HEADERS, uses_special_tokens
    from gpt.tokenizer import END_OF_TEXT

    headers, end = (SPECIAL_HEADERS, END_OF_TURN) if uses_special_tokens(tokenizer) else (TEXT_HEADERS, END_OF_TEXT)
    by_role = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{header}'
        for i, (role, header) in enumerate(headers.items())
    )
    return f"{{{{- range .Messages }}}}{by_role}{{{{ end }}}}{{{{ .Content }}}}{end}{{{{ end }}}}{headers['assistant']}"
