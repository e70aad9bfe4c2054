"""Which models exist: the store's model versions and the model directories under
KETTLE_HOME/models, by name. StoreCatalog answers a generation service's questions
(gpt.catalog.ModelCatalog) from them.

A name is looked up as a store version's name, then as a directory under KETTLE_HOME/models;
only a command-line argument may also be a directory path (a name from an HTTP client never is).
A fine-tune's model directory is a model only once the store has registered it: one whose run
was killed between writing it and registering it is neither listed nor served (its run's
`kettle finetune resume` registers it).
"""

from __future__ import annotations

import json
import threading
import unicodedata
from pathlib import Path

from data.paths import db_path, models_dir
from data.records import ModelVersion
from data.store import Store, open_store
from gpt.catalog import ModelInfo
from gpt.errors import KettleError

# What a fine-tune writes into its model directory beside the weights: {"run_id": N, ...}.
RUN_RECORD = "training.json"


# A folder name takes at most 255 bytes; an atomic write's temporary adds about 15 around it.
MAX_NAME_BYTES = 200


def is_model_name(value: str | Path) -> bool:
    """Whether `value` is a bare name (no folder in it), to be looked up among the models Kettle
    knows before anything in the working directory: a folder that happens to be called like a
    model (a repository's tests/) must never stand in for it."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and not value.startswith("~")
        and Path(value).name == value
    )


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model by name (a directory under KETTLE_HOME/models) or, failing that, by path. Paths
    are for command-line arguments: a server resolves only names it lists (GenerationService)."""
    path = _find_model_dir(name_or_path)
    _check_registered(path, name_or_path)
    return path


def _find_model_dir(name_or_path: str | Path) -> Path:
    if is_model_name(name_or_path) and (models_dir() / name_or_path).is_dir():
        return models_dir() / name_or_path
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    raise KettleError(f"{name_or_path}: no such model (not a directory, nor a model in {models_dir()})")


def _check_registered(path: Path, name_or_path: str | Path) -> None:
    """Refuse a fine-tune's model directory under KETTLE_HOME/models that its run never registered."""
    # the run's record first: a folder without one never makes KETTLE_HOME (models_dir creates it)
    if not (path / RUN_RECORD).is_file() or path.resolve().parent != models_dir().resolve() or not db_path().exists():
        return
    with open_store(read_only=True) as store:
        run_id = unregistered_run(store, path)
    if run_id is not None:
        raise KettleError(
            f"{name_or_path}: fine-tuning run {run_id} wrote this model but never registered it; "
            f"`kettle finetune resume {run_id}` does"
        )


def unregistered_run(store: Store, path: Path) -> int | None:
    """The fine-tuning run that wrote the model directory `path` (named as that run names its
    model) and has not finished, so has not registered it; None for any other directory."""
    try:
        record = json.loads((path / RUN_RECORD).read_text(encoding="utf-8"))
        run_id, base_name = record["run_id"], record["hparams"]["base_name"]
        run = store.run(run_id)
    except (OSError, ValueError, KeyError, TypeError, KettleError):
        return None
    spec = run.config.get("spec", {})
    if (
        run.kind != "finetune"
        or run.status == "finished"
        or path.name != (spec.get("name") or f"{base_name}-ft{run_id}")
    ):
        return None
    return run_id


