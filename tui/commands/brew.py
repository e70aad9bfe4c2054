"""`kettle brew starter`: an offline starter model from text that ships with Python."""

from __future__ import annotations

import argparse

from finetune.starter import BREW_TIME, SEED
from tui.commands import flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("brew", help="make a model from scratch, offline")
    brew_sub = p.add_subparsers(dest="brew_command", metavar="COMMAND", required=True)
    s = brew_sub.add_parser(
        "starter",
        help=f"train a small model on what ships with Python ({BREW_TIME}, offline)",
        description="Builds a corpus from what ships with Python (the standard library's source, "
        "the language reference, the builtins' help), trains a tokenizer and a small "
        "GPT on it, teaches it to answer Python questions, and registers the result "
        "as a model (the active one if none is active). The work is fixed: a busy "
        "machine takes longer, the model is the same.",
    )
    s.add_argument("--out", metavar="DIR", help="model directory (default KETTLE_HOME/models/starter)")
    s.add_argument(
        "--seed",
        type=flags.seed,
        default=SEED,
        help=f"random seed (default {SEED}): the same seed gives the same model",
    )
    s.add_argument("--device", type=flags.device, default="auto", help="auto (default), cpu, cuda or mps")
    s.add_argument("--force", action="store_true", help="replace an existing starter model")
    s.set_defaults(func=starter_command)


def starter_command(args) -> int:
    from data.store import open_store
    from finetune.starter import brew_starter
    from tui.commands.docs import remember

    result = brew_starter(out=args.out, device=args.device, force=args.force, seed=args.seed)
    print(result.summary())
    with open_store() as store:  # what the starter answers grounded questions from (a few seconds)
        remember(store, result.out.name, result.out)
    print("Python's documentation and the starter's lessons are indexed: grounded answers can use them")
    if result.refused:  # the last line: the app shows it as the brew's failure
        print(result.refused)
        return 1
    return 0
