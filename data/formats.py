"""Dataset files in and out of the store: Alpaca, ShareGPT, OpenAI chat JSONL, preference pairs.

Exact fields (see the README):
- alpaca    JSON list (or JSONL) of {"instruction": str, "input": str (may be ""), "output": str,
            "system": str (optional), "history": [[instruction, answer], ...] (optional, the
            earlier turns, as LLaMA-Factory writes them)}
- sharegpt  JSON list (or JSONL) of {"id": str, "conversations": [{"from": "system"|"human"|"gpt",
            "value": str}, ...]}; importing also takes turns keyed "role"/"content"
- openai    JSONL of {"messages": [{"role": "system"|"user"|"assistant", "content": str,
            "weight": 0|1 (optional, assistant only)}, ...]}
- dpo       JSONL of TRL preference pairs {"prompt": [messages], "chosen": [assistant message],
            "rejected": [assistant message]}; importing also takes the plain-text form (strings),
            TRL's implicit prompt (no "prompt": "chosen" and "rejected" are whole conversations
            that differ only in their last answer) and OpenAI's {"input": {"messages"},
            "preferred_output", "non_preferred_output"}.
Wherever a message's text is read, a list of content parts ([{"type": "text", "text": str}],
as OpenAI and ShareGPT-style tools write it) is taken too; a part of any other type is refused.

Importing creates one conversation per record, all or nothing: a malformed record stops the
import with one error naming the file and line, and the database is left as it was. The records
are written in short transactions (see import_file), hidden until the last one is in. So does a
record no model can learn from (data.datasets.chat_problem: an answer before any question, a
system message after the start, a preference pair without a question). Imported
assistant answers are labelled with themselves as the ideal answer (so they train); an OpenAI turn
with "weight": 0 stays unlabelled context; a preference pair becomes two sibling answers, the
chosen one up-voted and the rejected one down-voted.

Exporting reads a snapshot or a live filter. What a format cannot express (an answer kept as
context, "weight": 0, in ShareGPT or Alpaca, ...) is skipped and reported with a count and a
reason; without weights (`without_context`) such answers are left out instead, for the tools that
ignore the key and would train on them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from data.datasets import chat_problem
from data.records import DataFilter, content_hash
from gpt.errors import KettleError
from gpt.files import atomic_write_text, check_target, sha256_file, shown

if TYPE_CHECKING:  # data.store brings sqlite_utils (~1 s): the CLI's parser reads FORMATS from here
    from data.store import Store

MAX_LINE_BYTES = 16 * 1024 * 1024  # one JSONL record (or one JSON list entry)
IMPORT_BATCH_S = 0.25  # the longest an import holds the database's write lock at a time
# Then it lets go this long (8% of the time): Kettle's writers poll for the lock every 0.2-2 ms, and
# even SQLite's own busy handler, which backs off to 100 ms sleeps, lands in such a gap within seconds.
IMPORT_PAUSE_S = 0.02
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


@dataclass
class Node:
    """One message to import; `parent` indexes an earlier node of the same record."""

    role: str
    content: str
    parent: int | None
    label: dict | None = None
    meta: dict | None = None


@dataclass
class Record:
    line: int
    system_prompt: str
    nodes: list[Node]
    external_id: str | None = None


@dataclass
class ImportReport:
    path: Path
    format: str
    conversations: int = 0
    messages: int = 0
    ignored: Counter = field(default_factory=Counter)  # unknown field -> records having it


@dataclass
class ExportReport:
    path: Path
    format: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> examples not written
    context_dropped: int = 0  # weight-0 answers left out (no weights)


class _Bad(Exception):
    """A record problem; turned into a KettleError naming the file and line."""


# ---------------------------------------------------------------------------------------------
# Reading files


def read_json_records(path: Path) -> list[tuple[int, Any]]:
    """(line, value) for every entry of a JSON list, or every line of a JSONL file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise KettleError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _read_json_list(path)
    return _read_jsonl(path)


