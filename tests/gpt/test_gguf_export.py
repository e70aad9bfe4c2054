"""export-gguf writes what llama.cpp runs as Kettle does, and a Modelfile Ollama takes as it is.

Two models: the starter's shape (the tiny preset) with a Kettle BPE trained here, and a GPT-2 shape
on GPT-2's tokenizer, both random and padded past their tokenizers. Read back with the `gguf`
package's reader (llama.cpp's own): tensors, metadata. Run in llama.cpp itself through
node-llama-cpp's prebuilt CPU binaries, installed once into a cache folder by npm (skipped, saying
why, without node or npm): the same token ids as Kettle's for 200 varied texts, in every type,
and Kettle's greedy tokens from f32.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.chat_template import render_prompt, stop_token_ids
from gpt.checkpoint import load_model, save_model
from gpt.config import PRESETS, GPTConfig
from gpt.errors import KettleError
from gpt.gguf_export import MODELFILE, TYPES, export_gguf, llama_cpp_pre_tokenizer, ollama_modelfile
from gpt.model import GPT
from gpt.tokenizer import (
    END_OF_TEXT,
    LLAMA3_SPLIT_PATTERN,
    SPLIT_PATTERN,
    gpt2_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from tests.conftest import TEST_SHAPE
from tui.cli import main

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[2]
NODE_LLAMA_CPP = "3.22.1"
CHECK_SCRIPT = Path(__file__).with_name("llama_cpp_check.mjs")
QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len() do?"}]
NEW_TOKENS = 64
# Logits closer than this, relative to the larger, are a tie to float sums in another order
# (kettle_greedy): at 0.0033 apart on 12.46 Kettle took one token and llama.cpp the other.
CLEAR = 1e-3


def sharpened(model: GPT, seed: int) -> GPT:
    """Random weights wide enough apart that greedy decoding has clear winners: torch's and
    llama.cpp's float sums differ in their last bits, which must not decide a near tie."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and name != "lm_head.weight":
                p.normal_(0.0, 0.3 if name in ("wte.weight", "wpe.weight") else 0.15)
    return model


