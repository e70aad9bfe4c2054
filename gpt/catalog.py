"""What a generation service asks about models: which ones exist, which is active, whether a
training job is running. gpt/ only asks (ModelCatalog); which models exist is known above it
(data.registry's catalog, over the store and KETTLE_HOME/models), since gpt/ imports nothing
above it. PathCatalog is the plain answer without a store: models named by their directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpt.errors import KettleError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str = ""  # empty when a remote server does not say
    source: str = "directory"  # "store" (a model version) | "directory"
    kind: str = ""  # the store's kind (finetuned, imported, ...); "" for a plain directory
    status: str = ""
    created: float = 0.0
    version_id: int | None = None
    active: bool = False  # the model this service answers with now


class ModelCatalog(Protocol):
    """The models a service may serve. Every method but busy() may block on files or a
    database: the service calls them off the caller's event loop."""

    def resolve(self, name_or_path: str) -> ModelInfo:
        """The model a name (or, given on a command line, a directory path) stands for;
        KettleError "{name_or_path}: no such model ..." when none."""

    def active(self) -> ModelInfo:
        """The model to serve when none is named; KettleError when there is none."""

    def models(self) -> list[ModelInfo]:
        """Every model a service may switch to by name (active=False on each)."""

    def activate(self, info: ModelInfo) -> None:
        """Record that `info` is served now, so that active() answers it next time."""

    def busy(self) -> bool:
        """Whether a training job is running: it takes every core, so generation had better
        use one (see Engine.threads). Asked before every request, so it must be cheap."""


class PathCatalog:
    """Models named by their directory's path, for use without Kettle's store (a script, a
    test): it lists none (a service lists the models it served), has none active, records
    nothing and knows of no training."""

    def resolve(self, name_or_path: str) -> ModelInfo:
        from gpt.checkpoint import read_meta  # torch: not for whoever imports only ModelInfo

        path = Path(name_or_path).expanduser()
        read_meta(path)  # "... no such model directory", or what else is wrong with it
        return ModelInfo(name=path.resolve().name, path=str(path.resolve()))

    def active(self) -> ModelInfo:
        raise KettleError("no model is active: name one (a model directory)")

    def models(self) -> list[ModelInfo]:
        return []

    def activate(self, info: ModelInfo) -> None:
        pass

    def busy(self) -> bool:
        return False
