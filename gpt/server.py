"""`kettle serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over a GenerationService.

Endpoints (all under /v1; with an API key each needs `Authorization: Bearer KEY`):
    GET  /v1/models                 every model the server can switch to; the served one first,
                                    with "active": true
    GET  /v1/models/{id}            one of them
    POST /v1/models/switch          {"model": NAME} serves another model from now on, without a
                                    restart (requests already queued finish on the old one); NAME
                                    must be one GET /v1/models lists. A model that fails to load
                                    leaves the old one served.
    POST /v1/chat/completions       OpenAI's chat API, "stream": true for server-sent events
    POST /v1/completions            OpenAI's legacy completions API (raw text continuation)
    GET  /health                    {"status": "ok"}, no key needed (for readiness checks)

Parameters: OpenAI's names (model, messages / prompt, stream, stream_options.include_usage,
max_tokens or max_completion_tokens, temperature, top_p, seed, stop (a string or a list),
presence_penalty, frequency_penalty, n (must be 1), user) plus top_k, min_p and
repetition_penalty. A field left out keeps Kettle's default (gpt.sampling.SamplingParams). "model"
may be left out; if given it must be the served model. Features Kettle does not have (logprobs,
tools, logit_bias, JSON mode, echo, best_of > 1, suffix) get a 400, not a silent no, and so does
any field OpenAI does not define.

Every error is OpenAI's shape: {"error": {"message", "type", "param", "code"}}, 400 for a bad
request (malformed JSON, wrong type, out-of-range value), 401 for a missing or wrong key, 404 for
an unknown model or path. A failing request never stops the server.

Responses carry a "kettle" object with what OpenAI has no field for: the seed used (send it back
to reproduce an answer), time to first token, tokens/s, and prompt tokens dropped or reused from
the cache. Streams send it with the chunk that has the finish_reason.

A client that disconnects cancels its generation, streaming or not, also while it is queued.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import socket
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException

from gpt.errors import KettleError
from gpt.sampling import SamplingParams
from gpt.service import Delta, Done, Error, GenerationService, ModelInfo

log = logging.getLogger("kettle.server")

MAX_BODY_BYTES = 8 << 20
# OpenAI's name for each SamplingParams field, where it differs.
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, param=None, code=None, type=None) -> JSONResponse:
    err = APIError(status, message, param, code, type)
    return JSONResponse({"error": _error_body(err)}, status_code=status)


def _error_body(err: APIError) -> dict:
    return {"message": err.message, "type": err.type, "param": err.param, "code": err.code}


# --- request bodies ------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "0.5" is not a number and true is not 1; forbid: a misspelt field is an error,
    # not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _GenerationRequest(_Strict):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None             # accepted for compatibility; not used


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


class SwitchRequest(_Strict):
    model: str


def sampling_params(req: _GenerationRequest, max_tokens: int | None) -> SamplingParams:
    """The request's SamplingParams, validated; a bad value is a 400 naming OpenAI's field."""
    fields = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
              "top_k": req.top_k, "min_p": req.min_p, "repetition_penalty": req.repetition_penalty,
              "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
              "seed": req.seed, "stop": req.stop}
    try:
        return SamplingParams.from_dict({k: v for k, v in fields.items() if v is not None})
    except KettleError as exc:
        message = str(exc)
        field = message.split(" ", 1)[0]
        for ours, theirs in OPENAI_NAMES.items():
            message = message.replace(ours, theirs)
        raise APIError(400, message, param=OPENAI_NAMES.get(field, field)) from None


def _reject_unsupported(req: _GenerationRequest) -> None:
    def no(param: str, what: str):
        raise APIError(400, f"{param}: {what} is not supported by Kettle", param=param)

    if req.n not in (None, 1):
        raise APIError(400, f"n must be 1 (Kettle generates one answer per request), got {req.n}",
                       param="n")
    if req.logit_bias:
        no("logit_bias", "biasing tokens")
    if isinstance(req, ChatRequest):
        if req.logprobs or req.top_logprobs:
            no("logprobs", "returning log probabilities")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(req, name):
                no(name, "tool and function calling")
        if req.response_format and req.response_format.get("type", "text") != "text":
            no("response_format", "a response format other than text")
    else:
        if req.logprobs:
            no("logprobs", "returning log probabilities")
        if req.echo:
            no("echo", "echoing the prompt")
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
            raise APIError(400, f"messages[{i}].role: must be system, user or assistant "
                                f"(Kettle has no tools), got {m.role!r}", param=f"messages[{i}].role")
        content = m.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported, "
                                        f"got type {part.get('type')!r}",
                                   param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if role == "system" and out:
            raise APIError(400, f"messages[{i}]: a system message may only come first",
                           param=f"messages[{i}].role")
        out.append({"role": role, "content": content})
    if not out:
        raise APIError(400, "messages must hold at least one message", param="messages")
    return out


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list) and any(t < 0 for t in prompt):
        raise APIError(400, "prompt: token ids must be >= 0", param="prompt")
    return prompt


# --- the app -------------------------------------------------------------------------------------

def create_app(service: GenerationService, api_key: str | None = None) -> FastAPI:
    """The HTTP API over `service`. With `api_key`, every /v1 request must present it."""
    app = FastAPI(title="Kettle", description="OpenAI-compatible API of a Kettle model",
                  docs_url=None, redoc_url=None, openapi_url=None)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                     api_key.encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY` "
                                "with the key given to kettle serve --api-key",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": _error_body(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(400, *_validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [_model_json(m) for m in await _models(service)]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
    async def get_model(model_id: str):
        for m in await _models(service):
            if m.name == model_id:
                return _model_json(m)
        raise APIError(404, f"no model {model_id!r} (GET /v1/models lists them)", param="model",
                       code="model_not_found")

    @app.post("/v1/models/switch", dependencies=[Depends(check_key)])
    async def switch_model(request: Request):
        req = await parse_body(request, SwitchRequest)
        # Only models the server lists: a client must not make the server open arbitrary paths.
        if not any(m.name == req.model for m in await _models(service)):
            raise APIError(404, f"no model {req.model!r} to switch to (GET /v1/models lists them)",
                           param="model", code="model_not_found")
        try:
            info = await service.switch_model(req.model)
        except KettleError as exc:
            raise APIError(400, f"cannot switch to {req.model!r}, still serving "
                                f"{_served_name(service)!r}: {exc}", param="model") from None
        log.info("now serving %s (%s)", info.name, info.path)
        return _model_json(info)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        req = await parse_body(request, ChatRequest)
        _reject_unsupported(req)
        params = sampling_params(req, req.max_tokens if req.max_completion_tokens is None
                                 else req.max_completion_tokens)
        messages = chat_messages(req)
        model = _check_model(service, req.model)
        return await _respond(request, service, "chat", messages, params, req, model)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request):
        req = await parse_body(request, CompletionRequest)
        _reject_unsupported(req)
        params = sampling_params(req, req.max_tokens)
        prompt = completion_prompt(req)
        model = _check_model(service, req.model)
        return await _respond(request, service, "complete", prompt, params, req, model)

    return app


async def parse_body(request: Request, model: type[BaseModel]):
    """The JSON body as `model` (whatever the Content-Type says: curl -d sends form's), or a 400."""
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:  # far beyond any context window: refuse, don't buffer
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
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
    wanted = [e["msg"].removeprefix("Input should be ") for e in same
              if len(e.get("loc", ())) == deepest and where(e) == param]
    if len(wanted) > 1:
        return f"{param}: should be {' or '.join(dict.fromkeys(wanted))}", param
    return f"{param}: {err['msg']}", param


async def _models(service: GenerationService) -> list[ModelInfo]:
    models = await service.list_models()
    return sorted(models, key=lambda m: not m.active)  # the served one first, order kept otherwise


def _model_json(m: ModelInfo) -> dict:
    return {"id": m.name, "object": "model", "created": int(m.created), "owned_by": "kettle",
            "active": m.active, "source": m.source, "kind": m.kind, "status": m.status}


def _served_name(service: GenerationService) -> str:
    return service.active_model.name if service.active_model else ""


def _check_model(service: GenerationService, requested: str | None) -> str:
    served = _served_name(service)
    if requested and requested != served:
        raise APIError(404, f"model {requested!r} is not being served; this server serves {served!r} "
                            "(leave model out, or switch with POST /v1/models/switch)",
                       param="model", code="model_not_found")
    return served


async def _respond(request: Request, service: GenerationService, kind: str, payload, params,
                   req: _GenerationRequest, model: str):
    request_id = uuid.uuid4().hex
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    reply = _Reply(prefix + request_id, model, kind, include_usage)
    run = _Run(service, request, kind, request_id,
               (service.stream_chat if kind == "chat" else service.complete)(payload, params, request_id))
    if req.stream:
        return StreamingResponse(_sse(reply, run), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while True:
            event = await run.next()
            if isinstance(event, Error):
                raise APIError(400 if event.code == "invalid_request" else 500, event.message)
            if isinstance(event, Done):
                return reply.whole(event)
    finally:
        run.stop()


class _Run:
    """One request's generation, consumed by a task of its own: when the response ends early (the
    client went away) the generation is cancelled, and its outcome is still logged."""

    def __init__(self, service: GenerationService, request: Request, kind: str, request_id: str,
                 events: AsyncIterator):
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


async def _sse(reply: "_Reply", run: _Run) -> AsyncIterator[str]:
    try:
        yield _data(reply.chunk(role=True))
        while True:
            event = await run.next()
            if isinstance(event, Delta):
                yield _data(reply.chunk(text=event.text))
                continue
            if isinstance(event, Error):
                err = APIError(400 if event.code == "invalid_request" else 500, event.message)
                yield _data({"error": _error_body(err)})
            else:
                yield _data(reply.chunk(done=event))
                if reply.include_usage:
                    yield _data({**reply.chunk(), "choices": [], "usage": _usage(event)})
            break
        yield "data: [DONE]\n\n"
    finally:
        run.stop()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(done: Done) -> dict:
    r = done.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.new_tokens,
            "total_tokens": r.prompt_tokens + r.new_tokens}


def _kettle_extra(done: Done) -> dict:
    r = done.result
    return {"seed": r.seed, "ttft_s": r.ttft_s, "tokens_per_s": r.tokens_per_s,
            "dropped_tokens": r.dropped_tokens, "cached_tokens": r.cached_tokens}


def _log_done(kind: str, done: Done) -> None:
    r = done.result
    log.info("%s on %s: %d prompt + %d new tokens, finish %s, first token %.0f ms, %.1f tokens/s",
             kind, done.model, r.prompt_tokens, r.new_tokens, r.finish_reason, r.ttft_s * 1000,
             r.tokens_per_s)


class _Reply:
    """Builds one request's response objects, whole or as stream chunks."""

    def __init__(self, id: str, model: str, kind: str, include_usage: bool):
        self.id, self.model, self.kind, self.include_usage = id, model, kind, include_usage
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def whole(self, done: Done) -> dict:
        r = done.result
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                      "logprobs": None, "finish_reason": r.finish_reason}
        else:
            choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
        return {"id": self.id, "object": self.object, "created": self.created, "model": done.model,
                "choices": [choice], "usage": _usage(done), "kettle": _kettle_extra(done)}

    def chunk(self, text: str = "", role: bool = False, done: Done | None = None) -> dict:
        finish = done.result.finish_reason if done else None
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created,
                 "model": done.model if done else self.model, "choices": [choice]}
        if done:
            chunk["kettle"] = _kettle_extra(done)
        return chunk


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


def build_server(service: GenerationService, api_key: str | None = None,
                 log_level: str = "info"):
    """A uvicorn server for the API; run it with `server.run(sockets=[listen(host, port)])`
    (blocking) and stop it with `server.should_exit = True`."""
    import uvicorn

    config = uvicorn.Config(create_app(service, api_key), log_level=log_level,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