def _decode(path: Path, data: bytes, *, first_line: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + data[: exc.start].count(b"\n")
        raise KettleError(f"{path}, line {line}: not valid UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    records = []
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise KettleError(
                    f"{path}, line {number}: longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB; is this a JSONL file?"
                )
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            text = _decode(path, raw, first_line=number).strip()
            if not text:
                continue
            try:
                records.append((number, json.loads(text)))
            except json.JSONDecodeError as exc:
                raise KettleError(f"{path}, line {number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            except (RecursionError, ValueError) as exc:
                raise KettleError(f"{path}, line {number}: {_unreadable(exc)}") from None
    return records


def _unreadable(exc: RecursionError | ValueError) -> str:
    """What Python's JSON reader refuses beyond syntax: nesting deeper than its recursion
    limit, an integer with more digits than int() converts."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply to read (no dataset record nests like that)"
    return f"a number too long to read ({str(exc).split(';')[0]})"


def _read_json_list(path: Path) -> list[tuple[int, Any]]:
    text = _decode(path, path.read_bytes(), first_line=1).removeprefix("\ufeff")
    decoder = json.JSONDecoder()
    counted_to, line_there = 0, 1

    def line_of(pos: int) -> int:
        """The line of `pos`. Entries are read in order, so only the newlines since the last
        entry are counted: counting from the start each time made a long list quadratic."""
        nonlocal counted_to, line_there
        if pos < counted_to:
            counted_to, line_there = 0, 1
        line_there += text.count("\n", counted_to, pos)
        counted_to = pos
        return line_there

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(0) + 1  # past "["
    records = []
    try:
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == "]":
            pos += 1
        else:
            while True:
                start = pos
                try:
                    value, pos = decoder.raw_decode(text, pos)
                except json.JSONDecodeError:
                    raise
                except (RecursionError, ValueError) as exc:
                    raise KettleError(f"{path}, line {line_of(start)}: {_unreadable(exc)}") from None
                if pos - start > MAX_LINE_BYTES:
                    raise KettleError(
                        f"{path}, line {line_of(start)}: one entry is longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB"
                    )
                records.append((line_of(start), value))
                pos = skip_ws(pos)
                if pos < len(text) and text[pos] == ",":
                    pos = skip_ws(pos + 1)
                    continue
                if pos < len(text) and text[pos] == "]":
                    pos += 1
                    break
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
    except json.JSONDecodeError as exc:
        raise KettleError(f"{path}, line {exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if (extra := skip_ws(pos)) != len(text):
        raise KettleError(f"{path}, line {line_of(extra)}: invalid JSON: extra data after the list")
    return records


def detect_format(path: Path, records: list[tuple[int, Any]]) -> str:
    """The format the first record looks like."""
    if not records:
        raise KettleError(f"{path}: no records to import")
    line, first = records[0]
    keys = set(first) if isinstance(first, dict) else set()
    if "messages" in keys:
        return "openai"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"chosen", "rejected"} <= keys or "preferred_output" in keys:
        return "dpo"
    shown = ", ".join(sorted(keys)) or type(first).__name__
    raise KettleError(
        f"{path}, line {line}: cannot tell the format from the first record "
        f"({shown}); pass --format {'|'.join(FORMATS)}"
    )


# ---------------------------------------------------------------------------------------------
# Records -> message trees


def _string(obj: dict, key: str, *, where: str = "") -> str:
    if key not in obj:
        raise _Bad(f"missing field {where}{key!r}")
    return _as_string(obj[key], f"field {where}{key!r}")


def _as_string(value: Any, name: str, *, also: str = "") -> str:
    """`value` if it is a string SQLite can hold; `also` names what else the field takes."""
    if not isinstance(value, str):
        raise _Bad(f"{name} must be a string, got {_type(value)}{also}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escape: no character, SQLite refuses it
        raise _Bad(f"{name} holds a lone surrogate {value[exc.start]!a} (not a character)") from None
    return value


def _text(obj: dict, key: str, *, where: str = "") -> str:
    """A message's text: a string, or a list of content parts whose texts are joined as they
    are (as Kettle's server joins them)."""
    if key not in obj:
        raise _Bad(f"missing field {where}{key!r}")
    value = obj[key]
    if not isinstance(value, list):
        return _as_string(value, f"field {where}{key!r}", also=" (or a list of text parts)")
    texts = []
    for i, part in enumerate(value):
        part = _object(part, f"{where}{key}[{i}]")
        if part.get("type") != "text":
            raise _Bad(
                f"{where}{key}[{i}] is a part of type {part.get('type')!r}: Kettle imports text only (type 'text')"
            )
        texts.append(_string(part, "text", where=f"{where}{key}[{i}]."))
    return "".join(texts)


def _type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "true/false",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(value), "a value")


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise _Bad(f"{what} must be a JSON object, got {_type(value)}")
    return value


def _list(obj: dict, key: str) -> list:
    if key not in obj:
        raise _Bad(f"missing field {key!r}")
    if not isinstance(obj[key], list):
        raise _Bad(f"field {key!r} must be a list, got {_type(obj[key])}")
    return obj[key]


def _chain(messages: list[dict], ideal: bool = True) -> tuple[str, list[Node]]:
    """A linear conversation: a leading system message becomes the system prompt; assistant
    answers are labelled ideal unless they carry weight 0."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        messages = messages[1:]
    nodes = []
    for m in messages:
        label = None
        if m["role"] == "assistant" and ideal and m.get("weight", 1) == 1:
            label = {"ideal": m["content"]}
        nodes.append(Node(m["role"], m["content"], len(nodes) - 1 if nodes else None, label))
    return system, nodes


def _chat_messages(items: list, where: str) -> list[dict]:
    out = []
    for i, m in enumerate(items):
        m = _object(m, f"{where}[{i}]")
        role = _string(m, "role", where=f"{where}[{i}].")
        if role not in ("system", "user", "assistant"):
            raise _Bad(f"{where}[{i}]: role {role!r} is not supported (system, user, assistant)")
        msg = {"role": role, "content": _text(m, "content", where=f"{where}[{i}].")}
        if "weight" in m:
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool) or role != "assistant":
                raise _Bad(f"{where}[{i}]: weight must be 0 or 1, on an assistant message")
            msg["weight"] = m["weight"]
        out.append(msg)
    return out


def _alpaca(obj: dict) -> tuple[str, list[Node]]:
    instruction = _string(obj, "instruction")
    output = _string(obj, "output")
    system = _string(obj, "system") if "system" in obj else ""
    messages = []
    for i, turn in enumerate(_list(obj, "history") if "history" in obj else []):
        if not isinstance(turn, list) or len(turn) != 2:
            raise _Bad(
                f"history[{i}] must be a pair [instruction, answer], got {_type(turn)}"
                + (f" of {len(turn)}" if isinstance(turn, list) else "")
            )
        messages += [
            {"role": "user", "content": _as_string(turn[0], f"history[{i}][0]")},
            {"role": "assistant", "content": _as_string(turn[1], f"history[{i}][1]")},
        ]
    _, nodes = _chain(messages)  # earlier answers train too, as in a ShareGPT conversation
    meta = {"instruction": instruction}
    text = instruction
    if "input" in obj:
        meta["input"] = _string(obj, "input")
        if meta["input"]:
            text = f"{instruction}\n\n{meta['input']}"
    if not text.strip() and not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise _Bad("'instruction' and 'input' are empty: an answer answers a question")
    parent = len(nodes) - 1 if nodes else None
    nodes.append(Node("user", text, parent, meta=meta))
    nodes.append(Node("assistant", output, len(nodes) - 1, {"ideal": output}))
    return system, nodes


def _sharegpt(obj: dict) -> tuple[str, list[Node]]:
    messages = []
    for i, turn in enumerate(_list(obj, "conversations")):
        where = f"conversations[{i}]"
        turn = _object(turn, where)
        # ShareGPT's own keys, or the role/content that OpenAI-style converters write
        who_key, text_key = ("role", "content") if "role" in turn and "from" not in turn else ("from", "value")
        who = _string(turn, who_key, where=f"{where}.")
        if who not in SHAREGPT_ROLES:
            names = "system, human or gpt" if who_key == "from" else "system, user or assistant"
            raise _Bad(f"{where}: {who_key!r} must be {names}, got {who!r}")
        messages.append({"role": SHAREGPT_ROLES[who], "content": _text(turn, text_key, where=f"{where}.")})
    return _chain(_conversation(messages, "conversations"))


def _openai(obj: dict) -> tuple[str, list[Node]]:
    return _chain(_conversation(_chat_messages(_list(obj, "messages"), "messages"), "messages"))


def _conversation(messages: list[dict], name: str) -> list[dict]:
    """`messages` if they make a conversation to learn from: an answer, after a question."""
    if problem := chat_problem(messages):
        raise _Bad(f"{name!r} {problem}")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Bad(f"{name!r} has no assistant message")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise _Bad(f"{name!r} has only empty questions: an answer answers a question")
    return messages


def _dpo(obj: dict) -> tuple[str, list[Node]]:
    prompt_name = "'prompt'"
    if "preferred_output" in obj:  # OpenAI's preference form
        prompt_name = "'input.messages'"
        source = _object(obj.get("input"), "field 'input'")
        prompt = _chat_messages(_list(source, "messages"), "input.messages")
        chosen = _chat_messages(_list(obj, "preferred_output"), "preferred_output")
        rejected = _chat_messages(_list(obj, "non_preferred_output"), "non_preferred_output")
    elif isinstance(obj.get("prompt"), str):  # TRL's plain-text form
        prompt = [{"role": "user", "content": _string(obj, "prompt")}]
        chosen = [{"role": "assistant", "content": _string(obj, "chosen")}]
        rejected = [{"role": "assistant", "content": _string(obj, "rejected")}]
    elif "prompt" not in obj:  # TRL's implicit prompt: the turns both conversations share
        if isinstance(obj.get("chosen"), str):
            raise _Bad(
                "without a 'prompt', 'chosen' and 'rejected' must be conversations "
                "(lists of messages); a text pair needs its 'prompt'"
            )
        chosen = _chat_messages(_list(obj, "chosen"), "chosen")
        rejected = _chat_messages(_list(obj, "rejected"), "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        prompt_name = "the prompt (the messages 'chosen' and 'rejected' share)"
        if [m["role"] for m in chosen + rejected] != ["assistant", "assistant"]:
            raise _Bad(
                "without a 'prompt', 'chosen' and 'rejected' must be one conversation "
                f"but for a last assistant answer each (they share {shared} messages, "
                f"then hold {len(chosen)} and {len(rejected)} more)"
            )
    else:
        prompt = _chat_messages(_list(obj, "prompt"), "prompt")
        chosen = _chat_messages(_list(obj, "chosen"), "chosen")
        rejected = _chat_messages(_list(obj, "rejected"), "rejected")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if len(answer) != 1 or answer[0]["role"] != "assistant":
            raise _Bad(f"{name!r} must hold exactly one assistant message")
    if problem := chat_problem(prompt):  # stored, such a pair had no question to render
        raise _Bad(f"{prompt_name} {problem}: a preference pair answers a question")
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):
        raise _Bad(f"{prompt_name} has an empty question: a preference pair answers a question")
    system, nodes = _chain(prompt)
    parent = len(nodes) - 1 if nodes else None
    nodes.append(Node("assistant", chosen[0]["content"], parent, {"thumb": 1, "ideal": chosen[0]["content"]}))
    nodes.append(Node("assistant", rejected[0]["content"], parent, {"thumb": -1}))
    return system, nodes


def check_file(path: str | Path) -> None:
    """A KettleError unless `path` is a file that can be read."""
    path = Path(path)
    if path.is_dir():
        raise KettleError(f"{path}: a folder, not a file")
    if not path.is_file():
        raise KettleError(f"{path}: no such file")


def parse_file(path: str | Path, fmt: str | None = None) -> tuple[str, list[Record], Counter]:
    """Read and validate a whole file: (format, records, ignored fields). Raises KettleError
    naming the file and line of the first problem."""
    path = Path(path)
    if fmt is not None and fmt not in FORMATS:
        raise KettleError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_file(path)
    raw = read_json_records(path)
    fmt = fmt or detect_format(path, raw)
    records, ignored = [], Counter()
    for line, obj in raw:
        try:
            obj = _object(obj, "a record")
            system, nodes = FORMAT_TABLE[fmt].parse(obj)
            external_id = None
            if fmt == "sharegpt" and "id" in obj:
                external_id = _string(obj, "id")
        except _Bad as exc:
            raise KettleError(f"{path}, line {line}: {exc} ({fmt} format)") from None
        for key in set(obj) - FORMAT_TABLE[fmt].fields:
            ignored[key] += 1
        records.append(Record(line, system, nodes, external_id))
    return fmt, records, ignored


def import_file(
    store: Store,
    path: str | Path,
    *,
    fmt: str | None = None,
    again: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a dataset file as conversations, all or nothing. The same file (by content)
    is refused a second time unless `again`. `progress(done, total)` is called as it goes.

    The conversations are written in batches of IMPORT_BATCH_S, a transaction each, so a long
    import never keeps the app's labels or a training run's metrics from being written; they
    stay hidden until the last batch (Store.begin_import), and a failure deletes them."""
    path = Path(path)
    fmt, records, ignored = parse_file(path, fmt)
    source = f"import:{fmt}:{shown(path.name)}:{sha256_file(path)[:16]}"
    report = ImportReport(path=path, format=fmt, ignored=ignored)
    store.discard_abandoned_imports()
    with store.transaction():
        _refuse_imported_before(store, path, source, again)
        import_id = store.begin_import(source)
    try:
        while report.conversations < len(records):
            with store.transaction():
                deadline = time.monotonic() + IMPORT_BATCH_S
                while True:  # at least one record a batch
                    report.messages += _add_record(store, records[report.conversations], source, import_id)
                    report.conversations += 1
                    done = report.conversations
                    if progress is not None and (done % 200 == 0 or done == len(records)):
                        progress(done, len(records))
                    if done == len(records) or time.monotonic() >= deadline:
                        break
            time.sleep(IMPORT_PAUSE_S)
        with store.transaction():  # checked again: another import of the file may have finished meanwhile
            _refuse_imported_before(store, path, source, again)
            store.finish_import(import_id)
    except BaseException:
        # Best effort: what cannot be deleted now (a full disk, say) stays hidden, and the next
        # import deletes it once this process is gone.
        with contextlib.suppress(Exception):
            store.discard_import(import_id)
        raise
    return report


def _refuse_imported_before(store: Store, path: Path, source: str, again: bool) -> None:
    if not again and (seen := store.conversations_from(source)):
        raise KettleError(
            f"{path}: this file was imported before ({seen:,} conversations); pass --again to import a second copy"
        )


def _add_record(store: Store, record: Record, source: str, import_id: int) -> int:
    """Write one record as a hidden conversation of import `import_id`; returns its message count."""
    first_user = next((n.content for n in record.nodes if n.role == "user"), "")
    title = (first_user.strip().splitlines() or [""])[0][:80]
    conv = store.create_conversation(
        title,
        system_prompt=record.system_prompt,
        source=source,
        external_id=record.external_id,
        pending_import=import_id,
    )
    ids: list[int] = []
    for node in record.nodes:
        parent = None if node.parent is None else ids[node.parent]
        msg = store.add_message(conv.id, node.role, content=node.content, parent_id=parent, meta=node.meta)
        ids.append(msg.id)
        if node.label:
            store.set_label(msg.id, **node.label)
    return len(ids)


# ---------------------------------------------------------------------------------------------
# Examples -> files

SKIP_TURNS = "has turns that are not question-answer pairs (Alpaca's history holds pairs; use --format openai)"
SKIP_WEIGHT = (
    "has earlier answers not chosen for training ({} cannot mark them; use --format "
    "openai, or --no-weights to leave them out)"
)
SKIP_NOT_PAIR = "is an example, not a preference pair (export it with --format openai)"


def _to_alpaca(example: dict) -> dict | str:
    messages = example["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    if [m["role"] for m in turns] != ["user", "assistant"] * (len(turns) // 2) or not turns:
        return SKIP_TURNS
    if any("weight" in m for m in turns):
        return SKIP_WEIGHT.format("Alpaca")
    user, answer = turns[-2]["content"], turns[-1]["content"]
    meta = example.get("meta", {})
    instruction, given = meta.get("instruction"), meta.get("input", "")
    if instruction is None or user != (f"{instruction}\n\n{given}" if given else instruction):
        instruction, given = user, ""
    record = {"instruction": instruction, "input": given, "output": answer}
    if system:
        record["system"] = system
    if len(turns) > 2:
        record["history"] = [[q["content"], a["content"]] for q, a in zip(turns[:-2:2], turns[1:-2:2])]
    return record


def _to_sharegpt(example: dict) -> dict | str:
    if any("weight" in m for m in example["messages"]):
        return SKIP_WEIGHT.format("ShareGPT")
    ident = example.get("meta", {}).get("id") or f"kettle-{content_hash(example)[:12]}"
    return {
        "id": ident,
        "conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in example["messages"]],
    }


def _to_openai(example: dict) -> dict:
    return {
        "messages": [
            {"role": m["role"], "content": m["content"], **({"weight": m["weight"]} if "weight" in m else {})}
            for m in example["messages"]
        ]
    }


def _to_dpo(pair: dict) -> dict:
    def msgs(items):
        return [{"role": m["role"], "content": m["content"]} for m in items]

    return {"prompt": msgs(pair["prompt"]), "chosen": msgs(pair["chosen"]), "rejected": msgs(pair["rejected"])}


# --- the formats: one entry each; the CLI's choices and the app's export dialog come from here -----


@dataclass(frozen=True)
class Format:
    name: str
    help: str  # one line, as the export dialog shows it
    suffix: str  # ".json": one JSON list; ".jsonl": a record a line
    parse: Callable[[dict], tuple[str, list[Node]]]  # a record -> (system prompt, nodes)
    render: Callable[[dict], dict | str] | None  # an example -> a record or a skip reason;
    #                                                   None: the format holds preference pairs
    fields: frozenset[str]  # a record's keys that parse reads (others are counted as ignored)


FORMAT_TABLE = {
    f.name: f
    for f in (
        Format(
            "alpaca",
            "Alpaca JSON (single-turn only)",
            ".json",
            _alpaca,
            _to_alpaca,
            frozenset({"instruction", "input", "output", "system", "history"}),
        ),
        Format("sharegpt", "ShareGPT JSON", ".json", _sharegpt, _to_sharegpt, frozenset({"id", "conversations"})),
        Format(
            "openai",
            "OpenAI chat JSONL (every turn, system prompts)",
            ".jsonl",
            _openai,
            _to_openai,
            frozenset({"messages"}),
        ),
        Format(
            "dpo",
            "preference pairs JSONL (corrections and up/down siblings)",
            ".jsonl",
            _dpo,
            None,
            frozenset({"prompt", "chosen", "rejected", "input", "preferred_output", "non_preferred_output"}),
        ),
    )
}
FORMATS = tuple(FORMAT_TABLE)


def without_context(example: dict) -> dict:
    """`example` less its weight-0 answers, each with the question it answered, for tools that
    train on every assistant message they are given (TRL ignores "weight"). The question goes
    too so that roles keep alternating, as many chat templates require."""
    kept: list[dict] = []
    asked: list[dict] = []  # user messages waiting for the answer that decides their fate
    for m in example["messages"]:
        if m["role"] == "user":
            asked.append(m)
        elif m.get("weight", 1) == 0:
            asked = []
        else:
            kept += asked + [m]
            asked = []
    return {**example, "messages": kept}


def learnable(items: list[dict], messages: Callable[[dict], list], what: str, skipped: Counter) -> list[dict]:
    """`items` less those whose messages no model can learn from (an older Kettle's snapshot
    may hold them), counted in `skipped` as data.datasets.render_dataset counts them."""
    kept = []
    for item in items:
        if problem := chat_problem(messages(item)):
            skipped[what + problem] += 1
        else:
            kept.append(item)
    return kept


def convert(examples: list[dict], pairs: list[dict], *, fmt: str) -> tuple[list[dict], Counter]:
    """Examples (and pairs) in the one chat format -> records of `fmt`, and skip reasons."""
    skipped: Counter = Counter()
    examples = learnable(examples, lambda e: e["messages"], "", skipped)
    pairs = learnable(pairs, lambda p: p["prompt"], "a preference pair whose prompt ", skipped)
    to_record = FORMAT_TABLE[fmt].render
    if to_record is None:
        if examples and not pairs:
            skipped[SKIP_NOT_PAIR] = len(examples)
        return [_to_dpo(p) for p in pairs], skipped
    out = []
    for example in examples:
        record = to_record(example)
        if isinstance(record, str):
            skipped[record] += 1
        else:
            out.append(record)
    return out, skipped


def export_file(
    store: Store,
    out: str | Path,
    *,
    fmt: str,
    snapshot_id: int | None = None,
    filt: DataFilter | None = None,
    weights: bool = True,
) -> ExportReport:
    """Write a snapshot's examples, or what `filt` chooses now, as a `fmt` file (atomically).
    Without `weights`, answers marked weight 0 are left out (`without_context`)."""
    if fmt not in FORMATS:
        raise KettleError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not weights and fmt == "dpo":
        raise KettleError(
            "--no-weights leaves context-only answers out of examples; preference pairs (--format dpo) hold none"
        )
    out = Path(out)
    check_target(out)
    unlearnable: Counter = Counter()
    if snapshot_id is not None:
        examples, pairs = store.snapshot_data(snapshot_id)
    else:
        rows, pair_rows = store.dataset(filt, skipped=unlearnable)
        examples = [r["example"] for r in rows]
        pairs = [p["pair"] for p in pair_rows]
    dropped = 0
    if not weights:
        dropped = sum(m.get("weight", 1) == 0 for e in examples for m in e["messages"])
        examples = [without_context(e) for e in examples]
    records, skipped = convert(examples, pairs, fmt=fmt)
    if FORMAT_TABLE[fmt].suffix == ".json":
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        raise KettleError(f"{out}: cannot write: {exc.strerror or exc}") from exc
    return ExportReport(
        path=out, format=fmt, written=len(records), skipped=unlearnable + skipped, context_dropped=dropped
    )
