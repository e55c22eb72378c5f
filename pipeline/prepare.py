"""Prepare: raw files -> corpus and SFT Parquet shards + an accounted manifest (Ray Data).

One record's path, top to bottom:

  1. ``file_events`` (a Ray Data ``flat_map`` over the source's files, in canonical file order):
     the source's reader yields raw records or quarantine entries; each record goes through the
     file steps (``file_steps``: nesting depth -> record size -> normalize, which builds the corpus row
     and its checked SFT examples), any of which may quarantine it with a reason.
  2. The driver consumes the stream in order (``preserve_order``), so every decision below is
     independent of block layout: quarantine -> the driver steps: exact-duplicate check within the
     domain (``Dedupe``: normalized text hash) -> cap per source (``Cap``: the first
     ``max_docs_per_source`` kept records in canonical order; reading stops at the end of the file
     where the cap was reached) -> corpus shard / staged SFT shard. A ``Tally`` counts what each
     step dropped, by outcome and reason; the manifest's counts are its sums.
  3. Per domain: the SFT cap (exact, balanced across the domain's sources, rows picked by a seeded
     hash), a group key per row (document / topic), groups that share an exact prompt or response
     text merged, split by a seeded stable hash of the merged group -> SFT shards.
  4. ``data/manifest.json``, then ``data/_SUCCESS`` last.

Finished work is skipped on re-run: each source and each domain writes a marker under
``data/_work/`` (after its shards) holding a fingerprint of its inputs and settings; a source or
domain without a matching marker is redone from scratch (its old files deleted first). Store writes
are atomic, so a killed run never leaves a partial file that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline import layout, neardup
from pipeline.download import sha256_file
from pipeline.errors import UserFacingError
from pipeline.sources import Opts, Quarantine, Raw, Reject, SourceSpec, finalize_sft, norm_key, selected_sources, text_hash
from pipeline.sources.base import (MAX_DEPTH, OUTSIDE_RAW_DIR, RECORD_ERROR, TOO_DEEP, TOO_LARGE, UNKNOWN_FORMAT, SourceFiles,
                                   nesting_depth, prompt_text, record_chars)
from pipeline.raycluster import ensure_ray
from pipeline.sources.custom import custom_spec, detect_format, first_record
from pipeline.storage import Store, open_store

log = logging.getLogger(__name__)

CODE_VERSION = "prepare-v3"  # v3: SFT rows are conversations (messages)
SPLITS = ("train", "val", "test")
CORPUS_SCHEMA = pa.schema([(k, pa.string()) for k in ("doc_id", "domain", "source", "title", "text", "metadata", "license", "url")])
# an SFT row is one conversation: messages = [{role: system|user|assistant, content}], ending in an answer
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SFT_SCHEMA = pa.schema([("messages", MESSAGES_TYPE)] + [(k, pa.string()) for k in ("domain", "source", "doc_id", "task", "group", "split")])
QUARANTINE_SCHEMA = pa.schema([(k, pa.string()) for k in ("source", "file", "location", "reason", "snippet")])
STAGED_SFT_SCHEMA = pa.schema([("messages", MESSAGES_TYPE)] + [(k, pa.string()) for k in ("domain", "source", "doc_id", "task", "group")])
# after the cap is reached, reading goes on to the end of the current file, but never more than this
MAX_READ_PAST_CAP = 10_000
# how far (bytes of blocks in the object store) the Ray readers may run ahead of the driver
READ_AHEAD_BYTES = 512 * 1024 * 1024
# a source that takes longer than this logs how far it is, every this many seconds
PROGRESS_EVERY_S = 15.0
# SFT splits up to this many rows are written in a seeded shuffled order (held in memory); larger ones stream
SHUFFLE_LIMIT = 200_000
# a domain's staged messages columns up to this size are kept from the first pass for the near-duplicate
# step (read once instead of twice); above it, that step reads them again shard by shard
KEEP_MESSAGES_BYTES = 256 << 20


# ---- the per-record rules, as steps (datatrove's pattern) ------------------------------------------
# Each rule is a small step with a name: it passes a record on (returned, or what it makes of it) or raises
# Drop with the outcome and reason. The first three run where the file is read (Ray workers), the last two
# in the driver, in canonical order. The driver's Tally counts, per step, what each dropped (by outcome and
# reason) and the records kept; the manifest's counts are sums over it.

class Drop(Exception):
    """A step's verdict on a record it does not pass on: its outcome (quarantined: written to quarantine with
    the reason; deduplicated; capped) and why."""

    def __init__(self, reason: str, snippet: str = "", outcome: str = "quarantined"):
        super().__init__(reason)
        self.reason, self.snippet, self.outcome = reason, snippet, outcome


class RecordStep:
    name = ""

    def __call__(self, x: Any) -> Any:
        raise NotImplementedError


READ = "read"   # the step name of the reader's own quarantine entries (bad JSON, a wrong column count, ...)


class NestingDepth(RecordStep):
    """First: what follows walks the record (Python's json, str() and json.dumps recurse)."""
    name = "nesting_depth"

    def __call__(self, item: Raw) -> Raw:
        if nesting_depth(item.data) > MAX_DEPTH:
            raise Drop(TOO_DEEP, f"nested more than {MAX_DEPTH} levels")
        return item


class RecordSize(RecordStep):
    """Before anything is built from a record (corpus text, prompts, tokens)."""
    name = "record_size"

    def __init__(self, max_chars: int):
        self.max_chars = max_chars

    def __call__(self, item: Raw) -> Raw:
        if record_chars(item.data, self.max_chars) > self.max_chars:
            raise Drop(TOO_LARGE, f"more than {self.max_chars:,} characters of text (data.max_record_chars)")
        return item


class Normalize(RecordStep):
    """The source's normalizer and SFT builder: a Reject is quarantined with its reason; anything else a
    normalizer raises (a record of a shape it did not foresee) costs that record only (RECORD_ERROR), the
    first one per file logged."""
    name = "normalize"

    def __init__(self, src: SourceSpec, opts: Opts, rel: str):
        self.src, self.opts, self.rel = src, opts, rel
        self.errors = 0

    def __call__(self, item: Raw) -> dict:
        src, opts = self.src, self.opts
        try:
            row = src.normalize(item, opts)
            sft, rejected = finalize_sft(src.build_sft(row), row, opts.max_response_chars,
                                         opts.system_messages.get(row["domain"], ""))
        except Reject as e:
            raise Drop(e.reason, e.snippet)
        except Exception as e:  # noqa: BLE001
            if not self.errors:
                log.warning("%s: %s %s: %s: %s (quarantined as %s; further ones in this file are not logged)",
                            src.name, self.rel, item.location, type(e).__name__, e, RECORD_ERROR)
            self.errors += 1
            raise Drop(RECORD_ERROR, f"{type(e).__name__}: {e}"[:300])
        # outside the try: a row without text is a normalizer bug that fails the file (reader_error), as before
        return {"row": row, "sft": sft, "sft_rejected": rejected, "hash": text_hash(row["text"])}


class Dedupe(RecordStep):
    """A text (normalized hash) already kept in the domain (this source or one before it) is not kept again."""
    name = "dedupe"

    def __init__(self, seen: set[str]):
        self.seen = seen   # the keep step adds to it: a capped record's text is not "seen"

    def __call__(self, rec: dict) -> dict:
        if rec["hash"] in self.seen:
            raise Drop("duplicate_text", outcome="deduplicated")
        return rec


class Cap(RecordStep):
    """The first max_docs_per_source records that reach it are kept (canonical order); the rest are capped."""
    name = "cap"

    def __init__(self, cap: Optional[int]):
        self.cap, self.passed = cap, 0

    @property
    def reached(self) -> bool:
        return self.cap is not None and self.passed >= self.cap

    def __call__(self, rec: dict) -> dict:
        if self.reached:
            raise Drop("max_docs_per_source", outcome="capped")
        self.passed += 1
        return rec


def file_steps(src: SourceSpec, opts: Opts, rel: str) -> list[RecordStep]:
    """The steps a raw record of one file goes through where it is read: Raw -> a record for the driver."""
    return [NestingDepth(), RecordSize(opts.max_record_chars), Normalize(src, opts, rel)]


class Tally:
    """Per step, what it dropped by (outcome, reason); and the records kept."""

    def __init__(self) -> None:
        self.dropped: dict[str, Counter] = defaultdict(Counter)
        self.kept = 0

    def drop(self, step: str, outcome: str, reason: str) -> None:
        self.dropped[step][(outcome, reason)] += 1

    def reasons(self, outcome: str) -> Counter:
        out: Counter = Counter()
        for c in self.dropped.values():
            for (o, reason), n in c.items():
                if o == outcome:
                    out[reason] += n
        return out

    def count(self, outcome: str) -> int:
        return sum(self.reasons(outcome).values())

    @property
    def read(self) -> int:
        return self.kept + sum(sum(c.values()) for c in self.dropped.values())

    def by_step(self) -> dict[str, dict[str, int]]:
        return {step: {f"{o}:{r}": n for (o, r), n in sorted(c.items())} for step, c in self.dropped.items()}


# ---- step 1: one file -> records (runs in Ray workers, or in-process for the baseline) --------
def file_events(src: SourceSpec, path: str, rel: str, opts: Opts) -> Iterator[tuple[str, dict]]:
    """('r', record) / ('q', quarantine row, with the name of the step that dropped it under "step") for each
    record of one file, then ('f', file facts)."""
    p = Path(path)
    steps = file_steps(src, opts, rel)
    try:
        for item in src.read(p, rel, opts):
            if isinstance(item, Quarantine):
                yield "q", {**item.as_row(), "step": READ}
                continue
            x: Any = item
            try:
                for step in steps:
                    x = step(x)
            except Drop as d:
                yield "q", {**Quarantine(src.name, item.file, item.location, d.reason, d.snippet).as_row(), "step": step.name}
                continue
            yield "r", x
    except Exception as e:  # a reader bug or an unexpected format: the file is quarantined, the run goes on
        log.exception("reading %s failed", rel)
        yield "q", {**Quarantine(src.name, rel, "file", "reader_error", f"{type(e).__name__}: {e}"[:300]).as_row(), "step": READ}
    yield "f", {"rel": rel, "size": p.stat().st_size, "sha256": sha256_file(p)}


def _ray_file_events(item: dict, src: SourceSpec, opts: Opts) -> Iterator[dict]:
    """Ray Data flat_map UDF: one uniform row type (kind, payload JSON) for every event."""
    for kind, payload in file_events(src, item["path"], item["rel"], opts):
        yield {"kind": kind, "payload": json.dumps(payload, ensure_ascii=False)}


def _stream_events(src: SourceSpec, items: list[dict], opts: Opts, use_ray: bool) -> Iterator[tuple[str, dict]]:
    """Events of all files, in file order. Closing the generator stops reading."""
    if not items:
        return
    if not use_ray:
        for it in items:
            yield from file_events(src, it["path"], it["rel"], opts)
        return
    import ray.data
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), 16)).flat_map(
        _ray_file_events, fn_kwargs={"src": src, "opts": opts})
    for row in ds.iter_rows():
        yield row["kind"], json.loads(row["payload"])


