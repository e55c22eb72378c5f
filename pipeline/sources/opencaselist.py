"""OpenCaselist (Hugging Face Yusuf5/OpenCaselist, 'OpenDebateEvidence'): Parquet shards with
tag, cite, fullcite, summary, spoken, fulltext, pocket, hat, block, side, ... One record = one row."""
from __future__ import annotations

from .base import FREE_TEXT, DownloadPart, Opts, Raw, Reject, SourceSetting, SourceSpec, clean, corpus_row, iter_parquet, meta, stable_id, text_hash, EMPTY_TEXT

NAME, DOMAIN = "opencaselist", "debate"


def read(path, rel, opts: Opts):
    yield from iter_parquet(path, rel, NAME)


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    full = clean(d.get("fulltext"))
    if not full:
        raise Reject(EMPTY_TEXT, clean(d.get("tag")))
    rid = d.get("id")
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, rid) if rid is not None else stable_id(NAME, raw.file, raw.location),
        clean(d.get("tag"))[:200], full,
        {"tag": clean(d.get("tag")), "citation": clean(d.get("fullcite") or d.get("cite")),
         "summary": clean(d.get("summary")), "evidence": clean(d.get("spoken")), "side": clean(d.get("side")),
         "stance": {"aff": "pro", "neg": "con"}.get(clean(d.get("side")).lower(), ""),
         "pocket": clean(d.get("pocket")), "tournament": clean(d.get("tournament")), "year": d.get("year"),
         "event": clean(d.get("event"))},
        SOURCE.license, SOURCE.url, group="doc:" + text_hash(full), opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    out = []
    if m.get("tag"):
        side = {"pro": "affirmative", "con": "negative"}.get(m.get("stance", ""), "")
        out.append({"task": "debate_turn",
                    "prompt": f"As the {side or 'assigned'} side in a policy debate, read a card that proves this tag.\n\nTag: {m['tag']}",
                    "response": row["text"]})
        if m.get("evidence"):
            out.append({"task": "claim_extraction",
                        "prompt": f"Here is the highlighted part of a debate card. Write its tag (the claim it proves).\n\n{m['evidence']}",
                        "response": m["tag"]})
    return out


SOURCE = SourceSpec(NAME, DOMAIN, "OpenDebateEvidence", ("**/*.parquet",), read, normalize, build_sft,
                license="see the dataset card (Yusuf5/OpenCaselist)", url="https://huggingface.co/datasets/Yusuf5/OpenCaselist",
                parts=(DownloadPart("OpenDebateEvidence", "hf", "Yusuf5/OpenCaselist"),), 
                # the seed's misspelt variable first: the right spelling wins when both are set
                settings=(SourceSetting("opencaselist", "opt_in", ("DOWNLOAD_OPENCASLIST", "DOWNLOAD_OPENCASELIST"),
                                        "OpenCaselist is huge: opt in"),),
                how_to_get="DOWNLOAD_OPENCASELIST=1 adapters download (it is large), or put its Parquet shards under <raw_dir>/OpenDebateEvidence/; "
                           "or drop 'opencaselist' from data.sources",
                tasks={"debate_turn": FREE_TEXT, "claim_extraction": FREE_TEXT})
