"""Where Kettle keeps a user's state: one root for the database, models and runs."""

from __future__ import annotations

from pathlib import Path

from gpt.files import kettle_home  # noqa: F401  (owned by gpt/, which may not import data/)


def db_path() -> Path:
    return kettle_home() / "kettle.db"


def models_dir() -> Path:
    path = kettle_home() / "models"
    path.mkdir(exist_ok=True)
    return path


def runs_dir(*, create: bool = True) -> Path:
    """Where training runs keep their state; `create=False` only names it (for a path that is
    written later, so a command refused before then leaves nothing behind)."""
    path = kettle_home() / "runs"
    if create:
        path.mkdir(exist_ok=True)
    return path


def config_path() -> Path:
    return kettle_home() / "config.json"
