"""prepare over ../shared/data/real (real public samples, laid out as a raw dir) when it exists.
Counts checked by hand from the files: 1,000 PubMedQA questions; 1,535 Climate-FEVER claims; 2,983
MedQuAD QA pairs of which 792 (the 12_MPlusHerbsSupplements_QA collection) have empty answers; every
IAM line (11,947 in claims/ and stance/)."""
from __future__ import annotations

import json

import pytest

from pipeline.prepare import run_prepare
from tests.unit._prepare_helpers import make_cfg, ray_local, read_rows  # noqa: F401 (fixture)




@pytest.mark.slow
def test_prepare_real_data(real_data, ray_local, tmp_path):
    iam_lines = sum(1 for f in (real_data / "IAM").rglob("*.txt") for line in f.read_bytes().splitlines() if line.strip())
    out = tmp_path / "out"
    # no caps: every record is read and accounted for; the sources not in the sample are recorded as missing
    m = run_prepare(make_cfg(real_data, out, "data.allow_missing=true"))
    s = m["sources"]
    for name, v in s.items():
        assert v["read"] == v["kept"] + v["quarantined"] + v["deduplicated"] + v["capped"], name
        assert v["capped"] == 0
    assert s["pubmed_qa"]["read"] == 1000 and s["pubmed_qa"]["quarantined"] == 0
    assert s["climate_fever"]["read"] == 1535 and s["climate_fever"]["quarantined"] == 0
    assert s["medquad"]["read"] == 2983
    assert s["medquad"]["quarantined_by_reason"] == {"empty_answer": 792}
    assert s["iam"]["read"] == iam_lines == 11947
    for name in ("debatesum", "opencaselist", "ddo", "medmcqa", "medical_meadow"):
        assert s[name]["status"] == "missing"
    # empty-answer pairs are never QA targets
    q = read_rows(out, "data/quarantine/medquad/*.parquet")
    assert all("12_MPlusHerbsSupplements_QA" in r["file"] for r in q)
    sft = read_rows(out, "data/sft/medicine/*/*.parquet")
    med = [r for r in sft if r["source"] == "medquad"]
    assert med and all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip() for r in med)
    corpus = read_rows(out, "data/corpus/medicine/medquad-*.parquet")
    assert not any("MPlusHerbsSupplements" in r["url"] or "12_MPlus" in json.loads(r["metadata"]).get("collection", "") for r in corpus)
    # CNXML: no markup in the text, section titles kept
    ox = read_rows(out, "data/corpus/education/openstax-*.parquet")
    assert ox and not any("<para" in r["text"] or "<term" in r["text"] for r in ox)
    assert any("\n## " in r["text"] for r in ox)
    assert all(json.loads(r["metadata"])["book"] for r in ox)
    for dm in ("debate", "medicine", "education", "ecology"):
        d = m["domains"][dm]
        assert d["status"] == "ok" and all(d["sft_rows"][k] > 0 for k in ("train", "val", "test")), dm
