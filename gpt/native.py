"""Kettle's native CPU kernels (gpt/kernels.c), built on first use with the machine's C compiler.

The source is compiled for this CPU (-march=native) into KETTLE_HOME/cache/kernels, once per
source and CPU, atomically (a half-written library is never loaded), and loaded with ctypes: no
Python headers, no PyTorch headers, so a build takes well under a second. Where there is no C
compiler, the build fails, or the CPU has neither AVX-512 nor AVX2 with FMA, `gemv_kernel()` is
None and callers keep PyTorch's kernels: the kernels make decoding faster, never possible.
`KETTLE_NATIVE=0` turns them off (to compare, or to rule them out).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from gpt.files import kettle_home

SOURCE = Path(__file__).with_name("kernels.c")


def _cpu_signature() -> str:
    """What the build depends on besides the source: the machine, its CPU model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join([platform.machine(), *lines])


def _build(source: bytes, target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / target.name
        src.write_bytes(source)
        done = subprocess.run(
            [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(out), str(src)],
            capture_output=True,
            timeout=120,
        )
        if done.returncode:
            raise OSError(done.stderr.decode(errors="replace").strip().splitlines()[-1:] or "the build failed")
        os.replace(out, target)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KETTLE_NATIVE", "1") == "0":
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + _cpu_signature().encode()).hexdigest()[:16]
    target = kettle_home() / "cache" / "kernels" / f"kernels-{digest}.so"
    try:
        if not target.exists():
            _build(source, target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    if library.kettle_simd() == 0:  # a plain loop: PyTorch's kernels are faster
        return None
    library.kettle_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    library.kettle_linear.restype = None
    return library


def linear_kernel():
    """`linear(x, weight, bias) -> y`: F.linear for a few rows x [k, n] (fp32, contiguous, on the
    CPU; weight [m, n] as nn.Linear stores it, contiguous; bias [m] or None), on the calling
    thread; or None where the native kernels are not available (see the module docstring)."""
    library = _library()
    if library is None:
        return None
    run = library.kettle_linear

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        (k, n), m = x.shape, weight.size(0)
        y = torch.empty(k, m, dtype=torch.float32)
        run(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), m, n, k)
        return y

    return linear
