"""`kettle download` against a real HTTP server on 127.0.0.1 serving a checkpoint made here."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gpt.checkpoint import load_model
from gpt.config import GPTConfig
from gpt.errors import KettleError
from gpt.download import download_gpt2
from gpt.hf import export_hf
from gpt.checkpoint import save_model
from gpt.model import GPT
from tui.cli import main


class Files:
    """What the fake hub serves, and what it was asked."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ranges: list[str | None] = []
        self.cut: dict[str, int] = {}  # drop the connection once after this many bytes of a file
        self.bad_hash = False


def make_server(files: Files):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _find(self):
            name = self.path.removeprefix("/openai-community/gpt2/resolve/main/")
            return name, files.files.get(name)

        def _headers(self, data, status=200, start=0):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            digest = "0" * 64 if files.bad_hash else hashlib.sha256(data).hexdigest()
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(len(data)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()

        def do_HEAD(self):
            _, data = self._find()
            if data is None:
                self.send_error(404)
                return
            self._headers(data)

        def do_GET(self):
            name, data = self._find()
            if data is None:
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            files.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
            self._headers(data, 206 if rng else 200, start)
            body = data[start:]
            if name in files.cut:
                self.wfile.write(body[:files.cut.pop(name)])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hub(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=2, n_embd=16)
    save_model(GPT(config), tmp_path / "src")
    export_hf(tmp_path / "src", tmp_path / "hf")
    files = Files()
    for name in ("config.json", "model.safetensors"):
        files.files[name] = (tmp_path / "hf" / name).read_bytes()
    server = make_server(files)
    monkeypatch.setenv("KETTLE_HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield files, tmp_path / "src"
    server.shutdown()


def test_download_converts_to_a_working_model(hub, tmp_path, kettle_home):
    files, source = hub
    assert main(["download", "gpt2"]) == 0
    model, _ = load_model(kettle_home / "models" / "gpt2")
    original, _ = load_model(source)
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(idx), original(idx), atol=1e-5)
    assert not (kettle_home / "models" / "gpt2.download").exists()


def test_partial_file_resumes_where_it_stopped(hub, tmp_path):
    files, _ = hub
    weights = files.files["model.safetensors"]
    part = tmp_path / "m.download" / "model.safetensors.part"
    part.parent.mkdir()
    part.write_bytes(weights[: len(weights) // 2])
    download_gpt2("gpt2", tmp_path / "m")
    assert f"bytes={len(weights) // 2}-" in files.ranges
    load_model(tmp_path / "m")


def test_connection_dropped_mid_file_then_resumed(hub, tmp_path):
    files, _ = hub
    weights = files.files["model.safetensors"]
    files.cut = {"model.safetensors": len(weights) // 3}
    with pytest.raises(KettleError, match="run the command again to resume"):
        download_gpt2("gpt2", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    download_gpt2("gpt2", tmp_path / "m")
    assert f"bytes={len(weights) // 3}-" in files.ranges
    load_model(tmp_path / "m")


def test_hash_mismatch_is_refused_and_nothing_is_installed(hub, tmp_path):
    files, _ = hub
    files.bad_hash = True
    with pytest.raises(KettleError, match="does not match"):
        download_gpt2("gpt2", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(KettleError, match="unknown GPT-2 size"):
        download_gpt2("gpt3", tmp_path / "m")


def test_downloaded_and_imported_models_are_registered(hub, tmp_path, kettle_home, capsys):
    from data.store import Store

    assert main(["download", "gpt2"]) == 0
    assert main(["export-hf", str(kettle_home / "models" / "gpt2"), str(tmp_path / "exported")]) == 0
    assert main(["import-hf", str(tmp_path / "exported"), str(tmp_path / "gpt2")]) == 0
    with Store.open() as store:
        versions = {v.name: v for v in store.model_versions()}
        assert set(versions) == {"gpt2", "gpt2-2"}
        assert versions["gpt2"].kind == "downloaded" and versions["gpt2-2"].kind == "imported"
        assert store.active_model().name == "gpt2"
    assert "now the active model" in capsys.readouterr().out
