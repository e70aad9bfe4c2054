"""LoRA adapters in PEFT's layout, both ways, against the real transformers + peft (offline, on a
tiny model made here): Kettle's adapter loads with PeftModel on the export-hf model, and a PEFT
adapter merges in Kettle to what PEFT's merge_and_unload computes."""

from __future__ import annotations

import json

import pytest
import torch

from data.paths import models_dir
from finetune.lora import PEFT_CONFIG, PEFT_WEIGHTS, LoRAConfig, apply_lora, lora_layers, merge_adapter, save_adapter
from gpt.checkpoint import load_model
from gpt.hf import export_hf
from tui.cli import main

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def export(tiny_model_dir, tmp_path_factory):
    """The tiny model as `kettle export-hf` writes it: weights and config are what PEFT sees."""
    return export_hf(tiny_model_dir, tmp_path_factory.mktemp("hf") / "tiny-hf")


def _hf(export):
    return transformers.AutoModelForCausalLM.from_pretrained(export).eval()


def _ids(n=24):
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(1))


def _kettle_logits(model_dir):
    model, _ = load_model(model_dir)
    with torch.no_grad():
        return model.eval()(_ids())


@pytest.mark.parametrize(
    "config",
    [
        LoRAConfig(rank=4, alpha=8),
        # One c_proj only: PEFT must wrap the attention's, not the MLP's of the same name.
        LoRAConfig(rank=2, alpha=3, targets=("attn.c_proj", "mlp.c_fc")),
    ],
)
def test_kettle_adapter_in_peft_equals_kettles_merged_model(tiny_model_dir, export, tmp_path, config):
    model, _ = load_model(tiny_model_dir)
    apply_lora(model, config)
    g = torch.Generator().manual_seed(0)
    for layer in lora_layers(model).values():  # both matrices away from their initial values
        layer.lora_A.data = torch.randn(layer.lora_A.shape, generator=g) * 0.2
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.2
    save_adapter(model, tmp_path / "adapter", base=str(tiny_model_dir))
    merge_adapter(tiny_model_dir, tmp_path / "adapter", out_dir=tmp_path / "merged")

    meta = json.loads((tmp_path / "adapter" / PEFT_CONFIG).read_text())
    assert meta["target_modules"] == list(config.targets) and meta["fan_in_fan_out"] is True
    assert meta["base_model_name_or_path"] == str(tiny_model_dir)
    peft_model = peft.PeftModel.from_pretrained(_hf(export), tmp_path / "adapter").eval()
    wrapped = {
        name.removeprefix("base_model.model.transformer.")
        for name, module in peft_model.named_modules()
        if name.endswith(("c_attn", "c_proj", "c_fc")) and hasattr(module, "lora_A")
    }
    assert wrapped == {f"h.{i}.{t}" for i in range(2) for t in config.targets}
    with torch.no_grad():
        theirs = peft_model(_ids()).logits
        base = _hf(export)(_ids()).logits
    ours = _kettle_logits(tmp_path / "merged")
    assert (theirs - base).abs().max() > 1e-2  # the adapter does something
    assert (theirs - ours).abs().max() <= 1e-5


def test_lora_finetune_writes_an_adapter_peft_loads(tiny_model_dir, export, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(
        json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i} it is."} for i in range(12)]),
        encoding="utf-8",
    )
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--epochs",
                "2",
                "--lr",
                "1e-2",
                "--lora",
                "--lora-rank",
                "2",
                "--lora-alpha",
                "4",
                "--name",
                "peft-out",
                "--no-progress",
            ]
        )
        == 0
    ), capsys.readouterr()
    adapter = models_dir() / "peft-out" / "adapter"
    assert {PEFT_CONFIG, PEFT_WEIGHTS} <= {p.name for p in adapter.iterdir()}
    peft_model = peft.PeftModel.from_pretrained(_hf(export), adapter).eval()
    with torch.no_grad():
        theirs = peft_model(_ids()).logits
        base = _hf(export)(_ids()).logits
    ours = _kettle_logits(models_dir() / "peft-out")  # the merged model the run registered
    assert (theirs - base).abs().max() > 1e-4
    assert (theirs - ours).abs().max() <= 1e-5


