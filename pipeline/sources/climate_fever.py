"""Climate-FEVER: dataset/climate-fever.jsonl (claim_id, claim, claim_label, evidences[{evidence_id,
evidence_label, article, evidence, entropy, votes}]) or the Hugging Face Parquet (labels as integers).
One record = one claim with its evidences."""
from __future__ import annotations

from .base import (DownloadPart, MultipleChoice, Opts, Raw, Reject, SourceSpec, clean, corpus_row, iter_jsonl, iter_parquet, meta, stable_id,
                   EMPTY_TEXT, MISSING_FIELD)

NAME, DOMAIN = "climate_fever", "ecology"
CLAIM_LABELS = ["SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO", "DISPUTED"]
EVIDENCE_LABELS = ["SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO"]


def read(path, rel, opts: Opts):
    yield from (iter_parquet(path, rel, NAME) if path.suffix == ".parquet" else iter_jsonl(path, rel, NAME, opts))


def _label(v, names) -> str:
    if isinstance(v, int) and 0 <= v < len(names):
        return names[v]
    return clean(v).upper()


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    claim = clean(d.get("claim"))
    if not claim:
        raise Reject(EMPTY_TEXT, str(d.get("claim_id", "")))
    label = _label(d.get("claim_label"), CLAIM_LABELS)
    if label not in CLAIM_LABELS:
        raise Reject(MISSING_FIELD, f"claim_label {d.get('claim_label')!r}")
    evs = [{"article": clean(e.get("article")), "evidence": clean(e.get("evidence")),
            "label": _label(e.get("evidence_label"), EVIDENCE_LABELS)}
           for e in d.get("evidences") or [] if isinstance(e, dict) and clean(e.get("evidence"))]
    text = claim + "\n" + "\n".join(f"- {e['evidence']} ({e['article']})" for e in evs)
    cid = clean(d.get("claim_id"))
    return corpus_row(NAME, DOMAIN, stable_id(NAME, cid or raw.file + raw.location), claim[:200], text,
                      {"claim": claim, "label": label, "evidence": evs}, SOURCE.license, SOURCE.url,
                      group="claim:" + (cid or raw.location), opts=opts)


VERDICT = {"SUPPORTS": "Supported", "REFUTES": "Refuted", "NOT_ENOUGH_INFO": "Not enough information",
           "DISPUTED": "Disputed"}


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    evs = m.get("evidence") or []
    if not evs:
        return []
    listing = "\n".join(f"{i}. {e['evidence']} ({e['article']})" for i, e in enumerate(evs, 1))
    sup = [str(i) for i, e in enumerate(evs, 1) if e["label"] == "SUPPORTS"]
    ref = [str(i) for i, e in enumerate(evs, 1) if e["label"] == "REFUTES"]
    why = []
    if sup:
        why.append(f"sentence{'s' if len(sup) > 1 else ''} {', '.join(sup)} support{'' if len(sup) > 1 else 's'} it")
    if ref:
        why.append(f"sentence{'s' if len(ref) > 1 else ''} {', '.join(ref)} contradict{'' if len(ref) > 1 else 's'} it")
    if not why:
        why.append("no sentence bears directly on it")
    # The question sits between the claim and the evidence and the answer's fixed words are few: no run of
    # 13 fixed words (a word 13-gram of template alone, in train by construction, counted by the
    # contamination check as a leak; issue 24). The options are the eval's choices, the answer starts with one.
    out = [{"task": "claim_verification",
            "prompt": f"Climate claim: {m['claim']}\n\nVerdict from this evidence (Supported, Refuted, Not enough information "
                      f"or Disputed)?\n{listing}",
            "response": f"{VERDICT[m['label']]}. {why[0][:1].upper()}{'; '.join(why)[1:]}."}]
    return out


SOURCE = SourceSpec(NAME, DOMAIN, "climate_fever", ("**/*.jsonl", "**/*.parquet"), read, normalize, build_sft,
                license="research use; cite Diggelmann et al. 2020", url="https://github.com/tdiggelm/climate-fever-dataset",
                parts=(DownloadPart("climate_fever", "git", "https://github.com/tdiggelm/climate-fever-dataset.git"),),
                how_to_get="adapters download (git clone tdiggelm/climate-fever-dataset or Hugging Face climate_fever), or put "
                           "dataset/climate-fever.jsonl under <raw_dir>/climate_fever/",
                # the response starts with the verdict: "Refuted. Sentence 2 contradicts it."
                tasks={"claim_verification": MultipleChoice(tuple(VERDICT[k] for k in CLAIM_LABELS))})
