"""int8 weights for decoding on the CPU (`--quantize int8`, the app's "quantize" setting).

Decoding one token reads every weight once, so at batch 1 its speed is the memory bandwidth over
the weights' bytes: int8 weights are a quarter of fp32's. Every nn.Linear of the model, the
output head included, is replaced by an Int8Linear: the weight quantized symmetrically with one
scale per output row (8 bits), the activations quantized per call to 8 bits with their own
range (dynamic quantization), multiplied by PyTorch's own int8 kernels (fbgemm/oneDNN through
quantized::linear_dynamic). The token and position embeddings stay fp32: a lookup reads one row,
not the table. The weights come from the model directory's fp32 (or bf16) safetensors as they
are; nothing is stored quantized. benchmarks/quantize.py measures speed and held-out perplexity
against fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from gpt.errors import KettleError

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


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights in the kernel's packed layout (see the module docstring)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        # Symmetric (zero point 0) per row: a row's largest weight maps to 127.
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():
            # quantize_per_channel warns that quantized tensors are deprecated; it is the only
            # way into linear_prepack, and the quantized tensor is dropped once packed.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8
            )
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so that kernels without VNNI (AVX2: u8 x s8 pairs
        # summed in int16) cannot saturate; the weights keep all 8 bits.
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear of `model` (on the CPU, in eval mode) by its `mode` version, in
    place; the fp32 weights they held are let go (a tied head's stay: they are the embedding)."""
    check_mode(mode, next(model.parameters()).device)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model.eval()
