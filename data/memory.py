"""The store as the assistant's memory: passages an answer can be grounded in, found by search.

Two kinds of passage:

- **Documents**: the installed Python's documentation and the files a user adds (`kettle docs
  add`), chunked, each chunk with its source and position, in `doc_sources` / `doc_passages`
  (SQLite FTS5 over them). A source is written in one transaction (its old passages out, its new
  ones in), so a killed indexer leaves each source whole or absent, never half-indexed.
- **Answers that would train** (corrected, approved, imported), with their questions: read live
  from the messages and their current labels, so a correction is memory the moment it is saved.
- **A model's own lessons** (the instruction data a starter was taught, in `lessons`): the
  answers it learnt, so that beside its documentation it still answers as it was taught.

`retrieve` finds the passages for a question: exact name matches for code symbols ("str.upper"),
then BM25 candidates re-scored by how much of the question's rarer words they hold, with a
threshold so that a question about nothing in the store retrieves nothing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gpt.errors import KettleError

DOC_SUFFIXES = (".md", ".markdown", ".txt", ".rst", ".py", ".html", ".htm")
CHUNK_CHARS = 700  # a passage: a few paragraphs, small enough that three fit beside a question
MIN_COVERAGE = 0.7  # share of the question's word weight an earlier question must hold, both ways
DOC_COVERAGE = 0.6  # share of the question's word weight a document passage must hold
PART_OF_WHOLE = 0.35  # an earlier question wholly inside this one (or this in it) needs this share
# a lesson compared with the question holds at least this share of its words' weight (below
# PART_OF_WHOLE: the weights compared are the question's words' own, not yet their stems')
LESSON_SHARE = 0.2
AS_SPECIFIC = 0.75  # a one-word question inside an earlier one: its word's weight against that one's top
NAMED = 1.0  # added to a passage about the very name the question asks about
EXACT_NAME = 0.01  # ... and this when the name is the passage's whole name, not its last part
MARGIN = 0.2  # documentation passages kept: those within this of the best one
CANDIDATES = 30  # BM25 candidates re-scored per index
# Words that say how a question is asked, not what it is about.
# Small talk: about nothing in the store ("Hi!" found bisect's `hi` parameter, "thanks" a docstring
# thanking its author), and no follow-up of the chat's last question either (mid-chat, "Hi!" was
# answered with the correction the question before it had found)
# Words small talk is padded with ("thanks a lot", "bye for now", "how are you doing today"):
# a question holding nothing else is small talk, not a search for "lot" or "today"
FILLER = frozenset(
    "lot lots much so today now doing u ur there buddy friend mate again all day tonight help helps question".split()
)
SMALL_TALK = frozenset(
    """hi hello hey hiya thanks thank thx cheers bye goodbye ok okay yes yeah yep nope sorry cool great nice
    awesome welcome morning evening night up""".split()
)
STOPWORDS = SMALL_TALK | frozenset(
    """a an the of to in on for with by at from as and or not no is are was were be been being do does did
    doing done can could should would will shall may might must i me my we our you your it its this that these
    those there here what which who whom whose when where why how please tell explain show give want need
    use using used get about into python pythons function method way some any one thing something mean means
    make let lets know like just also often best good quickly easily really actually exactly simply ways
    if whether has have had than then so such into onto very more most other same only too there
    contain contains containing exist exists present certain particular specific given whole entire
    access fetch obtain grab retrieve define describe""".split()
)
# Short names people use for the same thing: one word for each, on both sides of a comparison.
ALIASES = {
    "dictionary": ("dict", "dicts"),
    "string": ("str", "strs", "text", "sentence"),
    "integer": ("int", "ints"),
    "number": ("num", "nums"),
    "character": ("char", "chars"),
    "object": ("obj", "objs"),
    # words people put for a correction's own ("drop duplicate items" for "remove duplicates",
    # "flip a list around" for "reverse a list")
    "remove": ("drop", "delete"),
    "item": ("element", "elements", "entry", "entries"),
    "reverse": ("flip", "invert", "backwards", "backward", "reversed"),
    "join": ("combine", "concatenate", "concat", "merge", "glue"),
    "convert": ("transform", "turn", "change", "parse", "cast"),
    "split": ("break", "separate", "separated", "cut", "divide", "chop"),
    "duplicates": ("dedupe", "deduplicate", "dedup", "repeated", "repeats", "unique", "distinct"),
    "check": ("verify", "test", "determine"),
    "loop": ("iterate", "traverse", "loops"),
    "last": ("final",),
    "copy": ("clone",),
    "length": ("len", "size"),
}
CANONICAL = {alias: word for word, aliases in ALIASES.items() for alias in aliases}
# Small talk in other words is the same small talk: "hey there" is "Hi there!", "Good evening"
# "Good morning!" (where a model's lessons hold a few forms of each, memory finds the nearest one)
CHATTER_ALIASES = {
    "hi": ("hello", "hey", "hiya", "howdy", "greetings", "morning", "evening", "afternoon", "yo"),
    "thanks": ("thank", "thx", "cheers", "ty", "appreciate", "appreciated"),
    "bye": ("goodbye", "later", "farewell", "cya", "night"),
}
CHATTER = {alias: word for word, aliases in CHATTER_ALIASES.items() for alias in aliases}
CHATTER_MATCH = 0.5  # share of the words of both (Jaccard) a lesson's small talk must have
PARTICLES = frozenset("a an the for so and very".split())  # not counted in that share
# Phrases that say one of those words in several ("get rid of" is "remove"), rewritten before a
# question is split into words. "duplicate" alone is a verb ("duplicate a list": copy it); before
# the things repeated it is the noun of "remove duplicates".
PHRASES = [
    (re.compile(pattern, re.IGNORECASE), replacement)
    for pattern, replacement in (
        (r"\bget rid of\b", "remove"),
        (r"\btake out\b", "remove"),
        (r"\b(?:one|a single) (\w+) at a time\b", r"\1 by \1"),
        (r"\beach (line|word|item|element|character|key)\b", r"\1 by \1"),
        (r"\bhow (?:long|big)\b", "length"),
        (r"\bhow many (?:items|elements|entries|values|things)\b", "length"),
        (r"\bnumber of (?:items|elements|entries|values)\b", "length"),
        (r"\b(?:largest|biggest|highest) to (?:smallest|lowest)\b", "descending"),
        (r"\b(?:high|big) to (?:low|small)\b", "descending"),
        # sorted "backwards" is sorted in descending order, not a list reversed
        (r"\b(sort\w*\b[^.?!]*?)\b(?:backwards?|in reverse order|in reverse|reversed)\b", r"\1 descending"),
        (r"\bin reverse\b", "reverse"),
        (r"\bduplicate(?= (?:items|elements|entries|values|words|lines|rows|numbers|ones)\b)", "duplicates"),
        (r"\bduplicate\b", "copy"),
        (r"\bgo(?:ing)? (?:through|over)\b", "loop"),
        (r"\bput together\b", "join"),
        (r"\b(?:find out|see|tell) (if|whether)\b", r"check \1"),
    )
]
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\d+")


ASKED = ("correction", "answer", "lesson")  # passages that are a question and its answer


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: where it comes from and its text."""

    kind: str  # "correction" | "answer" | "lesson" | "python" | "file"
    source: str  # a file's path, "python:json", "message 12", or the model whose lesson it is
    name: str  # the symbol or heading it is about, or the question an answer answers
    text: str
    ref: int  # doc_passages.id, or the answer's message id
    score: float  # the share of the question's word weight it holds

    @property
    def taught(self) -> bool:
        """An answer the user gave or approved: the model copies it whole (gpt.sampling.CopyBias)."""
        return self.kind in ("correction", "answer")

    @property
    def reference(self) -> str:
        """The passage as the model reads it: an answer with the question it answers."""
        return f"{self.name}\n{self.text}" if self.kind in ASKED else self.text

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "source", "name", "text", "ref", "score")}


