"""Every reader on the project's fixtures (fixtures/raw) and on damaged inputs (fixtures/damaged).
No Ray: the readers are plain functions; prepare runs them inside Ray Data."""
from __future__ import annotations

import json

import pytest

from pipeline.prepare import file_events
from pipeline.sources import BUILTIN, SOURCES, Opts
from pipeline.sources.base import EvalTask, norm_key

from ._prepare_helpers import DAMAGED, RAW, events, quarantined
from ._prepare_helpers import records as _records

CORPUS_KEYS = {"doc_id", "domain", "source", "title", "text", "metadata", "license", "url"}
SFT_KEYS = {"messages", "domain", "source", "doc_id", "task", "group"}


def flat(ex: dict) -> dict:
    """A built-in source's SFT example: one user turn and its answer (no system message configured),
    with the two as prompt and response for the checks below."""
    msgs = ex["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"], msgs
    return {**ex, "prompt": msgs[0]["content"], "response": msgs[1]["content"]}


def records(source, raw=RAW):
    return [{**r, "sft": [flat(ex) for ex in r["sft"]]} for r in _records(source, raw)]
# records each source's fixture holds (fixtures/make_fixtures.py)
EXPECTED_READ = {"debatesum": 120, "opencaselist": 80, "iam": 145, "ddo": 60, "medmcqa": 120, "pubmed_qa": 100,
                 "medquad": 114, "medical_meadow": 140, "openstax": 85, "climate_fever": 200}


DOMAIN_OF = {"debatesum": "debate", "opencaselist": "debate", "iam": "debate", "ddo": "debate", "medmcqa": "medicine",
             "pubmed_qa": "medicine", "medquad": "medicine", "medical_meadow": "medicine", "openstax": "education",
             "climate_fever": "ecology"}


def test_registry_declares_every_source_once():
    assert list(BUILTIN) == list(SOURCES) == list(DOMAIN_OF)
    for name, src in BUILTIN.items():
        assert src.domain == DOMAIN_OF[name] and src.patterns and src.how_to_get and src.license and src.parts
        assert src.tasks and all(isinstance(t, EvalTask) and t.kind for t in src.tasks.values())


@pytest.mark.parametrize("source", SOURCES)
def test_reader_reads_fixture(source):
    evs = events(source)
    recs = [e for k, e in evs if k == "r"]
    assert all(set(ex) == SFT_KEYS for r in recs for ex in r["sft"])
    recs = [{**r, "sft": [flat(ex) for ex in r["sft"]]} for r in recs]
    qs = [e for k, e in evs if k == "q"]
    files = [e for k, e in evs if k == "f"]
    assert len(recs) + len(qs) == EXPECTED_READ[source]
    assert len(files) == len(BUILTIN[source].files(RAW)) and all(len(f["sha256"]) == 64 for f in files)
    ids = set()
    for r in recs:
        row = r["row"]
        assert set(row) == CORPUS_KEYS
        assert row["source"] == source and row["domain"] == DOMAIN_OF[source]
        assert len(row["text"]) >= 20 and row["title"]
        md = json.loads(row["metadata"])
        assert md["group"]
        ids.add(row["doc_id"])
        # only a short fragment (a book's front matter) may give no SFT example
        assert r["sft"] or len(row["text"]) < 200, f"{source}: a kept record without SFT examples: {row['title']}"
        for ex in r["sft"]:
            assert ex["response"].strip() and ex["prompt"].strip()
            # a response never merely copies the prompt's context
            assert len(norm_key(ex["response"])) <= 12 or norm_key(ex["response"]) not in norm_key(ex["prompt"])
            assert ex["doc_id"] == row["doc_id"]
            # the evaluation knows how to score it: every SFT task is declared, a multiple-choice one has its gold
            task = BUILTIN[source].tasks.get(ex["task"])
            assert task is not None, f"{source}: SFT task {ex['task']!r} has no evaluation task in SourceSpec.tasks"
            assert task.kind != "multiple_choice" or task.gold(ex["response"]) is not None, ex["response"][:80]
    assert len(ids) == len(recs), "doc_id must be unique within a source"


def test_doc_ids_stable_across_runs():
    a = [r["row"]["doc_id"] for r in records("climate_fever")]
    b = [r["row"]["doc_id"] for r in records("climate_fever")]
    assert a == b and len(set(a)) == len(a)
    assert all(x.startswith("climate_fever:") for x in a)


def test_debatesum_columns_and_tasks():
    recs = records("debatesum")
    md = json.loads(recs[0]["row"]["metadata"])
    assert md["claim"] and md["evidence"] and md["citation"] and md["camp"]
    tasks = {ex["task"] for r in recs for ex in r["sft"]}
    assert tasks == {"claim_extraction", "evidence_for_claim"}


