"""Model configuration: one dataclass and the named presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from gpt.errors import KettleError
from gpt.files import read_regular_text

# The most weights a config may describe: over 600 times GPT-2 XL's 1.6 billion. A config.json
# past it is a typo or an attack, and building even a storage-less model of it overflows
# PyTorch's size arithmetic (a RuntimeError) or tries to allocate terabytes.
MAX_WEIGHTS = 10**12


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    # GPT-2 has biases in its attention projections; they are needed to load its weights.
    qkv_bias: bool = True
    # GPT-2 ties the output head to the token embedding. An untied head is the book's GPTModel:
    # its own output matrix, and embeddings initialised N(0, 1) as PyTorch does by default, which
    # lets a model trained from scratch on a small text memorise it far sooner (chapter 5).
    tie_embeddings: bool = True
    # The MLP's hidden width (Hugging Face's n_inner); None is GPT-2's 4 * n_embd.
    n_inner: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KettleError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise KettleError(f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and (
            not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool) or self.n_inner <= 0
        ):
            raise KettleError(f"config: n_inner must be a positive integer or null, got {self.n_inner!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise KettleError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise KettleError(f"config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.weight_count > MAX_WEIGHTS:
            sizes = ", ".join(
                f"{name} {getattr(self, name)}" for name in ("vocab_size", "context_length", "n_layer", "n_embd")
            )
            raise KettleError(
                f"config: {sizes} make a model of about {self.weight_count:.1e} weights; "
                f"Kettle builds at most {MAX_WEIGHTS:.0e}"
            )

    @property
    def weight_count(self) -> int:
        """The weights of the model's matrices (embeddings, attention, MLP, an untied head): all
        but its biases and norms, counted without building it."""
        block = 4 * self.n_embd**2 + 2 * self.n_embd * self.mlp_width
        embeddings = (self.vocab_size * (1 if self.tie_embeddings else 2) + self.context_length) * self.n_embd
        return embeddings + self.n_layer * block

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def replace(self, **changes) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "GPTConfig":
        if not isinstance(data, dict):
            raise KettleError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KettleError(f"{source}: unknown config keys {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise KettleError(f"{source}: {exc}") from None
        except KettleError as exc:  # "config: n_layer must be ...": name the file instead
            raise KettleError(f"{source}: {str(exc).removeprefix('config: ')}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "GPTConfig":
        path = Path(path)
        try:
            data = json.loads(read_regular_text(path))
        except FileNotFoundError:
            raise KettleError(f"{path}: config file not found") from None
        except RecursionError:
            raise KettleError(f"{path}: cannot read config (JSON nested too deeply)") from None
        except (OSError, ValueError) as exc:  # ValueError: bad JSON or UTF-8
            raise KettleError(f"{path}: cannot read config ({exc})") from None
        return cls.from_dict(data, source=str(path))


PRESETS: dict[str, GPTConfig] = {
    # GPT-2's published shapes.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes for CPU work. Their vocabulary is sized for a trained tokenizer; with GPT-2's
    # vocabulary the embedding alone would dominate the parameter count.
    "tiny": GPTConfig(vocab_size=4096, context_length=256, n_layer=4, n_head=4, n_embd=128),  # ~1.3M
    "small": GPTConfig(vocab_size=8192, context_length=512, n_layer=6, n_head=6, n_embd=384),  # ~14M
    # The book's GPT_CONFIG_124M: GPT-2's shape with context 256, no attention biases, dropout 0.1
    # and an untied output head (162M parameters with it).
    "book-124m": GPTConfig(context_length=256, dropout=0.1, qkv_bias=False, tie_embeddings=False),
}


def get_preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KettleError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})") from None