def _peft_adapter(export, directory, seed=0, **settings):
    """An adapter made by peft itself on the export, its weights perturbed, saved as PEFT does;
    returns the logits of PEFT's own merge."""
    settings = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        **settings,
    }
    model = peft.get_peft_model(_hf(export), peft.LoraConfig(**settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(directory)
    with torch.no_grad():
        return model.merge_and_unload().eval()(_ids()).logits


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"target_modules": ["c_attn"], "r": 3, "lora_alpha": 5, "lora_dropout": 0.1},
        {"use_rslora": True},
        {"fan_in_fan_out": False},  # PEFT turns it on for Conv1D itself
    ],
)
def test_peft_adapter_merges_in_kettle_like_merge_and_unload(tiny_model_dir, export, tmp_path, capsys, settings):
    theirs = _peft_adapter(export, tmp_path / "adapter", **settings)
    assert (
        main(
            [
                "finetune",
                "merge",
                "--base",
                str(tiny_model_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    ), capsys.readouterr()
    ours = _kettle_logits(tmp_path / "merged")
    assert (ours - _kettle_logits(tiny_model_dir)).abs().max() > 1e-2
    assert (theirs - ours).abs().max() <= 1e-5


def _edit_config(adapter, **changes):
    path = adapter / PEFT_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(adapter, change):
    from safetensors.torch import load_file, save_file

    path = adapter / PEFT_WEIGHTS
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


ROOT = "base_model.model.transformer.h.0.attn.c_attn"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: _edit_config(a, use_dora=True), "adapter_config.json: use_dora is true"),
        (lambda a: _edit_config(a, rank_pattern={"c_attn": 2}), 'rank_pattern is {"c_attn": 2}'),
        (lambda a: _edit_config(a, bias="all"), 'bias is "all"'),
        (lambda a: _edit_config(a, modules_to_save=["lm_head"]), "modules_to_save is"),
        (lambda a: _edit_config(a, layers_to_transform=[0]), "layers_to_transform is [0]"),
        (lambda a: _edit_config(a, init_lora_weights="pissa"), 'init_lora_weights is "pissa"'),
        (lambda a: _edit_config(a, peft_type="IA3"), "peft_type is 'IA3'"),
        (lambda a: _edit_config(a, r=0), "LoRA rank must be a positive integer"),
        (lambda a: _edit_config(a, lora_alpha="x"), "adapter_config.json: "),
        (lambda a: (a / PEFT_CONFIG).write_text("[1]"), "expected a JSON object"),
        (lambda a: (a / PEFT_CONFIG).write_text("{"), "adapter_config.json: cannot read"),
        (lambda a: (a / PEFT_WEIGHTS).rename(a / "adapter_model.bin"), "never unpickles adapter_model.bin"),
        (lambda a: (a / PEFT_WEIGHTS).write_bytes(b"\x10\x00"), "corrupt or truncated"),
        (
            lambda a: _edit_tensors(
                a, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)})
            ),
            "tensor base_model.model.lm_head.lora_A.weight is not a LoRA matrix",
        ),
        (
            lambda a: _edit_tensors(
                a, lambda t: t.update({ROOT.replace("h.0", "h.7") + ".lora_A.weight": torch.zeros(4, 32)})
            ),
            "unexpected base_model.model.transformer.h.7.attn.c_attn.lora_A.weight",
        ),
        (
            lambda a: _edit_tensors(a, lambda t: t.pop(ROOT + ".lora_B.weight")),
            "tensors do not match the model (no h.0.attn.c_attn.lora_B)",
        ),
        (
            lambda a: _edit_tensors(a, lambda t: t.update({ROOT + ".lora_B.weight": torch.zeros(96, 5)})),
            f"tensor {ROOT}.lora_B.weight has shape [96, 5], this model needs [96, 4]",
        ),
        (lambda a: _edit_tensors(a, lambda t: t.clear()), "holds no LoRA tensors"),
    ],
)
def test_bad_peft_adapter_is_one_line_and_writes_nothing(tiny_model_dir, export, tmp_path, capsys, damage, message):
    adapter = tmp_path / "adapter"
    _peft_adapter(export, adapter)
    damage(adapter)
    capsys.readouterr()
    assert (
        main(
            [
                "finetune",
                "merge",
                "--base",
                str(tiny_model_dir),
                "--adapter",
                str(adapter),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("kettle: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "merged").exists()


async def test_the_app_imports_a_peft_adapter_merged_into_its_base(app_model, tmp_path):
    from tests.tui.test_app import SIZE, open_chat, wait_until
    from tui.app import KettleApp

    export = export_hf(models_dir() / "tiny", tmp_path / "tiny-hf")
    theirs = _peft_adapter(export, tmp_path / "my-lora")  # it names the export: tiny, active, is used
    _peft_adapter(export, tmp_path / "dora")
    _edit_config(tmp_path / "dora", use_dora=True)
    app = KettleApp()
    async with app.run_test(size=SIZE) as pilot:
        await open_chat(pilot, app)
        await pilot.press("f4")
        await wait_until(pilot, lambda: app.current_mode == "models", "the models screen")
        for adapter in ("dora", "my-lora"):
            await pilot.press("i")
            await wait_until(pilot, lambda: app.screen.__class__.__name__ == "TextModal", "the path box")
            app.screen.query_one("#text").value = str(tmp_path / adapter)
            await pilot.press("enter")
            if adapter == "dora":
                await wait_until(
                    pilot, lambda: any("use_dora is true" in n.message for n in app._notifications), "the refusal"
                )
                assert sorted(p.name for p in models_dir().iterdir()) == ["tiny"]
        await wait_until(pilot, lambda: app.store.find_model_version("tiny-my-lora") is not None, "the merged import")
        version = app.store.model_version("tiny-my-lora")
        assert version.kind == "imported" and version.path == str(models_dir() / "tiny-my-lora")
    assert (theirs - _kettle_logits(version.path)).abs().max() <= 1e-5


def test_an_adapter_merges_into_the_model_it_names_else_the_active_one(tiny_model_dir, export, tmp_path):
    import shutil

    from data.store import open_store
    from gpt.errors import KettleError
    from tui.screens.models import adapter_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copytree(tiny_model_dir, models_dir() / "tiny")

    def named(base):
        (adapter / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
        return adapter_base(store, adapter)

    with open_store() as store:
        with pytest.raises(KettleError, match="its base model nowhere is not one of yours and no model is active"):
            named("nowhere")
        store.activate_model(store.add_model_version("other", tiny_model_dir, kind="imported").id)
        assert named("someone/tiny") == models_dir() / "tiny"  # a hub id, by its last part
        assert named(str(models_dir() / "tiny")) == models_dir() / "tiny"
        assert named(str(export)) == tiny_model_dir  # an export: not a Kettle model, the active one
        assert named("nowhere") == tiny_model_dir
