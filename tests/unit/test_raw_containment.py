"""Hostile raw directories: symbolic links that leave the raw dir are refused (quarantined as
outside_raw_dir, never opened, a linked folder never walked), links inside it are fine; oversized
records and whole-file documents are quarantined before anything is built from them."""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

from pipeline import download as dl
from pipeline.config import Config
from pipeline.prepare import run_prepare
from pipeline.sources import BUILTIN

from ._prepare_helpers import RAW, make_cfg, read_rows

SECRET = "OUTSIDE-THE-RAW-DIR-do-not-read"


def claim(i: int, text: str) -> str:
    return json.dumps({"claim_id": f"x{i}", "claim": text, "claim_label": "SUPPORTS",
                       "evidences": [{"evidence_id": "e", "evidence_label": "SUPPORTS", "article": "A",
                                      "evidence": "Some evidence sentence for the claim."}]}) + "\n"


@pytest.fixture
def hostile(tmp_path):
    """raw/climate_fever with: a link to a file outside, a link to a folder outside, a link to a file
    elsewhere inside the raw dir, and a loop (a link to its own parent)."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.jsonl").write_text(claim(1, f"{SECRET} file claim that is long enough"))
    (outside / "dir" / "more.jsonl").write_text(claim(2, f"{SECRET} folder claim that is long enough"))
    raw = tmp_path / "raw"
    shutil.copytree(RAW / "climate_fever", raw / "climate_fever")
    (raw / "shared").mkdir()
    (raw / "shared" / "extra.jsonl").write_text(claim(3, "A claim kept elsewhere in the raw directory, linked in."))
    d = raw / "climate_fever" / "dataset"
    os.symlink(outside / "secret.jsonl", d / "secret.jsonl")
    os.symlink(outside / "dir", raw / "climate_fever" / "linked_dir")
    os.symlink(raw / "shared" / "extra.jsonl", d / "extra.jsonl")
    os.symlink(raw / "climate_fever", d / "loop")
    return raw


def test_links_out_of_the_raw_dir_are_refused_links_inside_are_read(hostile, tmp_path):
    listing = BUILTIN["climate_fever"].listing(hostile)
    assert [rel for _, rel in listing.read] == ["climate_fever/dataset/climate-fever.jsonl",
                                                "climate_fever/dataset/extra.jsonl"]
    assert [rel for _, rel in listing.refused] == ["climate_fever/dataset/secret.jsonl", "climate_fever/linked_dir"]
    out = tmp_path / "out"
    m = run_prepare(make_cfg(hostile, out, domains=["ecology"]), use_ray=False)
    s = m["sources"]["climate_fever"]
    fixture_claims = sum(1 for line in (RAW / "climate_fever/dataset/climate-fever.jsonl").open() if line.strip())
    assert s["quarantined_by_reason"] == {"outside_raw_dir": 2} and s["kept"] == fixture_claims + 1  # + the linked-in one
    assert s["read"] == s["kept"] + s["quarantined"] + s["deduplicated"] + s["capped"]
    refused = {f["path"]: f for f in s["files"] if f["status"].startswith("refused")}
    assert set(refused) == {"climate_fever/dataset/secret.jsonl", "climate_fever/linked_dir"}
    assert all(f["sha256"] is None for f in refused.values())  # never opened, not even hashed
    q = read_rows(out, "data/quarantine/climate_fever/*.parquet")
    assert sorted((r["file"], r["reason"]) for r in q) == [("climate_fever/dataset/secret.jsonl", "outside_raw_dir"),
                                                           ("climate_fever/linked_dir", "outside_raw_dir")]
    for p in out.rglob("*"):  # nothing from outside anywhere in the output
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    assert any("linked in" in r["text"] for r in read_rows(out, "data/corpus/ecology/*.parquet"))


def test_a_source_folder_that_is_a_link_out_is_refused(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink(RAW / "climate_fever", raw / "climate_fever")  # the whole folder lives outside
    from pipeline.errors import UserFacingError
    with pytest.raises(UserFacingError, match=r"climate_fever: kept 0 of 1 records.*\n.*outside_raw_dir: 1"):
        run_prepare(make_cfg(raw, tmp_path / "out", domains=["ecology"]), use_ray=False)  # nothing kept: loud
    m = run_prepare(make_cfg(raw, tmp_path / "out", "data.min_kept_share=0", domains=["ecology"]), use_ray=False)
    s = m["sources"]["climate_fever"]
    assert (s["read"], s["kept"], s["quarantined_by_reason"]) == (1, 0, {"outside_raw_dir": 1})
    assert m["domains"]["ecology"]["status"] == "empty"


def test_download_records_a_link_out_without_hashing_it(hostile, tmp_path):
    cfg = Config.model_validate({"output": str(tmp_path / "o"), "model": {"base": "tiny"}, "resources": {"device": "cpu"},
                                 "data": {"raw_dir": str(hostile), "allow_missing": True,
                                          "download": {"offline": True, "only": ["climate_fever"]}}})
    m = dl.run_download(cfg)
    files = {f["path"]: f for f in m["sources"]["climate_fever"]["parts"][0]["files"]}
    assert files["dataset/secret.jsonl"] == {"path": "dataset/secret.jsonl", "refused": "outside_raw_dir"}
    assert files["linked_dir"] == {"path": "linked_dir", "refused": "outside_raw_dir"}
    assert len(files["dataset/extra.jsonl"]["sha256"]) == 64


def test_a_2mb_field_is_too_large_before_anything_is_built(tmp_path):
    raw = tmp_path / "raw"
    (raw / "climate_fever" / "dataset").mkdir(parents=True)
    big = "word " * 400_000  # 2 MB
    (raw / "climate_fever" / "dataset" / "c.jsonl").write_text(
        claim(1, "A normal claim that is long enough to keep.") + claim(2, big) + claim(3, "Another normal claim to keep."))
    (raw / "DebateSum").mkdir()
    with open(raw / "DebateSum" / "debateall.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Full-Document", "Extract", "Abstract"])
        w.writerow(["A full document that is long enough.", "An extract.", "An abstract."])
        w.writerow([big, "extract", "abstract"])
        w.writerow(["Another full document, long enough too.", "Extract two.", "Abstract two."])
    out = tmp_path / "out"
    m = run_prepare(make_cfg(raw, out, "data.allow_missing=true", domains=["ecology", "debate"]), use_ray=False)
    for name, where in (("climate_fever", "line 2"), ("debatesum", "line 3")):
        s = m["sources"][name]
        assert (s["kept"], s["quarantined_by_reason"]) == (2, {"too_large": 1}), name
        q = read_rows(out, f"data/quarantine/{name}/*.parquet")
        assert [(r["location"], r["reason"]) for r in q] == [(where, "too_large")]
        assert len(q[0]["snippet"]) < 300
    assert max(sum(len(m["content"]) for m in r["messages"]) for r in read_rows(out, "data/sft/*/*/*.parquet")) < 10_000
    # the limit is a setting: raised, the same record is kept
    m = run_prepare(make_cfg(raw, tmp_path / "out2", "data.allow_missing=true", "data.max_record_chars=3000000",
                             domains=["ecology"]), use_ray=False)
    assert m["sources"]["climate_fever"]["kept"] == 3


def test_a_whole_file_json_over_the_limit_is_not_loaded(tmp_path):
    raw = tmp_path / "raw"
    (raw / "pubmed_qa" / "data").mkdir(parents=True)
    doc = {str(i): {"QUESTION": "Is it so?", "CONTEXTS": ["x" * 1000], "final_decision": "yes"} for i in range(1500)}
    (raw / "pubmed_qa" / "data" / "ori_pqal.json").write_text(json.dumps(doc))  # ~1.6 MB
    from pipeline.errors import UserFacingError
    with pytest.raises(UserFacingError, match=r"(?s)pubmed_qa: kept 0 of 1.*file_too_large: 1 .*raise data.max_whole_file_mb"):
        run_prepare(make_cfg(raw, tmp_path / "out", "data.allow_missing=true", "data.max_whole_file_mb=1",
                             domains=["medicine"]), use_ray=False)   # the source lost everything: said, with the fix
    m = run_prepare(make_cfg(raw, tmp_path / "out", "data.allow_missing=true", "data.max_whole_file_mb=1",
                             "data.min_kept_share=0", domains=["medicine"]), use_ray=False)
    s = m["sources"]["pubmed_qa"]
    assert (s["read"], s["kept"], s["quarantined_by_reason"]) == (1, 0, {"file_too_large": 1})
    q = read_rows(tmp_path / "out", "data/quarantine/pubmed_qa/*.parquet")
    assert "data.max_whole_file_mb" in q[0]["snippet"]
