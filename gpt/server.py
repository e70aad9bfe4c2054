"""`kettle serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over a GenerationService, and
beside it the routers it is given (`kettle serve` gives Ollama's, gpt/ollama.py, under /api).

Endpoints (all under /v1; with an API key every /v1 and /api path, known or not, needs
`Authorization: Bearer KEY`, so a client without it learns nothing, not even which paths exist):
    GET  /v1/models                 every model the server serves, with its max_model_len; the
                                    one answering requests that name none first, with "active":
                                    true. Each is served when a request names it (loaded on first
                                    use; gpt.service keeps the ones used last loaded)
    GET  /v1/models/{id}            one of them
    POST /v1/models/switch          {"model": NAME} answers requests that name no model with
                                    another from now on, without a restart (requests already
                                    queued finish on the old one); NAME must be one GET /v1/models
                                    lists, never a path. A model that fails to load leaves the old
                                    one served.
    POST /v1/chat/completions       OpenAI's chat API, "stream": true for server-sent events
    POST /v1/completions            OpenAI's legacy completions API (raw text continuation)
    GET  /health                    {"status": "ok"}, no key needed (for readiness checks)

Parameters: OpenAI's names and ranges (model, messages / prompt, stream,
stream_options.include_usage, max_tokens or max_completion_tokens, temperature 0-2, top_p, seed,
stop (a string or a list), presence_penalty, frequency_penalty, n 1-128, logprobs (chat: true
and top_logprobs 0-20; completions: 0-5), echo (with max_tokens 0: the prompt scored alone; one
longer than the context is scored whole, see Engine.score_prompt) plus top_k, min_p,
repetition_penalty and `truncate` (true: a prompt too long for the context loses its oldest part
instead of a 400 with code context_length_exceeded). A completions prompt is a text, token ids,
or a list of either: one choice per prompt and per n, in OpenAI's index order. A field left out
keeps Kettle's default (gpt.sampling.SamplingParams). "model" may be left out (the active one);
if given it must be one GET /v1/models lists. A chat holds at most MAX_MESSAGES messages and a
completion request at most MAX_CHOICES choices (prompts × n), a body at most MAX_BODY_BYTES; a
connection has REQUEST_TIMEOUT_S to send a whole request. IGNORED_FIELDS are accepted and
change nothing. Features Kettle does not have (tools, logit_bias, JSON mode, best_of > 1,
suffix) get a 400, not a silent no, and so does any field OpenAI does not define. GET
/tokenizer_info, POST /tokenize and /detokenize are vLLM's, for evaluation harnesses.

Every error is OpenAI's shape: {"error": {"message", "type", "param", "code"}}, 400 for a bad
request (malformed or too deeply nested JSON, wrong type, out-of-range value), 401 for a missing
or wrong key, 403 for a refused Origin or Host, 404 for an unknown model or path, 415 for a POST
body that is not sent as application/json. A failing request never stops the server.

Web pages: any page the user visits can send requests to 127.0.0.1, and without a key nothing
else would stop it. So a POST body must be declared application/json (which a page cannot send
cross-origin without a CORS preflight), a request with an Origin header must come from this
server's own address or one allowed with `allow_origins` (--allow-origin), and the Host header
must name this server (localhost, 127.0.0.1, [::1] or the address the client connected to, with
the server's port) or one of `allow_hosts` (--allow-host): a page on a domain that resolves to
127.0.0.1 (DNS rebinding) sends its own name there. Programs (OpenAI clients, curl) send no
Origin and Host: 127.0.0.1:PORT, so they are unaffected. Allowed origins get CORS headers, and
their preflight requests are answered without a key (browsers send none with them).

The access log never holds a key sent in the query string (?api_key=...; keys are only read
from the Authorization header).

Responses carry a "kettle" object with what OpenAI has no field for: the seed used (send it back
to reproduce an answer), time to first token, tokens/s, and prompt tokens dropped or reused from
the cache. Streams send it with the chunk that has the finish_reason.

A client that disconnects cancels its generation, streaming or not, also while it is queued.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import time
import uuid
from typing import Any, AsyncIterator, Callable, ClassVar, Iterable
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from gpt.batching import MAX_BATCH
from gpt.errors import KettleError
from gpt.sampling import MAX_SEED, PARAMS, SamplingParams
from gpt.service import Delta, Done, Error, GenerationService, ModelInfo

log = logging.getLogger("kettle.server")

MAX_BODY_BYTES = 8 << 20
# More messages than any context window holds (each takes at least two tokens, its header and
# its end-of-turn): a longer list is refused before it is read, not rendered for nothing.
MAX_MESSAGES = 4096
# A connection must deliver a whole request (its head and body) this long after it opens or its
# previous response ends, or it is closed: uvicorn has no such limit, and a client sending its
# headers a byte at a time (slowloris) would hold its connection forever.
REQUEST_TIMEOUT_S = 15.0
# OpenAI's name for each SamplingParams field, where it differs.
OPENAI_NAMES = {p.name: p.openai for p in PARAMS if p.openai != p.name}


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, *, param=None, code=None, type=None) -> JSONResponse:
    return _error_json(APIError(status, message, param=param, code=code, type=type))


def _error_json(err: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse({"error": _error_body(err)}, status_code=err.status, headers=headers)


def _error_body(err: APIError) -> dict:
    return {"message": err.message, "type": err.type, "param": err.param, "code": err.code}


# --- request bodies ------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "0.5" is not a number and true is not 1; forbid: a misspelt field is an error,
    # not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", strict=True)
    # The most items a list field may hold, checked before validating (which takes the event
    # loop for as long as it runs).
    max_items: ClassVar[dict[str, int]] = {}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


# Every sampling parameter (gpt.sampling.PARAMS) under its OpenAI name; one left out (None)
# keeps Kettle's default. A list also comes as a single string, as OpenAI's stop does.
_SamplingFields = create_model(
    "_SamplingFields",
    __base__=_Strict,
    **{p.openai: ((p.kind | list[p.kind] if p.many else p.kind) | None, None) for p in PARAMS},
)


class _GenerationRequest(_SamplingFields):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    # Kettle's extension: a prompt too long for the context loses its oldest part (as in the app)
    # instead of a 400 context_length_exceeded.
    truncate: bool = False
    # Accepted and ignored (clients send them; they change nothing here): see IGNORED_FIELDS.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None


class Grounding(BaseModel):
    """Kettle's grounding extension of a chat request, the same in OpenAI's API and Ollama's:
    the answer is grounded in the passages the server's retriever finds for the newest question
    (create_app's `retrieve`; on unless "ground" is false), or in the client's own "references"
    instead (best first; the first "taught" of them answers the user taught, which an answer copies
    whole). The response names the passages the answer saw in "sources" (used_sources), a field both
    APIs' clients ignore."""

    ground: bool = True
    references: list[str] | None = None
    taught: int = Field(default=0, ge=0)


async def grounding(request: Request, body: Grounding, messages: list[dict]) -> list[dict]:
    """The passages to ground the answer to `messages` in, best first, each {"kind", "source",
    "name", "text", "reference", "taught"} as the retriever gives them (see Grounding)."""
    if body.references is not None:
        return [
            {"kind": "given", "text": text, "reference": text, "taught": i < body.taught}
            for i, text in enumerate(body.references)
        ]
    retrieve = request.app.state.retrieve
    if body.ground and retrieve is not None:
        return await asyncio.to_thread(retrieve, messages)
    return []


def used_sources(sources: list[dict], done: Done) -> list[dict]:
    """A response's "sources": the passages the answer saw (the best that fitted, as Done
    says), without the form they took in the prompt."""
    return [{k: v for k, v in s.items() if k not in ("reference", "taught")} for s in sources[: done.references_used]]


def grounded_options(sources: list[dict]) -> dict:
    """A service request's grounding options: the passages as the model reads them, and how many
    of them, the first ones, the user taught."""
    taught = next((i for i, s in enumerate(sources) if not s.get("taught")), len(sources))
    return {"references": [s["reference"] for s in sources], "taught": taught}


class ChatRequest(_GenerationRequest, Grounding):
    max_items: ClassVar[dict[str, int]] = {"messages": MAX_MESSAGES}
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # ignored: without tools it means nothing
    chat_template_kwargs: dict[str, Any] | None = None  # ignored: Kettle has one chat format


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class SwitchRequest(_Strict):
    model: str


class TokenizeRequest(_Strict):
    prompt: str
    add_special_tokens: bool = False  # Kettle's models have no beginning-of-text token
    model: str | None = None


class DetokenizeRequest(_Strict):
    tokens: list[int]
    model: str | None = None


# What clients send that changes nothing for Kettle: accepted, never acted on (the README's list).
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "chat_template_kwargs")
# OpenAI's ranges where they are narrower than Kettle's own (SamplingParams checks the rest).
OPENAI_RANGES = {"temperature": (0, 2), "n": (1, 128), "top_logprobs": (0, 20)}
# The most choices (prompts × n) one request may ask for: OpenAI's largest n. Each is a row the
# batch decodes (gpt.batching), and the rows past the batch's room queue before every later
# request: 500 prompts × n=128 would hold the server for everyone for an hour.
MAX_CHOICES = OPENAI_RANGES["n"][1]
COMPLETION_LOGPROBS = (0, 5)


