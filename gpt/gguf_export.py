"""GGUF export: a Kettle model as llama.cpp (and so Ollama and LM Studio) runs it.

The file is what llama.cpp's own converter (convert_hf_to_gguf.py) writes for a GPT-2: the `gpt2`
architecture's keys and tensor names, 1-D tensors and position embeddings in F32, the rest in the
chosen type. The tokenizer goes in as llama.cpp's byte-level BPE: the tokens, their merges, and a
pre-tokenizer, which llama.cpp picks by name from a fixed list of split patterns. A tokenizer
whose pattern is none of them is refused by name, because llama.cpp would split text elsewhere
and so encode it to other ids. Ids past the tokenizer's (a padded vocabulary) are left out: Kettle
never draws them, and without them llama.cpp cannot either. Beside the file, an Ollama Modelfile
gives Kettle's chat format as a Go template and its stop tokens.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import gguf
import numpy as np

from gpt.chat_template import (
    SPECIAL_HEADERS,
    TEXT_HEADERS,
    end_of_turn_id,
    jinja_chat_template,
    stop_token_ids,
    uses_special_tokens,
)
from gpt.checkpoint import check_model_dir, load_model
from gpt.errors import KettleError
from gpt.files import atomic_file, check_target
from gpt.model import GPT
from gpt.tokenizer import LLAMA3_SPLIT_PATTERN, SPLIT_PATTERN, Tokenizer, byte_level_bpe

FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
TYPES = tuple(FILE_TYPES)
# The 2-D weights' type in each file type; what cannot be (a width no multiple of Q8_0's 32-value
# blocks) falls back to F16, as llama.cpp's converter does.
TENSOR_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
MODELFILE = "Modelfile"


def llama_cpp_pre_tokenizer(tokenizer: Tokenizer) -> str:
    """The `tokenizer.ggml.pre` name under which llama.cpp splits text as this tokenizer's
    pattern does, or a KettleError naming what it cannot represent."""
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pattern, as tiktoken runs it

    pattern = tokenizer.encoding._pat_str
    names = {r50k_pat_str: "gpt-2", LLAMA3_SPLIT_PATTERN: "llama-bpe"}
    if pattern in names:
        return names[pattern]
    why = "it splits numbers into 1-2 digits" if pattern == SPLIT_PATTERN else f"its pattern is {pattern!r}"
    raise KettleError(
        f"tokenizer {tokenizer.name}: llama.cpp has no pre-tokenizer that splits text as this one does "
        f"({why}), so it would encode text to other ids; GGUF export takes GPT-2's tokenizer or one trained "
        "by this Kettle (`kettle tokenizer train`, `kettle brew starter`)"
    )


def export_gguf(model_dir: str | Path, out: str | Path, *, weights: str = "f16", overwrite: bool = False) -> Path:
    """Write `out` (a .gguf file) and a Modelfile beside it, each atomically; an existing one of
    them is refused unless `overwrite`. Returns `out`."""
    if weights not in TYPES:
        raise KettleError(f"--type must be one of {', '.join(TYPES)}, got {weights!r}")
    out = Path(out)
    modelfile = out.parent / MODELFILE
    for path in (out, modelfile):
        check_target(path)  # --force replaces a file, never a device, a FIFO or a link's target
        if path.exists() and not overwrite:
            raise KettleError(f"{path}: already exists (--force replaces it)")
    if any(c in out.name for c in '"\n\r'):
        raise KettleError(f"{out}: a Modelfile cannot name a file with quotes or line breaks in its name")
    _, _, tokenizer = check_model_dir(model_dir)  # every check but the weights' bytes, first
    try:
        pre = llama_cpp_pre_tokenizer(tokenizer)
    except KettleError as exc:
        raise KettleError(f"{model_dir}: {exc}") from None
    model, tokenizer = load_model(model_dir)
    with atomic_file(out) as tmp_gguf, atomic_file(modelfile) as tmp_modelfile:
        writer = gguf.GGUFWriter(tmp_gguf, "gpt2")
        writer.add_name(Path(model_dir).name)
        _add_hyperparameters(writer, model)
        writer.add_file_type(FILE_TYPES[weights])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, pre)
        for name, data, qtype in _tensors(model, tokenizer.n_vocab, weights):
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp_modelfile.write_text(
            ollama_modelfile(out.name, tokenizer, context_length=model.config.context_length), encoding="utf-8"
        )
    return out


def _add_hyperparameters(writer: gguf.GGUFWriter, model: GPT) -> None:
    """The keys llama.cpp's converter writes for a GPT-2."""
    config = model.config
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_width)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(model.ln_f.eps)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, pre: str) -> None:
    """The tokens (special ones as control tokens, which decoding leaves out as Kettle's answers
    do), the merges, the stop tokens and the chat template; no BOS added, as Kettle adds none."""
    tokens, merges = byte_level_bpe(tokenizer)
    special = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    if [i for _, i in special] != list(range(len(tokens), tokenizer.n_vocab)):
        raise KettleError(f"tokenizer {tokenizer.name}: its special tokens do not follow its merges")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens + [t for t, _ in special])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(special))
    writer.add_token_merges([f"{a} {b}" for a, b in merges])
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_eot_token_id(end_of_turn_id(tokenizer))
    writer.add_pad_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(jinja_chat_template(tokenizer))


