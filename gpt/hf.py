"""Hugging Face GPT-2 interop: import and export (downloads: gpt/download.py).

GPT-2's published checkpoints store each linear layer as a Conv1D, weight [in, out]; Kettle uses
nn.Linear, weight [out, in], so those weights are transposed on the way in and out. Names are
otherwise the same, except that some files prefix them with `transformer.`.

An export is what transformers loads as it is: the weights, config.json, generation_config.json
and the tokenizer (`tokenizer.json` in the tokenizers library's format, `tokenizer_config.json`
with Kettle's chat template). Importing it gives back the model it came from: export, import,
export writes the same bytes.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gpt.chat_template import TEXT_HEADERS, jinja_chat_template, stop_token_ids, uses_special_tokens
from gpt.checkpoint import (
    DTYPES,
    check_block_count,
    dtype_name,
    expected_tensors,
    finite,
    load_model,
    save_model,
    save_weights,
)
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.files import atomic_directory, check_regular, read_regular_text
from gpt.model import GPT
from gpt.tokenizer import (
    END_OF_TEXT,
    LEGACY_TOKENIZER_FILE,
    Tokenizer,
    from_hf_tokenizer,
    gpt2_tokenizer,
    hf_tokenizer_json,
    load_tokenizer_file,
)

CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Buffers some GPT-2 files carry (the causal mask); Kettle builds its mask itself.
IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")


# Config values Kettle's model does not implement, with the one it does: any other is refused by
# name (GPT-2 configs spell them all out; transformers' defaults are these).
FIXED = {
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
}
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both GPT-2's tanh GELU
DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")  # Kettle has one rate for all three
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def config_from_hf(data, source: str) -> GPTConfig:
    if not isinstance(data, dict):
        raise KettleError(f"{source}: expected a JSON object (a Hugging Face GPT-2 config)")
    if "kettle_format" in data:
        raise KettleError(
            f"{source}: already a Kettle model config (import-hf converts Hugging Face GPT-2 directories)"
        )
    if data.get("model_type") not in (None, "gpt2"):
        raise KettleError(f"{source}: model_type is {data.get('model_type')!r}, only gpt2 is supported")
    act = data.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise KettleError(
            f"{source}: activation_function {act!r} is not GPT-2's tanh GELU ({' or '.join(ACTIVATIONS)})"
        )
    for key, value in FIXED.items():
        if key in data and data[key] != value:
            raise KettleError(
                f"{source}: {key} {data[key]!r} is not implemented (Kettle's GPT-2 has {json.dumps(value)})"
            )
    dropout = data.get(DROPOUTS[0], 0.0)
    for key in DROPOUTS[1:]:
        if data.get(key, 0.0) != dropout:
            raise KettleError(
                f"{source}: {key} {data[key]!r} is not {DROPOUTS[0]} {dropout!r}; "
                "Kettle has one dropout rate for all three"
            )
    context = data.get("n_positions", data.get("n_ctx"))
    try:
        fields = {
            "vocab_size": data["vocab_size"],
            "n_layer": data["n_layer"],
            "n_head": data["n_head"],
            "n_embd": data["n_embd"],
            "context_length": data["n_positions"] if context is None else context,
            "n_inner": data.get("n_inner"),
            "dropout": dropout,
            "tie_embeddings": data.get("tie_word_embeddings", True),
        }
    except KeyError as exc:
        raise KettleError(f"{source}: missing key {exc.args[0]}") from None
    return GPTConfig.from_dict(fields, source)


def config_to_hf(config: GPTConfig, dtype: str, *, eot_id: int | None) -> dict:
    """GPT2Config's fields for `config`; `eot_id` is the tokenizer's end of text (bos and eos),
    None where no tokenizer is known."""
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
        "n_inner": config.n_inner,
        "initializer_range": 0.02,
        **FIXED,
        **{key: config.dropout for key in DROPOUTS},
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
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
        name if name == "lm_head.weight" else f"transformer.{name}": (t.t() if CONV1D.match(name) else t).contiguous()
        for name, t in state.items()
    }


def is_hf_dir(directory: Path) -> bool:
    """Whether `directory` holds a config.json that is not Kettle's (an object without
    kettle_format): a Hugging Face directory, for import_hf to convert and check."""
    try:
        data = json.loads(read_regular_text(directory / "config.json"))
    except (OSError, ValueError, RecursionError):
        return False  # not one to convert; the Kettle checks say what is wrong
    return isinstance(data, dict) and "kettle_format" not in data


def import_hf(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a Hugging Face GPT-2 directory (config.json + model.safetensors, or shards listed
    in model.safetensors.index.json) to Kettle's format."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise KettleError(f"{hf_dir}: no such directory")
    config_file = hf_dir / "config.json"
    try:
        data = json.loads(read_regular_text(config_file))
    except FileNotFoundError:
        raise KettleError(f"{config_file}: missing (a Hugging Face GPT-2 directory has config.json)") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise KettleError(f"{config_file}: cannot read ({exc})") from None
    config = config_from_hf(data, str(config_file))
    shards = _weight_files(hf_dir)
    tokenizer = _tokenizer(hf_dir)
    if tokenizer.n_vocab > config.vocab_size:
        source = (
            f"{hf_dir / LEGACY_TOKENIZER_FILE} ({tokenizer.n_vocab} tokens)"
            if tokenizer.name != "gpt2"
            else f"GPT-2's tokenizer ({tokenizer.n_vocab} tokens)"
            + ("" if (hf_dir / LEGACY_TOKENIZER_FILE).exists() else ", and there is no tokenizer.json")
        )
        raise KettleError(f"{config_file}: vocab_size {config.vocab_size} is smaller than {source}")
    with contextlib.ExitStack() as stack:
        names = {}  # Kettle's name: (the open file holding it, its name there, the file's path)
        for path in shards:
            f = stack.enter_context(_open_weights(path))
            for name in f.keys():
                names[kettle_name(name, config.tie_embeddings)] = (f, name, path)
        names.pop(None, None)
        where = shards[0] if len(shards) == 1 else hf_dir / WEIGHTS_INDEX
        check_block_count(where, set(names), config=config)
        expected = expected_tensors(config)
        for name, shape in expected.items():  # the headers, before a weight is read
            if name not in names:
                raise KettleError(f"{where}: missing tensor {name}")
            f, stored_name, path = names[name]
            with _reading(path):
                stored = tuple(f.get_slice(stored_name).get_shape())
            want = shape[::-1] if CONV1D.match(name) else shape  # Conv1D: [in, out]
            if stored != want:
                raise KettleError(
                    f"{path}: tensor {stored_name} has shape {list(stored)}, config.json implies {list(want)}"
                )
        extra = sorted(set(names) - set(expected))
        if extra:
            raise KettleError(f"{names[extra[0]][2]}: unexpected tensor {names[extra[0]][1]}")
        state = {}
        for f, stored_name, path in names.values():
            with _reading(path):
                state[stored_name] = finite(path, stored_name, f.get_tensor(stored_name))
    state = hf_state_to_kettle(state, tied=config.tie_embeddings)
    dtypes = {t.dtype for t in state.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and state["wte.weight"].dtype in DTYPES.values() else torch.float32
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    return save_model(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def _weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, or the shards its index
    names (files in `hf_dir` itself, never a path out of it)."""
    weights, index = hf_dir / "model.safetensors", hf_dir / WEIGHTS_INDEX
    if weights.exists():  # not a regular file: _open_weights says so
        return [weights]
    if not index.exists():
        hint = (
            " (only pytorch_model.bin, which Kettle does not unpickle)"
            if (hf_dir / "pytorch_model.bin").exists()
            else ""
        )
        raise KettleError(f"{weights}: missing{hint}")
    try:
        weight_map = json.loads(read_regular_text(index))["weight_map"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise KettleError(f"{index}: cannot read a weight_map from it ({exc!r})") from None
    files = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else None
    if not files or not all(isinstance(n, str) and n == Path(n).name and n.endswith(".safetensors") for n in files):
        raise KettleError(f"{index}: weight_map must map tensor names to .safetensors files in {hf_dir}")
    missing = [n for n in files if not (hf_dir / n).exists()]
    if missing:
        raise KettleError(f"{hf_dir / missing[0]}: missing (listed in {index.name})")
    return [hf_dir / n for n in files]


@contextlib.contextmanager
def _reading(path: Path):
    """Problems reading a safetensors file as KettleErrors naming it."""
    try:
        yield
    except SafetensorError as exc:
        raise KettleError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    except OSError as exc:
        raise KettleError(f"{path}: cannot read ({exc.strerror or exc})") from None


@contextlib.contextmanager
def _open_weights(path: Path):
    with _reading(path):
        check_regular(path)  # safetensors would wait forever on a named pipe
        with safe_open(str(path), framework="pt") as f:
            yield f


def _tokenizer(hf_dir: Path) -> Tokenizer:
    """The directory's tokenizer.json: Hugging Face's format (export-hf's, GPT-2's, or another
    byte-level BPE Kettle runs exactly), or Kettle's own, which export-hf wrote there before;
    GPT-2's tokenizer when there is none."""
    path = hf_dir / LEGACY_TOKENIZER_FILE
    if not path.exists():
        return gpt2_tokenizer()
    try:
        data = json.loads(read_regular_text(path))
    except (OSError, ValueError, RecursionError):
        data = None  # load_tokenizer_file says what is wrong with it
    if isinstance(data, dict) and "model" in data:
        return from_hf_tokenizer(path, tuple(TEXT_HEADERS.values()))
    return load_tokenizer_file(path)


def export_hf(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a directory that transformers loads as it is: GPT2LMHeadModel.from_pretrained,
    AutoTokenizer (Kettle's tokenizer converted exactly, its chat format as chat_template) and
    pipeline("text-generation"), which stops where Kettle's generation stops."""
    model, tokenizer = load_model(model_dir)
    dtype = dtype_name(model.wte.weight.dtype)
    weights = model.weights()
    if not model.config.qkv_bias:  # GPT-2 always has these biases: zeros add nothing
        weights |= {
            f"h.{i}.attn.c_attn.bias": model.wte.weight.new_zeros(3 * model.config.n_embd)
            for i in range(model.config.n_layer)
        }
    files = {
        "config.json": config_to_hf(model.config, dtype, eot_id=tokenizer.eot_id),
        GENERATION_CONFIG: _generation_config(model.config, tokenizer),
        TOKENIZER_CONFIG: {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "pad_token": END_OF_TEXT,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model.config.context_length,
            "chat_template": jinja_chat_template(tokenizer),
        },
    }
    stops = stop_token_ids(tokenizer)
    stop_tokens = [t for t, i in tokenizer.special_tokens.items() if i in stops]
    hf_tokenizer = hf_tokenizer_json(tokenizer, _prefixes(tokenizer), stop_tokens=stop_tokens)
    out_dir = Path(out_dir)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            save_weights(kettle_state_to_hf(weights), tmp / "model.safetensors")
            for name, value in files.items():
                (tmp / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
            (tmp / LEGACY_TOKENIZER_FILE).write_text(hf_tokenizer + "\n", encoding="utf-8")
    except FileExistsError:
        raise KettleError(f"{out_dir}: already exists (choose another directory)") from None
    return out_dir


def _prefixes(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The chat headers that are text (GPT-2's vocabulary has no tokens for them): Kettle encodes
    them apart from the message after them, so the exported tokenizer must split there too."""
    return () if uses_special_tokens(tokenizer) else tuple(tuple(TEXT_HEADERS.values()))


def _generation_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """What generate() stops at and may draw, as Kettle's engine does: the end-of-turn marker
    and end of text end an answer; ids past the tokenizer's (a padded vocabulary) never come."""
    out = {
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": sorted(stop_token_ids(tokenizer)),
        "pad_token_id": tokenizer.eot_id,
    }
    if config.vocab_size > tokenizer.n_vocab:
        out["suppress_tokens"] = list(range(tokenizer.n_vocab, config.vocab_size))
    return out