def check_model_name(name: str, *, flag: str = "--name") -> None:
    """A name a new model may take: it names its folder under KETTLE_HOME/models, so it must be
    one plain folder name, short enough for the temporary an atomic write puts around it."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        size = None
    problem = (
        "it is blank"
        if all(unicodedata.category(c)[0] in "ZC" for c in name)  # spaces, zero-width and control only
        else "it is not valid UTF-8"
        if size is None
        else "it has a slash"
        if "/" in name or "\\" in name
        else "it starts with a dot"
        if name.startswith(".")
        else "it starts or ends with a space"
        if name != name.strip()
        else "it holds a control character"
        if any(unicodedata.category(c) == "Cc" for c in name)
        else f"it is {size} bytes long, more than {MAX_NAME_BYTES}"
        if size > MAX_NAME_BYTES
        else None
    )
    if problem:
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise KettleError(f"{flag} {shown!r}: {problem}; use a plain name without slashes")


def name_taken(store: Store, name: str, *, own: Path | None = None) -> bool:
    """Whether a version has `name` or another model directory uses it (`own` is the directory
    being named, which may already carry the name)."""
    folder = models_dir() / name
    return store.find_model_version(name) is not None or (
        folder.exists() and (own is None or folder.resolve() != own.resolve())
    )


def unique_name(store: Store, wanted: str, *, own: Path | None = None) -> str:
    """`wanted`, or `wanted-2`, ... : a name no version has and no other model directory uses
    (`own` is the directory being named, which may already carry the name)."""
    name, n = wanted, 2
    while name_taken(store, name, own=own):
        name, n = f"{wanted}-{n}", n + 1
    return name


def version_info(version: ModelVersion) -> ModelInfo:
    return ModelInfo(
        name=version.name,
        path=version.path,
        source="store",
        kind=version.kind,
        status=version.status,
        created=version.created_at,
        version_id=version.id,
    )


class StoreCatalog:
    """The models of this KETTLE_HOME (gpt.catalog.ModelCatalog): store versions first, then
    directories under models_dir(). Each question opens the store afresh, so a long-lived
    service sees what the app and other processes record, except busy(), which is asked before
    every request and reads through one store kept open for it."""

    def __init__(self):
        self._busy_store: Store | None = None
        self._busy_lock = threading.Lock()  # busy() runs on every service's worker thread

    def resolve(self, name_or_path: str) -> ModelInfo:
        from gpt.checkpoint import read_meta  # torch: the app's screens import this module at start

        if not isinstance(name_or_path, str) or not name_or_path.strip():
            raise KettleError("a model name or path is needed")
        if is_model_name(name_or_path):
            with open_store() as store:
                version = store.find_model_version(name_or_path)
            if version is not None:
                return version_info(version)
        try:
            path = _find_model_dir(name_or_path)
        except KettleError:
            raise KettleError(
                f"{name_or_path}: no such model (not a store model version, nor a "
                f"model in {models_dir()}, nor a directory)"
            ) from None
        _check_registered(path, name_or_path)
        read_meta(path)
        return ModelInfo(
            name=name_or_path if is_model_name(name_or_path) else path.resolve().name, path=str(path.resolve())
        )

    def active(self) -> ModelInfo:
        with open_store() as store:
            version = store.active_model()
        if version is None:
            raise KettleError(
                "no model is active yet: name one (for example `kettle serve MODEL`) or activate one in the app"
            )
        return version_info(version)

    def models(self) -> list[ModelInfo]:
        """Store model versions (newest first), then model directories under models_dir() that
        no version already points at."""
        with open_store() as store:
            found = [version_info(v) for v in store.model_versions()]
            known = {str(Path(m.path).resolve()) for m in found}
            for path in sorted(models_dir().iterdir()):
                if (
                    not path.name.startswith(".")
                    and (path / "config.json").is_file()  # not a temporary
                    and str(path.resolve()) not in known
                    and unregistered_run(store, path) is None
                ):
                    found.append(ModelInfo(name=path.name, path=str(path), created=path.stat().st_mtime))
        return found

    def activate(self, info: ModelInfo) -> None:
        """A store version becomes the store's active model; a plain directory has no record."""
        if info.version_id is None:
            return
        with open_store() as store:
            active = store.active_model()
            if active is None or active.id != info.version_id:
                store.activate_model(info.version_id)

    def busy(self) -> bool:
        with self._busy_lock:
            if self._busy_store is None:
                if not db_path().exists():  # no store yet: nothing is training, none is created
                    return False
                self._busy_store = open_store()
            return self._busy_store.training_in_progress()
