"""`kettle generate MODEL PROMPT`: one answer from a model, with every sampling control."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt.sampling import PARAMS, PRESETS
from tui.commands import flags

# One flag per sampling parameter that declares one (gpt.sampling.PARAMS), named after it.
SAMPLING_FLAGS = tuple(param for param in PARAMS if param.metavar)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt (or answer it as a chat with --chat)",
        description="Continue PROMPT with MODEL and print the new text. The generation figures "
        "(tokens, time to first token, tokens/s, seed) go to stderr.",
    )
    p.add_argument("model", metavar="MODEL", help="model directory, or a model name under KETTLE_HOME/models")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue; - reads it from stdin")
    p.add_argument(
        "--chat", action="store_true", help="treat PROMPT as a user message and answer it with the chat template"
    )
    p.add_argument("--system", metavar="TEXT", help="system prompt (with --chat)")
    p.add_argument(
        "--no-ground",
        dest="ground",
        action="store_false",
        help="with --chat: answer from the model alone, without passages from your corrections and documents",
    )
    p.add_argument(
        "--preset", choices=list(PRESETS), help="start from these sampling settings; the flags below override them"
    )
    for param in SAMPLING_FLAGS:
        flag = "--" + param.name.replace("_", "-")
        if param.many:  # repeatable; checked with the others in sampling_params
            p.add_argument(flag, action="append", metavar=param.metavar, help=param.help)
        else:
            p.add_argument(flag, type=flags.sampling(param.name, param.kind), metavar=param.metavar, help=param.help)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--device", type=flags.device, help="cpu, cuda, cuda:N or mps (default: the best available)")
    flags.add_quantize(p)
    p.set_defaults(func=generate_command)


def sampling_params(args):
    """The preset (or the defaults) with the flags given on top, validated under the flags' names."""
    from gpt.errors import KettleError
    from gpt.sampling import SamplingParams, get_preset

    params = get_preset(args.preset) if args.preset else SamplingParams()
    changes = {p.name: getattr(args, p.name) for p in SAMPLING_FLAGS if getattr(args, p.name) is not None}
    try:
        return params.replace(**changes)
    except KettleError as exc:  # --stop's ("stop must be ..."): the others are checked as parsed
        raise KettleError("--" + str(exc).replace("_", "-", 2)) from None


def generate_command(args) -> int:
    from data.registry import resolve_model_dir
    from gpt.engine import Engine, GenerationResult
    from gpt.errors import KettleError

    if args.system is not None and not args.chat:
        raise KettleError("--system needs --chat")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args)
    model_dir = resolve_model_dir(args.model)
    engine = Engine.load(model_dir, device=args.device, quantize=args.quantize)
    sources = []
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        if args.ground:
            messages, sources = ground(engine, messages, params, model_dir)
        stream = engine.stream_chat(messages, params)
    else:
        stream = engine.stream(prompt, params)
    result = None
    for item in stream:
        if isinstance(item, GenerationResult):
            result = item
        elif args.stream:
            sys.stdout.write(item)
            sys.stdout.flush()
    if not args.stream:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    sys.stdout.flush()  # the answer before the figures, also when both go to one terminal
    dropped = f", {result.dropped_tokens} prompt tokens dropped to fit" if result.dropped_tokens else ""
    drafts = (
        f", speculative drafts kept {result.accepted_tokens}/{result.drafted_tokens} ({result.acceptance_rate:.0%})"
        if result.drafted_tokens
        else ""
    )
    print(
        f"[{result.new_tokens} tokens, finish: {result.finish_reason}, prompt {result.prompt_tokens} "
        f"tokens{dropped}, first token {result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s"
        f"{drafts}, seed {result.seed}, {engine.device}]",
        file=sys.stderr,
    )
    for p in sources:
        print(f"[source: {p.kind} {p.source} · {' '.join(p.name.split())[:80]}]", file=sys.stderr)
    return 0


def ground(engine, messages: list[dict], params, model_dir):
    """The conversation with the passages that answer its newest question, and those passages
    (Python's documentation is indexed on first use, the model's lessons when new)."""
    from data import memory
    from data.store import open_store
    from tui.commands.docs import remember

    with open_store() as store:
        remember(store, Path(model_dir).name, model_dir)
        found = memory.references_for(store, messages)
    grounded, used = engine.ground(messages, [p.reference for p in found], params, taught=memory.taught_count(found))
    return grounded, found[:used]
