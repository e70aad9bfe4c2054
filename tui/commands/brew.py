"""`kettle brew starter`: an offline starter model from text that ships with Python."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("brew", help="make a model from scratch, offline")
    brew_sub = p.add_subparsers(dest="brew_command", metavar="COMMAND", required=True)
    s = brew_sub.add_parser(
        "starter", help="train a small model on Python's own documentation (minutes, offline)",
        description="Builds a corpus from Python's language reference and standard-library "
                    "docstrings, trains a tokenizer and a small GPT on it, and registers the "
                    "result as a model (the active one if none is active).")
    s.add_argument("--out", metavar="DIR", help="model directory (default KETTLE_HOME/models/starter)")
    s.add_argument("--minutes", type=float, help="time budget for training (default: fits 10 minutes "
                                                  "in all on 2 CPU cores)")
    s.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    s.add_argument("--force", action="store_true", help="replace an existing starter model")
    s.set_defaults(func=starter_command)


def starter_command(args) -> int:
    from gpt.starter import brew_starter

    result = brew_starter(out=args.out, minutes=args.minutes, device=args.device, force=args.force)
    print(result.summary())
    return 0
