"""The bad-input corpus: files `kettle data import` must refuse, model directories every importer
must refuse, flags every command must refuse, each with one line and nothing changed.

The corpus is kept in tests/fixtures/bad-inputs/ (imports/, models/, and corpus.json: what each
error must say, and the flags) and made by this module: `python -m tests.tui.bad_inputs` writes it
again after a change here, and tests/tui/test_bad_inputs.py checks that what is kept is what this
code makes, then feeds it in.

Each entry is (name, content, what the error must say). A model directory is a dict of relative
path -> bytes (bytes alone: a file where a directory should be); a directory that must hold no
file, or be one where a file should be, holds a .gitkeep, since git keeps no empty directory.
Two import files are made at test time instead (HUGE): one line, one list entry over the 16 MiB
a record may take, too big to keep in the repository.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import json
import math
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "bad-inputs"
KEEP = ".gitkeep"


# --- dataset files for `kettle data import` -----------------------------------------------------


def _jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi."}
SHAREGPT = {"id": "a", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
DPO = {
    "prompt": [{"role": "user", "content": "Hi?"}],
    "chosen": [{"role": "assistant", "content": "Hello."}],
    "rejected": [{"role": "assistant", "content": "Go away."}],
}


def _chat(**message) -> dict:
    return {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."} | message]}


def import_files() -> list[tuple[str, bytes, str]]:
    deep = "[" * 100_000 + "]" * 100_000
    lone = '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}\n'
    return [
        ("empty.jsonl", b"", "no records to import"),
        ("blank-lines.jsonl", b"\n  \n\t\n", "no records to import"),
        ("empty-list.json", b"[]", "no records to import"),
        ("bom-only.jsonl", codecs.BOM_UTF8, "no records to import"),
        ("utf16-bom.jsonl", json.dumps(CHAT).encode("utf-16"), "line 1: not valid UTF-8"),
        ("utf16le-list.json", json.dumps([ALPACA]).encode("utf-16-le"), "line 1: invalid JSON"),
        (
            "latin1.jsonl",
            json.dumps({"instruction": "Café?", "output": "Oui."}, ensure_ascii=False).encode("latin-1"),
            "line 1: not valid UTF-8",
        ),
        (
            "latin1-line-3.jsonl",
            _jsonl(CHAT, CHAT) + '{"instruction": "Ça?", "output": "x"}\n'.encode("latin-1"),
            "line 3: not valid UTF-8",
        ),
        ("png.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01", "not valid UTF-8"),
        ("nul-bytes.jsonl", b"\x00\x00\x00\x00\n", "line 1: invalid JSON"),
        ("gzipped.jsonl", gzip.compress(_jsonl(CHAT), mtime=0), "line 1: not valid UTF-8"),
        ("alpaca.csv", b"instruction,input,output\nSay hi.,,Hi.\n", "line 1: invalid JSON"),
        ("pairs.tsv", b"Say hi.\tHi.\n", "line 1: invalid JSON"),
        ("chat.yaml", b"- instruction: Say hi.\n  output: Hi.\n", "line 1: invalid JSON"),
        ("truncated.jsonl", b'{"messages": [{"role": "user"', "line 1: invalid JSON"),
        ("truncated-list.json", json.dumps([ALPACA, ALPACA]).encode()[:-20], "line 1: invalid JSON"),
        ("trailing-garbage.json", json.dumps([ALPACA]).encode() + b"\nxyz\n", "line 2: invalid JSON: extra data"),
        (
            "missing-comma.json",
            b'[\n{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n]',
            "line 3: invalid JSON",
        ),
        ("bad-second-line.jsonl", _jsonl(CHAT) + b"{nope}\n", "line 2: invalid JSON"),
        ("bom-on-line-2.jsonl", _jsonl(CHAT) + codecs.BOM_UTF8 + _jsonl(CHAT), "line 2: invalid JSON"),
        ("string.jsonl", b'"hello"\n', "line 1: cannot tell the format"),
        ("number.jsonl", b"42\n", "line 1: cannot tell the format"),
        ("null.jsonl", b"null\n", "line 1: cannot tell the format"),
        ("object-not-list.json", b'{"instruction": "Say hi."}', "line 1: cannot tell the format"),
        ("unknown-fields.jsonl", _jsonl({"question": "a", "answer": "b"}), "line 1: cannot tell the format"),
        ("openai-content-number.jsonl", _jsonl(_chat(content=3)), "must be a string, got a number"),
        ("openai-role-robot.jsonl", _jsonl(_chat(role="robot")), "role 'robot' is not supported"),
        (
            "openai-no-assistant.jsonl",
            _jsonl({"messages": [{"role": "user", "content": "Hi?"}]}),
            "no assistant message",
        ),
        ("openai-messages-string.jsonl", _jsonl({"messages": "Hi?"}), "'messages' must be a list"),
        ("openai-message-list.jsonl", _jsonl({"messages": [["user", "Hi?"]]}), "must be a JSON object"),
        ("openai-weight-2.jsonl", _jsonl(_chat(weight=2)), "weight must be 0 or 1"),
        (
            "openai-weight-nan.jsonl",
            b'{"messages": [{"role": "user", "content": "Hi?"}, '
            b'{"role": "assistant", "content": "x", "weight": NaN}]}\n',
            "weight must be 0 or 1",
        ),
        ("openai-record-2-list.jsonl", _jsonl(CHAT, [CHAT]), "line 2: a record must be a JSON object"),
        (
            "alpaca-output-missing.json",
            json.dumps([ALPACA, {"instruction": "x"}], indent=1).encode(),
            "line 7: missing field 'output'",
        ),
        (
            "alpaca-input-null.json",
            json.dumps([ALPACA | {"input": None}]).encode(),
            "'input' must be a string, got null",
        ),
        (
            "alpaca-instruction-list.json",
            json.dumps([ALPACA | {"instruction": ["a"]}]).encode(),
            "'instruction' must be a string, got a list",
        ),
        (
            "sharegpt-from-robot.json",
            json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]).encode(),
            "'from' must be system, human or gpt",
        ),
        (
            "sharegpt-conversations-string.json",
            json.dumps([{"conversations": "hi"}]).encode(),
            "'conversations' must be a list",
        ),
        ("sharegpt-id-number.json", json.dumps([SHAREGPT | {"id": 7}]).encode(), "'id' must be a string"),
        ("sharegpt-value-missing.jsonl", _jsonl({"conversations": [{"from": "human"}]}), "missing field"),
        ("dpo-chosen-two.jsonl", _jsonl(DPO | {"chosen": DPO["chosen"] * 2}), "exactly one assistant message"),
        (
            "dpo-rejected-user.jsonl",
            _jsonl(DPO | {"rejected": [{"role": "user", "content": "x"}]}),
            "exactly one assistant message",
        ),
        (
            "dpo-openai-input-string.jsonl",
            _jsonl({"input": "x", "preferred_output": [], "non_preferred_output": []}),
            "field 'input' must be a JSON object",
        ),
        ("surrogate-openai.jsonl", lone.encode(), "line 1: field messages[0].'content' holds a lone surrogate"),
        ("surrogate-low-alpaca.json", b'[{"instruction": "a", "output": "\\udfff"}]', "lone surrogate"),
        (
            "surrogate-sharegpt-id.json",
            b'[{"id": "\\udbff", "conversations": ' + json.dumps(SHAREGPT["conversations"]).encode() + b"}]",
            "'id' holds a lone surrogate",
        ),
        (
            "surrogate-dpo-prompt.jsonl",
            b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}\n',
            "'prompt' holds a lone surrogate",
        ),
        ("surrogate-line-5.jsonl", _jsonl(CHAT, CHAT, CHAT, CHAT) + lone.encode(), "line 5: field"),
        ("surrogate-pair-split.jsonl", b'{"instruction": "\\ud83d", "output": "\\ude00 split"}\n', "lone surrogate"),
        ("deep-nesting.jsonl", (deep + "\n").encode(), "line 1: JSON nested too deeply"),
        ("deep-nesting-list.json", f"[\n{json.dumps(ALPACA)},\n{deep}\n]".encode(), "line 3: JSON nested too deeply"),
        ("deep-objects.jsonl", ('{"a": ' * 50_000 + "1" + "}" * 50_000 + "\n").encode(), "nested too deeply"),
        ("long-integer.jsonl", b'{"messages": ' + b"7" * 5000 + b"}\n", "line 1: a number too long to read"),
    ]


HUGE = {  # made at test time: over MAX_LINE_BYTES, too big to keep
    "huge-line.jsonl": ("longer than 16 MiB", lambda size: b'{"instruction": "' + b"a" * size + b'", "output": "b"}\n'),
    "huge-entry.json": (
        "one entry is longer than 16 MiB",
        lambda size: b'[{"instruction": "' + b"a" * size + b'", "output": "b"}]',
    ),
}


# --- model directories for every importer ------------------------------------------------------


def _tokenizer_json(**changes) -> bytes:
    """A byte-level tokenizer as Tokenizer.save writes one (its 256 bytes, the special tokens),
    with sorted keys so that the corpus is the same on every run."""
    from gpt.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    data = {
        "name": "bad-inputs",
        "pattern": SPLIT_PATTERN,
        "special_tokens": {t: 256 + i for i, t in enumerate(SPECIAL_TOKENS)},
        "merges": [base64.b64encode(bytes([b])).decode("ascii") for b in range(256)],
    }
    data.update(changes)
    return json.dumps(data, sort_keys=True).encode("utf-8")


def _weights(state) -> bytes:
    from safetensors.torch import save

    return save(state, metadata={"format": "pt"})


def _state(config):
    """Every tensor of `config`'s model, filled with a fixed pattern (exact in every dtype)."""
    import torch

    from gpt.checkpoint import expected_tensors

    return {
        name: ((torch.arange(torch.Size(shape).numel()) % 17 - 8) / 64).reshape(shape)
        for name, shape in expected_tensors(config).items()
    }


