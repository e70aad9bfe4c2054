"""int8 weights (gpt/quantize.py): loaded from the same model directory, every linear layer (the
output head too) on PyTorch's int8 kernels, close to fp32; --quantize for generate and serve, the
app's "quantize" setting; bad values are one line and load nothing."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
import torch.nn as nn

from data.paths import config_path
from gpt.checkpoint import load_model
from gpt.errors import KettleError
from gpt.model import KVCache
from gpt.quantize import Int8Linear
from tui.cli import main


def test_int8_replaces_every_linear_layer_and_stays_close_to_fp32(tiny_model_dir):
    fp32, _ = load_model(tiny_model_dir)
    int8, _ = load_model(tiny_model_dir, quantize="int8")
    assert not any(isinstance(m, nn.Linear) for m in int8.modules())
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.h[0].attn.c_attn, Int8Linear)
    x = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, got = fp32(x), int8(x)
        # The decoding path (KV cache, one token at a time) is as close. Not equal to the full
        # forward's int8 logits: each call quantizes its activations with their own range.
        cache = KVCache(int8.config, batch_size=2)
        int8(x[:, :39], kv_cache=cache)
        step = int8(x[:, 39:], kv_cache=cache)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (step[:, 0] - expected[:, -1]).abs().max() < 0.05 * expected.abs().max()


def test_int8_linear_computes_the_layer_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    error = (Int8Linear(linear)(x) - linear(x)).abs().max()
    assert error < 0.02 * linear(x).abs().max()


def test_quantize_on_another_device_is_refused_before_reading_weights(tiny_model_dir):
    with pytest.raises(KettleError, match="--quantize int8 runs on the CPU only"):
        load_model(tiny_model_dir, device="meta", quantize="int8")
    with pytest.raises(KettleError, match="must be one of int8"):
        load_model(tiny_model_dir, quantize="int4")


def test_generate_with_quantize_int8(tiny_model_dir, capsys):
    args = ["generate", str(tiny_model_dir), "hello", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args + ["--quantize", "int8"]) == 0
    out = capsys.readouterr()
    assert "[6 tokens" in out.err and out.out.strip()


def test_a_bad_quantize_flag_is_one_line(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", str(tiny_model_dir), "hello", "--quantize", "int4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize: must be one of int8, got 'int4'" in err[0]


def test_serve_with_quantize_int8_answers_over_http(tiny_model_dir):
    """kettle serve's service and server as the command builds them, on 127.0.0.1."""
    import threading

    from gpt.server import build_server, listen
    from gpt.service import InProcessService

    service = InProcessService(str(tiny_model_dir), device="cpu", quantize="int8")
    sock = listen("127.0.0.1", 0)
    server = build_server(service, None, allow_origins=[], allow_hosts=["127.0.0.1"])
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    try:
        service.load()
        assert isinstance(service._engine.model.lm_head, Int8Linear)
        thread.start()
        port = sock.getsockname()[1]
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0}
        for _ in range(200):
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30)
                break
            except httpx.ConnectError:
                threading.Event().wait(0.05)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
        sock.close()


@pytest.mark.parametrize(
    "setting,quantized,problem",
    [
        ("int8", True, None),
        (None, False, None),
        ("int4", False, '"quantize" must be "int8" or null'),
    ],
)
async def test_the_apps_quantize_setting(app_model, setting, quantized, problem):
    from tui.app import KettleApp

    config_path().write_text(json.dumps({"quantize": setting}), encoding="utf-8")
    app = KettleApp()
    async with app.run_test(size=(140, 44)) as pilot:
        while app.service is None or app.service._engine is None:
            await pilot.pause(0.05)
        assert isinstance(app.service._engine.model.lm_head, Int8Linear) == quantized
        warnings = [n.message for n in app._notifications if "quantize" in n.message]
        assert len(warnings) == (problem is not None)
        assert all(problem in w and "\n" not in w for w in warnings)
