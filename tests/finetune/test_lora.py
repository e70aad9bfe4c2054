"""LoRA adapters: frozen base, no-op start, small separate file, exact merge."""

from __future__ import annotations

import pytest
import torch

from finetune.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoRAConfig,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_adapter,
    merge_lora,
    save_adapter,
)
from gpt.checkpoint import load_model
from gpt.errors import KettleError


def _randomise_adapter(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.05


def test_apply_lora_freezes_base_and_starts_as_identity(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    ids = torch.randint(0, 512, (2, 20))
    before = model(ids)
    apply_lora(model, LoRAConfig(rank=4, targets=("attn.c_attn", "mlp.c_fc")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(lora_layers(model)) == 2 * model.config.n_layer
    assert torch.equal(model(ids), before)


def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    _randomise_adapter(model)
    ids = torch.randint(0, 512, (2, 24))
    with_adapter = model(ids)
    base, _ = load_model(tiny_model_dir)
    assert not torch.allclose(with_adapter, base(ids), atol=1e-4)  # the adapter does something

    save_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS])  # + PEFT's
    adapter_bytes = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < (tiny_model_dir / "model.safetensors").stat().st_size / 2

    # Loading the adapter file onto a fresh base reproduces the logits.
    reloaded, _ = load_model(tiny_model_dir)
    load_adapter(reloaded, tmp_path / "adapter")
    torch.testing.assert_close(reloaded(ids), with_adapter)

    # Merging in memory and into a model directory gives the same logits with no LoRA code.
    torch.testing.assert_close(merge_lora(reloaded)(ids), with_adapter, atol=1e-5, rtol=1e-5)
    assert not lora_layers(reloaded)
    merge_adapter(tiny_model_dir, tmp_path / "adapter", out_dir=tmp_path / "merged")
    merged, _ = load_model(tmp_path / "merged")
    torch.testing.assert_close(merged(ids), with_adapter, atol=1e-5, rtol=1e-5)


def test_adapter_for_another_shape_is_refused(tiny_model_dir, tiny_gpt2_vocab_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    apply_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "adapter")
    other, _ = load_model(tiny_gpt2_vocab_model_dir)
    with pytest.raises(KettleError, match="another shape"):
        load_adapter(other, tmp_path / "adapter")
    with pytest.raises(KettleError, match="not a LoRA adapter"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": ("attn.q",)}, "targets"),
    ],
)
def test_bad_lora_settings(kwargs, message):
    with pytest.raises(KettleError, match=message):
        LoRAConfig(**kwargs)
