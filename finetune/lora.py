"""LoRA: low-rank adapters on a frozen GPT's linear layers.

A wrapped layer computes `base(x) + scale * B(A(dropout(x)))` with `A` [rank, in], `B` [out, rank]
and `scale = alpha / rank`. `B` starts at zero, so a fresh adapter leaves the model unchanged.

An adapter is saved on its own, small, as a directory:

    adapter.safetensors   only the A and B matrices ("h.0.attn.c_attn.lora_A", ...)
    adapter.json          {"kettle_adapter": 1, "lora": LoRAConfig, "base_config": GPTConfig}

and can be merged into a full model directory (W + scale * B @ A), which then needs no LoRA code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from data.files import atomic_directory
from finetune import read_manifest
from gpt.checkpoint import save_weights
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.model import GPT

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FORMAT = 1
# The linear layers of a block, by their name inside it.
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    # No dropout by default: the user wants their corrections back word for word, and dropout on
    # the adapter's input slowed that most (on the starter: 3 of 20 back after 60 epochs, 9 without).
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise KettleError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise KettleError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise KettleError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise KettleError(f"LoRA targets must be among {', '.join(TARGETS)}, got "
                              f"{', '.join(self.targets) or 'none'}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "LoRA config") -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise KettleError(f"{source}: expected an object with keys {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise KettleError(f"{source}: {exc}") from None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.base = base
        self.scale = config.scale
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, **factory))
        # A as nn.Linear initialises its weight; B at zero makes the adapter start as a no-op.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


def _targets(model: nn.Module, config: LoRAConfig) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, full name) of every layer LoRA wraps."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in config.targets):
            parent_name, _, attr = name.rpartition(".")
            found.append((model.get_submodule(parent_name), attr, name))
    return found


def apply_lora(model: GPT, config: LoRAConfig) -> GPT:
    """Freeze every weight of `model` and wrap its target linears with trainable adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, attr, _name in _targets(model, config):
        # A new module starts in training mode; it must follow the model's (eval: no dropout).
        setattr(parent, attr, LoRALinear(getattr(parent, attr), config).train(model.training))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, named "<layer>.lora_A" / "<layer>.lora_B"."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        state[f"{name}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
    return state


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight and unwrap it, in place: a plain GPT again."""
    for name, layer in lora_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def save_adapter(model: GPT, directory: str | Path, overwrite: bool = False,
                 extra: dict | None = None) -> Path:
    """Write the adapter of a LoRA-wrapped `model` as its own directory, atomically."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise KettleError("this model has no LoRA adapter to save")
    meta = {"kettle_adapter": ADAPTER_FORMAT, "lora": config.to_dict(),
            "base_config": model.config.to_dict(), **(extra or {})}
    try:
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_weights(adapter_state(model), tmp / ADAPTER_WEIGHTS)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        raise KettleError(f"{directory}: already exists (choose another directory)") from None
    return Path(directory)


def read_adapter_meta(directory: str | Path) -> dict:
    return read_manifest(Path(directory) / ADAPTER_CONFIG, "kettle_adapter", ADAPTER_FORMAT,
                         "a Kettle LoRA adapter")


def load_adapter(model: GPT, directory: str | Path) -> GPT:
    """Wrap `model` with the adapter saved in `directory`, after checking it fits the model."""
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    config = LoRAConfig.from_dict(meta.get("lora"), source=str(directory / ADAPTER_CONFIG))
    base_config = GPTConfig.from_dict(meta.get("base_config"), source=str(directory / ADAPTER_CONFIG))
    if base_config != model.config:
        raise KettleError(f"{directory}: the adapter was trained on a model of another shape "
                          f"({base_config.n_layer} layers, {base_config.n_embd} wide, vocabulary "
                          f"{base_config.vocab_size}) than this one")
    apply_lora(model, config)
    expected = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    path = directory / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(expected):
                raise KettleError(f"{path}: tensors do not match the adapter config")
            tensors = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as exc:
        raise KettleError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    except FileNotFoundError:
        raise KettleError(f"{path}: missing") from None
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            t = tensors[f"{name}.{part}"]
            if tuple(t.shape) != expected[f"{name}.{part}"]:
                raise KettleError(f"{path}: tensor {name}.{part} has shape {list(t.shape)}")
            getattr(layer, part).data.copy_(t)
    return model


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  overwrite: bool = False) -> Path:
    """Base model directory + adapter directory -> a full model directory."""
    from gpt.checkpoint import load_model, save_model

    model, tokenizer = load_model(base_dir)
    load_adapter(model, adapter_dir)
    return save_model(merge_lora(model), out_dir, tokenizer, overwrite=overwrite)
