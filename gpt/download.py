"""Downloading GPT-2's published checkpoints and converting them into Kettle models.

The files go through huggingface_hub into its shared cache (`HF_HOME`, `HF_HUB_CACHE`), from
`HF_ENDPOINT`, so a GPT-2 that transformers or another tool already fetched is not fetched again,
and theirs can use Kettle's. One step is Kettle's own: huggingface_hub (2.x) writes each download
to a temporary file that it deletes on any failure, and checks no hash, so an interrupted
gpt2-xl (6.4 GB) would start over and a corrupt file would be kept. Kettle therefore fills the
blob itself through the hub's `http_get`, from `blobs/<etag>.incomplete` (the name older
huggingface_hub versions resumed from; 2.x never touches it), checks it against the etag (the
sha256 of an LFS file, the git hash of a small one), then lets `hf_hub_download` link it into
the snapshot as it does for any blob already in the cache.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from gpt.errors import KettleError
from gpt.files import sha256_file
from gpt.hf import import_hf

HF_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_REPO = "openai-community/{size}"
FILES = ("config.json", "model.safetensors")


def download_gpt2(size: str, out_dir: str | Path, *, progress_factory=None, overwrite: bool = False) -> Path:
    """Download a published GPT-2 checkpoint (or take it from the cache) and convert it."""
    if size not in HF_SIZES:
        raise KettleError(f"unknown GPT-2 size {size!r} (choose from {', '.join(HF_SIZES)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise KettleError(f"{out_dir}: already exists (choose another directory)")
    repo = HF_REPO.format(size=size)
    paths = {}
    for name in FILES:
        progress = progress_factory(name) if progress_factory else None
        paths[name] = fetch(repo, name, progress=progress)
        if progress:  # also when the cache had it: the bar ends full, not waiting
            nbytes = paths[name].stat().st_size
            progress(nbytes, nbytes)
    # The snapshot may hold other tools' files (HF's tokenizer.json, pytorch_model.bin): import
    # exactly the two fetched here.
    with tempfile.TemporaryDirectory(prefix="kettle-download-") as staging:
        for name, path in paths.items():
            os.symlink(path, Path(staging) / name)
        import_hf(staging, out_dir, overwrite=overwrite)
    return out_dir


def fetch(repo: str, name: str, *, progress=None) -> Path:
    """`name` from `repo` at main, through the shared cache; its path in the cache's snapshot."""
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock

    url = hf_hub_url(repo, name)
    try:
        try:
            meta = get_hf_file_metadata(url)
        except (httpx2.HTTPError, OSError):
            # Offline (HF_HUB_OFFLINE, no network, the hub down): main as last fetched, as
            # hf_hub_download answers then; otherwise the error is the answer.
            cached = try_to_load_from_cache(repo, name)
            if isinstance(cached, str):
                return Path(cached)
            raise
        if meta.etag is None or meta.commit_hash is None:
            raise KettleError(f"{url}: the server sent no ETag or X-Repo-Commit (not a Hugging Face hub?)")
        folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
        blob = folder / "blobs" / meta.etag
        # The hub's own lock for this blob: a transformers download of it waits, and so do we.
        lock = Path(constants.HF_HUB_CACHE) / ".locks" / folder.name / f"{meta.etag}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        blob.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not blob.exists():
                part = blob.with_name(blob.name + ".incomplete")
                have = part.stat().st_size if part.exists() else 0
                if meta.size is not None and have > meta.size:
                    have = 0
                with open(part, "r+b" if have else "wb") as f:
                    f.seek(have)
                    f.truncate()
                    http_get(
                        meta.location,
                        f,
                        resume_size=have,
                        expected_size=meta.size,
                        tqdm_class=_reporting(progress) if progress else None,
                    )
                    f.flush()
                    os.fsync(f.fileno())
                _check_hash(part, meta.etag, url=url)
                os.replace(part, blob)
        # The blob is in place: this writes refs/main and the snapshot's link, and downloads nothing.
        return Path(hf_hub_download(repo, name))
    except (httpx2.HTTPError, OSError) as exc:  # the hub's HfHubHTTPError is both
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a local file's error (a full disk): the CLI prints it as the OSError it is
        # A short body is an OSError without errno from http_get ("Consistency check failed").
        raise KettleError(f"{url}: download failed ({_first_line(exc)}); run the command again to resume") from None


def _check_hash(part: Path, etag: str, *, url: str) -> None:
    from huggingface_hub.utils.sha import git_hash

    if re.fullmatch(r"[0-9a-f]{64}", etag):  # an LFS file: its etag is its sha256
        kind, digest = "sha256", sha256_file(part)
    elif re.fullmatch(r"[0-9a-f]{40}", etag):  # a file in git: its etag is its git blob hash
        kind, digest = "git hash", git_hash(part.read_bytes())
    else:
        return
    if digest != etag:
        part.unlink()
        raise KettleError(
            f"{url}: {kind} {digest} does not match the published {etag}; "
            "the partial file was removed, run the command again"
        )


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _reporting(progress):
    """A tqdm class for huggingface_hub that draws nothing and hands each update to `progress`
    (done, total), so the CLI's rich bar (and the app's task window reading it) shows the bytes."""
    from huggingface_hub.utils import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, initial=0, total=None, **kwargs):
            super().__init__(*args, initial=initial, total=total, **{**kwargs, "disable": True})
            self.done = initial
            progress(initial, total)

        def update(self, n=1):
            self.done += n
            progress(self.done, self.total)

    return Reporting
