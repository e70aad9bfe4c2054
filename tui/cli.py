"""The `kettle` command line. With no subcommand it opens the app.

Each command group lives in a module of `tui.commands` that defines `register(subparsers)`;
heavy imports (torch) happen inside the command functions so that `kettle --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys

from gpt.errors import KettleError

COMMAND_MODULES = [
    "tui.commands.models",
    "tui.commands.generate",
    "tui.commands.serve",
    "tui.commands.pretrain",
    "tui.commands.brew",
    "tui.commands.data",
    "tui.commands.docs",
    "tui.commands.finetune",
]


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every Kettle error is: the usage block it would
    print first is what --help shows. Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kettle",
        description="Chat with, label and fine-tune a GPT trained on your own machine.",
    )
    # Own dests: `kettle serve` has an --api-key of its own.
    parser.add_argument(
        "--server",
        metavar="URL",
        dest="app_server",
        help="with no command: chat through a running `kettle serve` at URL",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        dest="app_api_key",
        help="the API key that server asks for (default: $KETTLE_API_KEY, which keeps the key out of the process list)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is not None and (args.app_server or args.app_api_key):
            parser.error("--server and --api-key are for the app: use them without a command")
        if args.command is None:
            from tui.app import run_app
            from tui.commands.serve import api_key

            return run_app(server=args.app_server, api_key=api_key(args.app_api_key))
        return args.func(args) or 0
    except KettleError as exc:
        print(f"kettle: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a folder that cannot be written: what and where
        if isinstance(exc, BrokenPipeError) and stdout_closed():
            # `kettle ... | head`: the reader has all it wanted. Later writes (Python's own flush
            # at exit included) go nowhere instead of failing again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        where = f": {exc.filename}" if exc.filename else ""
        print(f"kettle: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kettle: interrupted", file=sys.stderr)
        return 130


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return bool(poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), stdout without a descriptor
        return False


def entry() -> None:
    """The `kettle` command (and `python -m tui.cli`): main() in a process started with
    finetune.allocator's setting, so that training holds no more memory than it needs, in this
    process or in the fine-tune jobs and brews it starts. Tests call main() in their own."""
    from finetune.allocator import restart_with_tunable

    restart_with_tunable()
    sys.exit(main())


if __name__ == "__main__":
    entry()
