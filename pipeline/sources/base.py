"""What every source declares, once, and the small helpers the readers share.

A source is one ``SourceSpec``: its name and domain, its folder under the raw directory, licence,
home page, how to get it by hand, the parts ``adapters download`` fetches, the file patterns (the
one declaration of which files it has: download keeps exactly these, prepare reads exactly these),
and three functions, each with one signature:

    read(path: Path, rel: str, opts: Opts)  -> Iterator[Raw | Quarantine]   one raw record at a time
    normalize(raw: Raw, opts: Opts)         -> dict (a corpus row)           or raise Reject(reason)
    build_sft(row: dict)                    -> list[dict(task, prompt, response)] or list[dict(task, messages)]

plus how the evaluation scores each SFT task (``tasks``: ``MultipleChoice`` or ``FreeText``). Config validation,
download, prepare, the report's data card and the docs' source table all derive from these objects
(``pipeline.sources.BUILTIN`` and the config's ``data.custom_sources``).

``rel`` is the file's path relative to the raw directory (posix), used in doc ids, quarantine
entries and the manifest so they do not depend on where the raw directory lives.

The raw directory is contained: a file or folder reached through a symbolic link that resolves
outside it is never opened (``SourceSpec.listing`` reports it, prepare quarantines it as
``outside_raw_dir``); records over ``Opts.max_record_chars`` and whole-file documents over
``Opts.max_whole_file_bytes`` are quarantined (``too_large``, ``file_too_large``) before anything
is built from them.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, Optional

# Quarantine reasons (stable strings: tests and the manifest use them)
UNREADABLE = "unreadable_file"
EMPTY_FILE = "empty_file"
NOT_UTF8 = "not_utf8"
BAD_JSON = "malformed_json"
BAD_XML = "malformed_xml"
BAD_CSV = "malformed_csv"
BAD_PARQUET = "malformed_parquet"
WRONG_COLUMNS = "wrong_column_count"
MISSING_FIELD = "missing_field"
EMPTY_TEXT = "empty_text"
TOO_SHORT = "text_too_short"
EMPTY_ANSWER = "empty_answer"
UNKNOWN_FORMAT = "unknown_format"
OUTSIDE_RAW_DIR = "outside_raw_dir"
TOO_LARGE = "too_large"
FILE_TOO_LARGE = "file_too_large"
TOO_DEEP = "too_deeply_nested"
RECORD_ERROR = "record_error"      # a normalizer raised something else than Reject: that record only

# Nesting depth a record may have (the sources' real records are 4 deep at most). Deeper ones are
# quarantined before anything walks them: Python's json, str() and json.dumps recurse, and a line of
# 100,000 '[' made the reader raise RecursionError, which lost the rest of its file.
MAX_DEPTH = 64


@dataclass
class Opts:
    """The parts of cfg.data a reader or normalizer needs (small, picklable)."""
    min_text_chars: int = 20
    max_response_chars: int = 4000
    txt_chunk_chars: int = 2000
    max_record_chars: int = 1_000_000
    max_whole_file_bytes: int = 2048 << 20
    system_messages: dict = field(default_factory=dict)   # domain -> system message (data.system_messages)


@dataclass
class Raw:
    source: str
    file: str          # path relative to the raw dir
    location: str      # line / row / element / key inside the file
    data: dict


@dataclass
class Quarantine:
    source: str
    file: str
    location: str
    reason: str
    snippet: str = ""

    def as_row(self) -> dict:
        return {"source": self.source, "file": self.file, "location": self.location,
                "reason": self.reason, "snippet": self.snippet[:300]}


class Reject(Exception):
    """Raised by a normalizer: the record goes to quarantine with this reason."""

    def __init__(self, reason: str, snippet: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.snippet = snippet


# metadata files that Hugging Face snapshots and the download stage leave beside the data
NOT_DATA = {"dataset_infos.json", "dataset_info.json", "dataset_dict.json", "state.json", "download_manifest.json",
            "README.md", "README.txt", "LICENSE.txt"}
# documentation download keeps at the top of each part, beside the data files
DOCS = ("README*", "readme*", "LICENSE*", "License*")


@dataclass(frozen=True)
class DownloadPart:
    """One thing ``adapters download`` fetches into ``<raw_dir>/<dest>`` (``dest`` is the source's
    folder or a folder inside it). Which files it keeps is the source's ``patterns``."""
    dest: str
    kind: Literal["hf", "git", "http", "s3"]
    repo: str = ""                             # HF dataset id, git URL, or s3:// URI
    revision: Optional[str] = None             # HF revision / git branch or tag (None: default branch)
    files: tuple[tuple[str, str], ...] = ()    # http: (file name, config key of its URL)
    # http: config key of a Google Drive folder share whose listing gives the URL of a file not set by its key
    folder_key: str = ""