# ---- small helpers ---------------------------------------------------------------------------
def digest(*parts: Any) -> str:
    """The sha256 of JSON-encoded parts (fingerprints of inputs and settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _unit(seed: int, key: str) -> float:
    """A stable number in [0, 1) from (seed, key)."""
    return int(hashlib.sha256(f"{seed}\x1f{key}".encode()).hexdigest()[:15], 16) / float(1 << 60)


def split_of(seed: int, key: str, fractions: dict[str, float]) -> str:
    u = _unit(seed, key)
    acc = 0.0
    for name in SPLITS:
        acc += fractions[name]
        if u < acc:
            return name
    return SPLITS[-1] if fractions[SPLITS[-1]] > 0 else "train"


def balanced_quotas(counts: dict[str, int], cap: Optional[int]) -> dict[str, int]:
    """Split a cap across sources as evenly as their counts allow (water-filling); exact and deterministic."""
    if cap is None or sum(counts.values()) <= cap:
        return dict(counts)
    quota = {s: 0 for s in counts}
    remaining = cap
    active = sorted(s for s, c in counts.items() if c > 0)
    while remaining > 0 and active:
        share = max(1, remaining // len(active))
        for s in active:
            take = min(share, counts[s] - quota[s], remaining)
            quota[s] += take
            remaining -= take
        active = [s for s in active if quota[s] < counts[s]]
    return quota


LONG_RESPONSE = 200


def _dup_keys(r: dict) -> list[str]:
    """Texts that must not cross splits: the whole conversation, and each long answer on its own (the
    same card or answer under another prompt). Short templated answers ("None: ...") and shared prompt
    templates are not keys: they would merge whole tasks into one group."""
    msgs = r["messages"]
    keys = ["x:" + text_hash("\x1f".join(m["content"] for m in msgs if m["role"] != "system"))]
    keys += sorted({"r:" + text_hash(m["content"]) for m in msgs
                    if m["role"] == "assistant" and len(m["content"]) >= LONG_RESPONSE})
    return keys


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller key is the representative: independent of the order of unions
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


class _ShardWriter:
    """Buffers rows and writes numbered Parquet shards through the Store (each write atomic)."""

    def __init__(self, store: Store, prefix: str, schema: pa.Schema, rows_per_shard: int):
        self.store, self.prefix, self.schema, self.n = store, prefix, schema, rows_per_shard
        self.buf: list[dict] = []
        self.parts: list[str] = []
        self.rows = 0

    def add(self, row: dict) -> None:
        self.buf.append(row)
        if len(self.buf) >= self.n:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        rel = f"{self.prefix}{len(self.parts):05d}.parquet"
        self.store.write_table(rel, pa.Table.from_pylist(self.buf, schema=self.schema))
        self.parts.append(rel)
        self.rows += len(self.buf)
        self.buf = []


def _delete_prefix(store: Store, directory: str, name_prefix: str = "") -> None:
    for rel in store.list_files(directory):
        if rel.rsplit("/", 1)[-1].startswith(name_prefix):
            store.delete(rel)


# ---- step 2: one source ----------------------------------------------------------------------
def _prepare_source(src: SourceSpec, listing: SourceFiles, cfg, store: Store, opts: Opts,
                    seen: set[str], use_ray: bool) -> dict:
    name = src.name
    d = cfg.data
    cap = d.max_docs_per_source
    files = [p for p, _ in listing.read]
    rels = [rel for _, rel in listing.read]
    _delete_prefix(store, layout.corpus(src.domain), f"{name}-")
    store.delete(layout.quarantine(name))
    store.delete(layout.staged_sft(src.domain, name))
    corpus = _ShardWriter(store, f"{layout.corpus(src.domain)}/{name}-", CORPUS_SCHEMA, d.rows_per_shard)
    quarantine = _ShardWriter(store, f"{layout.quarantine(name)}/part-", QUARANTINE_SCHEMA, d.rows_per_shard)
    sft = _ShardWriter(store, f"{layout.staged_sft(src.domain, name)}/part-", STAGED_SFT_SCHEMA, d.rows_per_shard)
    tally = Tally()
    capper = Cap(cap)
    driver_steps: list[RecordStep] = [Dedupe(seen), capper]   # in this order: a duplicate is never counted as capped
    corpus_chars = 0
    sft_rejected: Counter = Counter()
    sft_tasks: Counter = Counter()
    file_facts: dict[str, dict] = {}
    stopped_early = False

    # files under the source's folder that no pattern matches are reported, not guessed at
    for p, rel in listing.unmatched:
        tally.drop("file_format", "quarantined", UNKNOWN_FORMAT)
        quarantine.add(Quarantine(name, rel, "file", UNKNOWN_FORMAT, f"no {name} reader for this file layout").as_row())
        file_facts[rel] = {"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p), "status": "quarantined (unknown format)"}
    # links that leave the raw directory are refused, never opened
    for p, rel in listing.refused:
        tally.drop("containment", "quarantined", OUTSIDE_RAW_DIR)
        quarantine.add(Quarantine(name, rel, "link", OUTSIDE_RAW_DIR, "a symbolic link that resolves outside the raw "
                                  "directory: not followed (copy the data into the raw directory instead)").as_row())
        file_facts[rel] = {"path": rel, "size": None, "sha256": None, "status": "refused (link outside the raw directory)"}

    items = [{"path": str(p), "rel": rel} for p, rel in zip(files, rels)]
    stream = _stream_events(src, items, opts, use_ray)
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    try:
        for kind, ev in stream:
            if time.monotonic() >= next_progress:  # a long source says how far it is (no bars: logs and jobs)
                log.info("prepare: %s: %d records read, %d kept, %d of %d files done", name, tally.read, tally.kept,
                         len(file_facts), len(files))
                next_progress = time.monotonic() + PROGRESS_EVERY_S
            if kind == "f":
                file_facts[ev["rel"]] = {"path": ev["rel"], "size": ev["size"], "sha256": ev["sha256"], "status": "read"}
                if capper.reached:
                    break  # the cap is reached: files after this one are not opened
                continue
            if kind == "q":
                tally.drop(ev["step"], "quarantined", ev["reason"])
                quarantine.add(ev)
                continue
            try:
                for step in driver_steps:
                    ev = step(ev)
            except Drop as d:
                tally.drop(step.name, d.outcome, d.reason)
                if d.outcome == "capped" and tally.count("capped") >= MAX_READ_PAST_CAP:
                    stopped_early = True
                    break
                continue
            # kept
            row = ev["row"]
            seen.add(ev["hash"])
            tally.kept += 1
            corpus_chars += len(row["text"])
            corpus.add(row)
            sft_rejected.update(ev["sft_rejected"])
            for ex in ev["sft"]:
                sft.add(ex)
                sft_tasks[ex["task"]] += 1
    finally:
        stream.close()
    corpus.flush()
    quarantine.flush()
    sft.flush()
    stopped_early = stopped_early or any(rel not in file_facts for rel in rels)
    for p, rel in zip(files, rels):
        if rel not in file_facts:
            file_facts[rel] = {"path": rel, "size": p.stat().st_size, "sha256": None,
                               "status": "not read to the end (cap reached)" if stopped_early else "not read"}
    read, kept, q_by_reason = tally.read, tally.kept, tally.reasons("quarantined")
    deduplicated, capped = tally.count("deduplicated"), tally.count("capped")
    quarantined = sum(q_by_reason.values())
    assert read == kept + quarantined + deduplicated + capped, (name, read, kept, quarantined, deduplicated, capped)
    log.debug("prepare: %s: dropped per step %s; kept %d", name, tally.by_step(), kept)
    return {
        "status": "ok", "domain": src.domain, "raw_subdir": src.raw_dir, "license": src.license, "url": src.url,
        "files": [file_facts[r] for r in sorted(file_facts)],
        "read": read, "kept": kept, "quarantined": quarantined, "quarantined_by_reason": dict(sorted(q_by_reason.items())),
        "deduplicated": deduplicated, "capped": capped, "cap": cap, "stopped_early": stopped_early,
        "corpus_chars": corpus_chars,
        "sft_examples": sum(sft_tasks.values()), "sft_by_task": dict(sorted(sft_tasks.items())),
        "sft_rejected": dict(sorted(sft_rejected.items())),
        "corpus_shards": corpus.parts, "quarantine_shards": quarantine.parts, "staged_sft_shards": sft.parts,
        **({"note": src.note} if src.note else {}),
        # a custom source: the record format read (given, or detected from its first record)
        **({"format": json.loads(src.declaration).get("format")} if src.declaration else {}),
    }


# ---- step 3: one domain ----------------------------------------------------------------------
def _near_duplicates(names: list[str], chosen: dict, src_manifests: dict, store: Store, uf: "_UnionFind", seed: int,
                     fractions: dict[str, float], unit_split: dict[str, str], keep: Optional[dict] = None,
                     domain: str = "", messages: Optional[dict] = None) -> dict:
    """Near-duplicate-aware split units (pipeline/neardup.py), in two steps over the chosen rows' 13-grams:
    (1) merge the groups of near-duplicate rows (one mostly contained in the other), so no such pair
    crosses splits; (2) a val or test row with >= neardup.THRESHOLD of its 13-grams in the train split
    (several train rows may cover it together: Climate-FEVER claims citing the same evidence
    sentences), template n-grams not counted, moves to train with its whole unit, repeated until none
    is left. Fills unit_split (unit root -> split) and returns the counts for the manifest; `keep` gets
    the rows' n-gram index, template groups and splits for the contamination table (so it need not
    tokenize them again). messages: (source, shard) -> that staged shard's messages column, if the first
    pass kept them (else each shard is read again)."""
    t0, c0 = time.time(), time.process_time()
    row_group, tasks, pairs = [], [], []
    for name in names:
        want = chosen[name]
        for si, rel in enumerate(src_manifests[name].get("staged_sft_shards", [])):
            col = (messages or {}).get((name, si))
            if col is None:
                col = store.read_table(rel, ["messages"]).column("messages")
            sel = [ri for ri in range(len(col)) if (si, ri) in want]
            col = col.take(pa.array(sel, pa.int64()))  # typed: may be empty
            row_group += [want[si, ri][1] for ri in sel]
            tasks += [f"{name}/{want[si, ri][0]}" for ri in sel]
            h, r = neardup.texts_pairs(neardup.column_texts(col))
            pairs.append((h, r + (len(row_group) - len(sel))))
    max_df = neardup.max_df_for(len(row_group))
    merged = 0
    # every step below reads this index's posting lists
    ix = neardup.Index.from_pairs(np.concatenate([h for h, _ in pairs] or [np.empty(0, np.uint64)]),
                                  np.concatenate([r for _, r in pairs] or [np.empty(0, np.int64)]), len(row_group))
    del pairs
    for i, j in neardup.near_duplicate_links(ix, max_df):
        if uf.find(row_group[i]) != uf.find(row_group[j]):
            uf.union(row_group[i], row_group[j])
            merged += 1
    root_of = {g: uf.find(g) for g in set(row_group)}
    roots = [root_of[g] for g in row_group]
    # step 2 judges a row by its n-grams without the domain's templates: a short row can be mostly prompt
    # template, which is in train by construction and says nothing about a leak
    tmpl = ix.template_groups(tasks)
    for r in roots:
        if r not in unit_split:
            unit_split[r] = split_of(seed, r, fractions)
    moved_units = moved_rows = 0
    kept: dict[str, int] = {}   # split -> rows left in it though covered: moving them would empty it
    while True:
        in_train = np.fromiter((unit_split[r] == "train" for r in roots), bool, len(roots))
        held_out = np.flatnonzero(~in_train).tolist()
        cover = ix.covered(in_train, drop=tmpl)
        move = {roots[k] for k in held_out if cover[k] >= neardup.THRESHOLD}
        for s in ("val", "test"):
            # a split is never emptied: a domain whose every held-out row is covered by train keeps them (no
            # val/test loss otherwise); they stay counted in the contamination table, and a line says so
            in_s = {roots[k] for k in held_out if unit_split[roots[k]] == s}
            if in_s and in_s <= move:
                move -= in_s
                kept[s] = sum(1 for r in roots if r in in_s)
        if not move:
            break
        moved_units += len(move)
        moved_rows += sum(1 for r in roots if r in move)
        for r in move:
            unit_split[r] = "train"
    if keep is not None:
        keep.update(index=ix, templates=tmpl, splits=np.array([unit_split[r] for r in roots], dtype=str))
    for s, n in kept.items():
        log.warning("near-duplicates: all %d %s rows of domain %s are covered by its train split; kept in %s (moving "
                    "them would leave it empty): its %s figures measure seen text (the contamination table counts them)",
                    n, s, domain, s, s)
    return {"max_df": max_df, "pair_share": neardup.PAIR_SHARE, "threshold": neardup.THRESHOLD,
            "merged_groups": merged, "moved_to_train": {"units": moved_units, "rows": moved_rows},
            "covered_but_kept": kept, "seconds": round(time.time() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3)}   # this process's: the steadier figure on a busy machine


def _prepare_domain(domain: str, names: list[str], src_manifests: dict[str, dict], cfg, store: Store,
                    keep: Optional[dict] = None) -> dict:
    """Two passes over the staged SFT shards, so memory holds keys, not texts: (1) per row a selection
    key, its group and its duplicate-text keys -> cap, merged groups, split; (2) the rows again,
    shard by shard, to the split writers. Splits of up to SHUFFLE_LIMIT rows are written in a seeded
    shuffled order; larger ones stream in canonical order (shuffle at load time)."""
    d = cfg.data
    seed = d.split_seed
    store.delete(layout.sft(domain))
    # pass 1: keys only (and, for the near-duplicate step, the shards' messages columns while they are small)
    keys: dict[str, list[tuple]] = {}
    messages: Optional[dict[tuple[str, int], Any]] = {} if d.near_duplicates else None
    kept_bytes = 0
    for name in names:
        entries = []
        for si, rel in enumerate(src_manifests[name].get("staged_sft_shards", [])):
            tbl = store.read_table(rel, ["messages", "doc_id", "task", "group"])
            if messages is not None:
                messages[name, si] = tbl.column("messages")
                kept_bytes += messages[name, si].nbytes
                if kept_bytes > KEEP_MESSAGES_BYTES:
                    messages = None   # read again, shard by shard, by the near-duplicate step
            t = tbl.to_pylist()
            del tbl
            for ri, r in enumerate(t):
                u = _unit(seed, f"{r['doc_id']}|{r['task']}|{norm_key(prompt_text(r['messages']))[:200]}")
                entries.append((u, r["doc_id"], r["task"], si, ri, r["group"], tuple(_dup_keys(r))))
        keys[name] = entries
    counts = {n: len(e) for n, e in keys.items()}
    quotas = balanced_quotas(counts, d.max_sft_per_domain)
    chosen: dict[str, dict[tuple[int, int], tuple[str, str]]] = {}   # source -> (shard, row) -> task, group
    uf = _UnionFind()
    first_group: dict[str, str] = {}
    for name in names:
        entries = keys[name]
        if quotas[name] < len(entries):  # seeded hash order: the same rows every run, spread over the source
            entries = sorted(entries)[: quotas[name]]
        chosen[name] = {(e[3], e[4]): (e[2], e[5]) for e in entries}   # (shard, row) -> task, group
        # merge groups that share an exact example or long response, so no duplicate text crosses splits
        for e in entries:
            uf.find(e[5])
            for key in e[6]:
                if key in first_group:
                    uf.union(first_group[key], e[5])
                else:
                    first_group[key] = e[5]
    near = {"enabled": bool(d.near_duplicates), "ngram": neardup.NGRAM}
    unit_split: dict[str, str] = {}
    n_chosen_rows = sum(len(c) for c in chosen.values())
    if d.near_duplicates and n_chosen_rows > neardup.MAX_ROWS:
        near.update(enabled=False, skipped=f"{n_chosen_rows} rows > {neardup.MAX_ROWS}: exact duplicates and groups only")
        log.warning("prepare: %s has %d SFT rows, more than %d: near-duplicates are not grouped (exact duplicates "
                    "still are); set data.max_sft_per_domain to have them grouped", domain, n_chosen_rows, neardup.MAX_ROWS)
    elif d.near_duplicates:
        near.update(_near_duplicates(names, chosen, src_manifests, store, uf, seed, d.split, unit_split, keep, domain,
                                     messages))
    del messages
    split_of_group: dict[str, str] = {}
    where: dict[str, str] = {}
    for name in names:
        for e in keys[name]:
            if (e[3], e[4]) not in chosen[name]:
                continue
            g = e[5]
            if g not in split_of_group:
                root = uf.find(g)
                split_of_group[g] = unit_split.get(root) or split_of(seed, root, d.split)
            sp = split_of_group[g]
            # the check: no group and no exact-duplicate text in two splits (near-duplicates: _near_duplicates)
            for key in ("g:" + g,) + e[6]:
                if where.setdefault(key, sp) != sp:
                    raise AssertionError(f"{domain}: {key} is in both {where[key]} and {sp}")
    n_chosen = sum(len(c) for c in chosen.values())
    del keys, where, first_group
    # pass 2: rows to the split writers
    writers = {s: _ShardWriter(store, f"{layout.sft(domain, s)}/part-", SFT_SCHEMA, d.rows_per_shard) for s in SPLITS}
    shuffle = n_chosen <= SHUFFLE_LIMIT
    held: dict[str, list[dict]] = {s: [] for s in SPLITS}
    n_split = {s: 0 for s in SPLITS}
    sft_chars = {s: 0 for s in SPLITS}
    groups: dict[str, set] = {s: set() for s in SPLITS}
    for name in names:
        for si, rel in enumerate(src_manifests[name].get("staged_sft_shards", [])):
            for ri, r in enumerate(store.read_table(rel).to_pylist()):
                if (si, ri) not in chosen[name]:
                    continue
                r["split"] = sp = split_of_group[r["group"]]
                n_split[sp] += 1
                sft_chars[sp] += sum(len(m["content"]) for m in r["messages"])
                groups[sp].add(r["group"])
                (held[sp].append if shuffle else writers[sp].add)(r)
    shards: dict[str, list[str]] = {}
    for s in SPLITS:
        w = writers[s]
        if shuffle:
            for r in sorted(held[s], key=lambda r: (_unit(seed + 1, f"{r['doc_id']}|{r['task']}|{prompt_text(r['messages'])[:100]}"), r["doc_id"])):
                w.add(r)
        w.flush()
        if not w.parts:  # an empty split still gets a (zero-row) shard so readers find the schema
            rel = layout.sft_shard(domain, s)
            store.write_table(rel, SFT_SCHEMA.empty_table())
            w.parts.append(rel)
        shards[s] = w.parts
    corpus_rows = sum(src_manifests[n]["kept"] for n in names)
    corpus_chars = sum(src_manifests[n].get("corpus_chars", 0) for n in names)
    return {
        "status": "ok" if corpus_rows else "empty", "sources": names, "corpus_rows": corpus_rows,
        "sft_candidates": sum(counts.values()), "sft_capped": sum(counts.values()) - n_chosen,
        "sft_per_source": {n: quotas[n] for n in names},
        "sft_rows": n_split,
        "groups": {s: len(groups[s]) for s in SPLITS},
        "tokens_estimate": {"corpus": corpus_chars // 4, "sft": {s: sft_chars[s] // 4 for s in SPLITS}},
        "shuffled": shuffle,
        "cross_split_duplicates": 0, "near_duplicates": near, "sft_shards": shards,
    }


def _contamination(store: Store, sizes: dict[str, dict[str, int]], known: Optional[dict] = None) -> dict:
    """Per domain: its test rows with >= neardup.THRESHOLD of their word 13-grams in its own train split,
    and in the other domains' train splits (the data card's table); each counted over all 13-grams (as
    published contamination checks count) and without the domain's template 13-grams (neardup.templates:
    a short row's prompt template is in train by construction). sizes: domain -> its SFT rows per split;
    known: domain -> the n-gram index, template groups and splits _near_duplicates kept (else the splits are
    read back and tokenized here)."""
    domains = list(sizes)
    found: dict[str, tuple] = {}   # domain -> its rows' neardup.Index, template groups, split per row
    big = [dm for dm in domains if sum(sizes[dm].values()) > neardup.MAX_ROWS]
    if big:
        return {"skipped": f"domain(s) {', '.join(big)} above {neardup.MAX_ROWS} SFT rows: not computed", "domains": {}}
    for dm in domains:
        k = (known or {}).get(dm) or {}
        if k.get("index") is not None:   # _near_duplicates's, templates found by the same rule
            found[dm] = (k["index"], k["templates"], k["splits"])
            continue
        hs, rs, tasks, split = [], [], [], []
        for s in SPLITS:
            t = store.read_table(layout.sft(dm, s), ["messages", "source", "task"])
            h, r = neardup.texts_pairs(neardup.column_texts(t.column("messages")))
            hs.append(h)
            rs.append(r + len(split))
            tasks += [f"{src}/{task}" for src, task in zip(t.column("source").to_pylist(), t.column("task").to_pylist())]
            split += [s] * t.num_rows
        ix = neardup.Index.from_pairs(np.concatenate(hs), np.concatenate(rs), len(split))
        found[dm] = (ix, ix.template_groups(tasks), np.array(split, dtype=str))
    pools = {dm: ix.pool(sp == "train") for dm, (ix, _, sp) in found.items()}
    out = {"ngram": neardup.NGRAM, "threshold": neardup.THRESHOLD, "domains": {}}
    for dm in domains:
        ix, tmpl, sp = found[dm]
        train, test = sp == "train", sp == "test"
        others = [pools[o] for o in domains if o != dm]   # their union, not sorted again

        def count(share: np.ndarray) -> int:
            return int((share[test] >= neardup.THRESHOLD).sum())
        other, other_wo = ix.covered_by(test, others, drop=tmpl)
        out["domains"][dm] = {
            "test_rows": int(test.sum()),
            "in_own_train": count(ix.covered(train)),
            "in_other_train": count(other),
            "in_own_train_without_templates": count(ix.covered(train, drop=tmpl)),
            "in_other_train_without_templates": count(other_wo),
        }
    return out


# ---- the stage -------------------------------------------------------------------------------
def run_prepare(cfg, use_ray: bool = True) -> dict:
    """Prepare every selected source and domain; returns the manifest (also at data/manifest.json).

    ``use_ray=False`` runs the same steps in this process (the bench's baseline; debugging)."""
    t0 = time.time()
    d = cfg.data
    raw_dir = Path(d.raw_dir).expanduser().resolve()
    store = open_store(cfg)
    opts = Opts(min_text_chars=d.min_text_chars, max_response_chars=d.max_response_chars, txt_chunk_chars=d.txt_chunk_chars,
                max_record_chars=d.max_record_chars, max_whole_file_bytes=d.max_whole_file_mb << 20,
                system_messages=dict(d.system_messages))
    specs = {s.name: _with_format(s, cfg, raw_dir, opts) for s in selected_sources(cfg)}
    names = list(specs)

    listings = {n: specs[n].listing(raw_dir) for n in names}
    present = {n: bool(listings[n].read or listings[n].refused) for n in names}
    missing = [n for n in names if not present[n]]
    if missing and not d.allow_missing:
        lines = [f"  - {n}: nothing under {specs[n].folder(raw_dir)} matching {', '.join(specs[n].patterns)}; "
                 f"{specs[n].how_to_get_at(raw_dir)}" for n in missing]
        raise UserFacingError("raw data missing for source(s) " + ", ".join(missing) + ":\n" + "\n".join(lines) +
                              "\nOr set ALLOW_MISSING_DATA=1 (data.allow_missing: true) to record them as missing and go on, "
                              "or leave them out of data.sources.")

    # fingerprints: a source's covers its files, the settings and the sources before it in its domain (dedupe)
    settings = {"code": CODE_VERSION, "cap": d.max_docs_per_source, "opts": opts.__dict__, "rows_per_shard": d.rows_per_shard}
    src_fp: dict[str, str] = {}
    chain: dict[str, str] = {}
    for n in names:
        dom = specs[n].domain
        ls = listings[n]
        listing = [(rel, p.stat().st_size, p.stat().st_mtime_ns) for p, rel in ls.read + ls.unmatched]
        listing += [(rel, "refused", p.lstat().st_mtime_ns) for p, rel in ls.refused]
        src_fp[n] = digest(n, specs[n].declaration, settings, listing, chain.get(dom, ""))
        chain[dom] = src_fp[n]
    domains = [dm for dm in cfg.domains if any(specs[n].domain == dm for n in names)]
    dom_fp = {dm: digest(dm, [src_fp[n] for n in names if specs[n].domain == dm], d.max_sft_per_domain, d.split, d.split_seed,
                       {"near_duplicates": d.near_duplicates, "ngram": neardup.NGRAM})
              for dm in domains}
    run_fp = digest(CODE_VERSION, dom_fp, cfg.domains, names)

    done = store.read_json_or(layout.PREPARED)
    if isinstance(done, dict) and done.get("fingerprint") == run_fp and store.is_file(layout.MANIFEST):
        log.info("prepare: up to date (data/_SUCCESS matches); nothing to do")
        return store.read_json(layout.MANIFEST)
    store.delete(layout.PREPARED)

    todo = [n for n in names if present[n] and (store.read_json_or(layout.source_marker(n)) or {}).get("fingerprint") != src_fp[n]]
    if use_ray and todo:
        _start_ray_data(cfg)

    src_manifest: dict[str, dict] = {}
    seen: dict[str, set[str]] = defaultdict(set)
    for n in names:
        src = specs[n]
        if not present[n]:
            src_manifest[n] = {"status": "missing", "domain": src.domain, "raw_subdir": src.raw_dir, "files": [],
                               "license": src.license, "url": src.url,
                               "read": 0, "kept": 0, "quarantined": 0, "quarantined_by_reason": {}, "deduplicated": 0,
                               "capped": 0, "how_to_get": src.how_to_get_at(raw_dir)}
            continue
        marker = store.read_json_or(layout.source_marker(n))
        if isinstance(marker, dict) and marker.get("fingerprint") == src_fp[n]:
            log.info("prepare: %s already done; skipped", n)
            src_manifest[n] = marker["manifest"]
            for rel in src_manifest[n].get("corpus_shards", []):
                seen[src.domain].update(text_hash(t) for t in store.read_table(rel, ["text"]).column("text").to_pylist())
            continue
        ts = time.time()
        m = _prepare_source(src, listings[n], cfg, store, opts, seen[src.domain], use_ray)
        m["seconds"] = round(time.time() - ts, 2)
        store.write_json(layout.source_marker(n), {"fingerprint": src_fp[n], "manifest": m})
        src_manifest[n] = m
        top = Counter(m["quarantined_by_reason"]).most_common(1)
        log.info("prepare: %s read=%d kept=%d quarantined=%d%s deduplicated=%d capped=%d sft=%d (%.1fs)",
                 n, m["read"], m["kept"], m["quarantined"], f" (top: {top[0][0]} {top[0][1]})" if top else "",
                 m["deduplicated"], m["capped"], m.get("sft_examples", 0), m["seconds"])
    _check_kept_shares(src_manifest, specs, d.min_kept_share, store)

    dom_manifest: dict[str, dict] = {}
    hashes_of: dict[str, dict] = {}   # domain -> its rows' 13-gram hashes, tasks, splits (for _contamination)
    for dm in cfg.domains:
        dnames = [n for n in names if specs[n].domain == dm]
        present_ok = [n for n in dnames if src_manifest[n]["status"] == "ok"]
        if not present_ok or not sum(src_manifest[n]["kept"] for n in present_ok):
            dom_manifest[dm] = {"status": "empty", "sources": dnames, "corpus_rows": 0, "sft_rows": {s: 0 for s in SPLITS},
                                "reason": "no source of this domain was selected" if not dnames else
                                          "no records: every source is missing or fully quarantined"}
            store.delete(layout.sft(dm))
            log.warning("prepare: domain %s is empty (%s); skipped", dm, dom_manifest[dm]["reason"])
            continue
        marker = store.read_json_or(layout.domain_marker(dm))
        if isinstance(marker, dict) and marker.get("fingerprint") == dom_fp[dm]:
            dom_manifest[dm] = marker["manifest"]
            continue
        hashes_of[dm] = {}
        dom_manifest[dm] = _prepare_domain(dm, present_ok, src_manifest, cfg, store, hashes_of[dm])
        store.write_json(layout.domain_marker(dm), {"fingerprint": dom_fp[dm], "manifest": dom_manifest[dm]})

    tc, cc = time.time(), time.process_time()
    contamination = _contamination(store, {dm: dom_manifest[dm]["sft_rows"] for dm in cfg.domains
                                           if dom_manifest[dm].get("status") == "ok"}, hashes_of)
    del hashes_of
    contamination["seconds"] = round(time.time() - tc, 3)
    contamination["cpu_seconds"] = round(time.process_time() - cc, 3)
    manifest = {
        "version": 1, "fingerprint": run_fp, "raw_dir": str(raw_dir), "output": store.uri,
        "domains_requested": list(cfg.domains), "sources_selected": names,
        "settings": {"max_docs_per_source": d.max_docs_per_source, "max_sft_per_domain": d.max_sft_per_domain,
                     "split": d.split, "split_seed": d.split_seed, "near_duplicates": d.near_duplicates,
                     "min_text_chars": d.min_text_chars,
                     "max_response_chars": d.max_response_chars, "txt_chunk_chars": d.txt_chunk_chars,
                     "max_record_chars": d.max_record_chars, "max_whole_file_mb": d.max_whole_file_mb},
        "sources": src_manifest, "domains": dom_manifest, "contamination": contamination,
        "totals": {k: sum(m.get(k, 0) for m in src_manifest.values()) for k in ("read", "kept", "quarantined", "deduplicated", "capped")},
    }
    for n, m in src_manifest.items():
        assert m["read"] == m["kept"] + m["quarantined"] + m["deduplicated"] + m["capped"], n
    store.write_json(layout.MANIFEST, manifest)
    store.write_json(layout.PREPARED, {"fingerprint": run_fp})
    log.info("prepare: done in %.1fs: %s", time.time() - t0, manifest["totals"])
    return manifest


def _with_format(spec: SourceSpec, cfg, raw_dir: Path, opts: Opts) -> SourceSpec:
    """A custom source whose format is left out: the format its first record's columns say, said in one line."""
    c = next((c for c in cfg.data.custom_sources if c.name == spec.name), None)
    if c is None or c.format is not None:
        return spec
    rec = first_record(spec, raw_dir, opts)
    fmt = detect_format(rec.data) if rec else None
    if fmt is None:
        return spec  # nothing to read, or no known columns: its records are quarantined with their columns
    log.info("prepare: %s: format not set; assumed %s from the columns of %s (%s); set data.custom_sources[%s].format "
             "to choose", spec.name, fmt, rec.file, ", ".join(sorted(map(str, rec.data)))[:120], spec.name)
    return custom_spec(c.model_copy(update={"format": fmt}))


def _check_kept_shares(src_manifest: dict[str, dict], specs: dict[str, SourceSpec], min_share: float, store: Store) -> None:
    """No source lost in silence: one that read records but kept none, or fewer than min_share of those it
    did not deduplicate or cap (the rest quarantined), fails prepare, with its top reasons and an example each."""
    bad = []
    for n, m in src_manifest.items():
        judged = m.get("kept", 0) + m.get("quarantined", 0)
        if m.get("status") != "ok" or not judged or not min_share or (m["kept"] and m["kept"] >= min_share * judged):
            continue
        examples: dict[str, str] = {}
        for rel in m.get("quarantine_shards", []):
            for q in store.read_table(rel, ["reason", "file", "location", "snippet"]).to_pylist():
                examples.setdefault(q["reason"], f"{q['file']} {q['location']}: {q['snippet'][:160]}")
        reasons = Counter(m["quarantined_by_reason"]).most_common(3)
        fix = ("fix the mapping in data.custom_sources[{0}] (format and the columns: docs/TRAINING.md, 'Your data')"
               .format(n) if specs[n].declaration else "check the source's files")
        bad.append(f"  - {n}: kept {m['kept']} of {judged} records ({m['quarantined']} quarantined)\n" +
                   "".join(f"      {r}: {k} (e.g. {examples.get(r, '')})\n" for r, k in reasons) + f"      {fix}")
    if bad:
        raise UserFacingError(f"prepare: source(s) kept less than data.min_kept_share ({min_share}) of their records:\n"
                              + "\n".join(bad) + "\nOr lower data.min_kept_share (0 turns this check off).")


def _start_ray_data(cfg) -> None:
    """Ray, and Ray Data settings that keep the stream in canonical order with bounded memory."""
    import ray.data
    ensure_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # canonical order: caps and dedupe independent of block layout
    ctx.target_max_block_size = 8 * 1024 * 1024  # small blocks: a capped source stops soon after its cap
    ctx.enable_progress_bars = False
    # the driver consumes one record at a time: cap what readers may run ahead (bounded memory)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=READ_AHEAD_BYTES)
