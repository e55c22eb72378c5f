"""medalpaca medical_meadow_* (JSON list or JSON lines or Parquet with instruction/input/output) and
lavita/MedQuAD (Parquet/JSON with question/answer columns), each under
medical_qa_collection/<owner__name>/. One record = one row."""
from __future__ import annotations

from .base import (Opts, Quarantine, Raw, Reject, Source, clean, corpus_row, iter_json_file, iter_jsonl, iter_parquet,
                   meta, stable_id, text_hash, BAD_JSON, EMPTY_ANSWER, EMPTY_TEXT, UNKNOWN_FORMAT)

NAME, DOMAIN = "medical_meadow", "medicine"


def read(path, rel, opts: Opts):
    if path.suffix == ".parquet":
        yield from iter_parquet(path, rel, NAME)
    elif path.suffix == ".jsonl":
        yield from iter_jsonl(path, rel, NAME)
    else:
        obj, q = iter_json_file(path, rel, NAME)
        if q:
            if q.reason == BAD_JSON:  # maybe JSON lines saved as .json
                yield from iter_jsonl(path, rel, NAME)
            else:
                yield q
            return
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            yield Quarantine(NAME, rel, "file", UNKNOWN_FORMAT, "expected a JSON list of records")
            return
        for i, v in enumerate(obj):
            if isinstance(v, dict):
                yield Raw(NAME, rel, f"item {i}", v)
            else:
                yield Quarantine(NAME, rel, f"item {i}", BAD_JSON, str(v)[:200])


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


SOURCE = Source(NAME, DOMAIN, "medical_qa_collection", ("*/**/*.json", "*/**/*.jsonl", "*/**/*.parquet"), read, normalize, build_sft,
                license="see each dataset card (medalpaca medical_meadow_*: mostly CC BY; lavita/MedQuAD: CC BY 4.0)",
                url="https://huggingface.co/medalpaca",
                how_to_get="adapters download (Hugging Face medalpaca/medical_meadow_* and lavita/MedQuAD), or put each under "
                           "<raw_dir>/medical_qa_collection/<owner__name>/")
