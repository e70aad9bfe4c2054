"""export-hf writes what the Hugging Face libraries load as it is, and import-hf takes it back.

Real transformers and tokenizers, offline, on tiny models made here: AutoTokenizer encodes as
Kettle does, apply_chat_template renders Kettle's prompt ids, pipeline's greedy text is `kettle
generate`'s, export -> import -> export writes the same bytes, and config values Kettle's model
does not implement are refused one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt.chat_template import render_prompt
from gpt.checkpoint import load_model
from gpt.hf import export_hf, import_hf
from gpt.tokenizer import END_OF_TEXT, LEGACY_TOKENIZER_FILE, TOKENIZER_FILE, gpt2_tokenizer
from tui.cli import main

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TIKTOKEN_CACHE = ROOT.parent / "shared" / "tiktoken_cache"
# The tiktoken cache holds GPT-2's original release files: encoder.json and vocab.bpe.
GPT2_VOCAB, GPT2_MERGES = (
    TIKTOKEN_CACHE / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
    TIKTOKEN_CACHE / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
)


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tiny_gpt2_vocab_model_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {
        "trained": export_hf(tiny_model_dir, out / "trained"),
        "gpt2": export_hf(tiny_gpt2_vocab_model_dir, out / "gpt2"),
    }


@pytest.fixture(scope="module")
def kettle_dirs(tiny_model_dir, tiny_gpt2_vocab_model_dir) -> dict[str, Path]:
    return {"trained": tiny_model_dir, "gpt2": tiny_gpt2_vocab_model_dir}


def mixed_text() -> str:
    """2,000 lines: Kettle's own source, non-ASCII prose, odd whitespace and special tokens."""
    code = [
        line for path in sorted((ROOT / "gpt").glob("*.py")) for line in path.read_text(encoding="utf-8").splitlines()
    ]
    other = [
        "Ünïcödé façade — naïve café ✓",
        "日本語のテキストと中文",
        "emoji 😀👍🏽 and ＦＵＬＬ width",
        "\ttabs\t and  double  spaces   ",
        "",
        "   ",
        "it's we'll they're I'D",
        "1234567 3.14159",
        f"a{END_OF_TEXT}b <|user|>hi<|end|> <|assistant|>",
        "\r\nwindows\r\n",
        "Привет, мир! ¿Qué?",
    ]
    lines = [code[i % len(code)] if i % 3 else other[i % len(other)] for i in range(2000)]
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["trained", "gpt2"])
def test_autotokenizer_encodes_a_mixed_text_to_kettles_ids(kind, exports, kettle_dirs):
    hf = transformers.AutoTokenizer.from_pretrained(exports[kind])
    _, tokenizer = load_model(kettle_dirs[kind])
    text = mixed_text()
    assert text.count("\n") >= 1999 and END_OF_TEXT in text
    # Special-token strings are markers to Hugging Face tokenizers, as in Kettle's chat rendering.
    ids = tokenizer.encoding.encode(text, allowed_special="all")
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert END_OF_TEXT in hf.decode(ids) and hf.decode(ids) == tokenizer.decode(ids)
    plain = text.replace(END_OF_TEXT, "").replace("<|", "<")  # no special token left: user text
    assert hf(plain, add_special_tokens=False)["input_ids"] == tokenizer.encode(plain)


CHATS = {
    "single": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    "multi": [
        {"role": "system", "content": "Answer in code."},
        {"role": "user", "content": "Sum a list?"},
        {"role": "assistant", "content": "```python\nsum(xs)\n```"},
        # Leading blank lines and indentation: encoded apart from the header before them.
        {"role": "user", "content": "\n\n  def f(x):\n      return x  \n"},
        {"role": "assistant", "content": " Ça marche ✓"},
        {"role": "user", "content": "\t\tand now?"},
    ],
}


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("kind", ["trained", "gpt2"])
def test_apply_chat_template_gives_kettles_prompt_ids(kind, chat, exports, kettle_dirs):
    hf = transformers.AutoTokenizer.from_pretrained(exports[kind])
    _, tokenizer = load_model(kettle_dirs[kind])
    messages = CHATS[chat]
    got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert got == render_prompt(messages, tokenizer)


@pytest.mark.parametrize("kind", ["trained", "gpt2"])
def test_the_assistant_tokens_mask_is_kettles_training_mask(kind, exports, kettle_dirs):
    """TRL's assistant_only_loss trains on the tokens the template's {% generation %} blocks
    mark: they must be render_training's loss mask (each answer and its end-of-turn marker)."""
    from gpt.chat_template import render_training

    hf = transformers.AutoTokenizer.from_pretrained(exports[kind])
    _, tokenizer = load_model(kettle_dirs[kind])
    messages = CHATS["multi"] + [{"role": "assistant", "content": "Done."}]
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = render_training(messages, tokenizer)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == [int(m) for m in mask] and sum(mask) > 2


