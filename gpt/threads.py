"""How many CPU threads PyTorch should use here and now.

On a CPU that other programs keep busy, more threads are slower, not faster: at every parallel op
OpenMP's threads wait for the one the OS has parked (measured on 2 cores beside one busy loop, the
starter's shape: training 3.5k tok/s on two threads vs 4.6k on one, decoding 542 vs 763; reported
elsewhere as 2-4x with more load). So Kettle counts the cores
this process may use (`os.sched_getaffinity`), subtracts what other processes are keeping busy
(from /proc/stat, less this process's own CPU time), and uses what is left, at least one.

`fit_threads()` decides from the time since its last call (or since this module was imported);
`ThreadFitter` re-decides every few seconds inside a long loop, so that a program started
during a training run is noticed within REFIT_S.

OpenMP's wait policy stays its default (spin briefly, then sleep): PASSIVE waiting would soften
the collapse beside a busy process, but costs an idle machine 10% of training speed and half its
decoding speed (benchmarks/threads.py); with one thread there is nothing to wait for anyway.
"""

from __future__ import annotations

import os
import time

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# A core counts as taken by others when they keep it this busy (a browser idling takes ~0.1).
BUSY_CORE = 0.6
REFIT_S = 5.0


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _system_busy_seconds() -> float | None:
    """CPU seconds all processes have spent running since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class LoadSample:
    """A reading of the system's and this process's CPU time, to compare a later one with."""

    def __init__(self):
        self.wall = time.monotonic()
        self.system = _system_busy_seconds()
        self.own = time.process_time()

    def busy_elsewhere(self, since: "LoadSample") -> float | None:
        """Cores kept busy by other processes between `since` and this reading."""
        wall = self.wall - since.wall
        if self.system is None or since.system is None or wall < 0.05:
            return None
        others = (self.system - since.system) - (self.own - since.own)
        return max(0.0, others / wall)


def threads_for(cores: int, busy_elsewhere: float | None) -> int:
    """Threads to use on `cores` usable cores while others keep `busy_elsewhere` cores busy."""
    if busy_elsewhere is None:
        return cores
    taken = int(busy_elsewhere + (1 - BUSY_CORE))  # a core counts once it is BUSY_CORE busy
    return max(1, min(cores, (os.cpu_count() or cores) - taken))


MIN_WINDOW_S = 0.2
_last = LoadSample()
_last_threads: int | None = None


def fit_threads() -> int:
    """Threads for work that starts now, judged on the load since the previous decision; within
    MIN_WINDOW_S of it (too short to measure) that decision stands; a first call sooner than
    that after import waits for the window to fill."""
    global _last, _last_threads
    now = LoadSample()
    if now.wall - _last.wall < MIN_WINDOW_S:
        if _last_threads is not None:
            return _last_threads
        time.sleep(MIN_WINDOW_S - (now.wall - _last.wall))
        now = LoadSample()
    _last_threads = threads_for(usable_cores(), now.busy_elsewhere(_last))
    _last = now
    return _last_threads


class ThreadFitter:
    """Keeps torch's thread count fitted to the machine during a long loop:

        with ThreadFitter(device.type == "cpu") as threads:
            while training:
                threads.update()   # every REFIT_S seconds: re-decided from the load since then
                ...

    It never uses more threads than torch was set to on entry (OMP_NUM_THREADS, or an embedder's
    set_num_threads: a cap the user chose, which also keeps a run's float sums in one order).
    On leaving, the thread count it found is restored."""

    def __init__(self, enabled: bool = True):
        import torch

        self.enabled = enabled
        self.torch = torch
        self.threads = self.before = torch.get_num_threads()
        self._since = LoadSample()

    def __enter__(self) -> "ThreadFitter":
        if self.enabled:
            self.threads = min(fit_threads(), self.before)
            self.torch.set_num_threads(self.threads)
            self._since = LoadSample()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.torch.set_num_threads(self.before)

    def update(self) -> int:
        if not self.enabled or time.monotonic() - self._since.wall < REFIT_S:
            return self.threads  # the training step's hot path: no /proc read between refits
        now = LoadSample()
        if now.wall - self._since.wall >= REFIT_S:
            threads = threads_for(min(usable_cores(), self.before), now.busy_elsewhere(self._since))
            self._since = now
            if threads != self.threads:
                self.threads = threads
                self.torch.set_num_threads(threads)
        return self.threads
