"""prepare end to end on the project's fixtures with a local Ray (2 CPUs, started once per module):
caps exact and deterministic, split leak-free and stable, accounting identity, quarantine, idempotent
re-runs, a run killed halfway then re-run, missing sources, domain selection."""
from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from pipeline.errors import UserFacingError
from pipeline.prepare import SPLITS, balanced_quotas, run_prepare, split_of
from pipeline.sources.base import stable_id
from pipeline.storage import Store

from ._prepare_helpers import DAMAGED, RAW, ROOT, all_rows, make_cfg, ray_local, read_rows  # noqa: F401 (fixture)

CAP, SFT_CAP = 50, 120


def test_balanced_quotas_exact_and_even():
    assert balanced_quotas({"a": 10, "b": 100, "c": 100}, 90) == {"a": 10, "b": 40, "c": 40}
    assert balanced_quotas({"a": 10, "b": 100, "c": 100}, 91) == {"a": 10, "b": 41, "c": 40}
    assert balanced_quotas({"a": 5, "b": 3}, 100) == {"a": 5, "b": 3}
    assert balanced_quotas({"a": 5, "b": 3}, None) == {"a": 5, "b": 3}
    for cap in range(1, 60):
        q = balanced_quotas({"x": 7, "y": 30, "z": 0, "w": 12}, cap)
        assert sum(q.values()) == min(cap, 49) and q["z"] == 0


def test_split_is_stable_and_follows_fractions():
    fr = {"train": 0.8, "val": 0.1, "test": 0.1}
    keys = [f"group-{i}" for i in range(20000)]
    a = [split_of(42, k, fr) for k in keys]
    assert a == [split_of(42, k, fr) for k in keys]
    c = Counter(a)
    assert 0.78 < c["train"] / len(keys) < 0.82 and 0.08 < c["val"] / len(keys) < 0.12
    assert a != [split_of(7, k, fr) for k in keys]  # the seed matters
    assert set(split_of(42, k, {"train": 1.0, "val": 0.0, "test": 0.0}) for k in keys[:500]) == {"train"}


# ---- with Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    cfg = make_cfg(RAW, out, f"data.max_docs_per_source={CAP}", f"data.max_sft_per_domain={SFT_CAP}")
    return cfg, out, run_prepare(cfg)


def _sft(out):
    return read_rows(out, "data/sft/*/*/*.parquet")


@pytest.mark.slow
def test_manifest_accounting_and_caps(prepared):
    cfg, out, m = prepared
    assert (out / "data" / "_SUCCESS").is_file() and json.loads((out / "data" / "manifest.json").read_text()) == m
    for name, s in m["sources"].items():
        assert s["status"] == "ok", name
        assert s["read"] == s["kept"] + s["quarantined"] + s["deduplicated"] + s["capped"], name
        assert s["quarantined"] == sum(s["quarantined_by_reason"].values())
        assert s["kept"] <= CAP
        assert all(f["sha256"] is None or len(f["sha256"]) == 64 for f in s["files"])
        corpus = [r for r in read_rows(out, f"data/corpus/*/{name}-*.parquet")]
        assert len(corpus) == s["kept"] and len({r["doc_id"] for r in corpus}) == s["kept"]
        q = read_rows(out, f"data/quarantine/{name}/*.parquet")
        assert Counter(r["reason"] for r in q) == Counter(s["quarantined_by_reason"])
    # every fixture source has more than CAP good records except openstax (85 records) - all capped exactly
    assert all(s["kept"] == CAP for s in m["sources"].values())
    sft = _sft(out)
    per_domain = Counter(r["domain"] for r in sft)
    assert per_domain == {d: min(SFT_CAP, m["domains"][d]["sft_candidates"]) for d in m["domains"]}
    assert per_domain["debate"] == per_domain["medicine"] == SFT_CAP  # exact where there is more than the cap
    # balanced: debate has 4 sources with >= 50 SFT candidates each -> 30 each
    assert Counter(r["source"] for r in sft if r["domain"] == "debate") == {"debatesum": 30, "opencaselist": 30, "iam": 30, "ddo": 30}
    for dm, d in m["domains"].items():
        assert sum(d["sft_rows"].values()) == min(SFT_CAP, d["sft_candidates"]) and d["corpus_rows"] > 0
        assert d["tokens_estimate"]["corpus"] > 0 and all(v >= 0 for v in d["tokens_estimate"]["sft"].values())
        for s in SPLITS:
            assert (out / "data" / "sft" / dm / s).is_dir()


@pytest.mark.slow
def test_split_leak_free(prepared):
    _, out, _ = prepared
    sft = _sft(out)
    for key in ("group", "doc_id", "prompt_response"):
        where = {}
        for r in sft:
            k = str(r["messages"]) if key == "prompt_response" else r[key]
            assert where.setdefault((r["domain"], k), r["split"]) == r["split"], f"{key} crosses splits"
    # no corpus text twice within a domain (exact duplicates removed)
    corpus = read_rows(out, "data/corpus/*/*.parquet")
    from pipeline.sources import norm_key
    keys = [(r["domain"], norm_key(r["text"])) for r in corpus]
    assert len(keys) == len(set(keys))
    assert {r["split"] for r in sft} == set(SPLITS)
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip() for r in sft)


