"""Flag types: each flag declares its type and range once, where it is added, and argparse checks
it while parsing, so a bad value stops the command before it touches anything (no run row, no
directory, no model loaded) with one line naming the flag, and exit status 2.

Only the standard library here: `kettle --help` builds every parser, and must stay instant.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer flag in [low, high] (an open end where None)."""
    allowed = "an integer" + (
        f" in {low}..{high}"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
        if high is not None
        else ""
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def number(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite number flag between low and high (excluded where `*_open`)."""
    if low is not None and high is not None:
        allowed = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"a number {'>' if low_open else '>='} {low}"
    elif high is not None:
        allowed = f"a number {'<' if high_open else '<='} {high}"
    else:
        allowed = "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if (
            not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))
        ):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


positive_int = integer(1)  # steps, sizes, lengths, counts that must not be zero
count = integer(0)  # zero or more (warm-up steps, replay examples)
record_id = integer(1)  # store ids (runs, snapshots) start at 1
port = integer(0, 65535)  # 0: the system picks a free port
seed = integer(0, 2**64 - 1)  # what torch.manual_seed takes
positive = number(0, low_open=True)  # learning rates, LoRA alpha, seconds
share = number(0, 1, high_open=True)  # dropout and held-out shares: [0, 1)


def device(text: str) -> str:
    """A --device this machine has (auto, cpu, cuda, cuda:N, mps), as gpt.device.pick_device
    decides it."""
    if text == "auto":  # the default of several commands: no torch import to parse it
        return text
    from gpt.device import pick_device
    from gpt.errors import KettleError

    try:
        pick_device(text)
    except KettleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def sampling(name: str, kind: type) -> Callable[[str], int | float]:
    """A sampling flag (--top-p ...): a `kind` number in the range gpt.sampling.SamplingParams
    allows for its field `name`, where those ranges live (the HTTP API checks the same)."""
    parse_kind = integer() if kind is int else number()

    def parse(text: str) -> int | float:
        value = parse_kind(text)
        from gpt.errors import KettleError
        from gpt.sampling import SamplingParams

        try:
            SamplingParams().replace(**{name: value})
        except KettleError as exc:  # "top_p must be in (0, 1], got 2.0"
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name} ")) from None
        return value

    return parse


def quantize(text: str) -> str:
    """A --quantize mode gpt.quantize implements."""
    from gpt.quantize import MODES

    if text not in MODES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(MODES)}, got {text!r}")
    return text


def add_quantize(parser: argparse.ArgumentParser) -> None:
    """--quantize, for the commands that load a model to generate with (generate, serve)."""
    parser.add_argument(
        "--quantize",
        type=quantize,
        metavar="MODE",
        help="int8: 8-bit weights through PyTorch's int8 kernels, about 2x faster "
        'decoding on the CPU (CPU only; config.json "quantize" for the app)',
    )
