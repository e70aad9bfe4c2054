"""The records the store returns: frozen dataclasses, one per kind of row, plus DataFilter.

JSON columns are written in `canonical_json` (so equal content hashes equal) and decoded into
dicts/lists by each record's `from_row`. Times are Unix seconds (float).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

from gpt.errors import KettleError


def canonical_json(value: Any) -> str:
    """The one JSON spelling used for hashing: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()


def _loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def storable_text(value: str, what: str) -> str:
    """`value`, if UTF-8 (so SQLite) can hold it: a lone surrogate (JSON's "\\ud800", a broken
    paste) is no character, and would fail deep in sqlite3 instead of here, by name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KettleError(f"{what} holds a lone surrogate {value[exc.start]!a} (not a character)") from None
    return value


def clean_tags(tags: Iterable[str]) -> list[str]:
    """Tags as stored: stripped, without blanks or repeats, in the order given."""
    if isinstance(tags, str):
        raise KettleError("tags must be a list of strings, not one string")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise KettleError(f"a tag must be a string, got {tag!r}")
        tag = storable_text(tag, "a tag").strip()
        if tag and tag not in out:
            out.append(tag)
    return out


@dataclass(frozen=True)
class Conversation:
    id: int
    title: str
    system_prompt: str
    params: dict | None
    model: str | None
    leaf_id: int | None
    source: str
    external_id: str | None
    created_at: float
    updated_at: float
    deleted_at: float | None
    message_count: int = 0
    pending_import_id: int | None = None  # hidden until this import finishes (Store.begin_import)

    @classmethod
    def from_row(cls, row: dict) -> "Conversation":
        return cls(**{**row, "params": _loads(row["params"])})


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    parent_id: int | None
    role: str
    content: str
    created_at: float
    model_version_id: int | None = None
    model: str | None = None
    params: dict | None = None
    seed: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    dropped_tokens: int | None = None
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    meta: dict | None = None

    @classmethod
    def from_row(cls, row: dict) -> "Message":
        return cls(**{**row, "params": _loads(row["params"]), "meta": _loads(row["meta"])})

    def chat(self) -> dict:
        """This message in the one chat format."""
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Label:
    """One row of a message's label history; the newest row is the current label."""

    id: int
    message_id: int
    thumb: int | None
    score: int | None
    tags: list[str]
    note: str
    ideal: str | None
    excluded: bool
    created_at: float

    @classmethod
    def from_row(cls, row: dict) -> "Label":
        return cls(**{**row, "tags": _loads(row["tags"], []), "excluded": bool(row["excluded"])})

    @property
    def is_empty(self) -> bool:
        """True for a cleared label (a "remove label" row)."""
        return (
            self.thumb is None
            and self.score is None
            and not self.tags
            and not self.note
            and self.ideal is None
            and not self.excluded
        )


@dataclass(frozen=True)
class DataFilter:
    """Which assistant answers would train now.

    An answer is chosen when it passes any of: thumbs up (`thumbs_up`), has a corrected answer
    (`ideal`), score >= `min_score`, or `all_answers` (every answer not voted down); and then its
    tags contain one of `tags_include` (when given) and none of `tags_exclude`. An example is
    never made from a conversation the user deleted, nor through a message the user excluded.
    """

    thumbs_up: bool = True
    ideal: bool = True
    min_score: int | None = None
    all_answers: bool = False
    tags_include: tuple[str, ...] = ()
    tags_exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.min_score is not None and not 1 <= self.min_score <= 5:
            raise KettleError(f"min score must be between 1 and 5, got {self.min_score}")
        object.__setattr__(self, "tags_include", tuple(clean_tags(self.tags_include)))
        object.__setattr__(self, "tags_exclude", tuple(clean_tags(self.tags_exclude)))

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "tags_include": list(self.tags_include),
            "tags_exclude": list(self.tags_exclude),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "DataFilter":
        return cls(**d)

    def chooses(self, label: Label | None) -> bool:
        """Whether an answer with this current label is chosen (exclusion is checked by the
        caller over the whole branch). A down-voted answer is chosen only for its correction."""
        if label is None:
            return self.all_answers and not self.tags_include
        tags = set(label.tags)
        if self.tags_include and not tags & set(self.tags_include):
            return False
        if tags & set(self.tags_exclude):
            return False
        if self.ideal and label.ideal is not None:
            return True
        if label.thumb == -1:
            return False
        return bool(
            (self.thumbs_up and label.thumb == 1)
            or (self.min_score is not None and label.score is not None and label.score >= self.min_score)
            or self.all_answers
        )


@dataclass(frozen=True)
class Snapshot:
    id: int
    name: str
    filter: DataFilter
    content_hash: str
    n_examples: int
    n_pairs: int
    created_at: float

    @classmethod
    def from_row(cls, row: dict) -> "Snapshot":
        # `sealed` is the database's guard against new rows, always 1 once a snapshot is readable
        fields = {k: v for k, v in row.items() if k != "sealed"}
        return cls(**{**fields, "filter": DataFilter.from_dict(_loads(row["filter"]))})


@dataclass(frozen=True)
class ModelVersion:
    id: int
    name: str
    path: str
    kind: str
    parent_id: int | None
    snapshot_id: int | None
    run_id: int | None
    hparams: dict
    metrics: dict
    status: str
    note: str
    created_at: float

    @classmethod
    def from_row(cls, row: dict) -> "ModelVersion":
        return cls(**{**row, "hparams": _loads(row["hparams"], {}), "metrics": _loads(row["metrics"], {})})


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    status: str
    model_version_id: int | None
    snapshot_id: int | None
    output_model_id: int | None
    config: dict
    step: int
    total_steps: int | None
    log_path: str | None
    error: str | None
    pid: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @classmethod
    def from_row(cls, row: dict) -> "Run":
        return cls(**{**row, "config": _loads(row["config"], {})})


@dataclass(frozen=True)
class SearchHit:
    message_id: int
    conversation_id: int
    conversation_title: str
    role: str
    snippet: str
    created_at: float
