"""`kettle serve [MODEL]`: the OpenAI-compatible HTTP API (gpt/server.py) for other programs."""
from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL at http://HOST:PORT/v1 (chat/completions, completions, models; "
                    "streaming with server-sent events). Switch the served model without a "
                    "restart with POST /v1/models/switch {\"model\": NAME}.")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="model directory, model name under KETTLE_HOME/models, or store model "
                        "version (default: the active model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` (default: $KETTLE_API_KEY, which "
                        "keeps the key out of the process list)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.set_defaults(func=serve_command)


def serve_command(args) -> int:
    import logging

    from gpt.errors import KettleError
    from gpt.server import build_server, listen
    from gpt.service import InProcessService

    if args.api_key is not None and not args.api_key.strip():
        raise KettleError("--api-key must not be empty")  # never silently serve without a key
    api_key = args.api_key or os.environ.get("KETTLE_API_KEY", "").strip() or None
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("kettle").addHandler(handler)  # one line per answer: tokens, speed
    logging.getLogger("kettle").setLevel(logging.INFO)
    sock = listen(args.host, args.port)  # before loading: a taken port fails at once
    service = InProcessService(args.model, device=args.device)
    try:
        info = service.load()
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(f"kettle: serving {info.name} at http://{url_host}:{port}/v1"
              f"{' (API key required)' if api_key else ''}", flush=True)
        if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"kettle: warning: listening on {args.host} without --api-key: anyone who can "
                  "reach this machine can use the model", file=sys.stderr, flush=True)
        build_server(service, api_key).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
    return 0
