"""MedQuAD (github.com/abachaa/MedQuAD): XML files per collection, <Document id source url><Focus/>
<QAPairs><QAPair pid><Question qid qtype/><Answer/></QAPair>...</QAPairs></Document>. One record =
one QA pair. Some collections have every answer removed upstream (copyright): such pairs are
quarantined as empty_answer and never become QA targets."""
from __future__ import annotations

from .base import (FREE_TEXT, DownloadPart, Opts, Raw, Reject, SourceSpec, clean, corpus_row, meta, read_xml_root, stable_id,
                   EMPTY_ANSWER, EMPTY_TEXT)

NAME, DOMAIN = "medquad", "medicine"
ROOTS = ("Document", "DiseaseFile")


def read(path, rel, opts: Opts):
    # a few upstream files use <DiseaseFile fid=...> instead of <Document id=...>
    root, q = read_xml_root(path, rel, NAME, opts, ROOTS)
    if q:
        yield q
        return
    focus = clean(root.findtext("Focus"))
    doc = {"doc": root.get("id") or root.get("fid", ""), "source": root.get("source", ""), "url": root.get("url", ""), "focus": focus}
    pairs = root.find("QAPairs")
    for i, pair in enumerate(pairs.findall("QAPair") if pairs is not None else [], 1):
        qel = pair.find("Question")
        yield Raw(NAME, rel, f"QAPair {pair.get('pid') or i}", {
            **doc, "qid": qel.get("qid", "") if qel is not None else "", "qtype": qel.get("qtype", "") if qel is not None else "",
            "question": clean(qel.text if qel is not None else ""), "answer": (pair.findtext("Answer") or "").strip()})


def normalize(raw: Raw, opts: Opts) -> dict:
    d = raw.data
    if not d["question"]:
        raise Reject(EMPTY_TEXT, d.get("qid", ""))
    if not clean(d["answer"]):
        raise Reject(EMPTY_ANSWER, d["question"])
    answer = "\n".join(clean(line) for line in d["answer"].splitlines() if clean(line))
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, raw.file, d.get("qid") or raw.location), d["question"], f"{d['question']}\n{answer}",
        {"question": d["question"], "answer": answer, "focus": d["focus"], "qtype": d["qtype"], "collection": raw.file.split("/")[1] if raw.file.count("/") >= 2 else ""},
        SOURCE.license, d["url"], group="doc:" + raw.file, opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    return [{"task": "qa", "prompt": f"Answer this patient question clearly and accurately.\n\nQuestion: {m['question']}",
             "response": m["answer"]}]


SOURCE = SourceSpec(NAME, DOMAIN, "MedQuAD", ("*_QA/*.xml",), read, normalize, build_sft,
                license="CC BY 4.0", url="https://github.com/abachaa/MedQuAD",
                parts=(DownloadPart("MedQuAD", "git", "https://github.com/abachaa/MedQuAD.git"),),
                how_to_get="adapters download (git clone abachaa/MedQuAD), or copy its collection folders to <raw_dir>/MedQuAD/",
                tasks={"qa": FREE_TEXT})
