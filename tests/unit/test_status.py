"""adapters status over fake output trees holding each state."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline.status import collect_status, run_status
from pipeline.storage import Store

pytestmark = pytest.mark.timeout(60)


def put(root: Path, rel: str, obj) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


@pytest.fixture
def tree(tmp_path) -> Path:
    out = tmp_path / "out"
    put(out, "data/_SUCCESS", "")
    put(out, "data/manifest.json", {"domains": {"debate": {}, "medicine": {}, "education": {}, "ecology": {}}})
    put(out, "data/download_manifest.json", {"sources": {"iam": {"status": "local"}, "ddo": {"status": "missing"}}})
    put(out, "runs/demo/domains/debate.json", {"domain": "debate", "state": "finished", "updated": now(),
                                               "val_loss": 1.23456, "adapter_uri": str(out / "adapters/debate")})
    put(out, "adapters/debate/training_report.json", {"val_loss": 1.23456, "status": "finished"})
    put(out, "runs/demo/domains/medicine.json", {"domain": "medicine", "state": "failed", "updated": now(),
                                                 "error": "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"})
    put(out, "runs/demo/domains/education.json", {"domain": "education", "state": "running", "updated": now()})
    return out


def test_each_state_from_the_tree(tree):
    st = collect_status(Store(str(tree)), None, None)
    d = st["domains"]
    assert d["debate"]["state"] == "finished" and "1.2346" in d["debate"]["detail"]
    assert d["medicine"]["state"] == "failed" and "out of memory" in d["medicine"]["detail"]
    assert d["education"]["state"] == "running" and "ago" in d["education"]["detail"]
    assert d["ecology"]["state"] == "not started"
    assert st["stages"]["prepare"][0] == "finished"
    assert st["stages"]["download"][1] == "1 local, 1 missing"
    assert st["stages"]["report"][0] == "not written"


def test_output_only_cli_prints_table_and_finds_extra_domains(tree, capsys):
    put(tree, "adapters/law/training_report.json", {"val_loss": 2.0})      # a report without a state file
    put(tree, "report/summary.json", {})
    assert run_status(output=str(tree)) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert "finished" in lines["debate"] and "1.2346" in lines["debate"]
    assert "failed" in lines["medicine"] and "CUDA out of memory" in lines["medicine"]
    assert "running" in lines["education"]
    assert "not started" in lines["ecology"]
    assert "finished" in lines["law"] and "2.0000" in lines["law"]
    assert "written" in lines["report"]


def test_newest_run_wins_and_config_picks_its_run(tree, tmp_path, capsys):
    put(tree, "runs/old/domains/medicine.json", {"domain": "medicine", "state": "finished", "val_loss": 9.0,
                                                 "updated": "2020-01-01T00:00:00+00:00"})
    assert collect_status(Store(str(tree)), None, None)["domains"]["medicine"]["state"] == "failed"
    assert collect_status(Store(str(tree)), "old", ["medicine"])["domains"]["medicine"]["state"] == "finished"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_name: old\noutput: {tree}\ndomains: [medicine, debate]\nmodel: {{base: tiny}}\n"
                   "resources: {device: cpu}\n")
    assert run_status(config_path=str(cfg)) == 0
    out = capsys.readouterr().out
    assert "run: old" in out and "9.0000" in out and "ecology" not in out
    # debate has an adapter but no state in run 'old': the training report still says finished
    assert any(ln.startswith("debate") and "finished" in ln for ln in out.splitlines())


def test_empty_incomplete_and_missing_outputs(tmp_path, capsys):
    assert run_status(output=str(tmp_path / "nothing")) == 1
    out = tmp_path / "o"
    put(out, "data/manifest.json", {})
    put(out, "runs/r/domains/debate.json", "{not json")
    assert run_status(output=str(out)) == 0
    text = capsys.readouterr().out
    assert "incomplete" in text and "not valid JSON" in text and "not run" in text


def test_domains_filter(tree, capsys):
    assert run_status(output=str(tree), domains=["medicine"]) == 0
    out = capsys.readouterr().out
    assert "medicine" in out and "debate" not in out.split("domain", 1)[1]