def test_iam_lines_stances_and_unicode():
    recs = records("iam")
    stances = {json.loads(r["row"]["metadata"])["stance"] for r in recs}
    assert stances == {"support", "contest", "none"}
    assert any("naïve" in r["row"]["text"] for r in recs)  # non-ASCII survives
    turn = next(ex for r in recs for ex in r["sft"] if ex["task"] == "debate_turn")
    assert "argument" in turn["prompt"] and turn["response"] not in turn["prompt"]


def test_ddo_debates_and_users():
    recs = records("ddo")
    assert len(recs) == 60  # users.json yields no records but is checksummed
    files = [e for k, e in events("ddo") if k == "f"]
    assert sorted(f["rel"] for f in files) == ["DDO/debates.json", "DDO/users.json"]
    ex = recs[0]["sft"][1]
    assert ex["task"] == "debate_turn" and "opponent just said" in ex["prompt"]


def test_medmcqa_correct_option():
    for r in records("medmcqa"):
        md = json.loads(r["row"]["metadata"])
        assert md["answer"] == md["options"]["ABCD".index(md["answer_letter"])]
        assert r["sft"][0]["response"].startswith(f"{md['answer_letter']}) {md['answer']}")


def test_medmcqa_json_lines_one_based(tmp_path):
    d = tmp_path / "medmcqa"
    d.mkdir()
    (d / "train.json").write_text(json.dumps({"id": "x1", "question": "Drug of choice for absence seizures is?",
                                              "opa": "Phenytoin", "opb": "Ethosuximide", "opc": "Carbamazepine",
                                              "opd": "Gabapentin", "cop": 2, "exp": "Ethosuximide blocks T-type calcium channels."}) + "\n")
    recs = records("medmcqa", raw=tmp_path)
    assert json.loads(recs[0]["row"]["metadata"])["answer"] == "Ethosuximide"


def test_pubmed_qa_ori_pqal_and_hf_parquet(tmp_path):
    recs = records("pubmed_qa")
    md = json.loads(recs[0]["row"]["metadata"])
    assert md["label"] in ("yes", "no", "maybe") and md["contexts"] and md["pmid"]
    ex = recs[0]["sft"][0]
    assert ex["task"] == "qa_with_context" and ex["response"].lower().startswith(md["label"])
    # the Hugging Face layouts: qiaojin/PubMedQA (context struct) and bigbio_qa (document_id, answer list)
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "pubmed_qa" / "pqa_labeled"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"pubid": 123, "question": "Does aspirin prevent migraine relapse in adolescents?",
         "context": {"contexts": ["We studied 200 adolescents with migraine.", "Relapse was recorded for a year."],
                     "labels": ["METHODS", "RESULTS"], "meshes": ["Aspirin"]},
         "long_answer": "Aspirin lowered relapse modestly.", "final_decision": "maybe"}]), d / "train.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"id": "1", "document_id": "456", "question": "Is statin use linked to lower stroke risk after TIA?",
         "context": "Cohort of 900 patients after transient ischaemic attack followed for two years.",
         "answer": ["yes"], "type": "yesno"}]), d / "bigbio.parquet")
    recs = records("pubmed_qa", raw=tmp_path)
    labels = sorted(json.loads(r["row"]["metadata"])["label"] for r in recs)
    assert labels == ["maybe", "yes"]
    pmids = sorted(json.loads(r["row"]["metadata"])["pmid"] for r in recs)
    assert pmids == ["123", "456"]


def test_medquad_empty_answers_never_targets():
    recs, qs = records("medquad"), quarantined("medquad")
    assert len(qs) == 24 and {q["reason"] for q in qs} == {"empty_answer"}
    assert all("3_HerbLeaflets_QA" in q["file"] for q in qs)
    assert all(q["location"].startswith("QAPair") for q in qs)
    assert all("HerbLeaflets" not in r["row"]["doc_id"] and r["sft"][0]["response"] for r in recs)
    assert not any("3_HerbLeaflets_QA" in json.loads(r["row"]["metadata"]).get("collection", "") for r in recs)


def test_medical_meadow_alpaca_and_lavita():
    recs, qs = records("medical_meadow"), quarantined("medical_meadow")
    cols = {json.loads(r["row"]["metadata"])["collection"] for r in recs}
    assert cols == {"medalpaca__medical_meadow_medical_flashcards", "medalpaca__medical_meadow_wikidoc", "lavita__MedQuAD"}
    assert len(qs) == 5 and {q["reason"] for q in qs} == {"empty_answer"}


def test_openstax_txt_and_cnxml():
    recs = records("openstax")
    cnxml = [r for r in recs if r["row"]["doc_id"] and "index.cnxml" in json.loads(r["row"]["metadata"]).get("group", "")]
    txt = [r for r in recs if r not in cnxml]
    assert len(cnxml) == 60 and len(txt) == 25
    t = cnxml[0]["row"]["text"]
    assert "<" not in t and "para" not in t  # no markup
    assert "## Worked Example" in t  # section titles kept
    assert "labelled diagram" not in t and "chapter review for practice" not in t  # captions, footnotes dropped
    md = json.loads(cnxml[0]["row"]["metadata"])
    assert md["book"] == "Foundations of Reasoning"  # from collections/*.collection.xml
    assert {ex["task"] for r in cnxml for ex in r["sft"]} >= {"explain_concept", "write_section"}
    assert all(len(r["row"]["text"]) <= 2600 for r in txt)  # ~txt_chunk_chars
    assert {ex["task"] for r in txt for ex in r["sft"]} == {"continue_textbook"}


