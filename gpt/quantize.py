"""Weights for decoding on the CPU: fp32 ones read by the fastest kernel at hand
(decoding_layout, always), int8 ones (`--quantize int8`, the app's "quantize" setting).

At batch 1 a linear layer is a matrix-vector product, bound by how fast its weight streams from
memory. PyTorch's CPU kernel (MKL's sgemv) reads nn.Linear's [out, in] weight at 10-20 GB/s on
one thread of this project's CPU; gpt.native's kernel, built for the machine, at 24-32 (on one
thread: PyTorch's on two was slower still), and it reads them once for up to NATIVE_ROWS rows.
So decoding multiplies by it (GPT-2 124M decoded 1.5x as fast, see benchmarks/llama_cpp.py), a
prompt by PyTorch's. Where there is no native kernel PyTorch's runs for every row, with widening
and square layers' weights stored transposed, [in, out], which it reads faster: GPT-2 124M's
attention input (2,304 x 768, twelve layers' weights from memory) 14.0 -> 20.3 GB/s, a 4 x 256
model's output head with GPT-2's vocabulary (51 MB) 4.6 -> 1.8 ms a token; a narrowing layer
(the MLP's 768 x 3,072 projection) the other way, 19.2 -> 14.6, so it keeps its layout.

Decoding one token reads every weight once, so at batch 1 its speed is the memory bandwidth over
the weights' bytes: int8 weights are a quarter of fp32's. Every nn.Linear of the model, the
output head included, is replaced by an Int8Linear: the weight quantized symmetrically with one
scale per output row (8 bits). Up to NATIVE_ROWS rows (decoding) are multiplied by gpt.native's
int8 kernel: each weight widened to fp32 in a register, the activations kept in fp32 (weight-only
int8, 3-4x closer to fp32's product than quantizing the activations too), the whole step in one
native call (on this project's CPUs 1.5-1.9x llama.cpp's q8_0 at GPT-2 124M and 4 x 256,
benchmarks/llama_cpp.py). A prompt, and every row where there is no native kernel, goes through
PyTorch's int8 kernels (fbgemm/oneDNN through quantized::linear_dynamic), which quantize the
activations per call to 8 bits with their own range (dynamic quantization). The token and
position embeddings stay fp32: a lookup reads one row, not the table. The weights come from the
model directory's fp32 (or bf16) safetensors as they are; nothing is stored quantized.
benchmarks/quantize.py measures speed and held-out perplexity against fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.errors import KettleError
from gpt.native import int8_linear_kernel, linear_kernel

MODES = ("int8",)


def check_mode(mode: str | None, device: torch.device | str, *, where: str = "--quantize") -> None:
    """A KettleError unless `mode` is None or one of MODES on a device that runs it."""
    if mode is None:
        return
    if mode not in MODES:
        raise KettleError(f"{where} must be one of {', '.join(MODES)}, got {mode!r}")
    if torch.device(device).type != "cpu":
        raise KettleError(
            f"{where} {mode} runs on the CPU only (PyTorch's int8 kernels), not on {torch.device(device)}"
        )


# Up to this many rows (a decoding step, a speculative round's check, the service's batch) go
# through the native kernel, which reads the weights once for all of them; more (a prompt) through
# PyTorch's matrix product, which is faster there (at 16 rows the native kernel still was 1.3-1.6x).
NATIVE_ROWS = 16


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights (see the module docstring)."""

    def __init__(self, linear: nn.Linear, native=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.native = native  # gpt.native's int8 kernel, or None
        weight = linear.weight.detach().float()
        # Symmetric (zero point 0) per row: a row's largest weight maps to 127.
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        bias = None if linear.bias is None else linear.bias.detach().float()
        # Plain attributes, not buffers: nothing quantized is ever saved.
        self.weight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8) if native else None
        self.scale, self.bias = (scale, bias) if native else (None, None)
        with warnings.catch_warnings():
            # quantize_per_channel warns that quantized tensors are deprecated; it is the only
            # way into linear_prepack, and the quantized tensor is dropped once packed.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.native is not None and rows.size(0) <= NATIVE_ROWS and not torch.compiler.is_compiling():
            y = self.native(rows.contiguous(), self.weight, self.scale, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        # reduce_range: 7-bit activations, so that kernels without VNNI (AVX2: u8 x s8 pairs
        # summed in int16) cannot saturate; the weights keep all 8 bits.
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def extra_repr(self) -> str:
        kernel = ", native" if self.native else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{kernel}"


class DecodeLinear(nn.Module):
    """nn.Linear for decoding on the CPU in fp32, for inference only (see the module docstring)."""

    def __init__(self, linear: nn.Linear, native):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.native = native  # gpt.native's kernel, or None
        self.scale = None  # fp32 weights (gpt.native's step reads an int8 layer's scales here)
        weight = linear.weight.detach()
        self.transposed = native is None and self.out_features >= self.in_features
        self.weight = nn.Parameter(weight.t().contiguous() if self.transposed else weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        # a compiled step (Engine.compile_decode) traces PyTorch's ops, not a foreign call
        if self.native is not None and rows.size(0) <= NATIVE_ROWS and not torch.compiler.is_compiling():
            y = self.native(rows.contiguous(), self.weight, self.bias)
        elif not self.transposed:
            y = F.linear(rows, self.weight, self.bias)
        elif self.bias is None:
            y = rows @ self.weight
        else:
            y = torch.addmm(self.bias, rows, self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "native" if self.native else "transposed" if self.transposed else "torch"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kernel}"


def decoding_layout(model: nn.Module) -> nn.Module:
    """Every nn.Linear of a GPT on the CPU in fp32 as a DecodeLinear, in place, for decoding
    only (no gradients). A tied head stored transposed is read by the embedding too, through a
    transposed view (a lookup reads a strided row): one copy of the table, as before."""
    native = linear_kernel()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, DecodeLinear(child, native))
    if model.config.tie_embeddings:
        head = model.lm_head
        model.wte.weight = nn.Parameter(head.weight.t(), requires_grad=False) if head.transposed else head.weight
    return model.eval()


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear of `model` (on the CPU, in eval mode) by its `mode` version, in
    place; the fp32 weights they held are let go (a tied head's stay: they are the embedding)."""
    check_mode(mode, next(model.parameters()).device)
    native = int8_linear_kernel()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child, native))
    return model.eval()
