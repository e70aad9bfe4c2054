"""Fine-tuning: instruction (full and LoRA) and classification."""

from __future__ import annotations

import json
from pathlib import Path

from gpt.errors import KettleError
from gpt.files import read_regular_text


def read_manifest(path: Path, key: str, *, version: int, what: str) -> dict:
    """The JSON manifest of one of the directories fine-tuning writes, checked for its format."""
    try:
        meta = json.loads(read_regular_text(path))
    except RecursionError:
        raise KettleError(f"{path}: unreadable (JSON nested too deeply), so {path.parent} is not {what}") from None
    except (OSError, ValueError) as exc:
        reason = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        raise KettleError(f"{path}: {reason}, so {path.parent} is not {what}") from None
    if not isinstance(meta, dict) or meta.get(key) != version:
        raise KettleError(f"{path}: not {what} (format {version})")
    return meta
