"""PubMedQA: the GitHub release data/ori_pqal.json (an object keyed by PMID with QUESTION, CONTEXTS,
LABELS, MESHES, LONG_ANSWER, final_decision, ...) or Hugging Face Parquet: qiaojin/PubMedQA
(pubid, question, context{contexts, labels, meshes}, long_answer, final_decision) or bigbio/pubmed_qa
(source schema: QUESTION, CONTEXTS, ..., or bigbio_qa: document_id, question, context, answer).
One record = one question."""
from __future__ import annotations

from .base import (DownloadPart, MultipleChoice, Opts, Quarantine, Raw, Reject, SourceSpec, clean, corpus_row, iter_json_file, iter_parquet, meta, not_a_record,
                   stable_id, BAD_JSON, EMPTY_TEXT, MISSING_FIELD)

NAME, DOMAIN = "pubmed_qa", "medicine"
DECISIONS = ("yes", "no", "maybe")


def read(path, rel, opts: Opts):
    if path.suffix == ".parquet":
        yield from iter_parquet(path, rel, NAME)
        return
    obj, q = iter_json_file(path, rel, NAME, opts)
    if q:
        yield q
        return
    if not isinstance(obj, dict):
        yield Quarantine(NAME, rel, "file", BAD_JSON, "expected an object keyed by PubMed id")
        return
    for pmid in sorted(obj):
        v = obj[pmid]
        if not isinstance(v, dict):
            yield not_a_record(v, NAME, rel, f"key {pmid}")
            continue
        yield Raw(NAME, rel, f"key {pmid}", {"pubid": pmid, **v})


def _fields(d: dict) -> tuple[str, str, list[str], str, str, list]:
    """(pmid, question, contexts, long_answer, decision, meshes) whatever the column names."""
    g = {k.lower(): v for k, v in d.items()}
    pmid = clean(g.get("pubid") or g.get("document_id") or g.get("id"))
    question = clean(g.get("question"))
    ctx = g.get("contexts") if "contexts" in g else g.get("context")
    meshes = g.get("meshes") or []
    if isinstance(ctx, dict):  # qiaojin/PubMedQA: context {contexts, labels, meshes}
        meshes = ctx.get("meshes") or meshes
        ctx = ctx.get("contexts")
    if isinstance(ctx, str):
        ctx = [ctx]
    contexts = [clean(c) for c in (ctx or []) if clean(c)]
    long_answer = clean(g.get("long_answer"))
    decision = clean(g.get("final_decision"))
    if not decision and isinstance(g.get("answer"), (list, tuple)) and g["answer"]:
        decision = clean(g["answer"][0])
    return pmid, question, contexts, long_answer, decision.lower(), list(meshes or [])


def normalize(raw: Raw, opts: Opts) -> dict:
    pmid, question, contexts, long_answer, decision, meshes = _fields(raw.data)
    if not question:
        raise Reject(EMPTY_TEXT, pmid)
    if decision not in DECISIONS:
        raise Reject(MISSING_FIELD, f"final_decision {decision!r}")
    text = question + "\n\n" + "\n".join(contexts) + (f"\n\nConclusion: {long_answer}" if long_answer else "")
    return corpus_row(
        NAME, DOMAIN, stable_id(NAME, pmid or raw.file + raw.location), question[:200], text,
        {"question": question, "contexts": contexts, "answer": long_answer, "label": decision, "pmid": pmid,
         "meshes": [clean(x) for x in meshes]},
        SOURCE.license, f"https://pubmed.ncbi.nlm.nih.gov/{pmid}/" if pmid else "", group="pmid:" + (pmid or raw.location), opts=opts)


def build_sft(row: dict) -> list[dict]:
    m = meta(row)
    ctx = "\n".join(m.get("contexts") or [])
    resp = m["label"].capitalize() + "." + (f" {m['answer']}" if m.get("answer") else "")
    return [{"task": "qa_with_context",
             "prompt": f"Read the abstract and answer the research question with yes, no or maybe, then explain.\n\n"
                       f"Abstract: {ctx}\n\nQuestion: {m['question']}",
             "response": resp}]


SOURCE = SourceSpec(NAME, DOMAIN, "pubmed_qa", ("**/ori_pqal.json", "**/*.parquet"), read, normalize, build_sft,
                license="MIT", url="https://github.com/pubmedqa/pubmedqa",
                parts=(DownloadPart("pubmed_qa", "git", "https://github.com/pubmedqa/pubmedqa.git"),),
                how_to_get="adapters download (git clone pubmedqa/pubmedqa or Hugging Face), or put data/ori_pqal.json under <raw_dir>/pubmed_qa/",
                # the response starts with the decision: "Yes. <long answer>"
                tasks={"qa_with_context": MultipleChoice(tuple(d.capitalize() for d in DECISIONS))})
