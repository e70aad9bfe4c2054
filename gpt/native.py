"""Kettle's native CPU kernels (gpt/kernels.c), built on first use with the machine's C compiler.

The source is compiled for this CPU (-march=native) into KETTLE_HOME/cache/kernels, once per
source and CPU, atomically (a half-written library is never loaded), and loaded with ctypes: no
Python headers, no PyTorch headers, so a build takes well under a second. Where there is no C
compiler, the build fails, or the CPU has neither AVX-512 nor AVX2 with FMA, `linear_kernel()`
and `native_step()` are None and callers keep PyTorch's kernels: the kernels make decoding
faster, never possible. `KETTLE_NATIVE=0` turns them off (to compare, or to rule them out).
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

from gpt.files import fsync_dir, kettle_home

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
            [compiler, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(out), str(src), "-lm"],
            capture_output=True,
            timeout=120,
        )
        if done.returncode:
            raise OSError(done.stderr.decode(errors="replace").strip().splitlines()[-1:] or "the build failed")
        with open(out, "rb") as f:
            os.fsync(f.fileno())
        os.replace(out, target)
        fsync_dir(target.parent)


def _target(source: bytes) -> Path:
    """Where the library built from `source` for this CPU lives."""
    digest = hashlib.sha256(source + _cpu_signature().encode()).hexdigest()[:16]
    return kettle_home() / "cache" / "kernels" / f"kernels-{digest}.so"


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KETTLE_NATIVE", "1") == "0":
        return None
    source = SOURCE.read_bytes()
    target = _target(source)
    try:
        if not target.exists():
            _build(source, target)
        try:
            library = ctypes.CDLL(str(target))
        except OSError:  # damaged (a disk that lost it): built again, once
            target.unlink(missing_ok=True)
            _build(source, target)
            library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    if library.kettle_simd() == 0:  # a plain loop: PyTorch's kernels are faster
        return None
    library.kettle_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    library.kettle_linear.restype = None
    library.kettle_linear_q8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3
    library.kettle_linear_q8.restype = None
    library.kettle_step.restype = ctypes.c_int
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


def int8_linear_kernel():
    """`linear(x, weight, scale, bias) -> y`: the same for int8 weights [m, n] (contiguous) whose
    row i stands for weight[i] * scale[i] (scale: fp32 [m]), x kept in fp32; or None."""
    library = _library()
    if library is None:
        return None
    run = library.kettle_linear_q8

    def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        (k, n), m = x.shape, weight.size(0)
        y = torch.empty(k, m, dtype=torch.float32)
        bias_at = None if bias is None else bias.data_ptr()
        run(weight.data_ptr(), scale.data_ptr(), x.data_ptr(), bias_at, y.data_ptr(), m, n, k)
        return y

    return linear


class _Dims(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_long)
        for name in ("n_layer", "n_embd", "n_head", "hidden", "vocab", "max_len", "cache_layer_stride")
    ] + [("eps", ctypes.c_float)]


# A block's tensors in the order kettle_step reads them (its enum).
_BLOCK = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


class NativeStep:
    """A decoding step of `model` for a few rows on the keys and values `k`, `v` ([n_layer,
    rows, n_head, max_len, head_dim] as gpt.model's KVCache and gpt.batching's cache hold them)
    in one native call (kernels.c's kettle_step): the logits [rows, vocab] after each row's token
    at its position, its keys and values written there (row r in the cache's row r). Build it
    with `native_step`, which says where it cannot run."""

    def __init__(self, library: ctypes.CDLL, model, k: torch.Tensor, v: torch.Tensor):
        config = model.config
        self._run, self.k, self.max_len = library.kettle_step, k, k.size(3)
        self._tensors = []  # kept alive: the native side holds their addresses

        def address(t: torch.Tensor | None) -> ctypes.c_void_p:
            if t is not None:
                self._tensors.append(t)
            return ctypes.c_void_p(None if t is None else t.data_ptr())

        blocks = [_parameter(block, name) for block in model.h for name in _BLOCK]
        self._weights = (ctypes.c_void_p * len(blocks))(*[address(t) for t in blocks])
        scales = [_scale(block, name) for block in model.h for name in _BLOCK]
        self._scales = (ctypes.c_void_p * len(scales))(*[address(t) for t in scales])
        self._dims = _Dims(
            config.n_layer,
            config.n_embd,
            config.n_head,
            config.mlp_width,
            model.lm_head.out_features,
            self.max_len,
            k.stride(0),
            model.h[0].ln_1.eps,
        )
        self._row_floats = 6 * config.n_embd + config.mlp_width
        self._scratch = torch.empty(0)
        head = model.lm_head
        tables = (model.wte.weight, model.wpe.weight, model.ln_f.weight, model.ln_f.bias, head.weight, head.scale)
        self._arguments = [address(t) for t in tables] + [address(k), address(v), ctypes.c_long(k.stride(1))]

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int] | None = None) -> torch.Tensor:
        """`slots`: the cache row of each token (default: token r in row r); tokens in one slot at
        consecutive positions attend to each other causally (a speculative round's check)."""
        rows = len(tokens)
        slots = list(range(rows)) if slots is None else slots
        if not rows or len(positions) != rows or len(slots) != rows or not all(0 <= s < self.k.size(1) for s in slots):
            raise ValueError(f"{rows} rows in slots {slots} of a cache of {self.k.size(1)}")
        if not all(0 <= p < self.max_len for p in positions):
            raise ValueError(f"KV cache holds {self.max_len} positions, {max(positions) + 1} needed")
        if self._scratch.numel() < rows * self._row_floats + self.max_len:
            self._scratch = torch.empty(rows * self._row_floats + self.max_len)
        logits = torch.empty(rows, self._dims.vocab)
        self._run(
            ctypes.byref(self._dims),
            self._weights,
            self._scales,
            *self._arguments,
            (ctypes.c_long * rows)(*tokens),
            (ctypes.c_long * rows)(*positions),
            (ctypes.c_long * rows)(*slots),
            ctypes.c_long(rows),
            ctypes.c_void_p(logits.data_ptr()),
            ctypes.c_void_p(self._scratch.data_ptr()),
        )
        return logits


def _parameter(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The parameter at the dotted `name`, or None where there is none (a layer without a bias)."""
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner), attribute)


def _scale(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The row scales of the int8 layer whose weight is at the dotted `name`, or None (fp32
    weights, or not a layer's weight)."""
    owner, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(owner), "scale", None) if attribute == "weight" else None


def native_step(model, k: torch.Tensor, v: torch.Tensor) -> NativeStep | None:
    """The whole decoding step in one native call on the cache tensors `k`, `v` (see
    NativeStep), where it computes exactly gpt.model's: fp32 on the CPU, every linear layer on
    the native kernel in nn.Linear's layout (gpt.quantize's decoding layout, or its int8 weights;
    not a LoRA wrapper), LayerNorms, contiguous cache tensors. Else None: the step runs through PyTorch
    (the native kernel still multiplies)."""
    library = _library()
    if library is None or k.dtype != torch.float32 or k.device.type != "cpu":
        return None
    linears = [m for block in model.h for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
    # gpt.quantize's DecodeLinear or Int8Linear on these kernels (it imports this module: named by
    # what they hold)
    if not all(getattr(m, "native", None) is not None for m in [*linears, model.lm_head]):
        return None
    norms = [model.ln_f, *(n for block in model.h for n in (block.ln_1, block.ln_2))]
    if not all(type(n) is torch.nn.LayerNorm and n.weight is not None for n in norms):
        return None
    if not (k.is_contiguous() and v.is_contiguous() and k.shape == v.shape and k.size(1) >= 1):
        return None
    if len({n.eps for n in norms}) != 1 or model.wte.weight.dtype != torch.float32:
        return None
    return NativeStep(library, model, k, v)
