"""Hugging Face GPT-2 interop: import and export (downloads: gpt/download.py).

GPT-2's published checkpoints store each linear layer as a Conv1D, weight [in, out]; Kettle uses
nn.Linear, weight [out, in], so those weights are transposed on the way in and out. Names are
otherwise the same, except that some files prefix them with `transformer.`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from data.files import atomic_directory
from gpt.checkpoint import (DTYPES, check_block_count, dtype_name, expected_tensors, load_model,
                            save_model, save_weights)
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.model import GPT
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer, gpt2_tokenizer, load_tokenizer_file

CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Buffers some GPT-2 files carry (the causal mask); Kettle builds its mask itself.
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


def config_from_hf(data, source: str) -> GPTConfig:
    if not isinstance(data, dict):
        raise KettleError(f"{source}: expected a JSON object (a Hugging Face GPT-2 config)")
    if "kettle_format" in data:
        raise KettleError(f"{source}: already a Kettle model config (import-hf converts Hugging "
                          "Face GPT-2 directories)")
    if data.get("model_type") not in (None, "gpt2"):
        raise KettleError(f"{source}: model_type is {data.get('model_type')!r}, only gpt2 is supported")
    act = data.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise KettleError(f"{source}: activation {act!r} is not GPT-2's tanh GELU")
    context = data.get("n_positions", data.get("n_ctx"))
    try:
        fields = {"vocab_size": data["vocab_size"], "n_layer": data["n_layer"],
                  "n_head": data["n_head"], "n_embd": data["n_embd"],
                  "context_length": data["n_positions"] if context is None else context,
                  "tie_embeddings": data.get("tie_word_embeddings", True)}
    except KeyError as exc:
        raise KettleError(f"{source}: missing key {exc.args[0]}") from None
    return GPTConfig.from_dict(fields, source)


def config_to_hf(config: GPTConfig, dtype: str) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": dtype,
    }


def kettle_name(name: str, tied: bool = True) -> str | None:
    """The Kettle name of a tensor in a Hugging Face file; None for one Kettle does not keep (a
    tied head the file stores anyway, the mask buffers)."""
    name = name.removeprefix("transformer.")
    if (tied and name == "lm_head.weight") or IGNORED.match(name):
        return None
    return name


def hf_state_to_kettle(state: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
    """Kettle's names and layout."""
    out = {}
    for name, tensor in state.items():
        if (name := kettle_name(name, tied)) is not None:
            out[name] = tensor.t().contiguous() if CONV1D.match(name) else tensor
    return out


def kettle_state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's names and layout for a state without the tied head (GPT.weights())."""
    return {
        name if name == "lm_head.weight" else f"transformer.{name}":
            (t.t() if CONV1D.match(name) else t).contiguous()
        for name, t in state.items()
    }


def is_hf_dir(directory: Path) -> bool:
    """Whether `directory` holds a config.json that is not Kettle's (an object without
    kettle_format): a Hugging Face directory, for import_hf to convert and check."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False  # not one to convert; the Kettle checks say what is wrong
    return isinstance(data, dict) and "kettle_format" not in data


def import_hf(hf_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a Hugging Face GPT-2 directory (config.json + model.safetensors) to Kettle's format."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise KettleError(f"{hf_dir}: no such directory")
    config_file = hf_dir / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KettleError(f"{config_file}: missing (a Hugging Face GPT-2 directory has config.json)") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise KettleError(f"{config_file}: cannot read ({exc})") from None
    config = config_from_hf(data, str(config_file))
    weights = hf_dir / "model.safetensors"
    if not weights.is_file():
        hint = " (only pytorch_model.bin, which Kettle does not unpickle)" if (hf_dir / "pytorch_model.bin").exists() else ""
        raise KettleError(f"{weights}: missing{hint}")
    tokenizer = _tokenizer(hf_dir)
    n_vocab = (tokenizer or gpt2_tokenizer()).n_vocab
    if n_vocab > config.vocab_size:
        raise KettleError(f"{config_file}: vocab_size {config.vocab_size} is smaller than "
                          + (f"{hf_dir / TOKENIZER_FILE} ({n_vocab} tokens)" if tokenizer else
                             f"GPT-2's tokenizer ({n_vocab} tokens), and there is no Kettle tokenizer.json"))
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = {kettle_name(name, config.tie_embeddings): name for name in f.keys()}
            names.pop(None, None)
            check_block_count(weights, set(names), config)
            expected = expected_tensors(config)
            for name, shape in expected.items():  # the header, before a weight is read
                if name not in names:
                    raise KettleError(f"{weights}: missing tensor {name}")
                stored = tuple(f.get_slice(names[name]).get_shape())
                want = shape[::-1] if CONV1D.match(name) else shape  # Conv1D: [in, out]
                if stored != want:
                    raise KettleError(f"{weights}: tensor {names[name]} has shape {list(stored)}, "
                                      f"config.json implies {list(want)}")
            extra = sorted(set(names) - set(expected))
            if extra:
                raise KettleError(f"{weights}: unexpected tensor {names[extra[0]]}")
            state = hf_state_to_kettle({name: f.get_tensor(name) for name in names.values()},
                                       tied=config.tie_embeddings)
    except SafetensorError as exc:
        raise KettleError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
    except OSError as exc:
        raise KettleError(f"{weights}: cannot read ({exc.strerror or exc})") from None
    dtypes = {t.dtype for t in state.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and state["wte.weight"].dtype in DTYPES.values() else torch.float32
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    return save_model(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def _tokenizer(hf_dir: Path) -> Tokenizer | None:
    """The Kettle tokenizer.json export-hf leaves beside a vocabulary that is not GPT-2's
    (checked as any model's is); None for GPT-2's, which is also what a Hugging Face GPT-2
    directory's own tokenizer.json (the tokenizers library's, with a "model" inside) holds."""
    path = hf_dir / TOKENIZER_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        data = None  # load_tokenizer_file says what is wrong with it
    if isinstance(data, dict) and "model" in data:
        return None
    return load_tokenizer_file(path)


def export_hf(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads."""
    model, tokenizer = load_model(model_dir)
    dtype = dtype_name(model.wte.weight.dtype)
    state = kettle_state_to_hf(model.weights())
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            save_weights(state, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")
            if tokenizer.name != "gpt2":
                # Not GPT-2's vocabulary: keep Kettle's tokenizer beside the weights so it isn't lost.
                tokenizer.save(tmp)
    except FileExistsError:
        raise KettleError(f"{out_dir}: already exists (choose another directory)") from None
    return out_dir