@dataclass(frozen=True)
class DocSource:
    id: int
    kind: str
    path: str
    n_passages: int
    added_at: float


@dataclass
class IndexReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    passages: int = 0


# -- chunking -----------------------------------------------------------------------------------


def chunk_text(text: str, *, suffix: str) -> list[tuple[str, str]]:
    """(heading, text) chunks of a document: paragraphs packed up to CHUNK_CHARS, each under
    the nearest heading before it (Markdown/RST headings; HTML is reduced to its text first)."""
    if suffix in (".html", ".htm"):
        text, suffix = html_text(text), ".md"  # html_text marks headings as Markdown does
    heading, chunks, current = "", [], []

    def flush():
        if current:
            chunks.append((heading, "\n\n".join(current)))
            current.clear()

    lines = text.replace("\r\n", "\n").split("\n")
    paragraphs: list[str] = []
    buf: list[str] = []
    for i, line in enumerate(lines):
        title = _heading(line, lines[i + 1] if i + 1 < len(lines) else "", suffix)
        if title is not None or not line.strip():
            if buf:
                paragraphs.append("\n".join(buf))
                buf = []
            if title is not None:
                paragraphs.append("\0" + title)
            continue
        if suffix == ".rst" and set(line.strip()) <= set("=-~^*#") and len(line.strip()) >= 3:
            continue  # an underline of the heading just taken
        buf.append(line.rstrip())
    if buf:
        paragraphs.append("\n".join(buf))
    size = 0
    for para in paragraphs:
        if para.startswith("\0"):
            flush()
            heading, size = para[1:], 0
            continue
        for piece in _split_long(para):
            if current and size + len(piece) > CHUNK_CHARS:
                flush()
                size = 0
            current.append(piece)
            size += len(piece)
    flush()
    return chunks


def _heading(line: str, following: str, suffix: str) -> str | None:
    if suffix in (".md", ".markdown") and (m := re.match(r"#{1,6}\s+(.+)", line)):
        return m.group(1).strip()
    under = following.strip()
    if suffix == ".rst" and line.strip() and len(under) >= len(line.strip()) and set(under) <= set("=-~^*#"):
        return line.strip() if under else None
    return None