def _tensors(model: GPT, n_vocab: int, weights: str):
    """(GGUF name, data, GGML type) for each weight: Kettle's names are GPT-2's (Hugging Face's
    without `transformer.`) and its linear layers already [out, in], as GGUF stores them."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    for kettle_name, tensor in model.weights().items():
        name = names.get_name(f"transformer.{kettle_name}", try_suffixes=(".weight", ".bias"))
        if name is None:
            name = names.get_name(kettle_name, try_suffixes=(".weight",))  # lm_head
        data = tensor.detach().float().numpy()
        if kettle_name in ("wte.weight", "lm_head.weight"):
            data = data[:n_vocab]
        if data.ndim == 1 or name == "position_embd.weight":
            yield name, data, gguf.GGMLQuantizationType.F32
        else:
            yield (name, *_converted(data, TENSOR_TYPES[weights]))
    if not model.config.qkv_bias:  # llama.cpp's GPT-2 needs these biases: zeros add nothing
        for i in range(model.config.n_layer):
            yield f"blk.{i}.attn_qkv.bias", np.zeros(3 * model.config.n_embd, np.float32), gguf.GGMLQuantizationType.F32


def _converted(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if qtype == gguf.GGMLQuantizationType.F32:
        return data, qtype
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        with contextlib.suppress(gguf.QuantError):
            return gguf.quants.quantize(data, qtype), qtype
        qtype = gguf.GGMLQuantizationType.F16
    return data.astype(np.float16), qtype


def ollama_modelfile(gguf_name: str, tokenizer: Tokenizer, *, context_length: int) -> str:
    """An Ollama Modelfile for the GGUF file beside it: Kettle's chat format as a Go template
    (each message as header + content + end-of-turn, then the assistant's header), the tokens
    that end an answer as stop parameters, and the model's context as Ollama's window (its
    default is larger, and GPT-2's learned positions end at the context)."""
    headers = SPECIAL_HEADERS if uses_special_tokens(tokenizer) else TEXT_HEADERS
    end = tokenizer.decode([end_of_turn_id(tokenizer)])
    roles = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{header}'
        for i, (role, header) in enumerate(headers.items())
    )
    template = (
        f"{{{{- range .Messages }}}}{roles}{{{{ end }}}}{{{{ .Content }}}}{end}{{{{ end }}}}{headers['assistant']}"
    )
    stops = sorted(tokenizer.decode([i]) for i in stop_token_ids(tokenizer))
    source = f"./{gguf_name}"
    lines = [f"FROM {json.dumps(source) if any(c.isspace() for c in source) else source}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops] + [f"PARAMETER num_ctx {context_length}"]
    return "\n".join(lines) + "\n"