def _with_header(weights: bytes, change) -> bytes:
    """`weights` with its safetensors header changed by `change(header)`, the data as it was."""
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n :]


def _bases(work: Path) -> tuple[dict[str, bytes], dict[str, bytes], object]:
    """(a good Kettle model directory, the same exported for Hugging Face, its config), as
    Kettle's own writers make them."""
    import torch

    from gpt.checkpoint import save_model
    from gpt.config import GPTConfig
    from gpt.hf import export_hf
    from gpt.model import GPT
    from gpt.tokenizer import TOKENIZER_FILE, load_tokenizer_file

    config = GPTConfig(vocab_size=261, context_length=8, n_layer=2, n_head=1, n_embd=4)
    (work / "tokenizer.json").write_bytes(_tokenizer_json())
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(_state(config), strict=False, assign=True)
    model.tie_weights()
    save_model(model, work / "kettle", tokenizer=load_tokenizer_file(work / "tokenizer.json"))
    (work / "kettle" / TOKENIZER_FILE).write_bytes(_tokenizer_json())  # sorted keys, as the rest
    # An export made before export-hf wrote Hugging Face's tokenizer: Kettle's own format under
    # Hugging Face's name, which import-hf still reads (and checks).
    export_hf(work / "kettle", work / "hf")
    (work / "hf" / "tokenizer.json").write_bytes(_tokenizer_json())
    return files_under(work / "kettle"), files_under(work / "hf"), config