@dataclass(frozen=True)
class SourceSetting:
    """A setting a source declares for itself: ``data.download.<key>``, the environment variables that set
    it (in this order: a later one that is set wins), and what it holds. Config (its fields, the environment
    overrides, redaction), download (URLs, opt-in) and ``jobs/submit.py`` (which variables a job carries)
    all iterate over these; none names a source."""
    key: str
    kind: Literal["opt_in", "url"]   # opt_in: a bool, fetch this (large) source; url: a URL, may carry a token
    env: tuple[str, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.key) or not self.env:
            raise ValueError(f"SourceSetting {self.key!r}: a lower-case key and at least one environment variable")


class EvalTask:
    """How the evaluation stage (pipeline/eval) scores a source's SFT test rows of one SFT task.
    Two kinds: ``MultipleChoice`` and ``FreeText``. A source declares them in ``SourceSpec.tasks``
    (SFT task name -> EvalTask); an SFT task it does not name is scored as ``FREE_TEXT``. Each kind declares
    the metrics its rows get (besides the test loss every row gets); TASK_KINDS maps kind names to them."""
    kind: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class MultipleChoice(EvalTask):
    """Scored like lm-evaluation-harness: the log-likelihood of each choice as the continuation of the
    row's prompt (in the training prompt format); ``acc`` takes the most likely choice, ``acc_norm`` the
    most likely per character of the choice. The gold choice is the one the row's response starts
    with (the longest such choice, followed by a non-word character or the end); a row whose response
    starts with none is not scored, and counted."""
    choices: tuple[str, ...]
    kind: ClassVar[str] = "multiple_choice"
    metrics: ClassVar[tuple[str, ...]] = ("acc", "acc_norm")

    def __post_init__(self) -> None:
        if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices) or not all(c.strip() for c in self.choices):
            raise ValueError(f"MultipleChoice needs two or more distinct non-empty choices, got {self.choices!r}")

    def gold(self, response: str) -> Optional[int]:
        """Index of the choice the response starts with, or None."""
        best = None
        for i, c in enumerate(self.choices):
            if response.startswith(c) and (len(response) == len(c) or not (response[len(c)].isalnum() or response[len(c)] == "_")):
                if best is None or len(c) > len(self.choices[best]):
                    best = i
        return best


@dataclass(frozen=True)
class FreeText(EvalTask):
    """Greedy generation from the row's prompt, scored against its response with ROUGE-L (F) and token F1."""
    kind: ClassVar[str] = "free_text"
    metrics: ClassVar[tuple[str, ...]] = ("rouge_l", "f1")


FREE_TEXT = FreeText()
TASK_KINDS: dict[str, type[EvalTask]] = {k.kind: k for k in (MultipleChoice, FreeText)}


@dataclass(frozen=True)
class SourceFiles:
    """What a source's folder holds: files to read and to report, as (path, rel) pairs, and links refused."""
    read: list[tuple[Path, str]]
    unmatched: list[tuple[Path, str]]
    refused: list[tuple[Path, str]]       # symbolic links that resolve outside the raw directory