def sampling_params(req: _GenerationRequest, max_tokens: int | None) -> SamplingParams:
    """The request's SamplingParams, validated; a bad value is a 400 naming OpenAI's field.
    `max_tokens` is the request's max_tokens, or for a chat its max_completion_tokens."""
    fields = {p.name: getattr(req, p.openai) for p in PARAMS} | {"max_new_tokens": max_tokens}
    for name in ("temperature", "n", "top_logprobs"):
        low, high = OPENAI_RANGES[name]
        _in_range(name, getattr(req, name, None), low=low, high=high)
    try:
        return SamplingParams.from_dict({k: v for k, v in fields.items() if v is not None})
    except KettleError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        for ours, theirs in OPENAI_NAMES.items():
            message = message.replace(ours, theirs)
        raise APIError(400, message, param=OPENAI_NAMES.get(field, field)) from None


def _in_range(name: str, value, *, low, high) -> None:
    if value is not None and not low <= value <= high:
        raise APIError(400, f"{name} must be in [{low}, {high}], got {value}", param=name)


def _reject_unsupported(req: _GenerationRequest) -> None:
    def no(param: str, what: str):
        raise APIError(400, f"{param}: {what} is not supported by Kettle", param=param)

    if req.logit_bias:
        no("logit_bias", "biasing tokens")
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(req, name):
                no(name, "tool and function calling")
        if req.response_format and req.response_format.get("type", "text") != "text":
            no("response_format", "a response format other than text")
    else:
        low, high = COMPLETION_LOGPROBS
        _in_range("logprobs", req.logprobs, low=low, high=high)
        if req.best_of not in (None, 1):
            no("best_of", "best_of other than 1")
        if req.suffix:
            no("suffix", "a suffix (fill-in-the-middle)")