@pytest.fixture(scope="module")
def llama3_bpe(verdict_text):
    """A Kettle BPE trained with Llama 3's split pattern, which llama.cpp runs."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "gpt").glob("*.py")))
    return train_tokenizer([verdict_text, source], vocab_size=2048, pattern=LLAMA3_SPLIT_PATTERN)


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama3_bpe) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-models")
    tokenizer = llama3_bpe
    starter = PRESETS["tiny"]  # vocab 4096: padded past the tokenizer's 2048
    save_model(sharpened(GPT(starter), 0), out / "starter-shape", tokenizer=tokenizer)
    gpt2 = GPTConfig(vocab_size=50304, context_length=256, n_layer=2, n_head=4, n_embd=128)
    save_model(sharpened(GPT(gpt2), 1), out / "gpt2-shape", tokenizer=None)
    return {"starter-shape": out / "starter-shape", "gpt2-shape": out / "gpt2-shape"}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """exported(name, type): the model exported to GGUF (once per module)."""
    out = tmp_path_factory.mktemp("ggufs")
    done: dict[tuple[str, str], Path] = {}

    def export(name: str, type: str) -> Path:
        if (name, type) not in done:
            done[name, type] = export_gguf(models[name], out / f"{name}-{type}" / "model.gguf", weights=type)
        return done[name, type]

    return export


def varied_texts() -> list[str]:
    """200 texts: code, prose in several scripts, numbers of every length, contractions in
    either case, runs of whitespace and line ends, special-token strings as plain text."""
    fixed = [
        "",
        " ",
        "Hello, world!",
        "it's we'll they're I'D YOU'VE she'S",
        "0 12 345 6789 01234 567890 3.14159 1e-10 ¾ ٣٤٥ ⅷ",
        "\ttabs\t and  double  spaces   ",
        "\r\nwindows\r\nline\rends\n\n\n",
        "Ünïcödé façade — naïve café ✓",
        "日本語のテキストと中文",
        "emoji 😀👍🏽 and ＦＵＬＬ width",
        "Привет, мир! ¿Qué?",
        f"a{END_OF_TEXT}b <|user|>hi<|end|> <|assistant|>",
        "    def f(x):\n        return x  \n",
        "e\u0301 combining, \u200bzero width, \u00a0no-break",
        "!!!??? ... --- *** ```python```",
        "'ſ 'ſx 'S 'ST İstanbul ǅungla Ǉ",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 ١٢٣٤ 𝟘0",
        "line\u2028sep\u2029para \x0bvt\x0cff \x85nel",
    ]
    lines = [
        line
        for path in sorted((ROOT / "gpt").glob("*.py"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    rng = random.Random(0)
    texts = list(fixed)
    while len(texts) < 200:
        pieces = rng.sample(lines, 3) + rng.sample(fixed, 2)
        rng.shuffle(pieces)
        texts.append(rng.choice(["\n", " ", "", "\r\n", "  "]).join(pieces))
    return texts


def kettle_greedy(model_dir: Path) -> tuple[list[int], list[int], int]:
    """(prompt ids, the NEW_TOKENS greedy tokens after it, how many of them are clear choices):
    Kettle's model in f32, every step over the whole sequence, drawing only ids its tokenizer
    has, stop tokens included. A choice is clear while the best logit leads the next by more
    than float sums in another order can move them (CLEAR); from the first that is not on,
    another implementation may rightly take the other token."""
    model, tokenizer = load_model(model_dir, dtype=torch.float32)
    prompt = render_prompt(QUESTION, tokenizer)
    ids, clear = list(prompt), NEW_TOKENS
    with torch.no_grad():
        for step in range(NEW_TOKENS):
            logits = model(torch.tensor([ids]), last_only=True)[0, -1, : tokenizer.n_vocab]
            top = logits.topk(2).values
            if clear == NEW_TOKENS and top[0] - top[1] < CLEAR * top.abs().max():
                clear = step
            ids.append(int(logits.argmax()))
    return prompt, ids[len(prompt) :], clear


# --- the file, read back with the gguf package ---------------------------------------------


def test_the_gguf_holds_the_weights_and_gpt2_metadata(models, exported):
    model, tokenizer = load_model(models["starter-shape"], dtype=torch.float32)
    reader = gguf.GGUFReader(exported("starter-shape", "f32"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = model.config
    assert fields["general.architecture"] == "gpt2"
    assert [fields[f"gpt2.{k}"] for k in ("context_length", "embedding_length", "feed_forward_length")] == [
        256,
        128,
        512,
    ]
    assert (fields["gpt2.block_count"], fields["gpt2.attention.head_count"]) == (config.n_layer, config.n_head)
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("gpt2", "llama-bpe")
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.n_vocab < config.vocab_size  # the padding is left out
    special = tokenizer.special_tokens
    assert [tokens[i] for i in sorted(special.values())] == sorted(special, key=special.get)
    assert fields["tokenizer.ggml.token_type"][special["<|end|>"]] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == special[END_OF_TEXT]
    assert fields["tokenizer.ggml.eot_token_id"] == special["<|end|>"]
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert "{% generation %}" in fields["tokenizer.chat_template"]
    tensors = {t.name: t for t in reader.tensors}
    state = model.weights()
    assert len(tensors) == len(state)
    wte = np.asarray(tensors["token_embd.weight"].data)
    assert np.array_equal(wte, state["wte.weight"][: tokenizer.n_vocab].numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.attn_qkv.weight"].data), state["h.1.attn.c_attn.weight"].numpy())
    assert np.array_equal(np.asarray(tensors["blk.3.ffn_down.bias"].data), state["h.3.mlp.c_proj.bias"].numpy())


@pytest.mark.parametrize("type", ["f16", "q8_0"])
def test_smaller_types_hold_the_weights_to_their_precision(type, models, exported):
    model, _ = load_model(models["starter-shape"], dtype=torch.float32)
    tensors = {t.name: t for t in gguf.GGUFReader(exported("starter-shape", type)).tensors}
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type.name == type.upper()
    got = gguf.quants.dequantize(np.asarray(qkv.data), qkv.tensor_type).reshape(384, 128)
    want = model.weights()["h.0.attn.c_attn.weight"].numpy()
    assert np.abs(got - want).max() <= np.abs(want).max() * (2e-3 if type == "f16" else 1e-2)
    # 1-D tensors and position embeddings stay F32, as llama.cpp's converter keeps them.
    assert {tensors[n].tensor_type.name for n in ("position_embd.weight", "blk.0.attn_norm.bias")} == {"F32"}


def test_q8_0_keeps_in_f16_what_its_blocks_cannot_hold(llama3_bpe, tmp_path):
    """Q8_0 packs rows in blocks of 32 values: a width of 48 falls back to F16, as llama.cpp's
    converter does, and the rest of the file is still Q8_0."""
    config = GPTConfig(vocab_size=2048, context_length=64, n_layer=1, n_head=2, n_embd=48, n_inner=64)
    save_model(GPT(config), tmp_path / "odd", tokenizer=llama3_bpe)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "odd", tmp_path / "odd.gguf", weights="q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == types["token_embd.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 64


def render_go_template(template: str, messages: list[dict]) -> str:
    """The Modelfile's template as Ollama's Go templates render it, for the constructs it uses:
    range .Messages, if / else if eq .Role "...", .Content, end, and {{- trimming."""
    tokens: list[tuple[str, str]] = []
    trim_next = ""
    for i, piece in enumerate(re.split(r"(\{\{.*?\}\})", template, flags=re.S)):
        if i % 2 == 0:
            tokens.append(("text", piece.lstrip() if trim_next else piece))
            continue
        left, action, trim_next = re.fullmatch(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", piece, flags=re.S).groups()
        if left:
            tokens[-1] = ("text", tokens[-1][1].rstrip())
        tokens.append(("action", action))
    pos = 0

    def block() -> list:
        nonlocal pos
        nodes: list = []
        while pos < len(tokens):
            kind, value = tokens[pos]
            if kind == "action" and (value == "end" or value.startswith("else")):
                return nodes
            pos += 1
            if kind == "text":
                nodes.append(value)
            elif value == "range .Messages":
                nodes.append(("range", block()))
                pos += 1  # its end
            elif role := re.fullmatch(r'if eq \.Role "(\w+)"', value):
                branches = [(role[1], block())]
                while tokens[pos][1] != "end":
                    pos += 1
                    branches.append((re.fullmatch(r'else if eq \.Role "(\w+)"', tokens[pos - 1][1])[1], block()))
                pos += 1
                nodes.append(("if", branches))
            else:
                assert value == ".Content", f"unexpected template action {value!r}"
                nodes.append(("content",))
        return nodes

    def render(nodes: list, message: dict | None) -> str:
        out = ""
        for node in nodes:
            if isinstance(node, str):
                out += node
            elif node[0] == "content":
                out += message["content"]
            elif node[0] == "range":
                out += "".join(render(node[1], m) for m in messages)
            else:
                out += next((render(body, message) for role, body in node[1] if role == message["role"]), "")
        return out

    return render(block(), None)


def read_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, flags=re.S | re.M)[1]
    return {
        "from": re.search(r"^FROM (.+)$", text, flags=re.M)[1],
        "template": template,
        "stop": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.+)$", text, flags=re.M)],
        "num_ctx": int(re.search(r"^PARAMETER num_ctx (\d+)$", text, flags=re.M)[1]),
    }


CHATS = [
    QUESTION,
    [
        {"role": "user", "content": "Sum a list?"},
        {"role": "assistant", "content": "```python\nsum(xs)\n```"},
        {"role": "user", "content": "\n\n  and 'quotes' \"double\" {{ .Content }} ünïcode"},
    ],
]


def test_the_modelfile_gives_kettles_prompt_and_stops(models, exported):
    """The starter's chat format (special tokens) from the file written beside the GGUF, and
    GPT-2's (text headers) as ollama_modelfile writes it."""
    _, starter = load_model(models["starter-shape"])
    written = (exported("starter-shape", "f32").parent / MODELFILE).read_text(encoding="utf-8")
    gpt2 = ollama_modelfile("model.gguf", gpt2_tokenizer(), context_length=1024)
    for tokenizer, text, context in ((starter, written, 256), (gpt2_tokenizer(), gpt2, 1024)):
        modelfile = read_modelfile(text)
        assert (modelfile["from"], modelfile["num_ctx"]) == ("./model.gguf", context)
        assert sorted(modelfile["stop"]) == sorted(tokenizer.decode([i]) for i in stop_token_ids(tokenizer))
        for chat in CHATS:
            assert render_go_template(modelfile["template"], chat) == tokenizer.decode(render_prompt(chat, tokenizer))


# --- the command ------------------------------------------------------------------------------


def test_export_gguf_command_refuses_what_it_would_overwrite(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(models["starter-shape"]), str(out), "--type", "q8_0"]) == 0
    first = out.read_bytes()
    assert main(["export-gguf", str(models["starter-shape"]), str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"kettle: error: {out}: already exists (--force replaces it)\n"
    assert out.read_bytes() == first
    assert main(["export-gguf", str(models["starter-shape"]), str(out), "--force", "--type", "f32"]) == 0
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODELFILE, "m.gguf"]  # no temporaries left


def test_a_tokenizer_llama_cpp_cannot_split_as_kettle_is_refused_by_name(tmp_path, verdict_text, capsys):
    """Older Kettles' pattern splits numbers into 1-2 digits; no llama.cpp pre-tokenizer does."""
    old = train_tokenizer([verdict_text], vocab_size=400, pattern=SPLIT_PATTERN)
    save_model(GPT(GPTConfig(**{**TEST_SHAPE, "vocab_size": 512})), tmp_path / "old", tokenizer=old)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["export-gguf", str(tmp_path / "old"), str(out / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "splits numbers into 1-2 digits" in err and "kettle tokenizer train" in err
    assert list(out.iterdir()) == []


def test_the_default_tokenizer_exports(tiny_model_dir, tmp_path):
    """What Kettle trains by default (the test models' tokenizer, the starter's) is one llama.cpp
    splits as Kettle does."""
    assert main(["export-gguf", str(tiny_model_dir), str(tmp_path / "m.gguf")]) == 0


def test_tokenizer_train_defaults_to_a_pattern_gguf_takes(tmp_path, verdict_text):
    (tmp_path / "v.txt").write_text(verdict_text, encoding="utf-8")
    train = ["tokenizer", "train", "--data", str(tmp_path / "v.txt"), "--vocab-size", "400"]
    assert main([*train, "--out", str(tmp_path / "llama3")]) == 0
    assert main([*train, "--out", str(tmp_path / "kettle"), "--pattern", "kettle"]) == 0
    assert llama_cpp_pre_tokenizer(load_tokenizer(tmp_path / "llama3")) == "llama-bpe"
    with pytest.raises(KettleError, match="1-2 digits"):
        llama_cpp_pre_tokenizer(load_tokenizer(tmp_path / "kettle"))


# --- llama.cpp itself ---------------------------------------------------------------------------

# node-llama-cpp's prebuilt binaries for this machine, where their package's name is known: the
# others (CUDA, Vulkan builds) are not needed on the CPU.
PREBUILT = {
    ("linux", "x86_64"): "linux-x64",
    ("linux", "aarch64"): "linux-arm64",
    ("darwin", "arm64"): "mac-arm64-metal",
}


def node_llama_cpp() -> Path:
    """A folder with node-llama-cpp installed (by npm, once, into the user's cache folder), or
    the test is skipped, saying why."""
    npm = shutil.which("npm")
    if not (shutil.which("node") and npm):
        pytest.skip("node and npm are needed to run llama.cpp through node-llama-cpp")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kettle-tests"
    folder = cache / f"node-llama-cpp-{NODE_LLAMA_CPP}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".node-llama-cpp.lock", "w") as lock:  # one installer among test workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "node_modules" / "node-llama-cpp" / "package.json").exists():
            import platform

            prebuilt = PREBUILT.get((sys.platform, platform.machine()))
            packages = [f"node-llama-cpp@{NODE_LLAMA_CPP}"]
            packages += [f"@node-llama-cpp/{prebuilt}@{NODE_LLAMA_CPP}", "--omit=optional"] if prebuilt else []
            tmp = cache / f".node-llama-cpp-{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                done = subprocess.run(
                    [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", *packages],
                    capture_output=True,
                    text=True,
                    env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
                    timeout=600,
                )
            except subprocess.TimeoutExpired:  # a registry that never answers: no llama.cpp here
                shutil.rmtree(tmp, ignore_errors=True)
                pytest.skip("npm could not install node-llama-cpp within 10 minutes")
            if done.returncode:
                shutil.rmtree(tmp, ignore_errors=True)
                lines = done.stderr.strip().splitlines() or ["no output"]
                why = next((line for line in lines if "Error:" in line), lines[0])  # npm's reason, not its log
                pytest.skip(f"npm could not install node-llama-cpp ({why.strip()})")
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    return folder


@pytest.mark.slow  # about 35 s on 2 busy cores (and npm's install, once)
def test_llama_cpp_encodes_and_decodes_as_kettle(models, exported, tmp_path):
    install = node_llama_cpp()
    texts = varied_texts()
    kettle = {}
    specs = []
    for name, model_dir in models.items():
        _, tokenizer = load_model(model_dir)
        prompt, greedy, clear = kettle_greedy(model_dir)
        kettle[name] = ([tokenizer.encode(t) for t in texts], greedy, prompt, clear)
        chat = tokenizer.decode(prompt)  # the Modelfile's template renders this text (tested above)
        specs += [
            {
                "path": str(exported(name, type)),
                "texts": texts,
                "chat": chat,
                "prompt": prompt,
                "new_tokens": NEW_TOKENS,
            }
            for type in TYPES
        ]
    (tmp_path / "in.json").write_text(json.dumps({"models": specs}), encoding="utf-8")
    subprocess.run(
        ["node", str(CHECK_SCRIPT), str(install), str(tmp_path / "in.json"), str(tmp_path / "out.json")],
        check=True,
        timeout=300,
    )
    results = iter(json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))["models"])
    for name in models:
        ids, greedy, prompt, clear = kettle[name]
        for type in TYPES:
            got = next(results)
            assert got["chat_ids"] == prompt  # the rendered chat prompt is Kettle's prompt ids
            same = [a == b for a, b in zip(got["ids"], ids)]
            assert all(same) and len(same) == len(texts) == 200, (name, type, [t for t, s in zip(texts, same) if not s])
            agree = next((i for i, (a, b) in enumerate(zip(got["greedy"], greedy)) if a != b), NEW_TOKENS)
            print(
                f"{name} {type}: ids {sum(same)}/200, greedy {agree}/{NEW_TOKENS}, {got['tokens_per_second']:.0f} tok/s"
            )
            if type == "f32":  # Kettle's tokens up to a near tie (if any), and not one repeated
                assert got["greedy"][:clear] == greedy[:clear] and clear >= 8 and len(set(greedy)) > 8, clear