@dataclass(frozen=True)
class SourceSpec:
    name: str
    domain: str
    raw_dir: str                          # folder under data.raw_dir (the seed's name)
    patterns: tuple[str, ...]             # globs relative to raw_dir ('**' = any depth): the files it reads
    read: Callable[[Path, str, Opts], Iterator[Any]]
    normalize: Callable[[Raw, Opts], dict]
    build_sft: Callable[[dict], list[dict]]
    license: str = ""
    url: str = ""
    how_to_get: str = ""
    parts: tuple[DownloadPart, ...] = ()  # what `adapters download` fetches (none: provided by hand)
    # its own settings under data.download (URLs of its files, an opt-in for a large source)
    settings: tuple[SourceSetting, ...] = ()
    # files under raw_dir that match no pattern but are reported as unknown_format (not guessed at)
    report_unmatched: tuple[str, ...] = ()
    # a file or folder read in place instead of data.raw_dir/<raw_dir> (custom sources on local disk)
    local_path: Optional[str] = None
    note: str = ""                        # said in the manifest (e.g. that a text-only source gives no SFT)
    declaration: str = ""                 # what else decides its records (a custom source: its config), for re-runs
    # how the evaluation scores each of its SFT tasks (SFT task name -> EvalTask); others: FREE_TEXT
    tasks: Mapping[str, EvalTask] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = {s.key: s for s in self.settings}
        if len(keys) != len(self.settings) or sum(s.kind == "opt_in" for s in self.settings) > 1:
            raise ValueError(f"source {self.name}: settings name a key twice or have more than one opt_in")
        for p in self.parts:
            for k in [k for _, k in p.files] + ([p.folder_key] if p.folder_key else []):
                if k not in keys or keys[k].kind != "url":
                    raise ValueError(f"source {self.name}: part {p.dest} reads data.download.{k}, which its settings "
                                     "do not declare as a url")

    @property
    def opt_in(self) -> Optional[SourceSetting]:
        """The setting that must be true for download to fetch it (large sources), or None."""
        return next((s for s in self.settings if s.kind == "opt_in"), None)

    def setting(self, key: str) -> SourceSetting:
        return next(s for s in self.settings if s.key == key)

    def how_to_get_at(self, raw_root: Path) -> str:
        """how_to_get with <raw_dir> replaced by the raw directory."""
        return self.how_to_get.replace("<raw_dir>", str(raw_root))

    def folder(self, raw_root: Path) -> Path:
        return Path(self.local_path) if self.local_path else Path(raw_root) / self.raw_dir

    def listing(self, raw_root: Path) -> SourceFiles:
        """The files under the source's folder, sorted by rel (the canonical order); rel is the path
        relative to the raw dir (for a local custom source: ``<raw_dir>/<path inside it>``)."""
        base = self.folder(raw_root)
        if self.local_path and base.is_file():
            return SourceFiles([(base, f"{self.raw_dir}/{base.name}")], [], [])
        root = base if self.local_path else Path(raw_root)
        found, refused = walk_contained(base, root)
        read, unmatched = [], []
        match, report = glob_matcher(self.patterns), glob_matcher(self.report_unmatched)
        for p, inner in found:
            if p.name in NOT_DATA:
                continue
            if match(inner):
                read.append((p, f"{self.raw_dir}/{inner}"))
            elif report(inner):
                unmatched.append((p, f"{self.raw_dir}/{inner}"))
        # a linked folder is refused whatever it holds; a linked file only when it would be read or reported
        refused_rel = [(p, f"{self.raw_dir}/{inner}".rstrip("/")) for p, inner in refused
                       if p.is_dir() or match(inner) or report(inner)]
        return SourceFiles(read, unmatched, refused_rel)

    def eval_task(self, sft_task: str) -> EvalTask:
        """The evaluation task of one of this source's SFT tasks (free text unless declared)."""
        return self.tasks.get(sft_task, FREE_TEXT)

    def files(self, raw_root: Path) -> list[Path]:
        """The files the reader reads, in canonical order."""
        return [p for p, _ in self.listing(raw_root).read]


# ---- file patterns and the contained walk ----------------------------------------------------

def _glob_regex(pattern: str) -> str:
    """A glob relative to a folder as a regex on '/'-paths: '*' and '?' stay within one name, '**'
    is any number of folders (also none), as pathlib's glob reads them."""
    out = []
    parts = pattern.split("/")
    for k, seg in enumerate(parts):
        last = k == len(parts) - 1
        if seg == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        rx, i = "", 0
        while i < len(seg):
            c = seg[i]
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif c == "[" and seg.find("]", i + 2) > 0:  # a class: [abc], [!abc]
                end = seg.find("]", i + 2)
                body = seg[i + 1:end]
                rx += "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]"
                i = end
            else:
                rx += re.escape(c)
            i += 1
        out.append(rx + ("" if last else "/"))
    return "".join(out)


