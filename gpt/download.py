"""Downloading GPT-2's published checkpoints and converting them into Kettle models."""
from __future__ import annotations

import os
import re
from pathlib import Path

from data.files import sha256_file
from gpt.errors import KettleError
from gpt.hf import import_hf

HF_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_ENDPOINT = "https://huggingface.co"
HF_REPO = "openai-community/{size}"


def download_file(url: str, dest: Path, progress=None, timeout: float = 30.0) -> Path:
    """Fetch `url` to `dest`, resuming a partial `dest.part`, verifying size and sha256.

    The expected size and hash come from the server's headers (Hugging Face sends the LFS sha256
    as X-Linked-Etag / ETag and the size as X-Linked-Size / Content-Length).
    """
    import httpx

    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(follow_redirects=True, timeout=timeout) as client:
            head = client.head(url)
            if head.status_code != 200:
                raise KettleError(f"{url}: server answered {head.status_code}")
            size = _int_header(head, "x-linked-size") or _int_header(head, "content-length")
            sha256 = _sha256_header(head)
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have > size:
                part.unlink()
                have = 0
            # identity encoding: the bytes on disk are the file's bytes, so a range resumes exactly.
            headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={have}-"} if have else {})
            if not (size is not None and have == size):
                with client.stream("GET", url, headers=headers) as response:
                    if response.status_code == 200:
                        have = 0  # the server ignored the range: start over
                    elif response.status_code != 206:
                        raise KettleError(f"{url}: server answered {response.status_code}")
                    with open(part, "ab" if have else "wb") as f:
                        if progress:
                            progress(have, size)
                        for chunk in response.iter_raw():
                            f.write(chunk)
                            have += len(chunk)
                            if progress:
                                progress(have, size)
                        f.flush()
                        os.fsync(f.fileno())
    except httpx.HTTPError as exc:
        raise KettleError(f"{url}: download failed ({exc}); run the command again to resume") from None
    got = part.stat().st_size
    if size is not None and got != size:
        raise KettleError(f"{url}: got {got} bytes, expected {size}; run the command again to resume")
    if sha256 is not None:
        digest = sha256_file(part)
        if digest != sha256:
            part.unlink()
            raise KettleError(f"{url}: sha256 {digest} does not match the published {sha256}; "
                              "the partial file was removed, run the command again")
    os.replace(part, dest)
    return dest


def _int_header(response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value and value.isdigit() else None


def _sha256_header(response) -> str | None:
    for name in ("x-linked-etag", "etag"):
        value = (response.headers.get(name) or "").strip('W/"')
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def download_gpt2(size: str, out_dir: str | Path, progress_factory=None, overwrite: bool = False) -> Path:
    """Download a published GPT-2 checkpoint and convert it into a Kettle model directory.

    Files go to `<out_dir>.download/` first so an interrupted download resumes on the next call.
    `KETTLE_HF_ENDPOINT` replaces the Hugging Face address (a mirror, or a test server).
    """
    if size not in HF_SIZES:
        raise KettleError(f"unknown GPT-2 size {size!r} (choose from {', '.join(HF_SIZES)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise KettleError(f"{out_dir}: already exists (choose another directory)")
    endpoint = os.environ.get("KETTLE_HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
    staging = out_dir.with_name(out_dir.name + ".download")
    for name in ("config.json", "model.safetensors"):
        url = f"{endpoint}/{HF_REPO.format(size=size)}/resolve/main/{name}"
        download_file(url, staging / name, progress=progress_factory(name) if progress_factory else None)
    import_hf(staging, out_dir, overwrite=overwrite)
    for name in ("config.json", "model.safetensors"):
        (staging / name).unlink()
    staging.rmdir()
    return out_dir
