"""LoRA: low-rank adapters on a frozen GPT's linear layers.

A wrapped layer computes `base(x) + scale * B(A(dropout(x)))` with `A` [rank, in], `B` [out, rank]
and `scale = alpha / rank`. `B` starts at zero, so a fresh adapter leaves the model unchanged.

An adapter is saved on its own, small, as a directory:

    adapter.safetensors   only the A and B matrices ("h.0.attn.c_attn.lora_A", ...)
    adapter.json          {"kettle_adapter": 1, "lora": LoRAConfig, "base_config": GPTConfig}

and, beside them, the same adapter in PEFT's layout for the model `kettle export-hf` writes (a
transformers GPT2LMHeadModel), so `PeftModel.from_pretrained(model, directory)` loads it:

    adapter_model.safetensors   "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", ...
    adapter_config.json         PEFT's LoraConfig: r, lora_alpha, target_modules, fan_in_fan_out

GPT-2's Conv1D keeps its weight as [in, out], but PEFT's lora_A/lora_B are nn.Linear layers on it,
[rank, in] and [out, rank], like Kettle's A and B: the matrices are the same tensors, only renamed.
Kettle's targets ("attn.c_proj") are PEFT target_modules as they are (PEFT matches a suffix).

An adapter can be merged into a full model directory (W + scale * B @ A), which then needs no LoRA
code; a PEFT adapter trained elsewhere on a GPT-2 model is converted to Kettle's layout first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from finetune import read_manifest
from gpt.checkpoint import save_weights
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.files import atomic_directory, check_regular, read_regular_text
from gpt.model import GPT

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"
ADAPTER_FORMAT = 1
# The linear layers of a block, by their name inside it.
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Where PeftModelForCausalLM keeps GPT2LMHeadModel's blocks ("base_model.model." + its names).
PEFT_PREFIX = "base_model.model.transformer."
# A PEFT adapter's tensors Kettle can take: LoRA matrices of a block's linear layers (the
# "transformer." is absent when PEFT wrapped a GPT2Model rather than the LM head model).
PEFT_TENSOR = re.compile(
    r"base_model\.model\.(?:transformer\.)?(h\.\d+\.(" + "|".join(map(re.escape, TARGETS)) + r"))\.(lora_[AB])\.weight"
)
# adapter_config.json keys that do not change what a merge computes from the tensors: bookkeeping,
# which modules to wrap (the tensors say which were), fan_in_fan_out (PEFT forces it on for
# Conv1D either way), initialisation settings (init_lora_weights itself is checked), and settings
# that only act together with one that must be off (layers_pattern, qalora_group_size).
PEFT_INERT = {
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_config",
    "megatron_core",
    "runtime_config",
    "ensure_weight_tying",
    "layers_pattern",
    "qalora_group_size",
}
# Read, with PEFT's defaults: LoRAConfig's rank, alpha and dropout, and rsLoRA's scale.
PEFT_READ = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False}
# Initialisations that leave the base weights as they are (PiSSA, OLoRA, LoftQ... change them, so
# their adapter merged into the original base would be wrong).
PEFT_PLAIN_INIT = (True, False, "gaussian")


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
            raise KettleError(
                f"LoRA targets must be among {', '.join(TARGETS)}, got {', '.join(self.targets) or 'none'}"
            )

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

    def to_peft(self, base: str | None) -> dict:
        """adapter_config.json for PEFT, on the model export-hf writes from the base."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.targets),
            "fan_in_fan_out": True,
            "bias": "none",
            "use_rslora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "inference_mode": True,
        }


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


