"""Kettle's one checkpoint format: a model directory.

    model.safetensors   the weights (a tied output head is not stored twice)
    config.json         {"kettle_format": 1, "dtype": ..., "tokenizer": ..., "config": GPTConfig}
    kettle-tokenizer.json  only when the model does not use GPT-2's encoding (tokenizer.json in
                        directories older Kettles wrote, still read)

Saving goes through a temporary directory that is renamed into place, so a crash never leaves a
half-written model. Loading reads the safetensors header first and checks every tensor's name,
shape and dtype against the config before any weight is read. Nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.files import atomic_directory, check_regular, read_regular_text
from gpt.model import GPT
from gpt.tokenizer import LEGACY_TOKENIZER_FILE, TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_path

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors as safetensors; a write that fails (a full disk) is raised as the OSError
    it was, not as safetensors' own error."""
    try:
        save_file(state, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = errno.ENOSPC if "No space left" in str(exc) else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else str(exc), str(path)) from None


def expected_tensors(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor's name and shape for `config`, derived from the model itself."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.weights().items()}


def save_model(
    model: GPT,
    directory: str | Path,
    *,
    tokenizer: Tokenizer | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write `model` (and its tokenizer, unless GPT-2's) as a model directory, atomically."""
    directory = Path(directory)
    if tokenizer is not None and tokenizer.n_vocab > model.config.vocab_size:
        raise KettleError(f"tokenizer has {tokenizer.n_vocab} tokens but the model only {model.config.vocab_size}")
    state = {name: t.detach().contiguous().cpu() for name, t in model.weights().items()}
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) != 1:
        raise KettleError(f"model mixes dtypes {sorted(map(str, dtypes))}; cast it to one first")
    meta = {
        "kettle_format": FORMAT_VERSION,
        "dtype": dtype_name(dtypes.pop()),
        "tokenizer": "gpt2" if tokenizer is None or tokenizer.name == "gpt2" else TOKENIZER_FILE,
        "config": model.config.to_dict(),
    }
    try:
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            save_weights(state, tmp / WEIGHTS_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            if tokenizer is not None:
                tokenizer.save(tmp)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
    except FileExistsError:
        raise KettleError(f"{directory}: already exists (choose another directory)") from None
    return directory


def read_meta(directory: str | Path) -> tuple[dict, GPTConfig]:
    """config.json of a model directory, checked: (metadata, GPTConfig)."""
    directory = Path(directory)
    if not directory.exists():
        raise KettleError(f"{directory}: no such model directory")
    if not directory.is_dir():
        raise KettleError(f"{directory}: not a directory (a model is a directory)")
    path = directory / CONFIG_FILE
    try:
        meta = json.loads(read_regular_text(path))
    except FileNotFoundError:
        raise KettleError(f"{path}: missing, so {directory} is not a Kettle model directory") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise KettleError(f"{path}: cannot read ({exc})") from None
    if not isinstance(meta, dict) or "kettle_format" not in meta:
        if isinstance(meta, dict) and meta.get("model_type") == "gpt2":
            raise KettleError(
                f"{directory}: a Hugging Face GPT-2 directory; convert it with `kettle import-hf {directory} OUT_DIR`"
            )
        raise KettleError(f"{path}: not a Kettle model config (no kettle_format)")
    if meta["kettle_format"] != FORMAT_VERSION:
        raise KettleError(
            f"{path}: format version {meta['kettle_format']} is not supported (this Kettle reads {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("dtype"), str) or meta["dtype"] not in DTYPES:
        raise KettleError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {meta.get('dtype')!r}")
    config = GPTConfig.from_dict(meta.get("config"), source=str(path))
    return meta, config


def check_model_dir(directory: str | Path, *, values: bool = False) -> tuple[dict, GPTConfig, Tokenizer]:
    """Everything load_model checks, without reading a weight: config.json, every tensor's
    name, shape and dtype in the safetensors header, the tokenizer and that it fits the model;
    with `values`, the weights too (each read once, one at a time), which must be finite.
    Every importer calls it before a directory is registered: (metadata, config, tokenizer)."""
    directory = Path(directory)
    meta, config = read_meta(directory)
    path = directory / WEIGHTS_FILE
    with _checked_weights(path, config, dtype=meta["dtype"]) as f:
        for name in f.keys() if values else ():
            finite(path, name, f.get_tensor(name))
    if meta.get("tokenizer") in (TOKENIZER_FILE, LEGACY_TOKENIZER_FILE) and tokenizer_path(directory) is None:
        raise KettleError(f"{directory / meta['tokenizer']}: missing (config.json says the model uses it)")
    tokenizer = load_tokenizer(directory)
    if tokenizer.n_vocab > config.vocab_size:
        raise KettleError(f"{directory}: tokenizer has {tokenizer.n_vocab} tokens, the model only {config.vocab_size}")
    return meta, config, tokenizer


def read_weights(path: Path, config: GPTConfig, *, dtype: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking names, shapes and dtypes against `config`."""
    with _checked_weights(path, config, dtype=dtype) as f:
        return {name: finite(path, name, f.get_tensor(name)) for name in f.keys()}


def finite(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, unless it holds a NaN or an infinity (a run that diverged, a corrupt file):
    such weights load and run, but every logit is NaN and the model answers nothing, silently.
    A NaN or an infinity makes the sum NaN or infinite, and summing takes a thirtieth of the time
    of isfinite's pass (2 s for GPT-2's 124M weights here); only a sum that is not finite (that, or
    large finite weights that overflow it) is looked at weight by weight."""
    if not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
        raise KettleError(f"{path}: tensor {name} holds NaN or infinite values, so the model cannot generate")
    return tensor


def check_block_count(path: Path, names: set[str], *, config: GPTConfig) -> None:
    """The blocks a weights file holds (h.<i>.* tensors) against the config's n_layer, before a
    model of that many is built to list the tensors it expects: a config.json claiming 200,000
    layers would take minutes to tell that it lies."""
    blocks = len({name.split(".")[1] for name in names if name.startswith("h.")})
    if blocks != config.n_layer:
        raise KettleError(f"{path}: holds {blocks} transformer blocks, config.json says n_layer {config.n_layer}")


@contextmanager
def _checked_weights(path: Path, config: GPTConfig, *, dtype: str):
    """The open safetensors file, once its header matches `config` and `dtype`; problems with
    the file, also while reading it, are KettleErrors naming it."""
    if not path.exists():
        raise KettleError(f"{path}: missing")
    try:
        check_regular(path)
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            check_block_count(path, names, config=config)
            expected = expected_tensors(config)
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing:
                raise KettleError(
                    f"{path}: missing tensor {missing[0]}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            if unexpected:
                raise KettleError(
                    f"{path}: unexpected tensor {unexpected[0]}"
                    + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                )
            for name, shape in expected.items():
                sl = f.get_slice(name)
                got = tuple(sl.get_shape())
                if got != shape:
                    raise KettleError(f"{path}: tensor {name} has shape {list(got)}, the config expects {list(shape)}")
                if sl.get_dtype() != _safetensors_dtype(dtype):
                    raise KettleError(f"{path}: tensor {name} is {sl.get_dtype()}, config.json says {dtype}")
            yield f
    except SafetensorError as exc:
        raise KettleError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    except OSError as exc:
        raise KettleError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _safetensors_dtype(name: str) -> str:
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[name]


def load_model(
    directory: str | Path,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
) -> tuple[GPT, Tokenizer]:
    """Load a model directory: (model in eval mode on `device`, its tokenizer). `quantize`
    ("int8", CPU only) turns its linear layers into int8 ones from these same weights
    (gpt.quantize); they are quantized from fp32, whatever `dtype` says."""
    from gpt.quantize import check_mode, quantize_model

    check_mode(quantize, device)  # before any weight is read
    directory = Path(directory)
    meta, config, tokenizer = check_model_dir(directory)
    state = read_weights(directory / WEIGHTS_FILE, config, dtype=meta["dtype"])
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.to(device=device, dtype=torch.float32 if quantize else dtype or DTYPES[meta["dtype"]])
    if quantize:
        quantize_model(model, quantize)
    return model.eval(), tokenizer
