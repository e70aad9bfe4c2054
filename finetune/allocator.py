"""glibc's allocator set up for training on the CPU (Linux; elsewhere nothing changes).

A training step frees and allocates GBs of activations and gradients in blocks of a few MB, and
glibc serves them from its heap, where freed memory stays with the process (RSS) to be reused.
Two things make it hold far more than the step needs at its peak (GPT-2 124M at 4x256 tokens:
2.6-2.7 GB above the process's start for 2.1 GB in use, 2.4 GB with both settings below):

- blocks of over 32 MB get an mmap of their own, unmapped when freed, so each step page-faults
  them in again (~375k faults, 11% of a GPT-2 124M step on 2 cores): keep_freed_memory() puts
  them on the heap and keeps up to 1 GiB of freed memory there, as tcmalloc or jemalloc would;
- small freed blocks wait in per-thread caches (tcache) and fast bins, still marked in use, so
  the free space around them is never merged: hundreds of them cut the heap's free memory into
  pieces too small for the next step's blocks, and the heap grows instead. Fast bins can be
  turned off at run time (mallopt); tcache only by GLIBC_TUNABLES when the process starts, which
  is why Kettle's processes start with it (tui.cli.entry, finetune.jobs' runs: process_env).
  Small allocations then take glibc's ordinary bins, a few tens of ns more each: nothing next to
  a training step or a decoded token.

This module imports nothing heavy: the command line reads it before it loads torch.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

TUNABLE = "glibc.malloc.tcache_count=0"


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the tunable added to GLIBC_TUNABLES, for a process
    of Kettle's to start with."""
    env = dict(os.environ if env is None else env)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if _glibc() and TUNABLE not in tunables:
        env["GLIBC_TUNABLES"] = ":".join([*tunables, TUNABLE])
    return env


def restart_with_tunable() -> None:
    """Replace this process by the same command started with process_env(), unless it has it
    already (or glibc is not the C library). Call it first thing, before any work: nothing
    done before survives."""
    env = process_env()
    if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.cache
def keep_freed_memory() -> None:
    """The run-time part (see the module docstring): large blocks on the heap, freed memory kept
    up to 1 GiB, no fast bins."""
    if not _glibc():
        return
    libc = ctypes.CDLL("libc.so.6")
    M_MXFAST, M_TRIM_THRESHOLD, M_MMAP_MAX = 1, -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(M_MXFAST, 0)
