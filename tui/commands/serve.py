"""`kettle serve [MODEL]`: the OpenAI-compatible HTTP API (gpt/server.py) and Ollama's (gpt/ollama.py)
for other programs."""

from __future__ import annotations

import argparse
import os
import sys

from tui.commands import flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over OpenAI- and Ollama-compatible HTTP APIs",
        description="Serve MODEL at http://HOST:PORT/v1 (chat/completions, completions, models; "
        "streaming with server-sent events) and Ollama's API at http://HOST:PORT/api. Every model "
        "GET /v1/models lists is served on request by its name (loaded on first use, the two used "
        "last kept loaded); MODEL answers requests that name none, changed with POST /v1/models/switch "
        "{\"model\": NAME} (the server's choice: the app's active model stays as it is).",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        help="a store model version or a model under KETTLE_HOME/models, by name "
        "(looked up before a folder of that name here), or a model directory "
        "path (default: the active model)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--port", type=flags.port, help=f"port (default {OPENAI_PORT}, with --ollama {OLLAMA_PORT}; 0 picks a free one)"
    )
    p.add_argument(
        "--ollama",
        action="store_true",
        help=f"listen on Ollama's port ({OLLAMA_PORT}), where Ollama clients look; Ollama's API "
        "(/api/chat, /api/generate, /api/tags, ...) is served beside the OpenAI one either way",
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, which "
        "keeps the key out of the process list)",
    )
    p.add_argument("--device", type=flags.device, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument(
        "--allow-origin",
        metavar="ORIGIN",
        action="append",
        default=[],
        help="let web pages from ORIGIN (like http://localhost:3000) use the server; "
        'repeatable; config.json: {"serve": {"allow_origins": [...]}} '
        "(default: none, only programs and this server's own address)",
    )
    p.add_argument(
        "--allow-host",
        metavar="NAME",
        action="append",
        default=[],
        help="accept requests whose Host header is NAME (a name of this machine or a "
        'proxy in front); repeatable; config.json: {"serve": {"allow_hosts": '
        "[...]}} (default: localhost, 127.0.0.1, [::1] and the address listened on)",
    )
    flags.add_quantize(p)
    p.set_defaults(func=serve_command)


API_KEY_ENV = "KETTLE_API_KEY"
OPENAI_PORT, OLLAMA_PORT = 8000, 11434


def api_key(given: str | None, flag: str = "--api-key") -> str | None:
    """The key given with `flag`, else ${API_KEY_ENV} (a flag's value is in the process list for
    anyone on the machine to read), else None. An empty flag is an error, never "no key"."""
    from gpt.errors import KettleError

    if given is not None and not given.strip():
        raise KettleError(f"{flag} must not be empty")
    return given or os.environ.get(API_KEY_ENV, "").strip() or None


def allowed(args) -> tuple[list[str], list[str]]:
    """(origins, hosts) to let in, from the flags and config.json's "serve" settings; a bad
    entry is a KettleError naming where it came from."""
    from data.paths import config_path
    from gpt.errors import KettleError
    from gpt.server import parse_host, parse_origin
    from tui.app import load_config

    origins = [parse_origin(v, "--allow-origin") for v in args.allow_origin]
    # The name listened on is one clients use in URLs (an address is allowed anyway).
    hosts = [parse_host(v, "--allow-host") for v in args.allow_host] + [parse_host(args.host, "--host")]
    config, problem = load_config()
    if problem:
        print(f"kettle: warning: {problem}", file=sys.stderr)
    settings = config.get("serve", {})
    if not isinstance(settings, dict):
        raise KettleError(
            f'{config_path()}: "serve" must be an object like {{"allow_origins": [...], "allow_hosts": [...]}}'
        )
    for key, parse, found in (("allow_origins", parse_origin, origins), ("allow_hosts", parse_host, hosts)):
        listed = settings.get(key, [])
        where = f'{config_path()}: "serve" "{key}"'
        if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
            raise KettleError(f"{where} must be a list of strings")
        found += [parse(v, where) for v in listed]
    return origins, hosts


def serve_command(args) -> int:
    import logging

    from data.registry import StoreCatalog
    from data.store import open_store
    from gpt.ollama import router
    from gpt.server import LOCAL_NAMES, build_server, listen
    from gpt.service import MAX_LOADED, InProcessService

    key = api_key(args.api_key)
    allow_origins, allow_hosts = allowed(args)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("kettle").addHandler(handler)  # one line per answer: tokens, speed
    logging.getLogger("kettle").setLevel(logging.INFO)
    port = args.port if args.port is not None else OLLAMA_PORT if args.ollama else OPENAI_PORT
    sock = listen(args.host, port)  # before loading: a taken port fails at once
    # The server's model is its own: a switch (POST /v1/models/switch) never becomes the app's
    # active model, which is the user's choice in the app.
    store = open_store()  # grounding's memory (data.memory), read by every chat request
    service = InProcessService(
        args.model,
        catalog=StoreCatalog(),
        device=args.device,
        quantize=args.quantize,
        follow_catalog=False,
        max_loaded=MAX_LOADED,
    )
    try:
        info = service.load()
        # Before the line that says the server is up: indexing Python's documentation the first
        # time takes seconds, and requests sent meanwhile would wait unanswered.
        retrieve = store_retriever(store, info)
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(
            f"kettle: serving {info.name} at http://{url_host}:{port}/v1 (Ollama's API: http://{url_host}:{port})"
            f"{' (API key required)' if key else ''}",
            flush=True,
        )
        if key is None and args.host not in LOCAL_NAMES:
            print(
                f"kettle: warning: listening on {args.host} without --api-key: anyone who can "
                "reach this machine can use the model",
                file=sys.stderr,
                flush=True,
            )
        ollama = router(service)  # Ollama's API beside OpenAI's, on every port
        build_server(
            service,
            key,
            allow_origins=allow_origins,
            allow_hosts=allow_hosts,
            routers=[ollama],
            retrieve=retrieve,
        ).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
        store.close()
    return 0


def store_retriever(store, model):
    """The server's grounding: a conversation's passages from the store (data.memory), Python's
    documentation indexed first if it is not yet, and the lessons of the `model` it serves
    (a gpt.catalog.ModelInfo)."""
    from data import memory
    from tui.commands.docs import remember

    if not memory.has_python_docs(store):
        print("kettle: indexing Python's documentation (once)...", file=sys.stderr, flush=True)
    remember(store, model.name, model.path, bar=False)

    def retrieve(messages: list[dict]) -> list[dict]:
        return [
            {**p.to_dict(), "reference": p.reference, "taught": p.taught}
            for p in memory.references_for(store, messages)
        ]

    return retrieve