FILES = {"conf": "config.json", "weights": "model.safetensors"}


def _replaced(files: dict[str, bytes], changes: dict[str, bytes | None], tokenizer: str) -> dict[str, bytes]:
    """`files` with conf=/weights=/tok= (the file named `tokenizer`) or other names replaced, or
    removed where None."""
    out = dict(files)
    for key, content in changes.items():
        name = tokenizer if key == "tok" else FILES.get(key, key)
        if content is None:
            out.pop(name)
        else:
            out[name] = content
    return out


# Unpickling this would end the test process: the weights files below that hold it prove that
# no importer unpickles.
EXPLODING_PICKLE = b"cbuiltins\nexec\n(S'raise SystemExit(\"unpickled!\")'\ntR."


def model_dirs() -> list[tuple[str, dict[str, bytes] | bytes, str]]:
    import torch

    from gpt.hf import kettle_state_to_hf
    from gpt.tokenizer import LEGACY_TOKENIZER_FILE, TOKENIZER_FILE

    with tempfile.TemporaryDirectory() as work:
        kettle, hf, config = _bases(Path(work))
    meta = json.loads(kettle["config.json"])
    weights, hf_config = kettle["model.safetensors"], json.loads(hf["config.json"])

    def k(**files) -> dict[str, bytes]:  # the good Kettle directory, some files replaced
        return _replaced(kettle, files, TOKENIZER_FILE)

    def h(**files) -> dict[str, bytes]:  # the good Hugging Face directory, some files replaced
        return _replaced(hf, files, LEGACY_TOKENIZER_FILE)

    def meta_with(**changes) -> bytes:
        return json.dumps({**meta, **changes}).encode()

    def config_with(**changes) -> bytes:
        return meta_with(config={**meta["config"], **changes})

    def hf_with(**changes) -> bytes:
        return json.dumps({**hf_config, **changes}).encode()

    state = _state(config)
    hf_state = kettle_state_to_hf(state)
    good_tokenizer = json.loads(_tokenizer_json())
    specials, merges = good_tokenizer["special_tokens"], good_tokenizer["merges"]
    return [
        ("empty", {KEEP: b""}, "config.json: missing"),
        ("weights-only", k(conf=None), "config.json: missing"),
        ("config-not-json", k(conf=b"{kettle_format: 1"), "config.json: cannot read"),
        ("config-a-list", k(conf=b"[1, 2]"), "not a Kettle model config"),
        ("config-not-utf8", k(conf=b'{"kettle_format": 1, "dtype": "\xff"}'), "config.json: cannot read"),
        ("config-deep", k(conf=b"[" * 100_000 + b"]" * 100_000), "config.json: cannot read"),
        ("config-no-kettle-format", k(conf=json.dumps(meta["config"]).encode()), "no kettle_format"),
        ("kettle-format-2", k(conf=meta_with(kettle_format=2)), "format version 2 is not supported"),
        ("dtype-float64", k(conf=meta_with(dtype="float64")), "dtype must be one of"),
        ("dtype-a-list", k(conf=meta_with(dtype=["float32"])), "dtype must be one of"),
        ("config-missing", k(conf=meta_with(config=None)), "config.json: expected a JSON object"),
        ("config-unknown-key", k(conf=config_with(n_layers=2)), "unknown config keys n_layers"),
        ("n-layer-zero", k(conf=config_with(n_layer=0)), "config.json: n_layer must be a positive integer"),
        ("n-layer-string", k(conf=config_with(n_layer="2")), "n_layer must be a positive integer"),
        ("n-embd-not-divisible", k(conf=config_with(n_head=3)), "must be divisible by n_head"),
        ("dropout-1.5", k(conf=config_with(dropout=1.5)), "dropout must be in [0, 1)"),
        ("dropout-string", k(conf=config_with(dropout="0.1")), "dropout must be in [0, 1)"),
        (
            "n-layer-200000",
            k(conf=config_with(n_layer=200_000)),
            "holds 2 transformer blocks, config.json says n_layer 200000",
        ),
        (
            "vocab-size-10-to-12",
            k(conf=config_with(vocab_size=10**12)),
            "config.json: vocab_size 1000000000000, context_length 8, n_layer 2, n_embd 4 make a model of about",
        ),
        ("n-embd-10-to-12", k(conf=config_with(n_embd=10**12)), "n_embd 1000000000000 make a model of about 2.4e+25"),
        ("n-inner-10-to-12", k(conf=config_with(n_inner=10**12)), "Kettle builds at most 1e+12"),
        ("config-a-directory", {"config.json/" + KEEP: b"", "model.safetensors": weights}, "config.json: cannot read"),
        ("weights-missing", k(weights=None), "model.safetensors: missing"),
        ("weights-empty", k(weights=b""), "corrupt or truncated safetensors file"),
        ("weights-truncated", k(weights=weights[: len(weights) // 2]), "corrupt or truncated"),
        ("weights-pickled", k(weights=pickle.dumps({"wte.weight": [0.0] * 4}, protocol=4)), "corrupt or truncated"),
        ("weights-exploding-pickle", k(weights=EXPLODING_PICKLE), "corrupt or truncated"),
        ("weights-header-huge", k(weights=struct.pack("<Q", 2**62) + weights[8:]), "corrupt or truncated"),
        (
            "weights-header-not-json",
            k(weights=struct.pack("<Q", 9) + b"{not json" + weights[8:]),
            "corrupt or truncated",
        ),
        (
            "weights-header-lies",
            k(weights=_with_header(weights, lambda hd: hd["wte.weight"].update(shape=[261, 5]))),
            "corrupt or truncated",
        ),
        (
            "weights-wrong-shape",
            k(weights=_weights(_state(config.replace(n_embd=8, n_head=2)))),
            "tensor wte.weight has shape [261, 8], the config expects [261, 4]",
        ),
        (
            "weights-missing-tensor",
            k(weights=_weights({n: t for n, t in state.items() if n != "ln_f.bias"})),
            "missing tensor ln_f.bias",
        ),
        (
            "weights-extra-tensor",
            k(weights=_weights(state | {"lm_head.weight": state["wte.weight"].clone()})),
            "unexpected tensor lm_head.weight",
        ),
        (
            "weights-float16",
            k(weights=_weights({n: t.half() for n, t in state.items()})),
            "is F16, config.json says float32",
        ),
        (
            "weights-one-float64",
            k(weights=_weights(state | {"ln_f.bias": state["ln_f.bias"].double()})),
            "tensor ln_f.bias is F64",
        ),
        (
            "weights-a-directory",
            {
                "config.json": kettle["config.json"],
                "model.safetensors/" + KEEP: b"",
                TOKENIZER_FILE: kettle[TOKENIZER_FILE],
            },
            "model.safetensors: cannot read (a directory, not a regular file)",
        ),
        (
            "weights-nan",
            k(weights=_weights(state | {"h.1.attn.c_attn.weight": state["h.1.attn.c_attn.weight"] / 0})),
            "tensor h.1.attn.c_attn.weight holds NaN or infinite values",
        ),
        (
            "weights-one-infinity",
            k(weights=_weights(state | {"ln_f.bias": state["ln_f.bias"].index_fill(0, torch.tensor([1]), math.inf)})),
            "tensor ln_f.bias holds NaN or infinite values",
        ),
        (
            "weights-one-block",
            k(weights=_weights({n: t for n, t in state.items() if not n.startswith("h.1.")})),
            "holds 1 transformer blocks, config.json says n_layer 2",
        ),
        ("tokenizer-missing", k(tok=None), "tokenizer.json: missing (config.json says the model uses it)"),
        ("tokenizer-not-json", k(tok=b'{"name": '), "not a valid Kettle tokenizer file"),
        ("tokenizer-not-utf8", k(tok=b'{"name": "\xff"}'), "not a valid Kettle tokenizer file"),
        ("tokenizer-a-list", k(tok=b"[]"), "expected a JSON object"),
        (
            "tokenizer-no-endoftext",
            k(tok=_tokenizer_json(special_tokens={t: i for t, i in specials.items() if t != "<|endoftext|>"})),
            "no <|endoftext|> special token",
        ),
        (
            "tokenizer-specials-collide",
            k(tok=_tokenizer_json(special_tokens=specials | {"<|user|>": specials["<|endoftext|>"]})),
            "special token ids must be distinct",
        ),
        (
            "tokenizer-special-on-a-merge",
            k(tok=_tokenizer_json(special_tokens=specials | {"<|end|>": 65})),
            "special token ids must be distinct",
        ),
        (
            "tokenizer-special-float",
            k(tok=_tokenizer_json(special_tokens=specials | {"<|end|>": 260.0})),
            "special token ids must be distinct integers",
        ),
        (
            "tokenizer-bad-base64",
            k(tok=_tokenizer_json(merges=["!!!"] + merges[1:])),
            "merges[0] is not a base64 token",
        ),
        (
            "tokenizer-missing-byte",
            k(tok=_tokenizer_json(merges=merges[:255], special_tokens={t: i - 1 for t, i in specials.items()})),
            "no token for the byte 0xff",
        ),
        (
            "tokenizer-repeated-merge",
            k(tok=_tokenizer_json(merges=["QQ=="] + merges[1:])),
            "merges[65] repeats merges[0]",
        ),
        ("tokenizer-empty-pattern", k(tok=_tokenizer_json(pattern="")), "the pattern matches empty text"),
        ("tokenizer-bad-pattern", k(tok=_tokenizer_json(pattern="(\\p{L}")), "the pattern is not a regular expression"),
        (
            "tokenizer-too-big",
            k(tok=_tokenizer_json(special_tokens=specials | {"<|tool|>": 261})),
            "tokenizer has 262 tokens, the model only 261",
        ),
        ("a-file", weights, "not a directory"),
        # Hugging Face directories (config.json without kettle_format): import-hf's checks
        ("hf-config-a-list", h(conf=b"[]"), "expected a JSON object"),
        ("hf-config-not-json", h(conf=b'{"model_type": "gpt2",'), "config.json: cannot read"),
        (
            "hf-config-no-n-layer",
            h(conf=json.dumps({k_: v for k_, v in hf_config.items() if k_ != "n_layer"}).encode()),
            "missing key n_layer",
        ),
        (
            "hf-n-layer-200000",
            h(conf=hf_with(n_layer=200_000)),
            "holds 2 transformer blocks, config.json says n_layer 200000",
        ),
        ("hf-model-type-bert", h(conf=hf_with(model_type="bert")), "model_type is 'bert'"),
        ("hf-layer-norm-epsilon", h(conf=hf_with(layer_norm_epsilon=0.1)), "layer_norm_epsilon 0.1 is not implemented"),
        (
            "hf-activation-relu",
            h(conf=hf_with(activation_function="relu")),
            "activation_function 'relu' is not GPT-2's",
        ),
        ("hf-vocab-size-string", h(conf=hf_with(vocab_size="261")), "vocab_size must be a positive integer"),
        ("hf-n-embd-not-divisible", h(conf=hf_with(n_head=3)), "must be divisible by n_head"),
        ("hf-n-embd-10-to-12", h(conf=hf_with(n_embd=10**12, n_head=1)), "n_embd 1000000000000 make a model of"),
        ("hf-tie-yes", h(conf=hf_with(tie_word_embeddings="yes")), "tie_embeddings must be true or false"),
        (
            "hf-only-pytorch-bin",
            h(weights=None, **{"pytorch_model.bin": EXPLODING_PICKLE}),
            "only pytorch_model.bin, which Kettle does not unpickle",
        ),
        ("hf-weights-truncated", h(weights=hf["model.safetensors"][:100]), "corrupt or truncated"),
        (
            "hf-weights-not-transposed",
            h(weights=_weights(hf_state | {"transformer.h.0.attn.c_attn.weight": state["h.0.attn.c_attn.weight"]})),
            "transformer.h.0.attn.c_attn.weight has shape [12, 4], config.json implies [4, 12]",
        ),
        (
            "hf-weights-nan",
            h(weights=_weights(hf_state | {"transformer.wte.weight": hf_state["transformer.wte.weight"] * math.nan})),
            "model.safetensors: tensor transformer.wte.weight holds NaN or infinite values",
        ),
        (
            "hf-weights-missing-tensor",
            h(weights=_weights({n: t for n, t in hf_state.items() if n != "transformer.ln_f.weight"})),
            "missing tensor ln_f.weight",
        ),
        (
            "hf-weights-extra-tensor",
            h(weights=_weights(hf_state | {"transformer.h.0.attn.extra": torch.zeros(2)})),
            "unexpected tensor transformer.h.0.attn.extra",
        ),
        (
            "hf-tokenizer-no-endoftext",
            h(tok=_tokenizer_json(special_tokens={t: i for t, i in specials.items() if t != "<|endoftext|>"})),
            "no <|endoftext|> special token",
        ),
        (
            "hf-tokenizer-specials-collide",
            h(tok=_tokenizer_json(special_tokens=specials | {"<|end|>": 256})),
            "special token ids must be distinct",
        ),
        ("hf-gpt2-tokenizer-too-big", h(tok=None), "vocab_size 261 is smaller than GPT-2's tokenizer"),
    ]


# --- flags -----------------------------------------------------------------------------------------

# Placeholders: {model} a good model directory, {data} a good dataset file, {text} a text corpus,
# {tsv} a labelled TSV, {out} a path that must not appear. Exit 2: argparse refused the value;
# exit 1: a KettleError (a value that is well-formed but does not fit what it names).
FT = ["finetune", "--model", "{model}", "--data", "{data}", "--no-progress"]
PT = ["pretrain", "--data", "{text}", "--preset", "tiny", "--out", "{out}"]
GEN = ["generate", "{model}", "Hi"]
CLF = ["classify", "train", "--model", "{model}", "--data", "{tsv}", "--out", "{out}"]
TOK = ["tokenizer", "train", "--data", "{text}", "--out", "{out}"]


def flags() -> list[tuple[list[str], int, str]]:
    return [
        (FT + ["--val-fraction", "nan"], 2, "--val-fraction: must be a number in [0, 1)"),
        (FT + ["--val-fraction", "-1"], 2, "--val-fraction"),
        (FT + ["--val-fraction", "1"], 2, "--val-fraction"),
        (FT + ["--val-fraction", "1.5"], 2, "--val-fraction"),
        (FT + ["--val-fraction", "inf"], 2, "--val-fraction"),
        (FT + ["--lr", "nan"], 2, "--lr: must be a number > 0, got nan"),
        (FT + ["--lr", "inf"], 2, "--lr"),
        (FT + ["--lr", "-inf"], 2, "--lr"),
        (FT + ["--lr", "0"], 2, "--lr"),
        (FT + ["--lr", "-1e-3"], 2, "--lr"),
        (FT + ["--lr", "fast"], 2, "--lr: must be a number > 0, got 'fast'"),
        (FT + ["--warmup", "-5"], 2, "--warmup: must be an integer >= 0, got -5"),
        (FT + ["--warmup", "1.5"], 2, "--warmup"),
        (FT + ["--epochs", "0"], 2, "--epochs: must be an integer >= 1"),
        (FT + ["--epochs", "-1"], 2, "--epochs"),
        (FT + ["--epochs", "nan"], 2, "--epochs"),
        (FT + ["--batch-tokens", "0"], 2, "--batch-tokens"),
        (FT + ["--max-batch-size", "0"], 2, "--max-batch-size"),
        (FT + ["--max-length", "-1"], 2, "--max-length: must be an integer >= 1, got -1"),
        (FT + ["--max-length", "0"], 2, "--max-length"),
        (FT + ["--max-length", "100000"], 1, "--max-length 100000 exceeds the model's context length 128"),
        (FT + ["--replay", "-1"], 2, "--replay"),
        (FT + ["--patience", "0"], 2, "--patience"),
        (FT + ["--seed", "-1"], 2, "--seed"),
        (FT + ["--seed", str(2**64)], 2, "--seed"),
        (FT + ["--lora", "--lora-rank", "0"], 2, "--lora-rank"),
        (FT + ["--lora", "--lora-alpha", "nan"], 2, "--lora-alpha"),
        (FT + ["--lora", "--lora-alpha", "0"], 2, "--lora-alpha"),
        (FT + ["--lora", "--lora-dropout", "1"], 2, "--lora-dropout"),
        (FT + ["--lora", "--lora-dropout", "-0.1"], 2, "--lora-dropout"),
        (FT + ["--lora", "--lora-targets", "attn.nope"], 1, "LoRA targets must be among"),
        (FT + ["--lora-rank", "4"], 1, "need --lora"),
        (FT + ["--name", "a/b"], 1, "use a plain name without slashes"),
        (FT + ["--name", ""], 1, "use a plain name without slashes"),
        (FT + ["--name", " "], 1, "--name ' ': it is blank"),
        (FT + ["--name", "\u200b\u3000"], 1, r"--name '\u200b\u3000': it is blank"),
        (FT + ["--name", "a\x9bb"], 1, r"--name 'a\x9bb': it holds a control character"),
        (FT + ["--name", "a" * 300], 1, "it is 300 bytes long, more than 200"),
        (FT + ["--name", "tiny"], 1, "a model named 'tiny' already exists"),
        (FT + ["--max-length", "1"], 1, "all 1 examples are longer than the context of 1 tokens"),
        (FT + ["--val-fraction", "0.99"], 1, "no training examples left after holding out 1 of 1"),
        (FT + ["--lora", "--lora-rank", "100000"], 1, "--lora-rank 100000 exceeds the model's width 32"),
        (FT + ["--device", "tpu"], 2, "--device: unknown device 'tpu'"),
        (FT + ["--snapshot", "1"], 2, "not allowed with argument --data"),
        (["finetune", "--model", "{model}", "--snapshot", "0"], 2, "--snapshot: must be an integer >= 1"),
        (["finetune", "--model", "{model}", "--snapshot", "x"], 2, "--snapshot"),
        (["finetune", "--model", "{model}", "--snapshot", "99"], 1, "no dataset snapshot with id 99"),
        (["finetune", "--model", "{model}"], 1, "exactly one of --snapshot ID or --data FILE"),
        (["finetune", "--data", "{data}"], 1, "--model is required"),
        (["finetune", "--model", "no-such-model", "--data", "{data}"], 1, "no-such-model: no such model"),
        (["finetune", "--model", "{model}", "--data", "{out}"], 1, "no such file"),
        (["finetune", "resume", "0"], 2, "RUN: must be an integer >= 1"),
        (["finetune", "resume", "last"], 2, "RUN"),
        (["finetune", "resume", "7"], 1, "no training run with id 7"),
        (["finetune", "cancel", "-1"], 2, "RUN"),
        (["finetune", "run", "--run-id", "0"], 2, "--run-id"),
        (["finetune", "merge", "--base", "{model}", "--adapter", "{out}"], 2, "required: --out"),
        (PT + ["--lr", "nan"], 2, "--lr"),
        (PT + ["--lr", "0"], 2, "--lr"),
        (PT + ["--max-steps", "0"], 2, "--max-steps"),
        (PT + ["--warmup", "-1"], 2, "--warmup"),
        (PT + ["--weight-decay", "-0.1"], 2, "--weight-decay: must be a number >= 0"),
        (PT + ["--weight-decay", "nan"], 2, "--weight-decay"),
        (PT + ["--dropout", "1"], 2, "--dropout"),
        (PT + ["--val-fraction", "1"], 2, "--val-fraction"),
        (PT + ["--context", "0"], 2, "--context"),
        (PT + ["--batch-tokens", "-8"], 2, "--batch-tokens"),
        (PT + ["--micro-batch", "0"], 2, "--micro-batch"),
        (PT + ["--stride", "0"], 2, "--stride"),
        (PT + ["--eval-every", "0"], 2, "--eval-every"),
        (PT + ["--sample-every", "-1"], 2, "--sample-every"),
        (PT + ["--checkpoint-every", "0"], 2, "--checkpoint-every"),
        (PT + ["--max-time", "nan"], 2, "--max-time"),
        (PT + ["--max-time", "-5"], 2, "--max-time"),
        (PT + ["--seed", "abc"], 2, "--seed"),
        (PT + ["--loader", "zigzag"], 2, "--loader: invalid choice"),
        (PT + ["--device", "cuda:x"], 2, "--device"),
        (["pretrain", "--data", "{text}", "--preset", "huge", "--out", "{out}"], 2, "--preset: invalid choice: 'huge'"),
        (["pretrain", "--data", "{text}", "--preset", "tiny"], 2, "required: --out"),
        (PT, 1, "the corpus has 226 training tokens, fewer than one context window (256 + 1)"),
        (PT + ["--context", "100000"], 1, "fewer than one context window (100000 + 1)"),
        (PT + ["--context", "8", "--tokenizer", "gpt2"], 1, "the tokenizer has 50257 tokens but the model's"),
        (PT[:-1] + ["/proc/x", "--context", "8"], 1, "/proc/x: cannot be written"),
        (GEN + ["--temperature", "nan"], 2, "--temperature: must be a finite number"),
        (GEN + ["--temperature", "-1"], 2, "--temperature: must be in [0, 100], got -1.0"),
        (GEN + ["--temperature", "101"], 2, "--temperature"),
        (GEN + ["--top-k", "-1"], 2, "--top-k: must be >= 0, got -1"),
        (GEN + ["--top-k", "1.5"], 2, "--top-k"),
        (GEN + ["--top-p", "0"], 2, "--top-p: must be in (0, 1]"),
        (GEN + ["--top-p", "1.5"], 2, "--top-p"),
        (GEN + ["--min-p", "2"], 2, "--min-p"),
        (GEN + ["--repetition-penalty", "0"], 2, "--repetition-penalty"),
        (GEN + ["--presence-penalty", "3"], 2, "--presence-penalty"),
        (GEN + ["--frequency-penalty", "nan"], 2, "--frequency-penalty"),
        (GEN + ["--max-new-tokens", "0"], 2, "--max-new-tokens: must be >= 1, got 0"),
        (GEN + ["--max-new-tokens", "-1"], 2, "--max-new-tokens"),
        (GEN + ["--seed", "-1"], 2, "--seed"),
        (GEN + ["--preset", "wild"], 2, "--preset: invalid choice"),
        (GEN + ["--device", "bogus"], 2, "--device"),
        (GEN + ["--system", "Be terse."], 1, "--system needs --chat"),
        (GEN + ["--stop", ""], 1, "--stop must be a list of non-empty strings"),
        (["generate", "{out}", "Hi"], 1, "no such model"),
        (["serve", "--port", "-1"], 2, "--port: must be an integer in 0..65535, got -1"),
        (["serve", "--port", "65536"], 2, "--port"),
        (["serve", "--port", "http"], 2, "--port"),
        (["serve", "--device", "bogus"], 2, "--device"),
        (["data", "import", "{data}", "--format", "csv"], 2, "--format: invalid choice"),
        (["data", "import", "{out}"], 1, "no such file"),
        (["data", "export", "--format", "openai", "--snapshot", "0", "{out}"], 2, "--snapshot"),
        (["data", "export", "{out}"], 2, "required: --format"),
        (
            ["data", "export", "--format", "openai", "--min-score", "6", "{out}"],
            2,
            "--min-score: must be an integer in 1..5",
        ),
        (["data", "export", "--format", "openai", "--min-score", "0", "{out}"], 2, "--min-score"),
        (["data", "export", "--format", "openai", "--snapshot", "5", "{out}"], 1, "no dataset snapshot with id 5"),
        (["data", "snapshot", "create", "--min-score", "x"], 2, "--min-score"),
        (["data", "search", "kettle", "--limit", "0"], 2, "--limit"),
        (["data", "search", "kettle", "--limit", "-3"], 2, "--limit"),
        (["data"], 2, "required: COMMAND"),
        (CLF + ["--epochs", "0"], 2, "--epochs"),
        (CLF + ["--lr", "nan"], 2, "--lr"),
        (CLF + ["--batch-size", "0"], 2, "--batch-size"),
        (CLF + ["--max-length", "0"], 2, "--max-length"),
        (CLF + ["--seed", "-1"], 2, "--seed"),
        (CLF + ["--device", "bogus"], 2, "--device"),
        (CLF + ["--trainable", "last-9", "--device", "cpu"], 1, "--trainable must be head, all, lora or last-N"),
        (["classify", "predict", "{out}", "hi", "--device", "quantum"], 2, "--device"),
        (["brew", "starter", "--seed", "-1"], 2, "--seed"),
        (["brew", "starter", "--device", "bogus"], 2, "--device"),
        (["brew", "starter", "--steps", "5"], 2, "unrecognized arguments: --steps 5"),
        (["brew", "starter", "--out", "/proc/x"], 1, "/proc/x: cannot be written"),
        (["download", "gpt3"], 2, "invalid choice: 'gpt3'"),
        (TOK + ["--vocab-size", "x"], 2, "--vocab-size"),
        (TOK + ["--vocab-size", "10"], 1, "vocab size must be at least 261"),
        (["import-hf", "{model}"], 2, "required: OUT_DIR"),
        (["--server", "http://127.0.0.1:1", "data", "stats"], 2, "use them without a command"),
        (["teapot"], 2, "invalid choice: 'teapot'"),
    ]


# --- writing and reading the corpus ----------------------------------------------------------------


def write(root: Path = ROOT) -> None:
    """Make the whole corpus under `root` (replacing what is there)."""
    if root.exists():
        shutil.rmtree(root)
    imports, models = import_files(), model_dirs()
    for name, content, _ in imports:
        path = root / "imports" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    for name, files, _ in models:
        path = root / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(files, bytes):  # a file where a directory is expected
            path.write_bytes(files)
            continue
        for rel, content in files.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(content)
    index = {
        "imports": {name: says for name, _, says in imports},
        "models": {name: says for name, _, says in models},
        "flags": [{"argv": argv, "exit": code, "says": says} for argv, code, says in flags()],
    }
    (root / "corpus.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def files_under(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path: what the corpus holds."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


if __name__ == "__main__":  # python -m tests.tui.bad_inputs, from the repository's root
    write()
    print(f"wrote {ROOT}")
