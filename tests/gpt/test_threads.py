"""Thread counts fitted to the machine: the cores this process may use, less what others keep busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gpt import threads


def test_threads_leave_out_the_cores_others_keep_busy(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert threads.threads_for(2, 0.0) == 2
    assert threads.threads_for(2, 0.2) == 2  # a browser idling does not take a core
    assert threads.threads_for(2, 0.9) == 1  # one busy loop does
    assert threads.threads_for(2, 3.0) == 1  # never fewer than one
    assert threads.threads_for(1, 0.0) == 1  # never more than the affinity allows
    assert threads.threads_for(2, None) == 2  # no /proc/stat: every usable core
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert threads.threads_for(2, 5.0) == 2  # others busy on cores this process cannot use


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_a_busy_process_beside_us_is_seen_and_our_own_work_is_not():
    before = threads.LoadSample()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.5:  # this process busy: not "elsewhere"
        pass
    own_only = threads.LoadSample().busy_elsewhere(before)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        before = threads.LoadSample()
        time.sleep(0.6)
        with_busy = threads.LoadSample().busy_elsewhere(before)
    finally:
        busy.kill()
    # Another test worker (or anything else) may run beside this one; the busy loop adds a
    # whole core to it where a core is free, and fills what is left where none is.
    assert with_busy >= 0.8
    spare = max(0.0, (os.cpu_count() or 1) - own_only)
    assert with_busy - own_only >= 0.5 * min(1.0, spare)


def test_the_fitter_applies_its_choice_to_torch_and_restores_it(monkeypatch):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(4)  # the cap the fitter stays under
    monkeypatch.setattr(threads, "fit_threads", lambda: 3)
    monkeypatch.setattr(threads, "threads_for", lambda cores, busy: 2)
    monkeypatch.setattr(threads, "REFIT_S", 0.0)
    with threads.ThreadFitter() as fitter:
        assert torch.get_num_threads() == 3 == fitter.threads
        time.sleep(0.06)
        assert fitter.update() == 2 == torch.get_num_threads()
    assert torch.get_num_threads() == 4
    torch.set_num_threads(1)
    with threads.ThreadFitter() as fitter:  # fitted to 3, capped at the 1 the process was set to
        assert fitter.threads == 1 == torch.get_num_threads()
    with threads.ThreadFitter(enabled=False) as fitter:
        assert fitter.update() == 1 == torch.get_num_threads()
    torch.set_num_threads(before)