def _split_long(paragraph: str) -> Iterator[str]:
    while len(paragraph) > CHUNK_CHARS:
        cut = paragraph.rfind(" ", 0, CHUNK_CHARS)
        cut = cut if cut > CHUNK_CHARS // 2 else CHUNK_CHARS
        yield paragraph[:cut]
        paragraph = paragraph[cut:].lstrip()
    if paragraph.strip():
        yield paragraph


def html_text(markup: str) -> str:
    """The text of an HTML page, paragraphs kept apart, scripts and styles dropped."""
    from html.parser import HTMLParser

    blocks = {"p", "div", "br", "li", "tr", "pre", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6"}

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.out: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style"):
                self.skip += 1
            elif tag in blocks:
                self.out.append("\n\n" + ("# " if tag in ("h1", "h2", "h3") else ""))

        def handle_endtag(self, tag):
            if tag in ("script", "style") and self.skip:
                self.skip -= 1
            elif tag in blocks:
                self.out.append("\n\n")

        def handle_data(self, data):
            if not self.skip:
                self.out.append(" ".join(data.split()) + " " if data.strip() else "")

    parser = Text()
    parser.feed(markup)
    text = "".join(parser.out)
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


# -- indexing -----------------------------------------------------------------------------------


def doc_files(path: str | Path) -> list[Path]:
    """The document files at `path` (a file, or a folder searched recursively; hidden folders,
    virtual environments and caches skipped), sorted."""
    path = Path(path).expanduser()
    if not path.exists():
        raise KettleError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in DOC_SUFFIXES:
            raise KettleError(f"{path}: not a document Kettle reads ({', '.join(DOC_SUFFIXES)})")
        return [path.resolve()]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("node_modules", "__pycache__"))
        found += [Path(root, f).resolve() for f in files if Path(f).suffix.lower() in DOC_SUFFIXES]
    return sorted(found)


def index_documents(
    store, files: Iterable[Path], *, progress: Callable[[int, Path], None] | None = None
) -> IndexReport:
    """Index files as sources: an unchanged file (same size and modification time, or same
    content) is skipped, a changed one re-indexed, one whose content another source already
    holds counted as a duplicate. Each file lands whole in its own transaction."""
    report = IndexReport()
    for i, path in enumerate(files):
        _index_file(store, Path(path), report)
        if progress:
            progress(i + 1, Path(path))
    return report


def _index_file(store, path: Path, report: IndexReport) -> None:
    try:
        stat = path.stat()
        known = store._row("SELECT id, size, mtime, sha256 FROM doc_sources WHERE path = ?", (str(path),))
        if known and known["size"] == stat.st_size and known["mtime"] == stat.st_mtime:
            report.unchanged += 1
            return
        data = path.read_bytes()
    except OSError as exc:
        raise KettleError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if known and known["sha256"] == digest:
        with store.transaction():
            store.conn.execute(
                "UPDATE doc_sources SET size = ?, mtime = ? WHERE id = ?", (stat.st_size, stat.st_mtime, known["id"])
            )
        report.unchanged += 1
        return
    same = store._row("SELECT path FROM doc_sources WHERE sha256 = ? AND path != ?", (digest, str(path)))
    if same is not None:
        report.duplicates += 1
        return
    text = data.decode("utf-8", errors="replace")
    chunks = chunk_text(text, suffix=path.suffix.lower())
    put_source(store, "file", str(path), chunks, sha256=digest, size=stat.st_size, mtime=stat.st_mtime)
    report.passages += len(chunks)
    if known:
        report.updated += 1
    else:
        report.added += 1


def put_source(
    store,
    kind: str,
    path: str,
    chunks: list[tuple[str, str]],
    *,
    sha256: str,
    size: int | None = None,
    mtime: float | None = None,
) -> None:
    """Replace a source's passages with `chunks` ((name, text) pairs), all in one transaction."""
    with store.transaction():
        store.conn.execute("DELETE FROM doc_sources WHERE path = ?", (path,))  # its passages cascade
        sid = store.conn.execute(
            "INSERT INTO doc_sources (kind, path, sha256, size, mtime, n_passages, added_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (kind, path, sha256, size, mtime, len(chunks), time.time()),
        ).lastrowid
        store.conn.executemany(
            "INSERT INTO doc_passages (source_id, position, name, text) VALUES (?, ?, ?, ?)",
            [(sid, i, name, text) for i, (name, text) in enumerate(chunks)],
        )


def remove_documents(store, path: str | Path) -> int:
    """Remove the sources at `path` (a file, or every file under a folder); how many went."""
    target = str(Path(path).expanduser().resolve())
    with store.transaction():
        gone = store.conn.execute(
            "DELETE FROM doc_sources WHERE kind = 'file' AND (path = ? OR path LIKE ? ESCAPE '\\')",
            (target, _like_prefix(target.rstrip(os.sep) + os.sep)),
        ).rowcount
    return gone


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def doc_sources(store, *, kind: str | None = None) -> list[DocSource]:
    sql = "SELECT id, kind, path, n_passages, added_at FROM doc_sources WHERE path != ?"
    marker = f"python:{PYTHON_LAST}"
    rows = store._rows(
        sql + (" AND kind = ?" if kind else "") + " ORDER BY path", (marker, kind) if kind else (marker,)
    )
    return [DocSource(**r) for r in rows]


