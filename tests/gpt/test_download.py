"""`kettle download` through huggingface_hub, against a real HTTP server on 127.0.0.1 that speaks
enough of the hub's API (HEAD/GET /{repo}/resolve/main/{file}) and serves a checkpoint made here."""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gpt.checkpoint import load_model
from gpt.download import download_gpt2
from gpt.errors import KettleError
from gpt.hf import export_hf
from tui.cli import main

REPO = "openai-community/gpt2"
COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
CHUNK = 64 * 1024  # the hub's write size in these tests
CUT = 16 * CHUNK  # where a connection is cut: a whole number of chunks, all written
LFS = {"model.safetensors"}  # served as the hub serves LFS files: X-Linked-Etag = sha256


class Files:
    """What the fake hub serves, and what it was asked."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.gets: list[str] = []
        self.ranges: list[str | None] = []
        self.cut: dict[str, int] = {}  # drop the connection once after this many bytes of a file
        self.down_after_cut = False  # then answer 503 to every request: the download gives up
        self.bad_hash = False

    def etag(self, name: str) -> str:
        data = self.files[name]
        if self.bad_hash:
            return "0" * (64 if name in LFS else 40)
        if name in LFS:
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob hash


def make_server(files: Files):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _find(self):
            name = self.path.removeprefix(f"/{REPO}/resolve/main/")
            return name, files.files.get(name)

        def _refuse(self, data) -> bool:
            if files.down_after_cut and not files.cut:
                self.send_error(503)
                return True
            if data is None:
                self.send_error(404)
                return True
            return False

        def _headers(self, name, data, status=200, start=0):
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("X-Repo-Commit", COMMIT)
            if name in LFS:
                self.send_header("X-Linked-Etag", f'"{files.etag(name)}"')
                self.send_header("X-Linked-Size", str(len(data)))
            else:
                self.send_header("ETag", f'"{files.etag(name)}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()

        def do_HEAD(self):
            name, data = self._find()
            if not self._refuse(data):
                self._headers(name, data)

        def do_GET(self):
            name, data = self._find()
            if self._refuse(data):
                return
            files.gets.append(name)
            rng = self.headers.get("Range")
            files.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
            self._headers(name, data, 206 if rng else 200, start)
            body = data[start:]
            if name in files.cut:
                self.wfile.write(body[: files.cut.pop(name)])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, make_model_dir):
    """A tiny GPT-2-vocabulary model, and its Hugging Face files as the hub would serve them."""
    root = tmp_path_factory.mktemp("checkpoint")
    make_model_dir(root / "src", gpt2_tokenizer=True, context_length=32, n_embd=16)
    export_hf(root / "src", root / "hf")
    return root / "src", {name: (root / "hf" / name).read_bytes() for name in ("config.json", "model.safetensors")}


@pytest.fixture
def hub(tmp_path, monkeypatch, checkpoint):
    """The fake hub, reached through HF_ENDPOINT, with HF_HOME in tmp_path. huggingface_hub reads
    both once, when imported: subprocesses (the app's download) get them from the environment,
    this process from the constants set here."""
    from huggingface_hub import constants

    source, served = checkpoint
    files = Files()
    files.files.update(served)
    server = make_server(files)
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # The hub writes in 10 MB chunks, more than this whole checkpoint: a cut mid-file would then
    # leave nothing written to resume from.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    yield files, source
    server.shutdown()


def blob(tmp_path, files: Files, name: str):
    return tmp_path / "hf-home" / "hub" / "models--openai-community--gpt2" / "blobs" / files.etag(name)


def test_download_converts_to_a_working_model(hub, tmp_path, kettle_home, capsys):
    files, source = hub
    assert main(["download", "gpt2"]) == 0
    model, _ = load_model(kettle_home / "models" / "gpt2")
    original, _ = load_model(source)
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.allclose(model(idx), original(idx), atol=1e-5)
    assert sorted(p.name for p in (kettle_home / "models").iterdir()) == ["gpt2"]
    assert "model.safetensors" in capsys.readouterr().out  # the rich bar names each file


def test_the_download_is_in_the_shared_cache_for_other_tools(hub, tmp_path):
    """transformers and the rest find Kettle's download in HF_HOME without asking the server."""
    from huggingface_hub import hf_hub_download

    files, _ = hub
    download_gpt2("gpt2", tmp_path / "m")
    for name in ("config.json", "model.safetensors"):
        path = hf_hub_download(REPO, name, local_files_only=True)
        assert open(path, "rb").read() == files.files[name]
        assert f"/snapshots/{COMMIT}/" in path


def test_a_file_another_tool_downloaded_is_not_fetched_again(hub, tmp_path):
    from huggingface_hub import hf_hub_download

    files, _ = hub
    for name in ("config.json", "model.safetensors"):
        hf_hub_download(REPO, name)
    files.gets.clear()
    download_gpt2("gpt2", tmp_path / "m")
    assert files.gets == []
    load_model(tmp_path / "m")


def test_partial_file_resumes_where_it_stopped(hub, tmp_path):
    """A partial blob left by an interrupted run (killed, Ctrl-C) is continued, not restarted."""
    files, _ = hub
    weights = files.files["model.safetensors"]
    part = blob(tmp_path, files, "model.safetensors").with_suffix(".incomplete")
    part.parent.mkdir(parents=True)
    part.write_bytes(weights[: len(weights) // 2])
    download_gpt2("gpt2", tmp_path / "m")
    assert f"bytes={len(weights) // 2}-" in files.ranges
    assert not part.exists()
    load_model(tmp_path / "m")


def test_connection_dropped_once_resumes_in_the_same_run(hub, tmp_path):
    files, _ = hub
    files.cut = {"model.safetensors": CUT}
    download_gpt2("gpt2", tmp_path / "m")
    assert files.ranges[-2:] == [None, f"bytes={CUT}-"]
    load_model(tmp_path / "m")


def test_connection_lost_then_resumed_by_the_next_run(hub, tmp_path, capsys, monkeypatch):
    files, _ = hub
    # huggingface_hub's handler writes to the stderr it found when imported: make it this test's.
    for handler in logging.getLogger("huggingface_hub").handlers:
        monkeypatch.setattr(handler, "stream", sys.stderr)
    files.cut = {"model.safetensors": CUT}
    files.down_after_cut = True
    assert main(["download", "gpt2", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kettle: error: ") and err[-1].endswith("run the command again to resume")
    assert "Traceback" not in "\n".join(err), "\n".join(err)
    assert "Trying to resume download" in "\n".join(err[:-1])  # the hub retried before giving up
    assert not (tmp_path / "m").exists()
    files.down_after_cut = False
    download_gpt2("gpt2", tmp_path / "m")
    assert files.ranges[-1] == f"bytes={CUT}-"
    load_model(tmp_path / "m")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_hash_mismatch_is_refused_and_nothing_is_installed(hub, tmp_path, name):
    """The LFS file's sha256 and the small file's git hash are both checked; the bad bytes are
    removed, so the next run fetches them afresh."""
    files, _ = hub
    files.bad_hash = True
    if name == "model.safetensors":  # so that config.json passes and the weights are checked
        (cache := blob(tmp_path, files, "config.json").parent).mkdir(parents=True)
        (cache / files.etag("config.json")).write_bytes(files.files["config.json"])
    with pytest.raises(KettleError, match=f"{name}: .* does not match the published"):
        download_gpt2("gpt2", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not blob(tmp_path, files, name).exists()
    assert not blob(tmp_path, files, name).with_suffix(".incomplete").exists()


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(KettleError, match="unknown GPT-2 size"):
        download_gpt2("gpt3", tmp_path / "m")


def test_downloaded_and_imported_models_are_registered(hub, tmp_path, kettle_home, capsys):
    from data.store import open_store

    assert main(["download", "gpt2"]) == 0
    assert main(["export-hf", str(kettle_home / "models" / "gpt2"), str(tmp_path / "exported")]) == 0
    assert main(["import-hf", str(tmp_path / "exported"), str(tmp_path / "gpt2")]) == 0
    with open_store() as store:
        versions = {v.name: v for v in store.model_versions()}
        assert set(versions) == {"gpt2", "gpt2-2"}
        assert versions["gpt2"].kind == "downloaded" and versions["gpt2-2"].kind == "imported"
        assert store.active_model().name == "gpt2"
    assert "now the active model" in capsys.readouterr().out


def test_offline_a_cached_gpt2_is_converted_without_the_server(hub, tmp_path):
    files, _ = hub
    download_gpt2("gpt2", tmp_path / "first")
    files.down_after_cut = True  # nothing is being cut: every request is a 503 now
    last = {}
    download_gpt2(
        "gpt2",
        tmp_path / "second",
        progress_factory=lambda name: lambda done, total: last.__setitem__(name, (done, total)),
    )
    load_model(tmp_path / "second")
    # The progress bars end full rather than waiting for bytes that will not come.
    assert last == {name: (len(data), len(data)) for name, data in files.files.items()}
