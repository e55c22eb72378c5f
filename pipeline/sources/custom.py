"""Your own data: the SourceSpec of one ``data.custom_sources`` entry (``config.CustomSourceConfig``).

The entry names the file(s) (a local file or folder read in place; ``s3://`` or a Hugging Face dataset
fetched by ``adapters download`` into ``<raw_dir>/custom/<name>/``), which files to read (``files``:
jsonl, json, csv, parquet; a dataset laid out as on the Hugging Face Hub: ``subset``, ``split``,
``data_files``) and the record format (``config.RECORD_FORMATS``; column names overridable):

- ``openai``: ``messages: [{role: system|user|assistant, content}]`` (a JSON string in CSV).
- ``sharegpt``: ``conversations: [{from: system|human|gpt (and aliases), value}]``.
- ``alpaca``: ``instruction`` + ``input`` (joined as the user turn) -> ``output``; optional ``system``
  and ``history`` (earlier ``[instruction, output]`` pairs, as turns before it).
- ``prompt_completion``: ``prompt`` -> ``completion`` (or ``response``).
- ``text``: corpus only; it yields no SFT example (the manifest says so: ``sft_examples: 0`` and a
  note). Training needs SFT rows: pair a text source with a chat or instruction source.

Every SFT format becomes one conversation per record (one SFT row, trained on all of its assistant
turns). Left out, the format is detected from the first record (``detect_format``; prepare says
which it assumed). Text keeps its line breaks (only stripped at the ends); doc ids hash the text, so
they survive a reordering of the file. Everything else (quarantine, caps, dedupe, split) is
prepare's, as for a built-in source.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .base import (DownloadPart, Opts, Raw, Reject, SourceSpec, corpus_row, iter_csv, iter_json_records, iter_jsonl,
                   iter_parquet, meta, stable_id, text_hash, EMPTY_ANSWER, EMPTY_TEXT, MAX_DEPTH, MISSING_FIELD, ROLES,
                   TOO_DEEP)

if TYPE_CHECKING:
    from pipeline.config import CustomSourceConfig

FILE_TYPES = ("jsonl", "json", "csv", "parquet")
TEXT_ONLY_NOTE = "text-only source: corpus rows, no SFT examples"
BAD_TURNS = "bad_turn_order"
# ShareGPT speakers (the names seen in the common dumps) -> OpenAI roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}


def patterns(c: "CustomSourceConfig") -> tuple[str, ...]:
    """The files a source reads (and download keeps): data_files as given, else every file of its type(s)
    under the subset folder; with a split, only that split's files (a folder or a file name starting
    with it, as the Hub lays them out: data/train-00000-of-00001.parquet, <subset>/test/0.jsonl)."""
    exts = (c.files,) if c.files else FILE_TYPES
    if c.data_files:
        return tuple(c.data_files)
    pre = f"{c.subset}/" if c.subset else ""
    if not c.split:
        return tuple(f"{pre}**/*.{e}" for e in exts)
    s = c.split
    return tuple(p for e in exts for p in (f"{pre}**/{s}/**/*.{e}", f"{pre}**/{s}.{e}", f"{pre}**/{s}-*.{e}",
                                           f"{pre}**/{s}_*.{e}"))


def custom_spec(c: "CustomSourceConfig") -> SourceSpec:
    raw_dir = f"custom/{c.name}"
    parts: tuple[DownloadPart, ...] = ()
    what = c.files or "jsonl, json, csv or parquet"
    if c.where == "s3":
        parts = (DownloadPart(raw_dir, "s3", c.path),)
        how = f"adapters download (copies {c.path}), or put the files under <raw_dir>/{raw_dir}/"
    elif c.where == "hf":
        parts = (DownloadPart(raw_dir, "hf", c.hf_id, revision=c.revision),)
        how = f"adapters download (Hugging Face {c.hf_id}), or put the files under <raw_dir>/{raw_dir}/"
    else:
        how = f"fix data.custom_sources[{c.name}].path: {c.path} must be a {what} file or a folder of them"
    url = f"https://huggingface.co/datasets/{c.hf_id}" if c.where == "hf" else (c.path if c.where == "s3" else "")
    return SourceSpec(
        c.name, c.domain, raw_dir, patterns(c), functools.partial(read, c), functools.partial(normalize, c),
        build_sft, license=c.license, url=url, how_to_get=how, parts=parts,
        local_path=c.path if c.where == "local" else None, note=TEXT_ONLY_NOTE if c.format == "text" else "",
        declaration=c.model_dump_json())


# ---- read ------------------------------------------------------------------------------------

def read(c: "CustomSourceConfig", path: Path, rel: str, opts: Opts):
    kind = c.files or Path(path).suffix.lstrip(".").lower()
    if kind == "jsonl":
        yield from iter_jsonl(path, rel, c.name, opts)
    elif kind == "json":
        yield from iter_json_records(path, rel, c.name, opts)
    elif kind == "csv":
        yield from iter_csv(path, rel, c.name, c.columns, opts)
    else:
        yield from iter_parquet(path, rel, c.name)


def detect_format(record: dict) -> Optional[str]:
    """The record format a record's columns say (None: none of them)."""
    if "messages" in record:
        return "openai"
    if "conversations" in record or "conversation" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def first_record(spec: SourceSpec, raw_root: Path, opts: Opts) -> Optional[Raw]:
    for p, rel in spec.listing(raw_root).read:
        for item in spec.read(p, rel, opts):
            if isinstance(item, Raw):
                return item
    return None


# ---- normalize -------------------------------------------------------------------------------

def _columns_of(d: dict) -> str:
    return ", ".join(sorted(map(str, d)))[:200]