def save_adapter(model: GPT, directory: str | Path, *, overwrite: bool = False, base: str | None = None) -> Path:
    """Write the adapter of a LoRA-wrapped `model` as its own directory, atomically, in Kettle's
    layout and PEFT's; `base` is the base model's directory, kept in both configs."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise KettleError("this model has no LoRA adapter to save")
    meta = {
        "kettle_adapter": ADAPTER_FORMAT,
        "lora": config.to_dict(),
        "base_config": model.config.to_dict(),
        **({"base": base} if base else {}),
    }
    state = adapter_state(model)
    try:
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_weights(state, tmp / ADAPTER_WEIGHTS)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            save_weights({PEFT_PREFIX + name + ".weight": t for name, t in state.items()}, tmp / PEFT_WEIGHTS)
            (tmp / PEFT_CONFIG).write_text(json.dumps(config.to_peft(base), indent=2) + "\n", encoding="utf-8")
    except FileExistsError:
        raise KettleError(f"{directory}: already exists (choose another directory)") from None
    return Path(directory)


def read_adapter_meta(directory: str | Path) -> dict:
    return read_manifest(
        Path(directory) / ADAPTER_CONFIG, "kettle_adapter", version=ADAPTER_FORMAT, what="a Kettle LoRA adapter"
    )


def is_adapter_dir(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file() or (directory / PEFT_CONFIG).is_file()


def recorded_base(directory: Path) -> str | None:
    """The base model an adapter says it was trained on (Kettle's "base", PEFT's
    base_model_name_or_path), unchecked: a hint for finding it."""
    for name, key in ((ADAPTER_CONFIG, "base"), (PEFT_CONFIG, "base_model_name_or_path")):
        try:
            value = json.loads(read_regular_text(directory / name)).get(key)
        except (OSError, ValueError, RecursionError, AttributeError):
            continue  # loading the adapter says what is wrong with it
        if isinstance(value, str) and value:
            return value
    return None


def load_adapter(model: GPT, directory: str | Path) -> GPT:
    """Wrap `model` with the adapter saved in `directory` (Kettle's, or else PEFT's), after
    checking it fits the model."""
    directory = Path(directory)
    if not is_adapter_dir(directory):
        raise KettleError(
            f"{directory}: not a LoRA adapter (it has neither Kettle's {ADAPTER_CONFIG} nor PEFT's {PEFT_CONFIG})"
        )
    peft = not (directory / ADAPTER_CONFIG).exists()
    config, path, names = _peft_adapter(directory) if peft else _kettle_adapter(model, directory)
    apply_lora(model, config)
    expected = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    if set(names) != set(expected):
        missing = sorted(set(expected) - set(names))
        raise KettleError(
            f"{path}: tensors do not match the model ("
            + (f"no {missing[0]}" if missing else f"unexpected {names[sorted(set(names) - set(expected))[0]]}")
            + ")"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(stored) for name, stored in names.items()}
    except SafetensorError as exc:
        raise KettleError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            t = tensors[f"{name}.{part}"]
            if tuple(t.shape) != expected[f"{name}.{part}"]:
                raise KettleError(
                    f"{path}: tensor {names[f'{name}.{part}']} has shape "
                    f"{list(t.shape)}, this model needs {list(expected[f'{name}.{part}'])}"
                )
            getattr(layer, part).data.copy_(t)
    return model


def _tensor_names(path: Path, hint: str = "") -> list[str]:
    try:
        check_regular(path)  # safetensors would wait forever on a named pipe
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as exc:
        raise KettleError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    except FileNotFoundError:
        raise KettleError(f"{path}: missing{hint}") from None
    except OSError as exc:
        raise KettleError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _kettle_adapter(model: GPT, directory: Path) -> tuple[LoRAConfig, Path, dict[str, str]]:
    """Kettle's adapter: its config, weights file, and tensor names (already Kettle's)."""
    meta = read_adapter_meta(directory)
    config = LoRAConfig.from_dict(meta.get("lora"), source=str(directory / ADAPTER_CONFIG))
    base_config = GPTConfig.from_dict(meta.get("base_config"), source=str(directory / ADAPTER_CONFIG))
    if base_config != model.config:
        raise KettleError(
            f"{directory}: the adapter was trained on a model of another shape "
            f"({base_config.n_layer} layers, {base_config.n_embd} wide, vocabulary "
            f"{base_config.vocab_size}) than this one"
        )
    path = directory / ADAPTER_WEIGHTS
    return config, path, {name: name for name in _tensor_names(path)}


def _peft_adapter(directory: Path) -> tuple[LoRAConfig, Path, dict[str, str]]:
    """A PEFT LoRA adapter for a GPT-2 model, as Kettle's: its config, weights file, and
    {Kettle name: PEFT name} of its tensors. Anything that would make the merge differ from
    PEFT's is refused, naming the key or tensor."""
    source = directory / PEFT_CONFIG
    try:
        data = json.loads(read_regular_text(source))
    except (OSError, ValueError, RecursionError) as exc:
        raise KettleError(f"{source}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise KettleError(f"{source}: expected a JSON object (PEFT's adapter config)")
    if data.get("peft_type") != "LORA":
        raise KettleError(f"{source}: peft_type is {data.get('peft_type')!r}; Kettle merges LoRA adapters only")
    for key, value in data.items():
        plain = (
            key in PEFT_INERT
            or key in PEFT_READ
            or (
                value in (None, "none")
                if key == "bias"
                else value in PEFT_PLAIN_INIT
                if key == "init_lora_weights"
                else not value
            )
        )
        if not plain:
            raise KettleError(f"{source}: {key} is {json.dumps(value)[:60]}; Kettle merges plain LoRA adapters only")
    rank, alpha, dropout, rslora = (data.get(key, default) for key, default in PEFT_READ.items())
    path = directory / PEFT_WEIGHTS
    names, found = {}, set()
    for stored in _tensor_names(
        path,
        " (Kettle reads adapter_model.safetensors, never unpickles adapter_model.bin)"
        if (directory / "adapter_model.bin").exists()
        else "",
    ):
        match = PEFT_TENSOR.fullmatch(stored)
        if match is None:
            raise KettleError(
                f"{path}: tensor {stored} is not a LoRA matrix of a GPT-2 block's "
                f"{', '.join(TARGETS)} (Kettle cannot merge it)"
            )
        names[f"{match[1]}.{match[3]}"] = stored
        found.add(match[2])
    if not names:
        raise KettleError(f"{path}: holds no LoRA tensors")
    try:
        # rsLoRA scales by alpha / sqrt(rank); Kettle by alpha / rank.
        config = LoRAConfig(
            rank=rank,
            alpha=alpha * math.sqrt(rank) if rslora else alpha,
            dropout=dropout,
            targets=tuple(t for t in TARGETS if t in found),
        )
    except (KettleError, TypeError, ValueError) as exc:
        raise KettleError(f"{source}: {exc}") from None
    return config, path, names


def merge_adapter(
    base_dir: str | Path, adapter_dir: str | Path, *, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Base model directory + adapter directory -> a full model directory."""
    from gpt.checkpoint import load_model, save_model

    model, tokenizer = load_model(base_dir)
    load_adapter(model, adapter_dir)
    return save_model(merge_lora(model), out_dir, tokenizer=tokenizer, overwrite=overwrite)
