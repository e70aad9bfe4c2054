"""`kettle generate MODEL PROMPT`: one answer from a model, with every sampling control."""
from __future__ import annotations

import argparse
import sys

from tui.commands import flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt (or answer it as a chat with --chat)",
        description="Continue PROMPT with MODEL and print the new text. The generation figures "
                    "(tokens, time to first token, tokens/s, seed) go to stderr.")
    p.add_argument("model", metavar="MODEL", help="model directory, or a model name under KETTLE_HOME/models")
    p.add_argument("prompt", metavar="PROMPT", help="the text to continue; - reads it from stdin")
    p.add_argument("--chat", action="store_true",
                   help="treat PROMPT as a user message and answer it with the chat template")
    p.add_argument("--system", metavar="TEXT", help="system prompt (with --chat)")
    p.add_argument("--preset", choices=["precise", "balanced", "creative"],
                   help="start from these sampling settings; the flags below override them")
    p.add_argument("--max-new-tokens", type=flags.sampling("max_new_tokens", int), metavar="N")
    p.add_argument("--temperature", type=flags.sampling("temperature", float), metavar="T",
                   help="0 = greedy (deterministic)")
    p.add_argument("--top-k", type=flags.sampling("top_k", int), metavar="K",
                   help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=flags.sampling("top_p", float), metavar="P",
                   help="keep the most likely tokens up to mass P")
    p.add_argument("--min-p", type=flags.sampling("min_p", float), metavar="P",
                   help="drop tokens under P x the best one's probability")
    p.add_argument("--repetition-penalty", type=flags.sampling("repetition_penalty", float),
                   metavar="R", help="> 1 discourages repeats (1 = off)")
    p.add_argument("--presence-penalty", type=flags.sampling("presence_penalty", float), metavar="X")
    p.add_argument("--frequency-penalty", type=flags.sampling("frequency_penalty", float), metavar="X")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when TEXT is generated (not included); repeatable")
    p.add_argument("--seed", type=flags.sampling("seed", int),
                   help="same seed + settings + model = same text")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--device", type=flags.device,
                   help="cpu, cuda, cuda:N or mps (default: the best available)")
    flags.add_quantize(p)
    p.set_defaults(func=generate_command)


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "stop", "seed")


def sampling_params(args):
    """The preset (or the defaults) with the flags given on top, validated under the flags' names."""
    from gpt.errors import KettleError
    from gpt.sampling import SamplingParams, get_preset

    params = get_preset(args.preset) if args.preset else SamplingParams()
    changes = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    try:
        return params.replace(**changes)
    except KettleError as exc:  # --stop's ("stop must be ..."): the others are checked as parsed
        raise KettleError("--" + str(exc).replace("_", "-", 2)) from None


def generate_command(args) -> int:
    from gpt.checkpoint import resolve_model_dir
    from gpt.engine import Engine, GenerationResult
    from gpt.errors import KettleError

    if args.system is not None and not args.chat:
        raise KettleError("--system needs --chat")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = sampling_params(args)
    engine = Engine.load(resolve_model_dir(args.model), device=args.device, quantize=args.quantize)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        stream = engine.stream_chat(messages + [{"role": "user", "content": prompt}], params)
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
    print(f"[{result.new_tokens} tokens, finish: {result.finish_reason}, prompt {result.prompt_tokens} "
          f"tokens{dropped}, first token {result.ttft_s * 1000:.0f} ms, {result.tokens_per_s:.1f} tokens/s, "
          f"seed {result.seed}, {engine.device}]", file=sys.stderr)
    return 0
