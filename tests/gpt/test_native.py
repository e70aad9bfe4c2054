"""The native CPU kernel (gpt/native.py, gpt/kernels.c) and the decoding layout that uses it
(gpt/quantize.py): built once per machine into KETTLE_HOME, the product nn.Linear computes, the
same greedy tokens as the model as trained; without a compiler, PyTorch's kernels do the work."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import native
from gpt.batching import Batch, Request
from gpt.checkpoint import load_model, save_model
from gpt.engine import Engine
from gpt.quantize import DecodeLinear
from gpt.sampling import SamplingParams


@pytest.fixture
def fresh_build():
    """The kernel looked up again (the process caches it), as a new process would."""
    native._library.cache_clear()
    yield
    native._library.cache_clear()


@pytest.fixture(scope="module")
def sharp_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model, its weights spread wide so that greedy decoding has clear winners: float
    sums in another order differ in their last bits, which must not decide a near tie."""
    model, tokenizer = load_model(tiny_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return save_model(model, tmp_path_factory.mktemp("sharp") / "model", tokenizer=tokenizer)


def as_trained(model_dir):
    """An engine on the model's nn.Linear layers, as training left them."""
    return Engine(*load_model(model_dir))


def greedy(engine, n=40):
    engine.speculation = None
    r = engine.generate([5, 6, 7, 8], SamplingParams(max_new_tokens=n, temperature=0.0, seed=0))
    return r.token_ids


def test_native_linear_computes_nn_linears_product(fresh_build, kettle_home):
    linear = native.linear_kernel()
    if linear is None:
        pytest.skip("no native kernel on this machine (no C compiler, or no AVX2)")
    generator = torch.Generator().manual_seed(0)
    # widths that leave remainders after 16-, 8- and 1-wide steps, row counts past a block of 8
    for m, n, k in [(1, 1, 1), (7, 3, 2), (9, 17, 1), (13, 33, 3), (50, 100, 16), (8, 16, 1), (260, 250, 5)]:
        weight, x, bias = (torch.randn(*s, generator=generator) for s in ((m, n), (k, n), (m,)))
        for b in (bias, None):
            assert torch.allclose(linear(x, weight, b), F.linear(x, weight, b), atol=1e-5 * n, rtol=1e-4)
    built = list((kettle_home / "cache" / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # nothing half-built left beside it
    stamp = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.linear_kernel() is not None and built[0].stat().st_mtime_ns == stamp  # built once


def test_an_engine_decodes_the_models_own_tokens_through_the_native_kernel(fresh_build, sharp_dir):
    expected = greedy(as_trained(sharp_dir))
    engine = Engine.load(sharp_dir)
    if native.linear_kernel() is None:
        pytest.skip("no native kernel on this machine (no C compiler, or no AVX2)")
    layers = [m for m in engine.model.modules() if isinstance(m, (nn.Linear, DecodeLinear))]
    assert layers and all(isinstance(m, DecodeLinear) and m.native is not None for m in layers)
    assert greedy(engine) == expected and len(set(expected)) > 8
    assert isinstance(engine._native[1], native.NativeStep)  # the whole step in one call
    assert engine.model.num_params() == as_trained(sharp_dir).model.num_params()  # what Ollama's show says


def test_without_a_compiler_pytorch_decodes_the_same_tokens(fresh_build, sharp_dir, kettle_home, monkeypatch):
    monkeypatch.setenv("CC", str(kettle_home / "no-such-compiler"))
    assert native.linear_kernel() is None
    engine = Engine.load(sharp_dir)
    head = engine.model.lm_head
    assert isinstance(head, DecodeLinear) and head.native is None and head.transposed
    # one table: the embedding reads the head's transposed weight
    assert engine.model.wte.weight.data_ptr() == head.weight.data_ptr()
    assert greedy(engine) == greedy(as_trained(sharp_dir))
    assert engine.model.num_params() == as_trained(sharp_dir).model.num_params()
    kernels = kettle_home / "cache" / "kernels"
    assert not kernels.exists() or not any(kernels.iterdir())  # a failed build leaves nothing


def test_kettle_native_0_turns_the_kernel_off(fresh_build, monkeypatch):
    monkeypatch.setenv("KETTLE_NATIVE", "0")
    assert native.linear_kernel() is None


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_services_batch_decodes_its_rows_in_one_native_step(fresh_build, sharp_dir, quantize):
    expected = greedy(as_trained(sharp_dir) if quantize is None else rounded_to_int8(sharp_dir))
    engine = Engine.load(sharp_dir, quantize=quantize)
    engine.stop_ids = set()

    def serve(rows: int) -> tuple[Batch, list]:
        batch, done = Batch(engine), []
        for _ in range(rows):
            params = SamplingParams(max_new_tokens=len(expected), temperature=0.0, seed=0)
            batch.add(Request([5, 6, 7, 8], 0, params, threading.Event(), lambda t: None, done.append, print))
        while batch.rows:
            batch.step()
        return batch, done

    alone, done = serve(1)
    if native.linear_kernel() is None:
        pytest.skip("no native kernel on this machine (no C compiler, or no AVX2)")
    assert isinstance(alone._native, native.NativeStep) and done[0].token_ids == expected
    together, done = serve(3)  # three rows, each at its own position, in one call a step
    assert isinstance(together._native, native.NativeStep) and [r.token_ids for r in done] == [expected] * 3


def test_a_damaged_kernel_file_is_built_again(fresh_build, tmp_path, monkeypatch):
    if native.linear_kernel() is None:
        pytest.skip("no native kernel on this machine (no C compiler, or no AVX2)")
    monkeypatch.setenv("KETTLE_HOME", str(tmp_path / "another-home"))  # a library not loaded yet
    native._library.cache_clear()
    target = native._target(native.SOURCE.read_bytes())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")  # what a crash before the disk held it could leave
    linear = native.linear_kernel()
    assert linear is not None and target.stat().st_size > 0
    x, weight = torch.randn(2, 5), torch.randn(3, 5)
    assert torch.allclose(linear(x, weight, None), F.linear(x, weight), atol=1e-5)


def test_native_int8_linear_multiplies_the_rounded_weights(fresh_build):
    linear = native.int8_linear_kernel()
    if linear is None:
        pytest.skip("no native kernel on this machine (no C compiler, or no AVX2)")
    generator = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 1, 1), (9, 17, 1), (13, 33, 3), (50, 100, 16), (260, 250, 5), (16, 80, 2)]:
        weight = torch.randint(-127, 128, (m, n), generator=generator, dtype=torch.int8)
        scale, x, bias = torch.rand(m, generator=generator), torch.randn(k, n, generator=generator), torch.randn(m)
        expected = F.linear(x, weight.float() * scale[:, None])
        assert torch.allclose(linear(x, weight, scale, None), expected, atol=1e-4 * n, rtol=1e-4)
        assert torch.allclose(linear(x, weight, scale, bias), expected + bias, atol=1e-4 * n, rtol=1e-4)


def rounded_to_int8(model_dir):
    """An engine on nn.Linear layers whose weights are what int8 keeps of them (per row:
    round(w / scale) * scale, the row's largest weight at 127), computed by PyTorch in fp32."""
    model, tokenizer = load_model(model_dir)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                scale = (m.weight.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
                m.weight.copy_(torch.round(m.weight / scale).clamp(-127, 127) * scale)
    return Engine(model, tokenizer)


def test_int8_weights_decode_in_one_native_step_as_their_fp32_values_would(fresh_build, sharp_dir):
    engine = Engine.load(sharp_dir, quantize="int8")
    if native.int8_linear_kernel() is None:
        pytest.skip("no native kernel on this machine (no C compiler, or no AVX2)")
    got = greedy(engine)
    assert isinstance(engine._native[1], native.NativeStep)  # the whole int8 step in one call
    assert got == greedy(rounded_to_int8(sharp_dir)) and len(set(got)) > 8
    # the untied head is int8 too; the embedding table stays fp32 (a lookup reads one row)
    assert engine.model.lm_head.weight.dtype == torch.int8 and engine.model.wte.weight.dtype == torch.float32
