"""Where Kettle keeps a user's state: one root for the database, models and runs."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def kettle_home() -> Path:
    """`KETTLE_HOME` if set, else the platform's user data folder; created on first use."""
    root = os.environ.get("KETTLE_HOME") or platformdirs.user_data_dir("kettle", appauthor=False)
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
