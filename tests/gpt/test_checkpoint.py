"""Model directories: atomic saves, and one clear line for every broken input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from gpt.checkpoint import load_model, save_model
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.model import GPT
from tui.cli import main

CONFIG = GPTConfig(vocab_size=512, context_length=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def model_dir(tmp_path, trained_tokenizer):
    torch.manual_seed(0)
    return save_model(GPT(CONFIG), tmp_path / "model", tokenizer=trained_tokenizer)


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_save_and_load_round_trip(model_dir, trained_tokenizer):
    model, tok = load_model(model_dir)
    torch.manual_seed(0)
    original = GPT(CONFIG).eval()
    idx = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), original(idx))
    assert tok.encode("hello there") == trained_tokenizer.encode("hello there")
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "kettle-tokenizer.json", "model.safetensors"]


def test_save_refuses_to_overwrite_and_leaves_no_temporary(model_dir):
    with pytest.raises(KettleError, match="already exists"):
        save_model(GPT(CONFIG), model_dir)
    assert [p.name for p in model_dir.parent.iterdir()] == ["model"]


def test_a_crash_while_saving_leaves_nothing(tmp_path, monkeypatch):
    import gpt.checkpoint as checkpoint

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", explode)
    with pytest.raises(OSError):
        save_model(GPT(CONFIG), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights(model_dir, capsys, tmp_path):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, err = run_cli(["export-hf", str(model_dir), str(tmp_path / "out")], capsys)
    assert code != 0
    assert err.startswith("kettle: error:") and "model.safetensors" in err and "truncated" in err
    assert len(err.splitlines()) == 1


def test_wrong_shape(model_dir, capsys, tmp_path):
    meta = json.loads((model_dir / "config.json").read_text())
    meta["config"]["n_embd"] = 32
    (model_dir / "config.json").write_text(json.dumps(meta))
    code, err = run_cli(["export-hf", str(model_dir), str(tmp_path / "out")], capsys)
    assert code != 0 and "model.safetensors" in err and "shape" in err
    assert len(err.splitlines()) == 1


def test_missing_config(model_dir, capsys, tmp_path):
    (model_dir / "config.json").unlink()
    code, err = run_cli(["export-hf", str(model_dir), str(tmp_path / "out")], capsys)
    assert code != 0 and "config.json" in err and "missing" in err


def test_nonexistent_path(capsys, tmp_path):
    code, err = run_cli(["export-hf", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert code != 0 and "nope" in err and "no such model" in err


def test_wrong_dtype_is_named(model_dir, tmp_path):
    meta = json.loads((model_dir / "config.json").read_text())
    meta["dtype"] = "bfloat16"
    (model_dir / "config.json").write_text(json.dumps(meta))
    with pytest.raises(KettleError, match="is F32, config.json says bfloat16"):
        load_model(model_dir)


def test_hugging_face_dir_given_as_model_points_to_import(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(KettleError, match="import-hf"):
        load_model(tmp_path / "hf")


def test_errors_in_a_real_process_are_one_line(tmp_path, model_dir):
    """The installed command prints one line and no traceback."""
    shutil.copy(model_dir / "config.json", tmp_path / "config.json")
    out = subprocess.run(
        [sys.executable, "-m", "tui.cli", "import-hf", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"kettle: error: {tmp_path / 'missing'}: no such directory"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_only_weights_holding_nan_or_infinity_are_refused(dtype):
    """The check sums each tensor first: a sum that overflows (float16's 65,504 is soon passed)
    must not refuse weights that are all finite."""
    from gpt.checkpoint import finite

    large = torch.full((100_000,), 60_000.0).to(dtype)
    assert finite("w.safetensors", "ln_f.weight", large) is large
    for bad in (float("nan"), float("inf"), float("-inf")):
        weights = torch.zeros(1000, dtype=dtype).index_fill(0, torch.tensor([7]), bad)
        with pytest.raises(KettleError, match="w.safetensors: tensor wte.weight holds NaN or infinite values"):
            finite("w.safetensors", "wte.weight", weights)