def test_openstax_hf_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "openstax" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"text": "Momentum is mass times velocity. It is conserved in collisions. "
                                                  "A worked example uses two carts on a track. The total stays the same."}]),
                   d / "train-00000.parquet")
    recs = records("openstax", raw=tmp_path)
    assert len(recs) == 1 and recs[0]["sft"][0]["task"] == "continue_textbook"


def test_climate_fever_jsonl_and_parquet(tmp_path):
    recs = records("climate_fever")
    md = json.loads(recs[0]["row"]["metadata"])
    assert md["label"] in ("SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO", "DISPUTED") and len(md["evidence"]) == 5
    ex = recs[0]["sft"][0]
    assert ex["task"] == "claim_verification" and ex["response"].split(".")[0] in (
        "Supported", "Refuted", "Not enough information", "Disputed")
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "climate_fever" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"claim_id": "7", "claim": "Sea levels are falling along every coast.", "claim_label": 1,
                                          "evidences": [{"evidence_id": "x:1", "evidence_label": 1, "article": "Sea level rise",
                                                         "evidence": "Global mean sea level rose about 20 cm since 1900.",
                                                         "entropy": 0.0, "votes": ["REFUTES"]}]}]), d / "test.parquet")
    recs = records("climate_fever", raw=tmp_path)
    md = json.loads(recs[0]["row"]["metadata"])
    assert md["label"] == "REFUTES" and md["evidence"][0]["label"] == "REFUTES"


# ---- damaged inputs ----
def _reasons(source):
    return sorted((q["file"].split("/")[-1], q["location"].split(" (")[0], q["reason"]) for q in quarantined(source, DAMAGED))


def test_damaged_xml_truncated_binary_empty():
    qs = quarantined("medquad", DAMAGED)
    by_file = {q["file"].split("/")[-1]: q["reason"] for q in qs}
    assert by_file == {"0000001.xml": "malformed_xml", "0000002.xml": "unknown_format", "0000003.xml": "empty_file"}
    assert len(records("medquad", DAMAGED)) == 1  # the good file beside them is read
    assert all(q["location"] and q["source"] == "medquad" for q in qs)


def test_damaged_jsonl_bad_line_and_bytes():
    assert _reasons("climate_fever") == [("climate-fever.jsonl", "line 2", "malformed_json"),
                                         ("climate-fever.jsonl", "line 4", "not_utf8")]
    assert len(records("climate_fever", DAMAGED)) == 3


def test_damaged_tsv_columns_bytes_empty():
    assert _reasons("iam") == [("dev.txt", "file", "empty_file"), ("train.txt", "line 2", "wrong_column_count"),
                               ("train.txt", "line 3", "wrong_column_count"), ("train.txt", "line 4", "not_utf8"),
                               ("train.txt", "line 5", "empty_text")]
    assert len(records("iam", DAMAGED)) == 1


def test_damaged_csv_wrong_column_count():
    assert _reasons("debatesum") == [("debateall.csv", "line 3", "wrong_column_count")]
    assert len(records("debatesum", DAMAGED)) == 2


def test_damaged_whole_files():
    assert [r[2] for r in _reasons("pubmed_qa")] == ["not_utf8"]  # PNG bytes where JSON should be
    assert [r[2] for r in _reasons("medmcqa")] == ["malformed_parquet"]
    assert [r[2] for r in _reasons("openstax")] == ["malformed_xml"]


def test_unexpected_reader_error_is_quarantined(tmp_path, monkeypatch):
    """A reader that fails in an unforeseen way costs that file (quarantined, counted), not the run."""
    import pipeline.sources.climate_fever as cf

    def broken(*a, **k):
        raise RuntimeError("disk went away")
        yield  # a generator, like the real one
    monkeypatch.setattr(cf, "iter_jsonl", broken)
    p = tmp_path / "x.jsonl"
    p.write_text('{"claim_id": "1", "claim": "a claim text that is long enough", "claim_label": "SUPPORTS"}\n')
    evs = list(file_events(BUILTIN["climate_fever"], str(p), "climate_fever/x.jsonl", Opts()))
    assert [k for k, _ in evs] == ["q", "f"]
    assert evs[0][1]["reason"] == "reader_error" and "disk went away" in evs[0][1]["snippet"]


def test_docs_table_is_the_registry():
    from pipeline.sources import sources_table
    from ._prepare_helpers import ROOT
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = doc.split("<!-- sources-table:start -->\n", 1)[1].split("\n<!-- sources-table:end -->", 1)[0]
    assert block == sources_table(), "docs/ARCHITECTURE.md's source table is stale: regenerate it (see the text above it)"
