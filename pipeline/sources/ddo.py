"""DDO, the debate.org corpus (Durmus & Cardie): debates.json, an object keyed by debate name with
title, category, rounds [[{side, text}, ...], ...] and participants; users.json (profiles, not text:
its size and checksum are recorded, it yields no records). One record = one debate."""
from __future__ import annotations

from .base import (FREE_TEXT, DownloadPart, Opts, SourceSetting, Quarantine, Raw, Reject, SourceSpec, clean, corpus_row, iter_json_file, meta, not_a_record, stable_id,
                   BAD_JSON, EMPTY_TEXT)

NAME, DOMAIN = "ddo", "debate"


def read(path, rel, opts: Opts):
    if path.name != "debates.json":
        return  # users.json: profiles only, checksummed by prepare, no records
    obj, q = iter_json_file(path, rel, NAME, opts)
    if q:
        yield q
        return
    if not isinstance(obj, dict):
        yield Quarantine(NAME, rel, "file", BAD_JSON, "expected an object keyed by debate name")
        return
    for key in sorted(obj):
        v = obj[key]
        if not isinstance(v, dict):
            yield not_a_record(v, NAME, rel, f"key {key}")
            continue
        yield Raw(NAME, rel, f"key {key}", {"key": key, **v})


def _turns(d: dict) -> list[tuple[str, str]]:
    out = []
    for rnd in d.get("rounds") or []:
        for turn in rnd if isinstance(rnd, list) else [rnd]:
            if isinstance(turn, dict) and clean(turn.get("text")):
                out.append((clean(turn.get("side")) or "?", clean(turn.get("text"))))
    return out


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    turns = _turns(d)
    if not turns:
        raise Reject(EMPTY_TEXT, d.get("title", ""))
    text = "\n\n".join(f"{side}: {t}" for side, t in turns)
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, d["key"]), clean(d.get("title")), text,
        {"topic": clean(d.get("title")), "category": clean(d.get("category")), "turns": turns,
         "pro": clean(d.get("participant_1_name")) if clean(d.get("participant_1_position")) == "Pro" else clean(d.get("participant_2_name"))},
        SOURCE.license, clean(d.get("url")), group="debate:" + d["key"], opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    turns = m.get("turns") or []
    out = []
    for i, (side, text) in enumerate(turns[:4]):
        stance = "for" if side.lower() == "pro" else "against"
        prev = f"\nYour opponent just said: {turns[i - 1][1][:600]}" if i > 0 else ""
        out.append({"task": "debate_turn",
                    "prompt": f"Debate ({m.get('category') or 'general'}): {m.get('topic')}\nYou argue {stance} the resolution "
                              f"({side}).{prev}\nWrite your next speech.",
                    "response": text})
    return out


SOURCE = SourceSpec(NAME, DOMAIN, "DDO", ("debates.json", "users.json"), read, normalize, build_sft,
                license="research use; cite Durmus & Cardie 2019", url="https://www.cs.cornell.edu/~esindurmus/ddo.html",
                parts=(DownloadPart("DDO", "http", files=(("debates.json", "ddo_debates_url"), ("users.json", "ddo_users_url")),
                                    folder_key="ddo_gdrive_folder_url"),),
                settings=(SourceSetting("ddo_debates_url", "url", ("DDO_DEBATES_URL",), "URL of debates.json (a Google Drive share link works)"),
                          SourceSetting("ddo_users_url", "url", ("DDO_USERS_URL",), "URL of users.json (a Google Drive share link works)"),
                          SourceSetting("ddo_gdrive_folder_url", "url", ("DDO_GDRIVE_FOLDER_URL",),
                                        "a Google Drive folder holding debates.json and users.json (for files without their own URL)")),
                how_to_get="set DDO_DEBATES_URL and DDO_USERS_URL (or DDO_GDRIVE_FOLDER_URL) and run adapters download, "
                           "or put debates.json and users.json under <raw_dir>/DDO/",
                # no label per turn (votes are per debate): turns are scored as free text
                tasks={"debate_turn": FREE_TEXT})