def _cell(d: dict, column: str, required: bool = True) -> str:
    """The text in a column: missing -> Reject(missing_field) (or '' when not required); None / NaN -> '';
    numbers as text."""
    if column not in d:
        if not required:
            return ""
        raise Reject(MISSING_FIELD, f"no column {column!r}; columns: {_columns_of(d)}")
    v = d[column]
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, (dict, list, tuple)):
        raise Reject(MISSING_FIELD, f"column {column!r} holds a {type(v).__name__}, not text")
    return str(v).strip()


def _list(d: dict, column: str, required: bool = True) -> list:
    """A list-valued column (a JSON string in CSV); '' / None -> []."""
    if column not in d:
        if not required:
            return []
        raise Reject(MISSING_FIELD, f"no column {column!r}; columns: {_columns_of(d)}")
    v = d[column]
    if v is None or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, str):  # CSV: the list as JSON text
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise Reject(MISSING_FIELD, f"column {column!r} is not a JSON list: {v[:150]}")
        except RecursionError:
            raise Reject(TOO_DEEP, f"column {column!r} is nested more than {MAX_DEPTH} levels: {v[:100]}")
    if not isinstance(v, (list, tuple)) and hasattr(v, "tolist"):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise Reject(MISSING_FIELD, f"column {column!r} holds a {type(v).__name__}, not a list")
    return list(v)


def _openai(d: dict, column: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(_list(d, column)):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise Reject(MISSING_FIELD, f"{column}[{i}] is not {{role: system|user|assistant, content: text}}: {str(m)[:150]}")
        out.append({"role": role, "content": content.strip()})
    return out


def _sharegpt(d: dict, column: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(_list(d, column)):
        speaker = (m.get("from", m.get("role")) if isinstance(m, dict) else None)
        value = (m.get("value", m.get("content")) if isinstance(m, dict) else None)
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None or not isinstance(value, str):
            raise Reject(MISSING_FIELD, f"{column}[{i}] is not {{from: {'|'.join(SHAREGPT_ROLES)}, value: text}}: "
                                        f"{str(m)[:150]}")
        out.append({"role": role, "content": value.strip()})
    return out


def _alpaca(c: "CustomSourceConfig", d: dict) -> list[dict[str, str]]:
    instruction, output = _cell(d, c.column("instruction", d)), _cell(d, c.column("output", d))
    inp = _cell(d, c.column("input", d), required=bool(c.input))
    system = _cell(d, c.column("system", d), required=bool(c.system))
    msgs = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(_list(d, c.column("history", d), required=bool(c.history))):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise Reject(MISSING_FIELD, f"history[{i}] is not an [instruction, output] pair: {str(pair)[:150]}")
        msgs += [{"role": "user", "content": pair[0].strip()}, {"role": "assistant", "content": pair[1].strip()}]
    # the input is the instruction's material (the text to translate, the passage to summarize)
    user = f"{instruction}\n\n{inp}" if instruction and inp else (instruction or inp)
    if not user:
        raise Reject(EMPTY_TEXT, output[:200])
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _check_turns(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """A conversation a chat template takes: an optional system turn first, then user and assistant
    turns alternating from a user turn; turns after the last answer dropped (nothing trains on them)."""
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise Reject(BAD_TURNS, "expected an optional system turn, then user and assistant turns alternating: "
                                    + " ".join(x["role"] for x in msgs)[:200])
    while msgs and msgs[-1]["role"] != "assistant":
        msgs = msgs[:-1]
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
        raise Reject(EMPTY_ANSWER, str(msgs)[:200])
    return msgs


def normalize(c: "CustomSourceConfig", raw: Raw, opts: Opts) -> dict:
    d = raw.data
    fmt = c.format or detect_format(d)
    if fmt is None:
        raise Reject(MISSING_FIELD, f"no known record format in columns {_columns_of(d)}: set format and the columns")
    if fmt == "text":
        text = _cell(d, c.column("text", d))
        if not text:
            raise Reject(EMPTY_TEXT, raw.location)
        md: dict[str, Any] = {"kind": "text"}
        title, group = text.splitlines()[0], "text:" + text_hash(text)
    else:
        if fmt == "openai":
            msgs, task = _openai(d, c.column("messages", d)), "chat"
        elif fmt == "sharegpt":
            msgs, task = _sharegpt(d, c.column("conversations", d)), "chat"
        elif fmt == "alpaca":
            msgs, task = _alpaca(c, d), "instruction"
        else:
            prompt, response = _cell(d, c.column("prompt", d)), _cell(d, c.column("response", d))
            if not prompt:
                raise Reject(EMPTY_TEXT, response[:200])
            msgs, task = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], "instruction"
        if not msgs:
            raise Reject(EMPTY_TEXT, "no turns")
        msgs = _check_turns(msgs)
        text = "\n\n".join(m["content"] for m in msgs if m["content"])
        first_user = next((m["content"] for m in msgs if m["role"] == "user"), text)
        # one conversation is one SFT row: the split keeps it whole; records that open with the same
        # user turn stay together
        md, title, group = {"kind": "chat", "task": task, "messages": msgs}, first_user, "chat:" + text_hash(first_user)
    return corpus_row(c.name, c.domain, stable_id(c.name, text_hash(text)), title.splitlines()[0][:200] if title else "",
                      text, md, c.license, "", group=group, opts=opts)


# ---- SFT -------------------------------------------------------------------------------------

def build_sft(row: dict) -> list[dict]:
    """One conversation per record: every assistant turn of it trains (pipeline.lm.model)."""
    m = meta(row)
    if m.get("kind") == "chat":
        return [{"task": m["task"], "messages": m["messages"]}]
    return []
