"""medalpaca medical_meadow_* (JSON list or JSON lines or Parquet with instruction/input/output) and
lavita/MedQuAD (Parquet/JSON with question/answer columns), each under
medical_qa_collection/<owner__name>/. One record = one row."""
from __future__ import annotations

from .base import (FREE_TEXT, DownloadPart, Opts, Raw, Reject, SourceSpec, clean, corpus_row, iter_json_records, iter_jsonl,
                   iter_parquet, meta, stable_id, text_hash, EMPTY_ANSWER, EMPTY_TEXT, UNKNOWN_FORMAT)

NAME, DOMAIN = "medical_meadow", "medicine"


def read(path, rel, opts: Opts):
    if path.suffix == ".parquet":
        yield from iter_parquet(path, rel, NAME)
    elif path.suffix == ".jsonl":
        yield from iter_jsonl(path, rel, NAME, opts)
    else:
        yield from iter_json_records(path, rel, NAME, opts)


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    collection = raw.file.split("/")[1] if raw.file.count("/") >= 2 else ""
    if "output" in d or "instruction" in d:
        instr, inp, out = clean(d.get("instruction")), clean(d.get("input")), clean(d.get("output"))
        question = inp or instr
        if not question:
            raise Reject(EMPTY_TEXT, out)
        if not out:
            raise Reject(EMPTY_ANSWER, question)
        md = {"instruction": instr, "question": question, "answer": out, "collection": collection}
    elif "question" in d and "answer" in d:  # lavita/MedQuAD
        question, out = clean(d.get("question")), clean(d.get("answer"))
        if not question:
            raise Reject(EMPTY_TEXT, out)
        if not out:
            raise Reject(EMPTY_ANSWER, question)
        md = {"question": question, "answer": out, "focus": clean(d.get("question_focus")),
              "qtype": clean(d.get("question_type")), "collection": collection}
    else:
        raise Reject(UNKNOWN_FORMAT, "columns " + ",".join(sorted(d))[:200])
    return corpus_row(NAME, DOMAIN, stable_id(NAME, raw.file, raw.location, text_hash(question)), question[:200],
                      f"{question}\n{out}", md, SOURCE.license, SOURCE.url, group=f"{collection}:{raw.location}", opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    instr = m.get("instruction") or "Answer this medical question accurately."
    return [{"task": "qa", "prompt": f"{instr}\n\nQuestion: {m['question']}", "response": m["answer"]}]


MEADOW = ("medical_flashcards", "wikidoc", "wikidoc_patient_information", "health_advice", "mediqa")
SOURCE = SourceSpec(NAME, DOMAIN, "medical_qa_collection", ("*/**/*.json", "*/**/*.jsonl", "*/**/*.parquet"), read, normalize, build_sft,
                license="see each dataset card (medalpaca medical_meadow_*: mostly CC BY; lavita/MedQuAD: CC BY 4.0)",
                url="https://huggingface.co/medalpaca",
                parts=tuple(DownloadPart(f"medical_qa_collection/medalpaca__medical_meadow_{n}", "hf",
                                         f"medalpaca/medical_meadow_{n}") for n in MEADOW)
                + (DownloadPart("medical_qa_collection/lavita__MedQuAD", "hf", "lavita/MedQuAD"),),
                how_to_get="adapters download (Hugging Face medalpaca/medical_meadow_* and lavita/MedQuAD), or put each under "
                           "<raw_dir>/medical_qa_collection/<owner__name>/",
                tasks={"qa": FREE_TEXT})