def passages(store, ids: list[int]) -> dict[int, Passage]:
    """Document passages by id, in one query (a removed one is absent)."""
    if not ids:
        return {}
    rows = store._rows(
        "SELECT p.id, p.name, p.text, s.kind, s.path FROM doc_passages p JOIN doc_sources s ON s.id = p.source_id"
        f" WHERE p.id IN ({','.join('?' * len(ids))}) AND s.path != ?",
        (*ids, f"python:{PYTHON_LAST}"),  # an older Kettle wrote a passage for it: never an answer's
    )
    return {r["id"]: Passage(r["kind"], r["path"], r["name"], r["text"], r["id"], 1.0) for r in rows}


def record_sources(store, message_id: int, passages: list[Passage]) -> None:
    """Keep, with an answer, the passages it was grounded in (as they were then)."""
    with store.transaction():
        store.conn.executemany(
            "INSERT INTO answer_sources (message_id, position, kind, source, name, text, ref)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(message_id, i, p.kind, p.source, p.name, p.text, p.ref) for i, p in enumerate(passages)],
        )


def answer_sources(store, message_id: int) -> list[Passage]:
    rows = store._rows(
        "SELECT kind, source, name, text, ref FROM answer_sources WHERE message_id = ? ORDER BY position",
        (message_id,),
    )
    return [Passage(**r, score=1.0) for r in rows]


# -- retrieval ----------------------------------------------------------------------------------


def _rephrased(text: str) -> str:
    """The text with PHRASES said in their one word."""
    for phrase, replacement in PHRASES:
        text = phrase.sub(replacement, text)
    return text


def query_terms(text: str) -> tuple[list[str], list[str]]:
    """(words, symbols) of a question: the lower-cased words that say what it is about, and the
    dotted or underscored names in it that look like code ("str.upper", "os.path.join")."""
    words, symbols = [], []
    for token in WORD.findall(_rephrased(text)):
        if "." in token or "_" in token.strip("_") or token.endswith("()"):
            symbols.append(token.strip("."))
        for part in re.split(r"[._]", token.lower()):
            part = CANONICAL.get(part, part)
            if (len(part) > 1 or part.isdigit()) and part not in STOPWORDS and part not in words:
                words.append(part)
    return words, symbols


def retrieve(store, question: str, *, recent: Iterable[str] = (), limit: int = 3) -> list[Passage]:
    """The passages that answer `question` best, corrections first, at most `limit`; none when
    nothing in the store holds enough of what the question is about. `recent` (the user's
    earlier turns, newest last) is searched only when the question names nothing itself
    ("and how do I undo it?"), and is no small talk ("Thanks!")."""
    words, symbols = query_terms(question)
    small_talk = SMALL_TALK & {w.lower() for w in WORD.findall(question)}
    if not symbols and set(words) <= FILLER:
        if chatter := _chatter(store, question):
            return chatter[:limit]
        if small_talk:
            return []
    if not words and not symbols and not small_talk:
        for earlier in reversed(list(recent)):
            words, symbols = query_terms(earlier)
            if words or symbols:
                break
    if not words and not symbols:
        return []
    # what the user taught comes first; then the documentation closest to the best match: a
    # passage about the exact name asked for outranks one that only mentions it
    answers = sorted(_answers(store, words, symbols), key=lambda p: (-p.score, p.kind != "correction", -p.ref))
    # then what the model was taught itself, before the documentation it was taught from
    answers += sorted(_lessons(store, words, symbols), key=lambda p: (-p.score, p.ref))
    answers = [p for p in answers if not _opposite(question, p.name)]
    docs: dict[int, Passage] = {}
    # names as the question spells them: "len" is documented as len, though it asks about length
    spelled = [w for w in (t.lower() for t in WORD.findall(question)) if w not in STOPWORDS]
    for p in _named(store, symbols, spelled if len(words) == 1 else words) + _documents(store, words, spelled):
        if p.ref not in docs or docs[p.ref].score < p.score:
            docs[p.ref] = p
    # a method of another builtin type than the one asked about answers another question ("How
    # do I reverse a string?" got list.reverse's "Reverse *IN PLACE*.")
    answers = [p for p in answers if not _other_type(words, p)]
    ranked = sorted((p for p in docs.values() if not _other_type(words, p)), key=lambda p: -p.score)
    ranked = [p for p in ranked if p.score >= ranked[0].score - MARGIN] if ranked else []
    out, seen = [], set()
    for p in answers + ranked:
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out[:limit]


