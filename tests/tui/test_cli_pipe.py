"""A `kettle` command whose reader stops early (`kettle export-hf ... | head`) ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_closed_stdout_ends_the_command_quietly(tiny_model_dir, tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command prints its first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tui.cli", "export-hf", str(tiny_model_dir), str(tmp_path / "out")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")
    assert (tmp_path / "out" / "model.safetensors").exists()  # the work itself was done
