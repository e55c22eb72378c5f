"""What every source module declares, and the small helpers they share.

A source is: a name and a domain, the raw subdirectory and file patterns a download leaves, and
three functions, each with one signature:

    read(path: Path, rel: str, opts: Opts)  -> Iterator[Raw | Quarantine]   one raw record at a time
    normalize(raw: Raw, opts: Opts)         -> dict (a corpus row)           or raise Reject(reason)
    build_sft(row: dict)                    -> list[dict(task, prompt, response)]

``rel`` is the file's path relative to the raw directory (posix), used in doc ids, quarantine
entries and the manifest so they do not depend on where the raw directory lives.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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


@dataclass
class Opts:
    """The parts of cfg.data a reader or normalizer needs (small, picklable)."""
    min_text_chars: int = 20
    max_response_chars: int = 4000
    txt_chunk_chars: int = 2000


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


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    subdir: str
    patterns: tuple[str, ...]
    read: Callable[[Path, str, Opts], Iterator[Any]]
    normalize: Callable[[Raw, Opts], dict]
    build_sft: Callable[[dict], list[dict]]
    license: str = ""
    url: str = ""
    how_to_get: str = ""
    # optional: files under subdir that match no pattern but should be reported (not guessed)
    report_unmatched: tuple[str, ...] = field(default_factory=tuple)

    def files(self, raw_dir: Path) -> list[Path]:
        """Matching files, sorted by their path relative to the raw dir (the canonical order)."""
        base = Path(raw_dir) / self.subdir
        if not base.is_dir():
            return []
        found = {p for pat in self.patterns for p in base.glob(pat)
                 if p.is_file() and not p.name.startswith(".") and p.name not in NOT_DATA}
        return sorted(found, key=lambda p: p.relative_to(raw_dir).as_posix())

    def unmatched_files(self, raw_dir: Path) -> list[Path]:
        base = Path(raw_dir) / self.subdir
        out = set()
        for pat in self.report_unmatched:
            out |= {p for p in base.glob(pat) if p.is_file() and not p.name.startswith(".") and p.name not in NOT_DATA}
        out -= set(self.files(raw_dir))
        return sorted(out, key=lambda p: p.relative_to(raw_dir).as_posix())


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


def truncate(text: str, limit: int) -> str:
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
def read_bytes_or_quarantine(path: Path, rel: str, source: str) -> tuple[Optional[bytes], Optional[Quarantine]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        return None, Quarantine(source, rel, "file", UNREADABLE, str(e))
    if not data.strip():
        return None, Quarantine(source, rel, "file", EMPTY_FILE, "")
    return data, None


def decode_or_quarantine(data: bytes, rel: str, source: str, location: str = "file") -> tuple[Optional[str], Optional[Quarantine]]:
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as e:
        return None, Quarantine(source, rel, f"{location} (byte {e.start})", NOT_UTF8, snippet_of(data[max(0, e.start - 40): e.start + 40]))


def iter_lines(path: Path, rel: str, source: str) -> Iterator[tuple[int, Optional[str], Optional[Quarantine]]]:
    """(line number, decoded line, quarantine) for each non-blank line; streams, never loads the file."""
    any_line = False
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            any_line = True
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n"), None
            except UnicodeDecodeError as e:
                yield n, None, Quarantine(source, rel, f"line {n} (byte {e.start})", NOT_UTF8, snippet_of(raw))
    if not any_line:
        yield 0, None, Quarantine(source, rel, "file", EMPTY_FILE, "")


def iter_jsonl(path: Path, rel: str, source: str) -> Iterator[Any]:
    for n, line, q in iter_lines(path, rel, source):
        if q is not None:
            yield q
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Quarantine(source, rel, f"line {n}", BAD_JSON, f"{e.msg}: {line[:200]}")
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


def iter_json_file(path: Path, rel: str, source: str) -> tuple[Any, Optional[Quarantine]]:
    """A whole JSON document (files of this kind are a few MB to a few hundred MB)."""
    data, q = read_bytes_or_quarantine(path, rel, source)
    if q:
        return None, q
    text, q = decode_or_quarantine(data, rel, source)
    if q:
        return None, q
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, Quarantine(source, rel, f"line {e.lineno} col {e.colno}", BAD_JSON, f"{e.msg}: {text[max(0, e.pos - 60): e.pos + 60]}")


def iter_csv(path: Path, rel: str, source: str, required: tuple[str, ...]) -> Iterator[Any]:
    """Rows of a CSV file with a header, streamed; wrong column counts and bad bytes quarantined."""
    csv.field_size_limit(1 << 30)
    with open(path, "rb") as fb:
        head = fb.read(1)
        if not head:
            yield Quarantine(source, rel, "file", EMPTY_FILE, "")
            return
    f = open(path, "r", encoding="utf-8", errors="surrogateescape", newline="")
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
            except UnicodeDecodeError as e:
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


# ---- SFT helpers -----------------------------------------------------------------------------
EMPTY_RESPONSE = "empty_response"
COPIES_PROMPT = "response_copies_prompt"


def finalize_sft(examples: list[dict], row: dict, max_response_chars: int) -> tuple[list[dict], dict[str, int]]:
    """Check and complete a record's SFT examples: no empty response, no response that only copies
    the prompt; responses cut to max_response_chars. Returns (examples, rejected counts by reason)."""
    out, rejected = [], {}
    group = meta(row).get("group") or row["doc_id"]
    for ex in examples:
        prompt = (ex.get("prompt") or "").strip()
        resp = truncate((ex.get("response") or "").strip(), max_response_chars)
        reason = None
        if not resp or not prompt:
            reason = EMPTY_RESPONSE
        else:
            nr = norm_key(resp)
            if len(nr) >= 1 and nr in norm_key(prompt) and len(nr) > 12:
                reason = COPIES_PROMPT
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        out.append({"prompt": prompt, "response": resp, "domain": row["domain"], "source": row["source"],
                    "doc_id": row["doc_id"], "task": ex["task"], "group": f"{row['source']}:{group}"})
    return out, rejected
