"""Your own data: the SourceSpec of one ``data.custom_sources`` entry (``config.CustomSourceConfig``).

The entry names the file(s) (a local file or folder read in place; ``s3://`` or a Hugging Face dataset
fetched by ``adapters download`` into ``<raw_dir>/custom/<name>/``), their format (jsonl, json, csv,
parquet) and which column holds what. One record = one row, in one of three shapes:

- ``prompt`` + ``response`` columns: one SFT example (task ``instruction``); corpus text = both.
- ``messages``: a chat, a list of {"role": system|user|assistant, "content": text} (a JSON string in
  CSV): one SFT example per assistant turn, the turns before it as the prompt (task ``chat``).
- ``text``: corpus only; it yields no SFT example (the manifest says so: ``sft_examples: 0`` and a
  note). Training needs SFT rows: pair a text source with a prompt/response or chat source.

Text keeps its line breaks (only stripped at the ends); doc ids hash the text, so they survive a
reordering of the file. Everything else (quarantine, caps, dedupe, split) is prepare's, as for a
built-in source.
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from .base import (DownloadPart, Opts, Raw, Reject, SourceSpec, corpus_row, iter_csv, iter_json_records, iter_jsonl,
                   iter_parquet, meta, stable_id, text_hash, EMPTY_ANSWER, EMPTY_TEXT, MAX_DEPTH, MISSING_FIELD, TOO_DEEP)

if TYPE_CHECKING:
    from pipeline.config import CustomSourceConfig

PATTERNS = {"jsonl": ("**/*.jsonl",), "json": ("**/*.json",), "csv": ("**/*.csv",), "parquet": ("**/*.parquet",)}
ROLES = ("system", "user", "assistant")
TEXT_ONLY_NOTE = "text-only source: corpus rows, no SFT examples"


def custom_spec(c: "CustomSourceConfig") -> SourceSpec:
    raw_dir = f"custom/{c.name}"
    parts: tuple[DownloadPart, ...] = ()
    if c.where == "s3":
        parts = (DownloadPart(raw_dir, "s3", c.path),)
        how = f"adapters download (copies {c.path}), or put the files under <raw_dir>/{raw_dir}/"
    elif c.where == "hf":
        parts = (DownloadPart(raw_dir, "hf", c.hf_id, revision=c.revision),)
        how = f"adapters download (Hugging Face {c.hf_id}), or put the files under <raw_dir>/{raw_dir}/"
    else:
        how = f"fix data.custom_sources[{c.name}].path: {c.path} must be a {c.format} file or a folder of them"
    url = f"https://huggingface.co/datasets/{c.hf_id}" if c.where == "hf" else (c.path if c.where == "s3" else "")
    return SourceSpec(
        c.name, c.domain, raw_dir, PATTERNS[c.format], functools.partial(read, c), functools.partial(normalize, c),
        build_sft, license=c.license, url=url, how_to_get=how, parts=parts,
        local_path=c.path if c.where == "local" else None, note=TEXT_ONLY_NOTE if c.text else "",
        declaration=c.model_dump_json())


# ---- read ------------------------------------------------------------------------------------

def read(c: "CustomSourceConfig", path, rel: str, opts: Opts):
    if c.format == "jsonl":
        yield from iter_jsonl(path, rel, c.name, opts)
    elif c.format == "json":
        yield from iter_json_records(path, rel, c.name, opts)
    elif c.format == "csv":
        yield from iter_csv(path, rel, c.name, c.columns, opts)
    else:
        yield from iter_parquet(path, rel, c.name)


# ---- normalize -------------------------------------------------------------------------------

def _cell(d: dict, column: str) -> str:
    """The text in a column: missing -> Reject(missing_field); None / NaN -> ''; numbers as text."""
    if column not in d:
        raise Reject(MISSING_FIELD, f"no column {column!r}; columns: {', '.join(sorted(map(str, d)))[:200]}")
    v = d[column]
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, (dict, list, tuple)):
        raise Reject(MISSING_FIELD, f"column {column!r} holds a {type(v).__name__}, not text")
    return str(v).strip()


def _messages(d: dict, column: str) -> list[dict[str, str]]:
    if column not in d:
        raise Reject(MISSING_FIELD, f"no column {column!r}; columns: {', '.join(sorted(map(str, d)))[:200]}")
    v = d[column]
    if isinstance(v, str):  # CSV: the list as JSON text
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise Reject(MISSING_FIELD, f"column {column!r} is not a JSON list of messages: {v[:150]}")
        except RecursionError:
            raise Reject(TOO_DEEP, f"column {column!r} is nested more than {MAX_DEPTH} levels: {v[:100]}")
    if not isinstance(v, (list, tuple)) or not v:
        raise Reject(EMPTY_TEXT, f"column {column!r} holds no messages")
    out = []
    for i, m in enumerate(v):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise Reject(MISSING_FIELD, f"{column}[{i}] is not {{role: system|user|assistant, content: text}}: {str(m)[:150]}")
        out.append({"role": role, "content": content.strip()})
    return out


def normalize(c: "CustomSourceConfig", raw: Raw, opts: Opts) -> dict:
    d = raw.data
    if c.text:
        text = _cell(d, c.text)
        if not text:
            raise Reject(EMPTY_TEXT, raw.location)
        md: dict[str, Any] = {"kind": "text"}
        title, group = text.splitlines()[0], "text:" + text_hash(text)
    elif c.messages:
        msgs = _messages(d, c.messages)
        if not any(m["role"] == "assistant" and m["content"] for m in msgs):
            raise Reject(EMPTY_ANSWER, str(msgs)[:200])
        text = "\n\n".join(m["content"] for m in msgs if m["content"])
        first_user = next((m["content"] for m in msgs if m["role"] == "user"), text)
        md, title, group = {"kind": "chat", "messages": msgs}, first_user, "chat:" + text_hash(first_user)
    else:
        prompt, response = _cell(d, c.prompt), _cell(d, c.response)
        if not prompt:
            raise Reject(EMPTY_TEXT, response[:200])
        if not response:
            raise Reject(EMPTY_ANSWER, prompt[:200])
        text = f"{prompt}\n\n{response}"
        md, title, group = {"kind": "pair", "prompt": prompt, "response": response}, prompt, "prompt:" + text_hash(prompt)
    return corpus_row(c.name, c.domain, stable_id(c.name, text_hash(text)), title.splitlines()[0][:200] if title else "",
                      text, md, c.license, "", group=group, opts=opts)


# ---- SFT -------------------------------------------------------------------------------------

def _render(turns: list[dict[str, str]]) -> str:
    """The turns before an answer as one prompt: a lone user turn (after an optional system turn) as it
    is, a longer conversation as 'User: ...' / 'Assistant: ...' paragraphs."""
    roles = [t["role"] for t in turns]
    if roles in (["user"], ["system", "user"]):
        return "\n\n".join(t["content"] for t in turns if t["content"])
    return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns if t["content"])


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    if m.get("kind") == "pair":
        return [{"task": "instruction", "prompt": m["prompt"], "response": m["response"]}]
    if m.get("kind") == "chat":
        msgs = m["messages"]
        return [{"task": "chat", "prompt": _render(msgs[:i]), "response": t["content"]}
                for i, t in enumerate(msgs) if t["role"] == "assistant" and t["content"] and i > 0]
    return []