# The builtin types a question names in words, and the names their methods go by.
TYPE_NAMES = {
    "string": "str",
    "list": "list",
    "dictionary": "dict",
    "tuple": "tuple",
    "set": "set",
    "integer": "int",
    "float": "float",
    "bytes": "bytes",
}
BUILTIN_TYPES = {*TYPE_NAMES.values(), "bytearray", "frozenset", "memoryview", "complex"}


def _other_type(words: list[str], passage: Passage) -> bool:
    """The question names builtin types, and the passage is about methods of others only."""
    asked = {TYPE_NAMES[w] for w in words if w in TYPE_NAMES} | {w for w in words if w in BUILTIN_TYPES}
    if not asked:
        return False
    names = [passage.name] if passage.kind == "python" else query_terms(passage.name)[1]
    owners = {n.split(".")[-2] for n in names if "." in n}
    return bool(owners) and owners <= BUILTIN_TYPES and not owners & asked


def taught_count(found: list[Passage]) -> int:
    """How many of the passages, the first ones, the user taught (retrieve puts them first)."""
    return next((i for i, p in enumerate(found) if not p.taught), len(found))


def references_for(store, messages: list[dict], *, limit: int = 3) -> list[Passage]:
    """The passages for a conversation's newest question, its earlier questions as context."""
    questions = [m["content"] for m in messages if m.get("role") == "user"]
    if not questions:
        return []
    return retrieve(store, questions[-1], recent=questions[:-1], limit=limit)


def _fts_any(words: list[str]) -> str:
    """An FTS5 query for any of `words` (or their aliases); user text is never FTS syntax."""
    spelled = [form for w in words for form in (w, *ALIASES.get(w, ()))]
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in spelled)


def _weights(total: int, counts: dict[str, int]) -> dict[str, float]:
    """Each word's inverse document frequency among `total` rows, `counts` the rows holding it
    (a word in no row weighs most)."""
    # smoothed and bounded: in a small store a word it has never seen must not outweigh the rest
    # of the question many times over
    return {w: math.log(1 + (total + 1) / (df + 1)) for w, df in counts.items()}


def _rows_of(store, table: str) -> int:
    """How many rows an FTS index has: those of its content table (an external-content FTS5
    index has exactly those), counted there from an index; COUNT(*) on the FTS table reads
    every row's text (1.8 ms a question over Python's documentation)."""
    return store._row(f"SELECT COUNT(*) AS n FROM {table}")["n"]


def _column(store, sql: str, params: tuple) -> list:
    """The first column of each row, without a dict per row (a common word's rows run to
    thousands)."""
    with store._lock:
        return [row[0] for row in store.conn.execute(sql, params)]


def _documents(store, words: list[str], spelled: list[str] = ()) -> list[Passage]:
    if not words:
        return []
    # every row holding each word, one query a word: how many weighs the word, and which of the
    # candidates are among them is their coverage (FTS5 runs "MATCH ? AND rowid IN (...)" as one
    # match per candidate: 0.8 ms a word)
    total = _rows_of(store, "doc_passages")
    version = (total, store._row("SELECT MAX(id) AS last FROM doc_passages")["last"])
    holding = {w: _doc_holding(store, w, version) for w in words}
    weights = _weights(total, {w: len(rows) for w, rows in holding.items()})
    whole = sum(weights.values()) or 1.0
    # A passage without any of the rarest words that make up more than 1 - DOC_COVERAGE of the
    # weight cannot hold DOC_COVERAGE of it: only passages with one of those are candidates
    # (ranking every passage with "string" or "convert" by BM25 took 2-3 ms a question).
    needed, held = [], 0.0
    for w in sorted(words, key=lambda w: -weights[w]):
        needed.append(w)
        held += weights[w]
        if held > (1 - DOC_COVERAGE) * whole:
            break
    ids = _column(
        store,
        "SELECT rowid FROM doc_passages_fts WHERE doc_passages_fts MATCH ? ORDER BY bm25(doc_passages_fts) LIMIT ?",
        (_fts_any(needed), CANDIDATES),
    )
    if not ids:
        return []
    # the share of the words' weight each candidate holds (its words stemmed by FTS5)
    cover = {pid: sum(weight for w, weight in weights.items() if pid in holding[w]) / whole for pid in ids}
    found = passages(store, [pid for pid in ids if cover[pid] >= DOC_COVERAGE])
    out = []
    for rank, pid in enumerate(ids):
        if (p := found.get(pid)) is not None:
            last = p.name.lower().rsplit(".", 1)[-1]
            named = {*words, *spelled}
            bonus = NAMED if last in named or p.name.lower() in named else 0.0
            out.append(Passage(p.kind, p.source, p.name, p.text, p.ref, cover[pid] + bonus - rank * 1e-4))
    return out


_doc_holdings: dict[str, tuple[tuple, dict[str, frozenset]]] = {}
HOLDINGS_KEPT = 512  # words whose rows are kept between questions, per store


