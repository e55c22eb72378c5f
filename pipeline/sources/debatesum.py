"""DebateSum (Hugging Face Hellisotherpeople/DebateSum): CSV with the columns Full-Document,
Extract, Abstract, Citation, OriginalDebateFileName, DebateCamp, Tag, Year, ... One record = one row."""
from __future__ import annotations

from .base import FREE_TEXT, DownloadPart, Opts, Raw, Reject, SourceSpec, clean, corpus_row, iter_csv, meta, stable_id, text_hash, EMPTY_TEXT

NAME, DOMAIN = "debatesum", "debate"
REQUIRED = ("Full-Document", "Extract", "Abstract")


def read(path, rel, opts: Opts):
    yield from iter_csv(path, rel, NAME, REQUIRED, opts)


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    doc, extract, abstract = clean(d.get("Full-Document")), clean(d.get("Extract")), clean(d.get("Abstract"))
    if not doc and not extract:
        raise Reject(EMPTY_TEXT, abstract)
    text = doc or extract
    tag = clean(d.get("Tag")) or abstract
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, raw.file, raw.location, text_hash(text)), tag[:200], text,
        {"claim": abstract, "evidence": extract, "tag": tag, "citation": clean(d.get("Citation")),
         "file_name": clean(d.get("OriginalDebateFileName")), "camp": clean(d.get("DebateCamp")),
         "year": clean(d.get("Year"))},
        SOURCE.license, SOURCE.url, group="doc:" + text_hash(doc or extract), opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    out = []
    if m.get("evidence") and m.get("claim"):
        out.append({"task": "claim_extraction",
                    "prompt": "Read this piece of debate evidence and state, in one sentence, the argument it supports.\n\n"
                              f"Evidence: {m['evidence']}",
                    "response": m["claim"]})
    if m.get("tag") and m.get("evidence"):
        out.append({"task": "evidence_for_claim",
                    "prompt": f"You are a policy debater. Write the warrant that backs up this tag.\n\nTag: {m['tag']}"
                              + (f"\nSource: {m['citation']}" if m.get("citation") else ""),
                    "response": m["evidence"]})
    return out


SOURCE = SourceSpec(NAME, DOMAIN, "DebateSum", ("**/*.csv",), read, normalize, build_sft,
                license="MIT", url="https://huggingface.co/datasets/Hellisotherpeople/DebateSum",
                parts=(DownloadPart("DebateSum", "hf", "Hellisotherpeople/DebateSum"),),
                how_to_get="adapters download (Hugging Face Hellisotherpeople/DebateSum), or put debateall.csv under <raw_dir>/DebateSum/",
                tasks={"claim_extraction": FREE_TEXT, "evidence_for_claim": FREE_TEXT})