@pytest.mark.slow
def test_same_rows_without_ray_and_other_shard_size(prepared, tmp_path):
    """Caps, dedupe and split do not depend on block layout: in-process and other shard sizes agree."""
    cfg, out, m = prepared
    out2 = tmp_path / "out2"
    cfg2 = make_cfg(RAW, out2, f"data.max_docs_per_source={CAP}", f"data.max_sft_per_domain={SFT_CAP}", "data.rows_per_shard=17")
    m2 = run_prepare(cfg2, use_ray=False)
    a, b = all_rows(out), all_rows(out2)
    key = lambda r: json.dumps(r, sort_keys=True)
    for kind in a:
        assert sorted(map(key, a[kind])) == sorted(map(key, b[kind])), kind
    assert {n: s["kept"] for n, s in m["sources"].items()} == {n: s["kept"] for n, s in m2["sources"].items()}


@pytest.mark.slow
def test_rerun_is_skipped_and_identical(prepared):
    cfg, out, m = prepared
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    rows = all_rows(out)
    m2 = run_prepare(cfg)
    assert m2 == m
    assert {p: p.stat().st_mtime_ns for p in files} == before  # nothing rewritten
    assert all_rows(out) == rows


@pytest.mark.slow
def test_killed_halfway_then_rerun_gives_identical_rows(prepared, tmp_path, monkeypatch):
    cfg, out, _ = prepared
    out2 = tmp_path / "killed"
    cfg2 = make_cfg(RAW, out2, f"data.max_docs_per_source={CAP}", f"data.max_sft_per_domain={SFT_CAP}")
    calls = {"n": 0}
    real = Store.write_table

    class Killed(Exception):
        pass

    def dying(self, rel, table):
        calls["n"] += 1
        if calls["n"] == 9:
            raise Killed("killed while writing " + rel)
        return real(self, rel, table)
    monkeypatch.setattr(Store, "write_table", dying)
    with pytest.raises(Killed):
        run_prepare(cfg2)
    monkeypatch.setattr(Store, "write_table", real)
    assert not (out2 / "data" / "_SUCCESS").exists() and not (out2 / "data" / "manifest.json").exists()
    done_before = sorted(p.name for p in (out2 / "data" / "_work" / "sources").glob("*.json"))
    assert 0 < len(done_before) < 10
    # a stale partial shard from the killed source must not survive the re-run
    run_prepare(cfg2)
    a, b = all_rows(out), all_rows(out2)
    assert a == b
    assert not list(out2.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_only_requested_domains(ray_local, tmp_path):
    out = tmp_path / "eco"
    m = run_prepare(make_cfg(RAW, out, "data.max_docs_per_source=20", domains=["ecology"]))
    assert list(m["sources"]) == ["climate_fever"] and list(m["domains"]) == ["ecology"]
    assert sorted(p.name for p in (out / "data" / "sft").iterdir()) == ["ecology"]


@pytest.mark.slow
def test_missing_source_is_a_clear_error_or_recorded(ray_local, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(RAW / "climate_fever", raw / "climate_fever")
    with pytest.raises(UserFacingError) as e:
        run_prepare(make_cfg(raw, tmp_path / "o1"))
    msg = str(e.value)
    assert "medquad" in msg and "MedQuAD" in msg and "ALLOW_MISSING_DATA" in msg and "climate_fever:" not in msg
    m = run_prepare(make_cfg(raw, tmp_path / "o2", "data.allow_missing=true", "data.max_docs_per_source=10"))
    assert m["sources"]["medquad"]["status"] == "missing" and m["sources"]["climate_fever"]["kept"] == 10
    assert m["domains"]["medicine"]["status"] == "empty" and m["domains"]["ecology"]["status"] == "ok"


@pytest.mark.slow
def test_damaged_inputs_quarantined_and_run_goes_on(ray_local, tmp_path):
    out = tmp_path / "dmg"
    m = run_prepare(make_cfg(DAMAGED, out, "data.allow_missing=true", "data.min_kept_share=0"))
    s = m["sources"]
    reasons = Counter()
    for name, v in s.items():
        assert v["read"] == v["kept"] + v["quarantined"] + v["deduplicated"] + v["capped"]
        reasons.update(v["quarantined_by_reason"])
    assert {"malformed_xml", "unknown_format", "empty_file", "malformed_json", "not_utf8", "wrong_column_count",
            "malformed_parquet", "empty_text"} <= set(reasons)
    q = read_rows(out, "data/quarantine/*/*.parquet")
    assert len(q) == sum(reasons.values()) and all(r["file"] and r["location"] and r["reason"] for r in q)
    assert m["domains"]["education"]["status"] == "empty"  # the only OpenStax input is broken
    assert m["domains"]["ecology"]["status"] == "ok" and (out / "data" / "_SUCCESS").exists()


@pytest.mark.slow
def test_cap_keeps_the_first_records_and_stops_reading(prepared):
    _, out, m = prepared
    cf = m["sources"]["climate_fever"]  # one file of 200 claims: 50 kept, the rest read and counted as capped
    assert (cf["read"], cf["kept"], cf["capped"]) == (200, CAP, 150) and not cf["stopped_early"]
    corpus = read_rows(out, "data/corpus/ecology/climate_fever-*.parquet")
    assert corpus and \
        sorted(r["doc_id"] for r in corpus) == sorted(stable_id("climate_fever", str(i)) for i in range(CAP))
    mq = m["sources"]["medquad"]  # 38 files of 3 pairs: reading stops at the end of the file where the cap is reached
    assert mq["stopped_early"] and mq["capped"] <= 2
    unread = [f for f in mq["files"] if f["sha256"] is None]
    assert unread and all(f["status"].startswith("not read") for f in unread)
    assert mq["read"] < 114


def test_unknown_layout_is_reported_not_guessed(tmp_path):
    """An IAM file outside claims/ and stance/ (other column layouts) is quarantined as unknown_format."""
    raw = tmp_path / "raw"
    (raw / "IAM" / "stance").mkdir(parents=True)
    (raw / "IAM" / "evidence").mkdir(parents=True)
    shutil.copy(RAW / "IAM" / "stance" / "test.txt", raw / "IAM" / "stance" / "test.txt")
    (raw / "IAM" / "evidence" / "train.txt").write_text("a\tb\tc\n")
    m = run_prepare(make_cfg(raw, tmp_path / "out", "data.allow_missing=true", domains=["debate"]), use_ray=False)
    s = m["sources"]["iam"]
    assert s["quarantined_by_reason"] == {"unknown_format": 1} and s["read"] == 15 + 1
    assert any(f["path"] == "IAM/evidence/train.txt" and f["status"].startswith("quarantined") for f in s["files"])
    q = read_rows(tmp_path / "out", "data/quarantine/iam/*.parquet")
    assert [(r["file"], r["reason"]) for r in q] == [("IAM/evidence/train.txt", "unknown_format")]


@pytest.mark.slow
def test_fifth_domain_from_a_custom_jsonl(prepared, tmp_path):
    """configs/custom_example.yaml's own data (fixtures/custom/law.jsonl, domain "law") goes through the
    same accounting, caps, dedupe and split as the built-ins, in Ray; the built-in domains' rows are
    the same as without it."""
    from pipeline.config import load_config
    _, out0, m0 = prepared
    out = tmp_path / "law"
    cfg = load_config(ROOT / "configs" / "custom_example.yaml", output=str(out), environ={},
                      sets=[f"data.max_docs_per_source={CAP}", f"data.max_sft_per_domain={SFT_CAP}",
                            "resources.num_cpus=2"])
    m = run_prepare(cfg)
    s = m["sources"]["harbour_code"]
    assert (s["status"], s["domain"], s["read"], s["quarantined"], s["deduplicated"]) == ("ok", "law", 60, 0, 0)
    assert s["kept"] == CAP and s["capped"] == 10 and s["sft_by_task"] == {"instruction": CAP}
    assert s["files"] == [{"path": "custom/harbour_code/law.jsonl", "size": (ROOT / "fixtures/custom/law.jsonl").stat().st_size,
                           "sha256": s["files"][0]["sha256"], "status": "read"}]
    law = m["domains"]["law"]
    assert law["status"] == "ok" and sum(law["sft_rows"].values()) == CAP and all(law["sft_rows"].values())
    rows = read_rows(out, "data/sft/law/*/*.parquet")
    assert len(rows) == CAP and {(r["domain"], r["source"], r["task"]) for r in rows} == {("law", "harbour_code", "instruction")}
    assert {s_: sum(r["split"] == s_ for r in rows) for s_ in SPLITS} == law["sft_rows"]
    where = {}
    for r in rows:  # a prompt never crosses splits
        assert where.setdefault(r["messages"][0]["content"], r["split"]) == r["split"]
    assert read_rows(out, "data/corpus/law/harbour_code-*.parquet")[0]["license"] == "invented for the project (CC0)"
    for dm in ("debate", "medicine", "education", "ecology"):
        assert read_rows(out, f"data/sft/{dm}/*/*.parquet") == read_rows(out0, f"data/sft/{dm}/*/*.parquet"), dm


def test_a_long_source_logs_how_far_it_is(tmp_path, monkeypatch, caplog):
    """Progress for prepare: a source that reads for longer than PROGRESS_EVERY_S says how many records
    and files it has done (here every record, with the interval at 0)."""
    import logging
    import pipeline.prepare as prepare
    monkeypatch.setattr(prepare, "PROGRESS_EVERY_S", 0.0)
    cfg = make_cfg(RAW, tmp_path / "out", "data.sources=[climate_fever]", domains=["ecology"])
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        m = run_prepare(cfg, use_ray=False)
    lines = [r.getMessage() for r in caplog.records if "records read" in r.getMessage()]
    read = m["sources"]["climate_fever"]["read"]
    assert len(lines) >= read and lines[-1].startswith(f"prepare: climate_fever: {read} records read")
    assert lines[0].startswith("prepare: climate_fever: 0 records read, 0 kept, 0 of 1 files done")