def _doc_holding(store, word: str, version: tuple) -> frozenset:
    """Every document passage holding `word` (or an alias), kept until the passages change: a
    common word ("string", "list") holds thousands, read again for every question it is in
    (2-5 ms a question over Python's documentation). `version`: the passages' count and last id."""
    kept_version, kept = _doc_holdings.get(store.path, (None, {}))
    if kept_version != version:
        kept = {}
        _doc_holdings[store.path] = (version, kept)
    if word not in kept:
        if len(kept) >= HOLDINGS_KEPT:
            kept.pop(next(iter(kept)))
        query = "SELECT rowid FROM doc_passages_fts WHERE doc_passages_fts MATCH ?"
        kept[word] = frozenset(_column(store, query, (_fts_any([word]),)))
    return kept[word]


def _named(store, symbols: list[str], words: list[str]) -> list[Passage]:
    """Python documentation of the exact names the question mentions (a name alone, like
    "getattr", counts when it is the question's only word and documented under that name)."""
    names = list(symbols)
    if not names and len(words) == 1:
        names = words
    out = []
    for name in names:
        name = name.removesuffix("()")
        rows = store._rows(
            "SELECT p.id FROM doc_passages p JOIN doc_sources s ON s.id = p.source_id"
            " WHERE s.kind = 'python' AND (p.name = ? OR p.name = ?) ORDER BY p.position, p.id LIMIT 1",
            (name, "builtins." + name),
        )
        for p in passages(store, [r["id"] for r in rows]).values():
            # above a member of the same name found by its words ("What is a list?": list, not
            # imaplib.IMAP4.list)
            out.append(Passage(p.kind, p.source, p.name, p.text, p.ref, 1.0 + NAMED + EXACT_NAME))
    return out


def _answers(store, words: list[str], symbols: list[str] = ()) -> list[Passage]:
    """Questions asked before whose answer would train now: a correction, an approved answer, or
    an imported one; the passage is that question and the answer as it would train. A question
    naming code ("tuple.count") matches only questions naming the same."""
    if not words:
        return []
    rows = store._rows(
        "SELECT f.rowid FROM messages_fts f JOIN messages m ON m.id = f.rowid"
        " JOIN conversations c ON c.id = m.conversation_id"
        " WHERE messages_fts MATCH ? AND m.role = 'user' AND c.deleted_at IS NULL"
        " ORDER BY bm25(messages_fts) LIMIT ?",
        (_fts_any(words), CANDIDATES * 3),
    )
    ids = [r["rowid"] for r in rows]
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    answers = store._rows(
        "SELECT q.id AS question_id, q.content AS question, a.id, a.content, l.ideal, l.thumb, l.excluded,"
        " c.source FROM messages q JOIN messages a ON a.parent_id = q.id AND a.role = 'assistant'"
        " JOIN conversations c ON c.id = q.conversation_id"
        " LEFT JOIN current_labels l ON l.message_id = a.id"
        f" WHERE q.id IN ({marks}) ORDER BY a.id DESC",
        tuple(ids),
    )
    chosen: dict[int, Passage] = {}
    for a in answers:
        if a["excluded"] or a["question_id"] in chosen and chosen[a["question_id"]].kind == "correction":
            continue
        if a["ideal"] is not None:
            kind, text = "correction", a["ideal"]
        elif a["thumb"] == 1 or (a["source"] != "chat" and a["thumb"] is None):
            kind, text = "answer", a["content"]
        else:
            continue
        if a["question_id"] not in chosen or kind == "correction":
            chosen[a["question_id"]] = Passage(kind, f"message {a['id']}", a["question"], text, a["id"], 0.0)
    if not chosen:
        return []
    # counted among the user's messages: a word most questions hold weighs little
    vocabulary = sorted(set(words) | {w for p in chosen.values() for w in query_terms(p.name)[0]})
    counts = {
        w: store._row("SELECT COUNT(*) AS n FROM messages_fts WHERE messages_fts MATCH ?", (_fts_any([w]),))["n"]
        for w in vocabulary
    }
    candidates = [(p, query_terms(p.name)) for p in chosen.values()]
    return _asking_alike(words, symbols, candidates, _weights(_rows_of(store, "messages"), counts))


def _asking_alike(
    words: list[str], symbols: list[str], candidates: Iterable[tuple[Passage, tuple]], weights: dict[str, float]
) -> list[Passage]:
    """The candidates (passages whose name is the question they answer, each with its question's
    query_terms) whose question asks what this one does, scored by how much of each the other
    holds, weighed by `weights` (each word's, theirs and the question's). Both ways: the old
    question must hold what this one asks, and this one what the old one asked ("sort a list" is
    not "reverse a list", however common "list" is)."""
    named = {s.lower().removesuffix("()") for s in symbols}
    # "What is a tuple?" answers nothing about tuple.count, though it holds a good share of it
    terms = [(p, w) for p, (w, s) in candidates if named <= {x.lower().removesuffix("()") for x in s}]
    weight: dict[str, float] = {}
    for w in {*words, *(w for _, their in terms for w in their)}:
        weight[_stem(w)] = max(weight.get(_stem(w), 0.0), weights[w])
    asked = {_stem(w) for w in words}
    out = []
    for p, their_words in terms:
        stored = {_stem(w) for w in their_words}
        held = asked & stored
        forward, backward = _share(held, asked, weight), _share(held, stored, weight)
        # most of each in the other, or all of one and a good part of the other ("What numbers
        # does range(5) produce?" holds all of "What does range(5) give?")
        both = min(forward, backward) >= MIN_COVERAGE
        # the old question wholly inside this one: this one asks more of the same; this one wholly
        # inside the old one when it says more than one thing, or its one word is what the old
        # one is most about ("What is isinstance for?" is "What does isinstance check?"; "What is
        # a list?" is not "How do I copy a list?")
        inside = forward >= 0.99 and (
            len(asked) > 1 or min(weight[w] for w in asked) >= AS_SPECIFIC * max(weight[w] for w in stored)
        )
        one_whole = min(forward, backward) >= PART_OF_WHOLE and (backward >= 0.99 or inside)
        if both or one_whole:
            out.append(Passage(p.kind, p.source, p.name, p.text, p.ref, (forward + backward) / 2))
    return out


