"""Where a model runs and in what number format: one rule for serving and for training.

    device = pick_device("auto")      # CUDA, else Apple's MPS, else the CPU
    dtype = pick_dtype(device)        # bf16 where the GPU has it, else fp32
    with autocast(device): ...        # training: the matmuls in that dtype, the weights in fp32

A server loads its weights in `pick_dtype(device)`; a training loop keeps fp32 weights (the
optimizer's small updates would vanish in bf16) and autocasts its forward pass to the same dtype,
so the two never disagree about which devices compute in bf16.
"""

from __future__ import annotations

import contextlib

import torch

from gpt.errors import KettleError

# Dense peak TFLOPS of tensor-core bf16 (fp16 where there is no bf16), by device-name substring;
# the first match wins, so more specific names come first. MFU is measured against these.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A6000", 154.8),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("4090", 165.2),
    ("3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA, else Apple's MPS, else the CPU (None or "auto"); or the device asked for, if it exists."""
    if device is not None and device != "auto":
        try:
            device = torch.device(device)
        except RuntimeError:
            raise KettleError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KettleError("device cuda was asked for, but PyTorch sees no CUDA GPU")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise KettleError("device mps was asked for, but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it (half the memory traffic, same range as fp32), else fp32
    (CPU bf16 is slower than fp32)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device):
    """Training's mixed precision: the forward pass in `pick_dtype(device)` with fp32 weights;
    nothing at all where that is fp32."""
    dtype = pick_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def allow_tf32(device: torch.device) -> None:
    """fp32 matmuls on TF32 tensor cores (Ampere and later GPUs): what autocast leaves in fp32
    (the optimizer, the loss) runs several times faster for a precision training does not need."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (PEAK_TFLOPS), or None when it is not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None
