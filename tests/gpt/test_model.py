"""The GPT matches Hugging Face's GPT-2 bit for bit (within fp32 noise), through import and export."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from gpt.checkpoint import load_model, save_model
from gpt.config import PRESETS, GPTConfig, get_preset
from gpt.errors import KettleError
from gpt.hf import export_hf, import_hf
from gpt.model import GPT, KVCache

transformers = pytest.importorskip("transformers")

CONFIG = GPTConfig(vocab_size=50257, context_length=64, n_layer=3, n_head=4, n_embd=32)


def hf_model(config: GPTConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    # Random, non-trivial values everywhere (HF initialises biases and LayerNorms to 0/1).
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def save_hf_dir(model, path):
    path.mkdir()
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_logits_match_transformers_through_import_and_export(tmp_path):
    reference = hf_model(CONFIG)
    save_hf_dir(reference, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "kettle")
    model, _ = load_model(tmp_path / "kettle")

    idx = torch.randint(0, CONFIG.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx).logits
        assert (model(idx) - expected).abs().max().item() < 1e-4

        export_hf(tmp_path / "kettle", tmp_path / "exported")
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
        assert (reloaded(idx).logits - expected).abs().max().item() < 1e-4


def test_a_kettle_model_exports_to_transformers(tmp_path):
    torch.manual_seed(3)
    model = GPT(CONFIG).eval()
    save_model(model, tmp_path / "m")
    export_hf(tmp_path / "m", tmp_path / "hf")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, CONFIG.vocab_size, (1, 30))
    with torch.no_grad():
        assert (reloaded(idx).logits - model(idx)).abs().max().item() < 1e-4


def test_hf_files_with_prefix_and_mask_buffers_import(tmp_path):
    reference = hf_model(CONFIG, seed=2)
    (tmp_path / "hf").mkdir()
    reference.config.save_pretrained(tmp_path / "hf")
    # The published files name tensors without the `transformer.` prefix, and old ones carry the
    # causal mask as h.N.attn.bias: import must accept both.
    state = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in reference.state_dict().items()
        if k.startswith("transformer.")
    }
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    import_hf(tmp_path / "hf", tmp_path / "k")
    model, _ = load_model(tmp_path / "k")
    idx = torch.randint(0, CONFIG.vocab_size, (1, 16))
    with torch.no_grad():
        assert (model(idx) - reference(idx).logits).abs().max().item() < 1e-4


def test_import_rejects_a_non_gpt2_config(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(KettleError, match="only gpt2"):
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split", [1, 7, 19])
def test_kv_cache_matches_full_forward(split):
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 24))
    cache = KVCache(CONFIG, batch_size=2)
    with torch.no_grad():
        full = model(idx)
        first = model(idx[:, :split], kv_cache=cache)
        rest = [model(idx[:, t : t + 1], kv_cache=cache) for t in range(split, 24)]
    got = torch.cat([first, *rest], dim=1)
    assert cache.pos == 24
    assert (got - full).abs().max().item() < 1e-5


def test_cache_truncate_reuses_a_prefix():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    a = torch.randint(0, CONFIG.vocab_size, (1, 20))
    b = torch.cat([a[:, :12], torch.randint(0, CONFIG.vocab_size, (1, 5))], dim=1)
    cache = KVCache(CONFIG)
    with torch.no_grad():
        model(a, kv_cache=cache)
        cache.truncate(12)
        tail = model(b[:, 12:], kv_cache=cache)
        assert (tail - model(b)[:, 12:]).abs().max().item() < 1e-5


def test_sequence_longer_than_context_is_refused():
    model = GPT(CONFIG)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, CONFIG.context_length + 1, dtype=torch.long))


def test_output_head_is_tied_and_residual_projections_scaled():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=500, context_length=32, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    proj = model.h[0].mlp.c_proj.weight.std().item()
    fc = model.h[0].mlp.c_fc.weight.std().item()
    assert proj == pytest.approx(0.02 / math.sqrt(2 * config.n_layer), rel=0.05)
    assert fc == pytest.approx(0.02, rel=0.05)


def test_an_untied_head_is_its_own_matrix_and_survives_save_load_and_hf(tmp_path):
    config = CONFIG.replace(tie_embeddings=False)
    torch.manual_seed(4)
    model = GPT(config).eval()
    assert model.lm_head.weight is not model.wte.weight
    # The book's init: N(0, 1) embeddings, while the head keeps GPT-2's small init.
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    idx = torch.randint(0, CONFIG.vocab_size, (1, 30))
    with torch.no_grad():
        expected = model(idx)
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is not loaded.wte.weight
    with torch.no_grad():
        assert torch.equal(loaded(idx), expected)
        export_hf(tmp_path / "m", tmp_path / "hf")
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        assert not reloaded.config.tie_word_embeddings
        assert (reloaded(idx).logits - expected).abs().max().item() < 1e-4
        import_hf(tmp_path / "hf", tmp_path / "back")
        back, _ = load_model(tmp_path / "back")
        assert not back.config.tie_embeddings
        assert torch.equal(back(idx), expected)


def test_a_tied_checkpoint_does_not_load_as_untied(tmp_path):
    save_model(GPT(CONFIG), tmp_path / "m")
    meta = (tmp_path / "m" / "config.json").read_text().replace('"tie_embeddings": true', '"tie_embeddings": false')
    (tmp_path / "m" / "config.json").write_text(meta)
    with pytest.raises(KettleError, match="missing tensor lm_head.weight"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(
    "name,millions", [("gpt2", 124), ("gpt2-medium", 355), ("gpt2-large", 774), ("gpt2-xl", 1558), ("book-124m", 162)]
)
def test_presets_have_gpt2_sizes(name, millions):
    config = get_preset(name)
    with torch.device("meta"):
        n = GPT(config).num_params()
    assert round(n / 1e6) == millions


def test_small_presets_fit_cpu_work():
    sizes = {}
    for name in ("tiny", "small"):
        with torch.device("meta"):
            sizes[name] = GPT(PRESETS[name]).num_params()
    assert 0.5e6 < sizes["tiny"] < 2e6
    assert 10e6 < sizes["small"] < 20e6


def test_config_rejects_bad_values():
    with pytest.raises(KettleError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(KettleError, match="unknown preset 'gpt5'"):
        get_preset("gpt5")
    with pytest.raises(KettleError, match="unknown config keys"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(KettleError, match="tie_embeddings must be true or false"):
        GPTConfig.from_dict({"tie_embeddings": "no"})


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 1000])
def test_loss_in_chunks_equals_the_full_cross_entropy_and_its_gradients(tie, chunk_rows):
    """The training loss never holds the full logits, yet its value and every parameter's
    gradient are those of F.cross_entropy over them (chunks that do and do not divide the rows)."""
    import torch.nn.functional as F

    from gpt.model import head_cross_entropy

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, context_length=32, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tie)
    model = GPT(config)
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    full = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
    (2.5 * full).backward()  # a scaled loss (gradient accumulation divides it)
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(x).flatten(0, 1)
    chunked = head_cross_entropy(h, model.lm_head.weight, targets=y.flatten(), chunk_rows=chunk_rows)
    (2.5 * chunked).backward()
    assert torch.allclose(chunked, full, atol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6), name
    with torch.no_grad():  # evaluation: the same value, no gradients made
        assert torch.allclose(model(x, targets=y), full, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_a_training_step_keeps_less_and_its_gradients_are_autograds(tie, monkeypatch):
    """The MLP keeps only its GELU's input for the backward pass (autograd's path would keep the
    GELU's output too, the step's largest activation), the attention's and the MLP's input
    projections keep the residual stream but not its normalised copy, and the tied embedding's
    gradient is added sparsely into the head's; every gradient is still the one autograd's plain
    ops give, dense."""
    import torch.nn.functional as F

    import gpt.model

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, context_length=32, n_layer=2, n_head=2, n_embd=16, tie_embeddings=tie)
    model = GPT(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))

    def saved_activations(loss_of) -> tuple[dict[int, set], torch.Tensor]:
        """The storages the backward pass keeps, by last dimension, and the loss."""
        kept: dict[int, set] = {config.mlp_width: set(), config.n_embd: set()}

        def keep(t):
            ptr = t.untyped_storage().data_ptr()
            if t.dim() > 1 and t.shape[-1] in kept and ptr not in params:
                kept[t.shape[-1]].add(ptr)
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = loss_of()
        return kept, loss

    kept, loss = saved_activations(lambda: model(x, targets=y))
    assert len(kept[config.mlp_width]) == config.n_layer
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(g.layout == torch.strided for g in grads.values())

    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(
        gpt.model._GeluProjection, "apply", lambda u, w, b: F.linear(F.gelu(u, approximate="tanh"), w, b)
    )
    monkeypatch.setattr(
        gpt.model._NormLinear,
        "apply",
        lambda x, nw, nb, w, b, eps: F.linear(F.layer_norm(x, (x.size(-1),), nw, nb, eps), w, b),
    )
    plain, loss = saved_activations(lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    # Autograd's path keeps each block's two normalised inputs as well.
    assert len(plain[config.n_embd]) - len(kept[config.n_embd]) >= 2 * config.n_layer
    loss.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