DIRECTION = re.compile(r"\b([a-z]+)\s+(?:to|into)\s+(?:an?\s+|the\s+|some\s+)?([a-z]+)")


def _direction(question: str) -> tuple[str, str] | None:
    """What a question turns into what ("a string to an integer": (string, integer)), in the
    words query_terms gives them, or None where it says no such thing."""
    match = DIRECTION.search(_rephrased(question).lower())
    if not match:
        return None
    a, b = (_stem(CANONICAL.get(w, w)) for w in match.groups())
    return None if a in STOPWORDS or b in STOPWORDS or a == b else (a, b)


def _opposite(question: str, other: str) -> bool:
    """The two questions ask for the same two things the other way round ("an integer to a
    string" against "a string to an integer"): the same words, not the same question."""
    mine, theirs = _direction(question), _direction(other)
    return mine is not None and theirs is not None and mine == theirs[::-1]


def _share(part: set[str], whole: set[str], weight: dict[str, float]) -> float:
    return sum(weight[w] for w in part) / (sum(weight[w] for w in whole) or 1.0)


def index_lessons(store, model: str, lessons: Iterable[tuple[str, str]]) -> int:
    """Keep a model's lessons ((question, answer) pairs) as memory; how many were new (one a
    model already brought is kept once)."""
    rows = [(model, q.strip(), a.strip()) for q, a in lessons if q.strip() and a.strip()]
    digest = hashlib.sha256(json.dumps([r[1:] for r in rows]).encode()).hexdigest()
    if not rows or store._row("SELECT 1 AS x FROM lesson_sets WHERE sha256 = ?", (digest,)):
        return 0  # read before: a model's file is read once, however often it answers
    with store.transaction():
        before = store.conn.total_changes
        store.conn.executemany("INSERT OR IGNORE INTO lessons (model, question, answer) VALUES (?, ?, ?)", rows)
        added = store.conn.total_changes - before
        store.conn.execute(
            "INSERT INTO lesson_sets (sha256, model, added_at) VALUES (?, ?, ?)", (digest, model, time.time())
        )
        return added


def lesson_counts(store) -> dict[str, int]:
    """How many lessons memory holds, by the model that brought them."""
    rows = store._rows("SELECT model, COUNT(*) AS n FROM lessons GROUP BY model ORDER BY model")
    return {r["model"]: r["n"] for r in rows}


@dataclass(frozen=True)
class _LessonIndex:
    """The lessons held in memory, read once per change of the table (a few hundred rows)."""

    version: tuple
    lessons: list[tuple[Passage, tuple]]  # each with its question's query_terms
    holding: dict[str, list[int]]  # a stem -> the lessons whose question holds it
    counts: dict[str, int]  # a word -> how many lessons' questions hold it
    chatter: list[tuple[Passage, frozenset]]  # lessons about nothing (small talk), their words


_lesson_indexes: dict[str, _LessonIndex] = {}


def _chatter_words(text: str) -> frozenset:
    words = {CHATTER.get(w, w) for w in (t.lower() for t in WORD.findall(text))} - PARTICLES
    return frozenset(words - FILLER or words)  # "Help" alone is what it says


def _chatter(store, question: str) -> list[Passage]:
    """For a question about nothing ("hey there", "How are you doing?"): the model's own lesson
    of small talk whose words are most like it, or none."""
    index = _lesson_index(store)
    said = _chatter_words(question)
    if index is None or not said:
        return []
    scored = [(len(said & theirs) / len(said | theirs), p) for p, theirs in index.chatter]
    score, best = max(scored, key=lambda sp: sp[0], default=(0.0, None))
    if best is None or score < CHATTER_MATCH:
        return []
    return [Passage(best.kind, best.source, best.name, best.text, best.ref, score)]