def chat_messages(req: ChatRequest) -> list[dict]:
    """OpenAI messages -> the one chat format. "developer" (OpenAI's newer name) is a system
    message; content given as a list of text parts is joined."""
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise APIError(
                400,
                f"messages[{i}].role: must be system, user or assistant (Kettle has no tools), got {m.role!r}",
                param=f"messages[{i}].role",
            )
        content = m.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}]: only text parts are supported, got type {part.get('type')!r}",
                        param=f"messages[{i}].content",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if role == "system" and out:
            raise APIError(400, f"messages[{i}]: a system message may only come first", param=f"messages[{i}].role")
        out.append({"role": role, "content": content})
    if not out:
        raise APIError(400, "messages must hold at least one message", param="messages")
    return out


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: a text, a list of token ids, or a list of either (one choice each,
    in order)."""
    prompt = req.prompt
    if not prompt:
        raise APIError(400, "prompt: must hold at least one prompt or token id", param="prompt")
    prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    for i, p in enumerate(prompts):
        if isinstance(p, list) and any(t < 0 for t in p):
            raise APIError(400, f"prompt[{i}]: token ids must be >= 0", param="prompt")
    n = req.n or 1
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(prompts)} prompts × n={n} ask for {len(prompts) * n} choices; a request may ask for at most "
            f"{MAX_CHOICES}: send the prompts in several requests",
            param="n" if n > 1 else "prompt",
        )
    return prompts


# --- who may ask ---------------------------------------------------------------------------------

TOKENIZER_PATHS = ("/tokenizer_info", "/tokenize", "/detokenize")
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


def parse_origin(text: str, where: str) -> str:
    """An origin to allow (scheme://host[:port]) spelled as requests' origins are compared, or
    a KettleError naming `where` (the flag or setting it came from)."""
    origin = _origin(text)
    if origin is None:
        raise KettleError(
            f"{where}: {text!r} is not an origin like http://localhost:3000 "
            "(http or https, a host, an optional port, no path)"
        )
    scheme, name, port = origin
    return _origin_text(scheme, name, port=port)


def parse_host(text: str, where: str) -> str:
    """A host name to allow in Host headers (on any port: a proxy in front may use its own),
    spelled as they are compared, or a KettleError naming `where`."""
    bare = text.strip().removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if not _HOST_NAME.fullmatch(bare.lower()):
            raise KettleError(f"{where}: {text!r} is not a host name like kettle.lan (no scheme, no port)") from None
    return _name(bare)


def _name(host: str) -> str:
    """A host name or address in one spelling (lower case; IPv6 compressed; IPv4-mapped IPv6
    as IPv4, which is how a dual-stack socket reports an IPv4 client's connection)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    return str(getattr(ip, "ipv4_mapped", None) or ip)


def _split_host(value: str) -> tuple[str, int | None]:
    """A Host header's (name, port); ("", None) when it is not host[:port]."""
    if "@" in value or "/" in value:
        return "", None
    try:
        split = urlsplit("//" + value)
        return _name(split.hostname or ""), split.port or DEFAULT_PORTS["http"]
    except ValueError:  # a port that is not a number
        return "", None


def _origin(text: str) -> tuple[str, str, int] | None:
    """An Origin's (scheme, name, port), or None when it is not one ("null" included)."""
    try:
        split = urlsplit(text.strip())
        port = split.port
    except ValueError:
        return None
    if (
        split.scheme not in DEFAULT_PORTS
        or not split.hostname
        or split.path not in ("", "/")
        or split.query
        or split.fragment
        or "@" in split.netloc
    ):
        return None
    return split.scheme, _name(split.hostname), port or DEFAULT_PORTS[split.scheme]


def _origin_text(scheme: str, name: str, *, port: int) -> str:
    return f"{scheme}://{f'[{name}]' if ':' in name else name}:{port}"


def _is_own(name: str, port: int | None, *, scope: dict) -> bool:
    """Whether (name, port) is this server: a local name, or the address the client connected
    to, on the port it connected to."""
    address, server_port = scope.get("server") or (None, None)
    return (
        server_port is not None
        and port == server_port
        and (name in LOCAL_NAMES or address is not None and name == _name(address))
    )


class _Gate:
    """ASGI middleware: an HTTP request that `check` refuses (an APIError) is answered with
    that error and goes no further."""

    def __init__(self, app, check: Callable[[Request], None]):
        self.app, self.check = app, check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            try:
                self.check(Request(scope))
            except APIError as exc:
                await _error_json(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app -------------------------------------------------------------------------------------


def create_app(
    service: GenerationService,
    api_key: str | None = None,
    *,
    allow_origins: Iterable[str] = (),
    allow_hosts: Iterable[str] = (),
    routers: Iterable[APIRouter] = (),
    retrieve: Callable[[list[dict]], list[dict]] | None = None,
) -> FastAPI:
    """The HTTP API over `service`. With `api_key`, every /v1 and /api request must present it.
    `retrieve` (conversation -> passages, each {"kind", "source", "name", "text", "reference"},
    best first) grounds chat answers, as `kettle serve` gives data.memory's over the store: in
    OpenAI's API and the routers' (Ollama's), which find it as the app's state (`grounding`).
    `allow_origins` and `allow_hosts` (as parse_origin and parse_host return them) are let in
    beside this server's own addresses (see the module docstring). `routers` add endpoints
    behind the same gates (gpt.ollama's, which builds on this module)."""
    app = FastAPI(
        title="Kettle",
        description="OpenAI-compatible API of a Kettle model",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.retrieve = retrieve
    origins, hosts = frozenset(allow_origins), frozenset(allow_hosts)

    def check_access(request: Request) -> None:
        host = request.headers.get("host")
        if host is not None:
            name, port = _split_host(host)
            if name not in hosts and not _is_own(name, port, scope=request.scope):
                raise APIError(
                    403,
                    f"Host {host!r} does not name this server (a web page on a "
                    f"domain that resolves here sends its own): use 127.0.0.1, or "
                    f"start kettle serve with --allow-host {name or host}",
                    code="host_not_allowed",
                )
        origin = request.headers.get("origin")
        if origin is not None:
            parsed = _origin(origin)
            scheme, name, port = parsed or (None, None, None)
            if parsed is None or (
                _origin_text(scheme, name, port=port) not in origins
                and not (scheme == "http" and _is_own(name, port, scope=request.scope))
            ):
                raise APIError(
                    403,
                    f"Origin {origin!r} is refused: a web page may only use this "
                    f"server when kettle serve is started with --allow-origin {origin}",
                    code="origin_not_allowed",
                )

    def check_key(request: Request) -> None:
        path = request.scope["path"]
        guarded = path in ("/v1", "/api") or path.startswith(("/v1/", "/api/")) or path in TOKENIZER_PATHS
        if api_key is None or not guarded:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY` "
                "with the key given to kettle serve (--api-key or $KETTLE_API_KEY)",
                code="invalid_api_key",
            )

    # The last added runs first: who may ask at all, then CORS (a browser's preflight carries
    # no key), then the key, for every /v1 path before routing (an unknown one is a 401 too).
    app.add_middleware(_Gate, check=check_key)
    # Every origin that gets this far is allowed: check_access has refused the others.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(_Gate, check=check_access)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_json(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {
            404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    for router in routers:
        app.include_router(router)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_json(m) for m in await _models(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in await _models(service):
            if m.name == model_id:
                return _model_json(m)
        raise APIError(404, f"no model {model_id!r} (GET /v1/models lists them)", param="model", code="model_not_found")

    @app.post("/v1/models/switch")
    async def switch_model(request: Request):
        req = await parse_body(request, SwitchRequest)
        # A name the server does not list is unknown here (the service itself resolves listed
        # names only, never a path: a client must not make the server open arbitrary folders).
        if not any(m.name == req.model for m in await _models(service)):
            raise APIError(
                404,
                f"no model {req.model!r} to switch to (GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        try:
            info = await service.switch_model(req.model)
        except KettleError as exc:
            raise APIError(
                400, f"cannot switch to {req.model!r}, still serving {_served_name(service)!r}: {exc}", param="model"
            ) from None
        log.info("now serving %s (%s)", info.name, info.path)
        return _model_json(info)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse_body(request, ChatRequest)
        _reject_unsupported(req)
        params = sampling_params(
            req, req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        )
        messages = chat_messages(req)
        model = await _check_model(service, req.model)
        top = (req.top_logprobs or 0) if req.logprobs else None
        sources = await grounding(request, req, messages)
        return await _respond(
            request,
            service,
            kind="chat",
            payloads=[messages],
            params=params,
            req=req,
            model=model,
            options={"truncate": req.truncate, "logprobs": top, **grounded_options(sources)},
            sources=sources,
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        _reject_unsupported(req)
        # max_tokens 0 with echo scores the prompt and generates nothing (as OpenAI's API did).
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise APIError(400, "max_tokens: 0 generates nothing, so it needs echo: true", param="max_tokens")
        params = sampling_params(req, None if score_only else req.max_tokens)
        prompts = completion_prompts(req)
        model = await _check_model(service, req.model)
        return await _respond(
            request,
            service,
            kind="complete",
            payloads=prompts,
            params=params,
            req=req,
            model=model,
            options={
                "truncate": req.truncate,
                "logprobs": req.logprobs,
                "echo": bool(req.echo),
                "score_only": score_only,
            },
        )

    # vLLM's tokenizer endpoints, which evaluation harnesses (lm-evaluation-harness) look for to
    # count tokens with the served model's own tokenizer.
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tokenizer, engine = await _tokenizer(service)
        return {
            "tokenizer_class": "kettle",
            "eos_token": "<|endoftext|>",
            "model_max_length": engine.context_length,
            "vocab_size": tokenizer.n_vocab,
        }

    # Tokenizing a long text, and writing its million token ids as JSON, takes seconds: on a
    # thread, so the loop answers everyone meanwhile.
    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_body(request, TokenizeRequest)
        tokenizer, engine = await _tokenizer(service, await _check_model(service, req.model))

        def answer() -> bytes:
            tokens = engine.tokenize(req.prompt)
            return json.dumps({"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length}).encode()

        return Response(await asyncio.to_thread(answer), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse_body(request, DetokenizeRequest)
        tokenizer, _ = await _tokenizer(service, await _check_model(service, req.model))

        def answer() -> str | None:
            if any(not 0 <= t < tokenizer.n_vocab for t in req.tokens):
                return None
            return tokenizer.decode(req.tokens)

        text = await asyncio.to_thread(answer)
        if text is None:
            raise APIError(400, f"tokens: ids must be in 0..{tokenizer.n_vocab - 1}", param="tokens")
        return {"prompt": text}

    return app


async def parse_body(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, or an APIError: 415 unless it is declared application/json (a
    web page can send text/plain to any server without asking; see the module docstring)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(
            415,
            "the request body must be JSON sent with `Content-Type: "
            f"application/json`, got {media_type or 'no Content-Type'}",
        )
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:  # far beyond any context window: refuse, don't buffer
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to read") from None
    for name, most in getattr(model, "max_items", {}).items():
        value = data.get(name) if isinstance(data, dict) else None
        if isinstance(value, list) and len(value) > most:
            raise APIError(400, f"{name}: a request may hold at most {most}, got {len(value)}", param=name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise APIError(400, *_validation_message(exc.errors())) from None


_UNION_BRANCH = re.compile(r"str|int|float|bool|none|list\[.*\]|dict\[.*\]")


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """Pydantic's validation errors -> one clear line and the field it is about."""

    def where(err):  # ("messages", 0, "content") -> "messages[0].content"; union branches dropped
        out = ""
        for p in err.get("loc", ()):
            if isinstance(p, int):
                out += f"[{p}]"
            elif p != "body" and not _UNION_BRANCH.fullmatch(p):
                out += f".{p}" if out else p
        return out or None

    # A union (str | list[str]) fails once per alternative: the one that got deepest is the
    # closest to what the client meant.
    field = errors[0].get("loc", ())[:1]
    same = [e for e in errors if e.get("loc", ())[:1] == field]
    deepest = max(len(e.get("loc", ())) for e in same)
    err = next(e for e in same if len(e.get("loc", ())) == deepest)
    param = where(err)
    if err.get("type") == "extra_forbidden":
        return f"unrecognized request argument: {param}", param
    if err.get("type") == "missing":
        return f"missing required argument: {param}", param
    if param is None:
        return f"the request body must be a JSON object ({err['msg']})", None
    wanted = [
        e["msg"].removeprefix("Input should be ")
        for e in same
        if len(e.get("loc", ())) == deepest and where(e) == param
    ]
    if len(wanted) > 1:
        return f"{param}: should be {' or '.join(dict.fromkeys(wanted))}", param
    return f"{param}: {err['msg']}", param


async def _models(service: GenerationService) -> list[ModelInfo]:
    models = await service.list_models()
    return sorted(models, key=lambda m: not m.active)  # the served one first, order kept otherwise


def _model_json(m: ModelInfo) -> dict:
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.created),
        "owned_by": "kettle",
        "active": m.active,
        "source": m.source,
        "kind": m.kind,
        "status": m.status,
        "max_model_len": _context_length(m),  # vLLM's name: clients size prompts by it
    }


def _context_length(m: ModelInfo) -> int | None:
    """The model's context length from its config (None where the path is not known here)."""
    from gpt.checkpoint import read_meta

    try:
        return read_meta(m.path)[1].context_length if m.path else None
    except KettleError:
        return None


def _served_name(service: GenerationService) -> str:
    return service.active_model.name if service.active_model else ""


async def _check_model(service: GenerationService, requested: str | None) -> str:
    """The model a request is for: one GET /v1/models lists (loaded on request), or when it
    names none the served one; a 404 for any other name."""
    if not requested or requested == _served_name(service):
        return _served_name(service)
    try:
        await service.find_model(requested)
    except KettleError:
        raise APIError(
            404,
            f"model {requested!r} does not exist here (GET /v1/models lists the models this server serves)",
            param="model",
            code="model_not_found",
        ) from None
    return requested


async def _tokenizer(service: GenerationService, model: str | None = None):
    try:
        return await service.tokenizer(model)
    except KettleError as exc:
        raise APIError(400, str(exc)) from None


def _event_error(event: Error, kind: str) -> APIError:
    if event.code == "context_length_exceeded":
        return APIError(
            400,
            f'{event.message}: shorten the prompt, lower max_tokens, or send "truncate": true to drop its oldest part',
            param="messages" if kind == "chat" else "prompt",
            code=event.code,
        )
    return APIError(400 if event.code == "invalid_request" else 500, event.message)


async def _respond(
    request: Request,
    service: GenerationService,
    *,
    kind: str,
    payloads: list,
    params,
    req: _GenerationRequest,
    model: str,
    options: dict,
    sources: list[dict] = (),
):
    """One choice per payload and per n (OpenAI's index order: prompt by prompt, n each), sent
    a batch's worth at a time (_Runs): the service decodes them together as rows of one batch,
    the later rows of a prompt copying the first one's prefill. With a seed, choice j of a prompt uses seed + j
    (without one, with n > 1, the server picks one), so the reported seed reproduces them all."""
    n = req.n or 1
    if n > 1 and params.seed is None:
        params = params.replace(seed=random.SystemRandom().randrange(MAX_SEED))
    rows = [
        (payload, params if j == 0 else params.replace(seed=(params.seed + j) % MAX_SEED))
        for payload in payloads
        for j in range(n)
    ]
    request_id = uuid.uuid4().hex
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    wants_tokens = options.get("logprobs") is not None or options.get("echo")
    tokenizer = (await _tokenizer(service, model))[0] if wants_tokens else None
    reply = _Reply(prefix + request_id, model, kind, include_usage, options, tokenizer, n)
    reply.sources = sources
    go = service.stream_chat if kind == "chat" else service.complete

    def start(i: int) -> _Run:
        payload, row_params = rows[i]
        return _Run(
            service,
            request,
            kind,
            f"{request_id}-{i}",
            go(payload, row_params, model=model, request_id=f"{request_id}-{i}", **options),
        )

    runs = _Runs(start, len(rows))
    head = await runs[0].next()  # an error before anything was generated is a plain 400
    if isinstance(head, Error):
        runs.stop()
        raise _event_error(head, kind)
    if req.stream:
        return StreamingResponse(
            _sse(reply, rows, runs=runs, head=head),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    dones = []
    try:
        for i in range(len(rows)):
            run = runs[i]
            event = head if i == 0 else await run.next()
            while not isinstance(event, (Done, Error)):
                event = await run.next()
            if isinstance(event, Error):
                raise _event_error(event, kind)
            dones.append(event)
    finally:
        runs.stop()
    return reply.whole(dones, rows)


class _Runs:
    """A request's runs, each started once the one MAX_BATCH before it has been read: one
    request's many choices queue at most a batch of rows at a time, so a request sent after it
    takes its turn as soon as one of them has finished, not after all of them."""

    def __init__(self, start: Callable[[int], "_Run"], count: int):
        self.start, self.count, self.started = start, count, []

    def __getitem__(self, i: int) -> "_Run":
        while len(self.started) < min(i + MAX_BATCH, self.count):
            self.started.append(self.start(len(self.started)))
        return self.started[i]

    def stop(self) -> None:
        for run in self.started:
            run.stop()


class _Run:
    """One request's generation, consumed by a task of its own: when the response ends early (the
    client went away) the generation is cancelled, and its outcome is still logged."""

    def __init__(self, service: GenerationService, request: Request, kind: str, request_id: str, events: AsyncIterator):
        self.service, self.request_id = service, request_id
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.pump = asyncio.create_task(self._pump(kind, events))
        self.watcher = asyncio.create_task(self._watch(request))

    async def _pump(self, kind: str, events: AsyncIterator) -> None:
        async for event in events:
            if isinstance(event, Done):
                _log_done(kind, event)
            self.inbox.put_nowait(event)

    async def _watch(self, request: Request) -> None:
        # Also covers a request still queued, which sends nothing that could fail.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("client went away: cancelling %s", self.request_id)
        self.service.cancel(self.request_id)

    async def next(self):
        return await self.inbox.get()

    def stop(self) -> None:
        """The response is over: stop watching, and stop generating if it has not finished."""
        self.watcher.cancel()
        if not self.pump.done():
            self.service.cancel(self.request_id)


async def _sse(reply: "_Reply", rows: list, *, runs: _Runs, head) -> AsyncIterator[str]:
    """The choices' chunks, one choice after another (the later ones generate meanwhile, their
    events wait in their runs); logprobs come with each choice's last chunk."""
    dones = []
    try:
        for i in range(len(rows)):
            run = runs[i]
            yield _data(reply.chunk(i, role=True, echo=rows[i][0]))
            event = head if i == 0 else await run.next()
            while isinstance(event, Delta):
                yield _data(reply.chunk(i, text=event.text))
                event = await run.next()
            if isinstance(event, Error):
                yield _data({"error": _error_body(_event_error(event, reply.kind))})
                break
            dones.append(event)
            yield _data(reply.chunk(i, done=event))
            run.stop()
        else:
            if reply.include_usage:
                yield _data({**reply.chunk(0), "choices": [], "usage": _usage(dones, reply.n)})
        yield "data: [DONE]\n\n"
    finally:
        runs.stop()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(dones: list[Done], n: int) -> dict:
    """OpenAI's count: each prompt's tokens once (not once per choice), every choice's answer."""
    prompt = sum(d.result.prompt_tokens for d in dones[::n])
    answer = sum(d.result.new_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


def _kettle_extra(done: Done) -> dict:
    r = done.result
    return {
        "seed": r.seed,
        "ttft_s": r.ttft_s,
        "tokens_per_s": r.tokens_per_s,
        "dropped_tokens": r.dropped_tokens,
        "cached_tokens": r.cached_tokens,
    }


def _log_done(kind: str, done: Done) -> None:
    r = done.result
    log.info(
        "%s on %s: %d prompt + %d new tokens, finish %s, first token %.0f ms, %.1f tokens/s",
        kind,
        done.model,
        r.prompt_tokens,
        r.new_tokens,
        r.finish_reason,
        r.ttft_s * 1000,
        r.tokens_per_s,
    )


def _finite(logprob: float) -> float:
    # JSON has no -Infinity; OpenAI writes -9999 for a token that cannot be drawn.
    return max(logprob, -9999.0)


class _Reply:
    """Builds one request's response objects, whole or as stream chunks."""

    def __init__(self, id: str, model: str, kind: str, include_usage: bool, options: dict, tokenizer, n: int):
        self.id, self.model, self.kind, self.include_usage = id, model, kind, include_usage
        self.options, self.tokenizer, self.n = options, tokenizer, n
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.sources: list[dict] = []  # the passages offered to a grounded answer, best first

    def whole(self, dones: list[Done], rows: list) -> dict:
        choices = []
        for i, (done, (payload, _)) in enumerate(zip(dones, rows)):
            r = done.result
            if self.kind == "chat":
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": r.text},
                        "logprobs": self._logprobs(r),
                        "finish_reason": r.finish_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": i,
                        "text": self._echo(payload) + r.text,
                        "logprobs": self._logprobs(r),
                        "finish_reason": r.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": dones[0].model,
            "choices": choices,
            "usage": _usage(dones, self.n),
            "kettle": _kettle_extra(dones[0]),
            **self._sources(dones[0]),
        }

    def chunk(self, index: int, text: str = "", *, role: bool = False, done: Done | None = None, echo=None) -> dict:
        finish = done.result.finish_reason if done else None
        logprobs = self._logprobs(done.result) if done else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            if role:
                text = self._echo(echo)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            obj = "text_completion"
        chunk = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": done.model if done else self.model,
            "choices": [choice],
        }
        if done:
            chunk["kettle"] = _kettle_extra(done)
            chunk.update(self._sources(done))
        return chunk

    def _sources(self, done: Done) -> dict:
        """Kettle's extension, which OpenAI's clients ignore: the passages the answer saw."""
        return {"sources": used_sources(self.sources, done)} if self.kind == "chat" else {}

    def _echo(self, prompt) -> str:
        """The prompt as sent, when echo asks for it."""
        if not self.options.get("echo"):
            return ""
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def _token(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])

    def _logprobs(self, r) -> dict | None:
        if self.options.get("logprobs") is None:
            return None
        if self.kind == "chat":

            def one(token, logprob):
                b = self._token(token)
                return {"token": b.decode("utf-8", "replace"), "logprob": _finite(logprob), "bytes": list(b)}

            return {
                "content": [
                    {**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in r.logprobs
                ],
                "refusal": None,
            }
        # The stop token that ended the answer is the answer's last token here, as in OpenAI's
        # legacy API (the text leaves it out): lm-eval reads an echoed prompt's scores up to it.
        entries = (r.prompt_logprobs or []) + r.logprobs + ([r.stop_logprob] if r.stop_logprob else [])
        tokens = [self._token(e.token).decode("utf-8", "replace") for e in entries]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        top = []
        for e, t in zip(entries, tokens):
            if e.logprob is None:  # a prompt's first token: nothing came before it
                top.append(None)
                continue
            # OpenAI's legacy shape: the top N, and always the chosen token's own.
            alternatives = {self._token(i).decode("utf-8", "replace"): _finite(v) for i, v in e.top}
            top.append({**alternatives, t: _finite(e.logprob)})
        return {
            "tokens": tokens,
            "token_logprobs": [None if e.logprob is None else _finite(e.logprob) for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }


# --- running it ----------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a KettleError saying why not (port taken, unknown host)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except socket.gaierror as exc:
        raise KettleError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    except OverflowError:
        raise KettleError(f"--port must be in 0..65535, got {port}") from None
    except OSError as exc:
        raise KettleError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


class _RedactSecrets(logging.Filter):
    """uvicorn's access log writes each URL whole: a key a client put in the query string
    (which Kettle never reads) must not end up in a terminal's scrollback or a log file."""

    PARAM = re.compile(r"(?<=[?&])(api[_-]?key|key|access_token|token)=[^&\s]*", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PARAM.sub(r"\1=REDACTED", a) if isinstance(a, str) else a for a in record.args)
        return True


_REDACT_SECRETS = _RedactSecrets()


def _no_delay(transport) -> None:
    """Send each write at once (TCP_NODELAY). asyncio sets it only on sockets whose protocol
    number says TCP, and socket.create_server's say 0: every request after the first on a
    kept-alive connection (OpenAI's and Ollama's clients keep theirs) waited ~44 ms for the
    client's delayed ACK before the end of its response went out (Nagle), a streamed answer's
    tokens in bursts as slow."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the connection is already gone
            pass


def _protocol_with_deadline(timeout: float):
    """uvicorn's h11 protocol, without Nagle's delay (_no_delay), closing a connection that has not
    sent a whole request (head and body) `timeout` seconds after it opened or its previous response
    ended. A request received whole disarms it: a long answer, streamed or not, is never cut."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            _no_delay(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Armed while the client owes a request (or the rest of one), disarmed once it is in."""
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                if self.deadline is None:
                    self.deadline = self.loop.call_later(timeout, self._expire)
            else:
                self._disarm()

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expire(self) -> None:
            self.deadline = None
            if self.flow.read_paused:  # the app has not read the body yet: not the client's fault
                self._watch()
                return
            log.info("closing a connection that sent no whole request in %g s", timeout)
            self.transport.close()

    return Protocol


def build_server(
    service: GenerationService,
    api_key: str | None = None,
    *,
    log_level: str = "info",
    allow_origins: Iterable[str] = (),
    allow_hosts: Iterable[str] = (),
    routers: Iterable[APIRouter] = (),
    request_timeout: float = REQUEST_TIMEOUT_S,
    retrieve: Callable[[list[dict]], list[dict]] | None = None,
):
    """A uvicorn server for the API (create_app's arguments; `request_timeout`: seconds a
    connection has to send a whole request, see REQUEST_TIMEOUT_S); run it with
    `server.run(sockets=[listen(host, port)])` (blocking) and stop it with
    `server.should_exit = True`."""
    import uvicorn

    app = create_app(
        service, api_key, allow_origins=allow_origins, allow_hosts=allow_hosts, routers=routers, retrieve=retrieve
    )
    config = uvicorn.Config(
        app, log_level=log_level, timeout_graceful_shutdown=5, http=_protocol_with_deadline(request_timeout)
    )
    # After uvicorn.Config, which sets up its loggers; adding the one filter again is a no-op.
    logging.getLogger("uvicorn.access").addFilter(_REDACT_SECRETS)
    return uvicorn.Server(config)