def glob_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """A test 'does this '/'-path (relative to the source folder) match one of the patterns'."""
    if not patterns:
        return lambda rel: False
    rx = re.compile("|".join(f"(?:{_glob_regex(p)})" for p in patterns))
    return lambda rel: rx.fullmatch(rel) is not None


def inside(path: Path, root: Path) -> bool:
    """Whether path, with every symbolic link resolved, is root or lies under it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def walk_contained(base: Path, root: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(files, refused) under base as (path, path relative to base), hidden names skipped.
    A symbolic link is followed only when it resolves inside root; one that leaves it is refused and
    never opened (a linked folder outside is not walked). Each real folder is walked once (no loops)."""
    if not base.is_dir():
        return [], []
    if not inside(base, root):
        return [], [(base, "")]
    files: list[tuple[Path, str]] = []
    refused: list[tuple[Path, str]] = []
    seen = {os.path.realpath(base)}
    stack: list[tuple[Path, str]] = [(base, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            p, rel = Path(e.path), prefix + e.name
            if e.is_symlink() and not inside(p, root):
                refused.append((p, rel))
            elif e.is_dir():
                real = os.path.realpath(p)
                if real not in seen:
                    seen.add(real)
                    stack.append((p, rel + "/"))
            elif e.is_file():
                files.append((p, rel))
    return sorted(files, key=lambda x: x[1]), sorted(refused, key=lambda x: x[1])


def record_chars(data: Any, limit: int) -> int:
    """Characters of text in a record (strings in nested dicts and lists), counted up to just past limit."""
    total = 0
    stack = [data]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, bytes):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def nesting_depth(data: Any, limit: int = MAX_DEPTH) -> int:
    """Depth of nested dicts/lists in a record (a scalar: 0), counted up to just past limit, without recursion."""
    deepest = 0
    stack = [(data, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, (list, tuple)):
            continue
        deepest = max(deepest, d + 1)
        if deepest > limit:
            return deepest
        stack.extend((x, d + 1) for x in v)
    return deepest


# ---- text helpers ----------------------------------------------------------------------------
_WS = re.compile(r"\s+")


def clean(text: Any) -> str:
    """Collapse whitespace; None and NaN become ''."""
    if text is None:
        return ""
    if isinstance(text, float) and text != text:
        return ""
    return " ".join(str(text).split())  # str.split() is several times faster than a regex here


def norm_key(text: str) -> str:
    """Normalized text for exact-duplicate detection: NFKC, casefold, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_hash(text: str) -> str:
    return hashlib.sha1(norm_key(text).encode("utf-8")).hexdigest()


def stable_id(source: str, *parts: Any) -> str:
    h = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]
    return f"{source}:{h}"


def snippet_of(data: bytes | str, n: int = 200) -> str:
    if isinstance(data, bytes):
        return data[:n].decode("utf-8", "backslashreplace")
    return data[:n]


def corpus_row(source: str, domain: str, doc_id: str, title: str, text: str, metadata: dict,
               license: str, url: str, group: str, opts: Opts) -> dict:
    """A corpus row (schema in docs/ARCHITECTURE.md) plus the split group (kept in metadata)."""
    text = text.strip()
    if not text:
        raise Reject(EMPTY_TEXT, title)
    if len(text) < opts.min_text_chars:
        raise Reject(TOO_SHORT, text)
    md = {k: v for k, v in metadata.items() if v not in (None, "", [], {})}
    md["group"] = group
    return {"doc_id": doc_id, "domain": domain, "source": source, "title": clean(title), "text": text,
            "metadata": json.dumps(md, ensure_ascii=False, sort_keys=True), "license": license, "url": url or ""}


def meta(row: dict) -> dict:
    return json.loads(row["metadata"]) if row.get("metadata") else {}


def shorten_text(text: str, limit: int) -> str:
    """Cut at a sentence or word boundary at or below limit characters."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    for sep in (". ", "\n", " "):
        i = cut.rfind(sep)
        if i > limit // 2:
            return cut[: i + (1 if sep == ". " else 0)].strip()
    return cut.strip()


# ---- reading helpers -------------------------------------------------------------------------
def read_bytes_or_quarantine(path: Path, rel: str, source: str, opts: Opts) -> tuple[Optional[bytes], Optional[Quarantine]]:
    """A whole file's bytes (for formats read whole: JSON documents, XML), or its quarantine entry:
    unreadable, empty, or larger than opts.max_whole_file_bytes (checked before reading)."""
    try:
        size = path.stat().st_size
        if size > opts.max_whole_file_bytes:
            return None, Quarantine(source, rel, "file", FILE_TOO_LARGE,
                                    f"{size:,} bytes, over the limit of {opts.max_whole_file_bytes:,} for files read "
                                    "whole; raise data.max_whole_file_mb to read it")
        data = path.read_bytes()
    except OSError as e:
        return None, Quarantine(source, rel, "file", UNREADABLE, str(e))
    if not data.strip():
        return None, Quarantine(source, rel, "file", EMPTY_FILE, "")
    return data, None


def bom_encoding(head: bytes) -> str:
    """The encoding a byte-order mark at the start of a file names; files without one are read as UTF-8
    (a UTF-8 mark is dropped: 'utf-8-sig'). UTF-32's marks begin with UTF-16's: checked first."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8-sig"


def file_encoding(path: Path) -> str:
    with open(path, "rb") as f:
        return bom_encoding(f.read(4))


def decode_or_quarantine(data: bytes, rel: str, source: str, location: str = "file") -> tuple[Optional[str], Optional[Quarantine]]:
    try:
        return data.decode(bom_encoding(data[:4])), None
    except UnicodeDecodeError as e:
        return None, Quarantine(source, rel, f"{location} (byte {e.start})", NOT_UTF8, snippet_of(data[max(0, e.start - 40): e.start + 40]))


def _max_line_bytes(opts: Optional[Opts]) -> int:
    """Longest line read (bytes): a record of data.max_record_chars characters, JSON-escaped, fits (\\uXXXX
    is 6 bytes a character); a longer line is skipped unread, not held in memory."""
    return 8 * (opts or Opts()).max_record_chars + 4096


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, Optional[bytes], bool]]:
    """(line number, bytes as UTF-8, too long) for each line; a line over max_bytes is read past in blocks.
    UTF-16 and UTF-32 files (they start with a byte-order mark) are decoded and handed on as UTF-8."""
    enc = file_encoding(path)
    if enc != "utf-8-sig":
        with open(path, "r", encoding=enc, newline="") as t:
            for n, line in enumerate(t, 1):
                b = line.encode("utf-8", "surrogatepass")
                yield n, (None if len(b) > max_bytes else b), len(b) > max_bytes
        return
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(max_bytes + 1)
            if not raw:
                return
            n += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # the rest of the line: skipped in blocks
                    raw = f.readline(1 << 20)
                yield n, None, True
                continue
            yield n, raw, False


def iter_lines(path: Path, rel: str, source: str, opts: Optional[Opts] = None) -> Iterator[tuple[int, Optional[str], Optional[Quarantine]]]:
    """(line number, decoded line, quarantine) for each non-blank line; streams, never loads the file.
    A byte-order mark is dropped wherever a line starts with one (files joined together carry several);
    a line longer than _max_line_bytes is quarantined as too_large without being held in memory."""
    any_line = False
    max_bytes = _max_line_bytes(opts)
    for n, raw, too_long in _lines(path, max_bytes):
        if too_long:
            any_line = True
            yield n, None, Quarantine(source, rel, f"line {n}", TOO_LARGE,
                                      f"a line over {max_bytes:,} bytes (data.max_record_chars)")
            continue
        if raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        any_line = True
        try:
            yield n, raw.decode("utf-8").rstrip("\r\n"), None
        except UnicodeDecodeError as e:
            yield n, None, Quarantine(source, rel, f"line {n} (byte {e.start})", NOT_UTF8, snippet_of(raw))
    if not any_line:
        yield 0, None, Quarantine(source, rel, "file", EMPTY_FILE, "")


def iter_jsonl(path: Path, rel: str, source: str, opts: Optional[Opts] = None) -> Iterator[Any]:
    for n, line, q in iter_lines(path, rel, source, opts):
        if q is not None:
            yield q
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Quarantine(source, rel, f"line {n}", BAD_JSON, f"{e.msg}: {line[:200]}")
            continue
        except RecursionError:  # nested deeper than the parser goes: this line only
            yield Quarantine(source, rel, f"line {n}", TOO_DEEP, f"nested more than {MAX_DEPTH} levels: {line[:100]}")
            continue
        if not isinstance(obj, dict):
            yield Quarantine(source, rel, f"line {n}", BAD_JSON, "not a JSON object: " + line[:200])
            continue
        yield Raw(source, rel, f"line {n}", obj)


def iter_parquet(path: Path, rel: str, source: str, batch_rows: int = 2048) -> Iterator[Any]:
    """Rows of a Parquet file, one record batch at a time (bounded memory)."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        if path.stat().st_size == 0:
            yield Quarantine(source, rel, "file", EMPTY_FILE, "")
        else:
            yield Quarantine(source, rel, "file", BAD_PARQUET, str(e)[:200])
        return
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                yield Raw(source, rel, f"row {n}", row)
                n += 1
    except Exception as e:
        yield Quarantine(source, rel, f"row {n}", BAD_PARQUET, str(e)[:200])


class TooDeep:
    """Stands in a JSON document for an item nested too deep for Python's parser; the reader quarantines
    that item as too_deeply_nested and keeps the others."""

    def __init__(self, snippet: str):
        self.snippet = snippet


def not_a_record(v: Any, source: str, rel: str, location: str) -> Quarantine:
    """The quarantine entry of an item of a JSON document that is not a record (an object)."""
    if isinstance(v, TooDeep):
        return Quarantine(source, rel, location, TOO_DEEP, f"nested more than {MAX_DEPTH} levels: {v.snippet}")
    return Quarantine(source, rel, location, BAD_JSON, str(v)[:200])


_JSON_WS = re.compile(r"[ \t\n\r]*")
_JSON_SPECIAL = re.compile(r'["\[\]{}]')
_JSON_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.S)


def _container_end(text: str, i: int) -> int:
    """Index just past the array or object starting at text[i], by counting brackets outside strings
    (no recursion: used for the values the parser could not nest into)."""
    depth = 0
    while True:
        m = _JSON_SPECIAL.search(text, i)
        if m is None:
            raise json.JSONDecodeError("Unterminated array or object", text, i)
        i = m.end()
        if m.group() == '"':
            rest = _JSON_STRING_REST.match(text, i)
            if rest is None:
                raise json.JSONDecodeError("Unterminated string", text, i)
            i = rest.end()
        elif m.group() in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i


def _json_item(dec: json.JSONDecoder, text: str, i: int) -> tuple[Any, int]:
    try:
        return dec.raw_decode(text, i)
    except RecursionError:
        return TooDeep(text[i:i + 100]), _container_end(text, i)


def _json_container(dec: json.JSONDecoder, text: str, i: int, data_key: bool) -> tuple[Any, int]:
    """The array or object at text[i] with each member parsed on its own (a member too deep becomes
    TooDeep); with data_key, a "data" array member is opened the same way ({"data": [records]})."""
    close = "]" if text[i] == "[" else "}"
    out: Any = [] if close == "]" else {}
    i = _JSON_WS.match(text, i + 1).end()
    if text[i:i + 1] == close:
        return out, i + 1
    while True:
        if close == "}":
            if text[i:i + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
            key, i = dec.raw_decode(text, i)
            i = _JSON_WS.match(text, i).end()
            if text[i:i + 1] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _JSON_WS.match(text, i + 1).end()
            if data_key and key == "data" and text[i:i + 1] == "[":
                out[key], i = _json_container(dec, text, i, False)
            else:
                out[key], i = _json_item(dec, text, i)
        else:
            v, i = _json_item(dec, text, i)
            out.append(v)
        i = _JSON_WS.match(text, i).end()
        c = text[i:i + 1]
        if c == close:
            return out, i + 1
        if c != ",":
            raise json.JSONDecodeError(f"Expecting ',' delimiter or '{close}'", text, i)
        i = _JSON_WS.match(text, i + 1).end()


def _loads_members(text: str) -> Any:
    """json.loads for a document with an item nested too deep: the top-level array's or object's members
    (and a top-level "data" array's) are parsed one at a time, the deep ones replaced by TooDeep."""
    dec = json.JSONDecoder()
    i = _JSON_WS.match(text).end()
    if text[i:i + 1] not in ("[", "{"):
        raise json.JSONDecodeError("Expecting an array or object", text, i)
    obj, i = _json_container(dec, text, i, True)
    if _JSON_WS.match(text, i).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, i)
    return obj


def iter_json_file(path: Path, rel: str, source: str, opts: Opts) -> tuple[Any, Optional[Quarantine]]:
    """A whole JSON document (files of this kind are a few MB to a few hundred MB). An item nested deeper
    than the parser goes is returned as TooDeep (readers quarantine it through not_a_record)."""
    data, q = read_bytes_or_quarantine(path, rel, source, opts)
    if q:
        return None, q
    text, q = decode_or_quarantine(data, rel, source)
    if q:
        return None, q
    try:
        try:
            return json.loads(text), None
        except RecursionError:
            return _loads_members(text), None
    except RecursionError:  # nested too deep in a member of a "data" member's item's ... : the file
        return None, Quarantine(source, rel, "file", TOO_DEEP, text[:100])
    except json.JSONDecodeError as e:
        return None, Quarantine(source, rel, f"line {e.lineno} col {e.colno}", BAD_JSON, f"{e.msg}: {text[max(0, e.pos - 60): e.pos + 60]}")


def iter_json_records(path: Path, rel: str, source: str, opts: Opts) -> Iterator[Any]:
    """Records of a JSON list of objects (or an object whose "data" is that list); a file that is not
    one JSON document is read as JSON lines (saved as .json)."""
    obj, q = iter_json_file(path, rel, source, opts)
    if q:
        if q.reason == BAD_JSON:
            yield from iter_jsonl(path, rel, source, opts)
        else:
            yield q
        return
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        yield Quarantine(source, rel, "file", UNKNOWN_FORMAT, "expected a JSON list of records")
        return
    for i, v in enumerate(obj):
        if isinstance(v, dict):
            yield Raw(source, rel, f"item {i}", v)
        else:
            yield not_a_record(v, source, rel, f"item {i}")


def iter_csv(path: Path, rel: str, source: str, required: tuple[str, ...], opts: Opts) -> Iterator[Any]:
    """Rows of a CSV file with a header, streamed; wrong column counts and bad bytes quarantined. A field
    longer than opts.max_record_chars stops being read where it passes the limit (csv's field size
    limit) and its row is quarantined as too_large."""
    csv.field_size_limit(opts.max_record_chars)
    with open(path, "rb") as fb:
        head = fb.read(1)
        if not head:
            yield Quarantine(source, rel, "file", EMPTY_FILE, "")
            return
    enc = file_encoding(path)   # utf-8-sig drops a UTF-8 mark before a quoted header too ('\ufeff"a",...')
    f = open(path, "r", encoding=enc, errors="surrogateescape" if enc == "utf-8-sig" else "strict", newline="")
    try:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except (csv.Error, StopIteration) as e:
            yield Quarantine(source, rel, "line 1", BAD_CSV, str(e))
            return
        header = [h.lstrip("\ufeff") for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            yield Quarantine(source, rel, "header", UNKNOWN_FORMAT, f"missing columns {missing}; header {header[:20]}")
            return
        ncol = len(header)
        while True:
            line = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                if "field larger than field limit" in str(e):  # the row is dropped, the next line read
                    yield Quarantine(source, rel, f"line {line}", TOO_LARGE,
                                     f"a field over data.max_record_chars ({opts.max_record_chars:,})")
                    continue
                yield Quarantine(source, rel, f"line {line}", BAD_CSV, str(e))
                break
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue
            if len(cells) != ncol:
                yield Quarantine(source, rel, f"line {line}", WRONG_COLUMNS,
                                 f"expected {ncol} columns, got {len(cells)}: " + "|".join(cells)[:150].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
                continue
            try:
                row = {h: c.encode("utf-8", "surrogateescape").decode("utf-8") if _has_surrogate(c) else c
                       for h, c in zip(header, cells)}
            except UnicodeDecodeError:
                yield Quarantine(source, rel, f"line {line}", NOT_UTF8, "|".join(cells)[:150].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
                continue
            yield Raw(source, rel, f"line {line}", row)
    finally:
        f.close()


def _has_surrogate(s: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def parse_xml(data: bytes, rel: str, source: str):
    """(root element, None) or (None, quarantine). Uses the stdlib parser (no external entities)."""
    import xml.etree.ElementTree as ET
    try:
        return ET.fromstring(data), None
    except ET.ParseError as e:
        kind = BAD_XML if data.lstrip()[:1] == b"<" else UNKNOWN_FORMAT  # binary garbage is not guessed at
        return None, Quarantine(source, rel, f"line {e.position[0]} col {e.position[1]}", kind, snippet_of(data))


def local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_xml_root(path: Path, rel: str, source: str, opts: Opts, roots: tuple[str, ...]):
    """(root element, None) of an XML file whose root is one of `roots` (namespace left out), or (None, the
    quarantine saying why not: unreadable, too big, not XML, another root element)."""
    data, q = read_bytes_or_quarantine(path, rel, source, opts)
    if q:
        return None, q
    root, q = parse_xml(data, rel, source)
    if q:
        return None, q
    if local(root.tag) not in roots:
        return None, Quarantine(source, rel, "root", UNKNOWN_FORMAT,
                                f"root element <{local(root.tag)}>, expected <{roots[0]}>")
    return root, None


# ---- SFT helpers -----------------------------------------------------------------------------
EMPTY_RESPONSE = "empty_response"
COPIES_PROMPT = "response_copies_prompt"
ROLES = ("system", "user", "assistant")


def conversation(ex: dict, system: str = "") -> list[dict[str, str]]:
    """An SFT example as a conversation (OpenAI roles, text content): a prompt/response pair is the
    one-turn case (the prompt a user turn), after ``system`` when the domain has a system message and
    the example none of its own."""
    if "messages" in ex:
        msgs = [{"role": m["role"], "content": (m["content"] or "").strip()} for m in ex["messages"]]
    else:
        msgs = [{"role": "user", "content": (ex.get("prompt") or "").strip()},
                {"role": "assistant", "content": (ex.get("response") or "").strip()}]
    if system and not (msgs and msgs[0]["role"] == "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


def prompt_text(messages: list[dict]) -> str:
    """Everything before the last answer, as text (duplicate keys, the split's order, a report's prompt)."""
    return "\n\n".join(m["content"] for m in messages[:-1] if m["content"])


def finalize_sft(examples: list[dict], row: dict, max_response_chars: int,
                 system: str = "") -> tuple[list[dict], dict[str, int]]:
    """Check and complete a record's SFT examples, each as one conversation (``messages``): it ends in
    an assistant turn, no answer is empty, no answer only copies the turns before it; answers cut to
    max_response_chars. Returns (examples, rejected counts by reason)."""
    out, rejected = [], {}
    group = meta(row).get("group") or row["doc_id"]
    for ex in examples:
        msgs = conversation(ex, system)
        for m in msgs:
            if m["role"] == "assistant":
                m["content"] = shorten_text(m["content"], max_response_chars)
        reason = None
        answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        if (not answers or msgs[-1]["role"] != "assistant" or any(not msgs[k]["content"] for k in answers)
                or not any(m["role"] == "user" and m["content"] for m in msgs)):
            reason = EMPTY_RESPONSE
        else:
            for k in answers:
                # an answer that only repeats what the user (or system) said; an assistant saying again what it
                # said before is a legitimate turn, so earlier answers do not count
                said = " ".join(m["content"] for m in msgs[:k] if m["role"] != "assistant")
                nr = norm_key(msgs[k]["content"])
                if len(nr) > 12 and nr in norm_key(said):
                    reason = COPIES_PROMPT
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        out.append({"messages": msgs, "domain": row["domain"], "source": row["source"],
                    "doc_id": row["doc_id"], "task": ex["task"], "group": f"{row['source']}:{group}"})
    return out, rejected