def _lesson_index(store) -> _LessonIndex | None:
    """The lessons memory holds, indexed (read again when the table changed), or None."""
    version = tuple(store._row("SELECT COUNT(*) AS n, MAX(id) AS last FROM lessons").values())
    if not version[0]:
        return None
    index = _lesson_indexes.get(store.path)
    if index is None or index.version != version:
        lessons = [
            (
                Passage("lesson", r["model"], r["question"], r["answer"], r["id"], 0.0),
                query_terms(r["question"]),
            )
            for r in store._rows("SELECT id, model, question, answer FROM lessons ORDER BY id")
        ]
        counts: dict[str, int] = {}
        for _, (terms, _) in lessons:
            for w in set(terms):
                counts[w] = counts.get(w, 0) + 1
        # small talk ("Hi!", "Hello, can you help me?") is found as small talk only
        small_talk = {i for i, (_, (terms, symbols)) in enumerate(lessons) if set(terms) <= FILLER and not symbols}
        holding: dict[str, list[int]] = {}
        for i, (_, (terms, _)) in enumerate(lessons):
            for stem in {_stem(w) for w in terms} if i not in small_talk else ():
                holding.setdefault(stem, []).append(i)
        chatter = [(lessons[i][0], _chatter_words(lessons[i][0].name)) for i in sorted(small_talk)]
        index = _LessonIndex(version, lessons, holding, counts, chatter)
        _lesson_indexes[store.path] = index
    return index


def _lessons(store, words: list[str], symbols: list[str]) -> list[Passage]:
    """The model's own lessons that ask what the question does (as a correction must)."""
    index = _lesson_index(store)
    if index is None or not words:
        return []
    # only lessons holding a fair share of the question's weight can ask what it does: the
    # others (hundreds for "string" or "list") are not compared one by one
    asked = {_stem(w): _lesson_weight(index, w) for w in words}
    whole = sum(asked.values()) or 1.0
    held: dict[int, float] = {}
    for stem, weight in asked.items():
        for i in index.holding.get(stem, ()):
            held[i] = held.get(i, 0.0) + weight
    found = [index.lessons[i] for i in sorted(i for i, w in held.items() if w >= LESSON_SHARE * whole)]
    vocabulary = {*words, *(w for _, (their, _) in found for w in their)}
    weights = _weights(len(index.lessons), {w: index.counts.get(w, 0) for w in vocabulary})
    return _asking_alike(words, symbols, found, weights)


def _lesson_weight(index: _LessonIndex, word: str) -> float:
    """A word's weight among the lessons' questions (as _weights gives it)."""
    return _weights(len(index.lessons), {word: index.counts.get(word, 0)})[word]


@functools.lru_cache(maxsize=65536)
def _stem(word: str) -> str:
    """A crude stem, the same on both sides of a comparison: plurals, -ing/-ed forms and a final
    e ("reverse", "reversed", "reversing" -> "revers")."""
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ed", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[: -len(suffix)] + keep
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


# -- the installed Python's documentation ------------------------------------------------------


def index_python_docs(
    store,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> IndexReport:
    """Index the installed Python's documentation (the builtins, then each standard-library
    module read from its source), one source per module: an unchanged module is skipped.
    `stopped` is asked between modules: what was indexed stays, the rest waits for next time."""
    import sys

    from data.pydocs import builtin_docs, module_docstrings

    modules = [("builtins", [f"{name}\n\n{doc}" for name, doc in builtin_docs() if doc])]
    modules += list(module_docstrings())
    modules.append((PYTHON_LAST, []))  # no passage: only its source, which has_python_docs looks for
    report = IndexReport()
    known = {r["path"]: r["sha256"] for r in store._rows("SELECT path, sha256 FROM doc_sources WHERE kind = 'python'")}
    for i, (module, texts) in enumerate(modules):
        if stopped():
            break
        chunks = [python_chunk(text) for text in texts]
        chunks = [c for c in chunks if c is not None]
        digest = hashlib.sha256("\0".join([sys.version, *(f"{n}\0{t}" for n, t in chunks)]).encode()).hexdigest()
        path = f"python:{module}"
        if known.get(path) == digest:
            report.unchanged += module != PYTHON_LAST
        else:
            put_source(store, "python", path, chunks, sha256=digest)
            report.passages += len(chunks)
            report.updated += path in known and module != PYTHON_LAST
            report.added += path not in known and module != PYTHON_LAST
        if progress:
            progress(i + 1, len(modules), module)
    return report


# A source written after every module: has_python_docs looks for it.
PYTHON_LAST = "~complete"


def python_chunk(text: str) -> tuple[str, str] | None:
    """(name, passage) of one documented name: "class X" / "Module m" / "f(args)" heads."""
    head, _, doc = text.partition("\n\n")
    if not doc.strip():
        return None
    name = head.removeprefix("class ").removeprefix("Module ").split("(")[0].strip()
    body = f"{head}\n\n{doc.strip()}"
    if len(body) > CHUNK_CHARS:
        cut = body.rfind("\n\n", 0, CHUNK_CHARS)
        body = body[: cut if cut > len(head) else CHUNK_CHARS]
    return name, body


def has_python_docs(store) -> bool:
    """Whether the documentation of this Python is indexed, to its last module (a stopped
    indexing run is not done)."""
    return store._row("SELECT 1 AS x FROM doc_sources WHERE path = ?", (f"python:{PYTHON_LAST}",)) is not None