@pytest.mark.parametrize("kind", ["trained", "gpt2"])
def test_trl_assistant_only_loss_trains_on_kettles_answers(kind, exports, kettle_dirs, tmp_path):
    """TRL's SFTTrainer with assistant_only_loss=True on the export as it is (it refused a chat
    template without {% generation %} markers): it trains on render_training's loss mask."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from gpt.chat_template import render_training

    _, tokenizer = load_model(kettle_dirs[kind])
    messages = CHATS["multi"] + [{"role": "assistant", "content": "Done."}]
    args = trl.SFTConfig(
        output_dir=str(tmp_path), assistant_only_loss=True, max_steps=1, per_device_train_batch_size=2,
        use_cpu=True, report_to=[], save_strategy="no", max_length=512,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=transformers.AutoModelForCausalLM.from_pretrained(exports[kind], dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list([{"messages": messages}] * 2),
        processing_class=transformers.AutoTokenizer.from_pretrained(exports[kind]),
    )
    row = trainer.train_dataset[0]
    ids, mask = render_training(messages, tokenizer)
    assert row["input_ids"] == ids
    assert [label != -100 for label in row["labels"]] == mask and sum(mask) > 2
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_the_export_holds_the_models_own_special_ids(exports, kettle_dirs):
    _, tokenizer = load_model(kettle_dirs["trained"])
    config = json.loads((exports["trained"] / "config.json").read_text())
    eot, end = tokenizer.special_id(END_OF_TEXT), tokenizer.special_id("<|end|>")
    assert config["eos_token_id"] == config["bos_token_id"] == eot != 50256
    generation = json.loads((exports["trained"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sorted([eot, end])


def kettle_generate(model_dir: Path, prompt: str, capsys, *flags: str) -> str:
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(model_dir),
                prompt,
                "--temperature",
                "0",
                "--max-new-tokens",
                "24",
                "--device",
                "cpu",
                *flags,
            ]
        )
        == 0
    )
    return capsys.readouterr().out.removesuffix("\n")


@pytest.mark.parametrize("kind", ["trained", "gpt2"])
def test_pipeline_greedy_text_equals_kettle_generate(kind, exports, kettle_dirs, capsys):
    pipe = transformers.pipeline("text-generation", model=str(exports[kind]), device="cpu")
    prompt = "I had always thought Jack"
    out = pipe(prompt, do_sample=False, max_new_tokens=24, return_full_text=False)
    assert out[0]["generated_text"] == kettle_generate(kettle_dirs[kind], prompt, capsys)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}]
    answer = pipe(messages, do_sample=False, max_new_tokens=24)[0]["generated_text"][-1]
    assert answer["role"] == "assistant"
    assert answer["content"] == kettle_generate(
        kettle_dirs[kind], prompt, capsys, "--chat", "--system", "You are terse."
    )


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_export_import_export_writes_the_same_bytes(tmp_path, make_model_dir):
    # What Hugging Face's GPT-2 holds beyond the defaults: an MLP width of its own, an untied
    # head, dropout.
    make_model_dir(
        tmp_path / "model",
        seed=1,
        vocab_size=520,
        context_length=32,
        n_embd=16,
        n_inner=24,
        tie_embeddings=False,
        dropout=0.1,
    )
    first = export_hf(tmp_path / "model", tmp_path / "hf")
    assert transformers.GPT2LMHeadModel.from_pretrained(first).config.n_inner == 24
    back = import_hf(first, tmp_path / "back")
    assert files(export_hf(back, tmp_path / "hf2")) == files(first)
    (original, tokenizer), (imported, tokenizer2) = load_model(tmp_path / "model"), load_model(back)
    assert imported.config == original.config
    assert all(torch.equal(t, imported.state_dict()[n]) for n, t in original.state_dict().items())
    assert tokenizer2.encoding._mergeable_ranks == tokenizer.encoding._mergeable_ranks
    assert tokenizer2.special_tokens == tokenizer.special_tokens
    assert sorted(files(back)) == ["config.json", TOKENIZER_FILE, "model.safetensors"]


def test_export_import_export_on_gpt2s_vocabulary(exports, tmp_path):
    back = import_hf(exports["gpt2"], tmp_path / "back")
    assert sorted(files(back)) == ["config.json", "model.safetensors"]  # GPT-2's: fetched by name
    assert files(export_hf(back, tmp_path / "hf2")) == files(exports["gpt2"])


def gpt2_directory(path: Path, config: dict, shard: str | None = None) -> "transformers.GPT2LMHeadModel":
    """A directory as transformers writes it, with GPT-2's real tokenizer (made from the
    original release files by transformers)."""
    torch.manual_seed(2)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    merges = [tuple(line.split()) for line in GPT2_MERGES.read_text(encoding="utf-8").splitlines()[1:] if line]
    transformers.GPT2Tokenizer(vocab=json.loads(GPT2_VOCAB.read_text(encoding="utf-8")), merges=merges).save_pretrained(
        path
    )
    return model


def test_any_gpt2_directory_imports_sharded_and_with_n_inner(tmp_path):
    hf = gpt2_directory(
        tmp_path / "hf", dict(n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=40), shard="200KB"
    )
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    model, tokenizer = load_model(import_hf(tmp_path / "hf", tmp_path / "kettle"))
    assert tokenizer.name == "gpt2" and model.config.n_inner == 40
    assert not (tmp_path / "kettle" / TOKENIZER_FILE).exists()
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < 1e-5
    text = mixed_text()[:5000]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(text)[
        "input_ids"
    ] == gpt2_tokenizer().encoding.encode(text, allowed_special="all")


UNSUPPORTED = [
    ("layer_norm_epsilon", 0.1),
    ("scale_attn_by_inverse_layer_idx", True),
    ("reorder_and_upcast_attn", True),
    ("scale_attn_weights", False),
    ("add_cross_attention", True),
    ("activation_function", "relu"),
    ("attn_pdrop", 0.3),
]


@pytest.mark.parametrize("key,value", UNSUPPORTED, ids=[k for k, _ in UNSUPPORTED])
def test_a_config_value_kettle_does_not_implement_is_refused_by_name(key, value, exports, tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name, content in files(exports["gpt2"]).items():
        (hf / name).write_bytes(content)
    config = json.loads((hf / "config.json").read_text()) | {key: value}
    (hf / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["import-hf", str(hf), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{hf / 'config.json'}: {key} {value!r}" in err, err
    assert not (tmp_path / "out").exists()


def test_a_shard_index_pointing_out_of_the_directory_is_refused(exports, tmp_path):
    from gpt.errors import KettleError

    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (hf / name).write_bytes((exports["gpt2"] / name).read_bytes())
    (tmp_path / "elsewhere.safetensors").write_bytes((exports["gpt2"] / "model.safetensors").read_bytes())
    (hf / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}})
    )
    with pytest.raises(KettleError, match="weight_map must map tensor names to .safetensors files in"):
        import_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_model_directory_of_an_older_kettle_still_loads(tiny_model_dir, tmp_path):
    """Kettle saved its own tokenizer format as tokenizer.json, Hugging Face's name."""
    old = tmp_path / "old"
    old.mkdir()
    for name, content in files(tiny_model_dir).items():
        (old / (LEGACY_TOKENIZER_FILE if name == TOKENIZER_FILE else name)).write_bytes(content)
    meta = json.loads((old / "config.json").read_text()) | {"tokenizer": LEGACY_TOKENIZER_FILE}
    (old / "config.json").write_text(json.dumps(meta))
    _, tokenizer = load_model(old)
    assert tokenizer.n_vocab == load_model(tiny_model_dir)[1].n_vocab
    assert (
        files(export_hf(old, tmp_path / "hf"))["tokenizer.json"]
        == files(export_hf(tiny_model_dir, tmp_path / "hf-new"))["tokenizer.json"]
    )


@pytest.mark.parametrize("kind", ["trained", "gpt2"])
def test_documents_ground_the_newest_question_as_kettle_does(kind, exports, kettle_dirs):
    """apply_chat_template(documents=...) puts passages where Kettle's grounded answers have them."""
    from gpt.chat_template import grounded

    hf = transformers.AutoTokenizer.from_pretrained(exports[kind])
    _, tokenizer = load_model(kettle_dirs[kind])
    messages = CHATS["multi"]
    passages = ["str.upper()\n\nReturn a copy of the string converted to uppercase.", "How do I sum?\nCall sum(xs)."]
    documents = [{"title": f"source {i}", "text": text} for i, text in enumerate(passages)]
    got = hf.apply_chat_template(messages, documents=documents, add_generation_prompt=True, tokenize=True)
    assert got["input_ids"] == render_prompt(grounded(messages, passages), tokenizer)
    plain = hf.apply_chat_template(messages, documents=[], add_generation_prompt=True, tokenize=True)
    assert plain["input_ids"] == render_prompt(messages, tokenizer)
