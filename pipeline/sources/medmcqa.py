"""MedMCQA (openlifescienceai/medmcqa): Parquet (Hugging Face; cop 0..3) or the original JSON lines
(cop 1..4), with question, opa..opd, cop, exp, subject_name, topic_name. One record = one question."""
from __future__ import annotations

from .base import (DownloadPart, MultipleChoice, Opts, Raw, Reject, SourceSpec, clean, corpus_row, iter_jsonl, iter_parquet, meta,
                   stable_id, EMPTY_TEXT, MISSING_FIELD)

NAME, DOMAIN = "medmcqa", "medicine"
LETTERS = "ABCD"


def read(path, rel, opts: Opts):
    if path.suffix == ".parquet":
        for r in iter_parquet(path, rel, NAME):
            if isinstance(r, Raw):
                r.data["_cop_base"] = 0
            yield r
    else:  # .json / .jsonl from the original release: one JSON object per line
        for r in iter_jsonl(path, rel, NAME, opts):
            if isinstance(r, Raw):
                r.data["_cop_base"] = 1
            yield r


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    q = clean(d.get("question"))
    opts_ = [clean(d.get(k)) for k in ("opa", "opb", "opc", "opd")]
    if not q:
        raise Reject(EMPTY_TEXT, str(d.get("id", "")))
    try:
        cop = int(d.get("cop")) - d.get("_cop_base", 0)
    except (TypeError, ValueError):
        cop = -1
    if not 0 <= cop < 4 or not opts_[cop]:
        raise Reject(MISSING_FIELD, f"cop={d.get('cop')!r}: no correct option")
    exp = clean(d.get("exp"))
    text = q + "\n" + "\n".join(f"{L}) {o}" for L, o in zip(LETTERS, opts_)) + (f"\nExplanation: {exp}" if exp else "")
    qid = clean(d.get("id"))
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, qid) if qid else stable_id(NAME, raw.file, raw.location), q[:200], text,
        {"question": q, "options": opts_, "answer": opts_[cop], "answer_letter": LETTERS[cop], "explanation": exp,
         "subject": clean(d.get("subject_name")), "topic": clean(d.get("topic_name"))},
        SOURCE.license, SOURCE.url, group=qid or raw.location, opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    opts_ = m["options"]
    prompt = (f"Answer this medical exam question ({m.get('subject') or 'medicine'}). Give the letter, the answer and the reason.\n\n"
              f"{m['question']}\n" + "\n".join(f"{L}) {o}" for L, o in zip(LETTERS, opts_)))
    resp = f"{m['answer_letter']}) {m['answer']}."
    if m.get("explanation"):
        resp += f" {m['explanation']}"
    return [{"task": "qa_multiple_choice", "prompt": prompt, "response": resp}]


SOURCE = SourceSpec(NAME, DOMAIN, "medmcqa", ("**/*.parquet", "**/*.json", "**/*.jsonl"), read, normalize, build_sft,
                license="Apache-2.0", url="https://huggingface.co/datasets/openlifescienceai/medmcqa",
                parts=(DownloadPart("medmcqa", "hf", "openlifescienceai/medmcqa"),),
                how_to_get="adapters download (Hugging Face openlifescienceai/medmcqa), or put its Parquet/JSON under <raw_dir>/medmcqa/",
                # the response starts with the letter: "B) <option>. <explanation>"
                tasks={"qa_multiple_choice": MultipleChoice(tuple(LETTERS))})
