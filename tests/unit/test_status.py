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
    assert d["debate"].state == "finished" and "1.2346" in d["debate"].detail()
    assert d["medicine"].state == "failed" and "out of memory" in d["medicine"].cause
    assert d["education"].state == "running" and "ago" in d["education"].detail()
    assert d["ecology"].state == "not started"
    assert st["stages"]["prepare"].state == "finished"
    assert st["stages"]["download"].detail == "1 local, 1 missing"
    assert st["stages"]["report"].state == "not started"


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
    assert "finished" in lines["report"] and "summary.json" in lines["report"]


def test_newest_run_wins_and_config_picks_its_run(tree, tmp_path, capsys):
    put(tree, "runs/old/domains/medicine.json", {"domain": "medicine", "state": "interrupted", "error": "stopped in 2020",
                                                 "updated": "2020-01-01T00:00:00+00:00"})
    assert collect_status(Store(str(tree)), None, None)["domains"]["medicine"].state == "failed"
    assert collect_status(Store(str(tree)), "old", ["medicine"])["domains"]["medicine"].state == "interrupted"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_name: old\noutput: {tree}\ndomains: [medicine, debate]\nmodel: {{base: tiny}}\n"
                   "resources: {device: cpu}\n")
    assert run_status(config_path=str(cfg)) == 0
    out = capsys.readouterr().out
    assert "run: old" in out and "stopped in 2020" in out and "ecology" not in out
    # debate has an adapter but no state in run 'old': the training report still says finished
    assert any(ln.startswith("debate") and "finished" in ln for ln in out.splitlines())


def test_finished_state_without_its_adapter_is_not_finished(tree):
    """The report counts an adapter as finished only when its training report is there; status agrees."""
    (tree / "adapters" / "debate" / "training_report.json").unlink()
    st = collect_status(Store(str(tree)), "demo", ["debate"])["domains"]["debate"]
    assert st.state == "not started" and "training_report.json is gone" in st.cause


def test_empty_incomplete_and_missing_outputs(tmp_path, capsys):
    assert run_status(output=str(tmp_path / "nothing")) == 1
    out = tmp_path / "o"
    put(out, "data/manifest.json", {})
    put(out, "runs/r/domains/debate.json", "{not json")
    assert run_status(output=str(out)) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.strip()}
    assert "interrupted" in lines["prepare"] and "partial output" in lines["prepare"]  # no _SUCCESS: stopped halfway
    assert "unknown" in lines["debate"] and "not valid JSON" in lines["debate"]
    assert "not started" in lines["download"]


def test_domains_filter(tree, capsys):
    assert run_status(output=str(tree), domains=["medicine"]) == 0
    out = capsys.readouterr().out
    assert "medicine" in out and "debate" not in out.split("domain", 1)[1]


# ---- stale, interrupted, partial prepare; the record the CLI keeps; report and status agree ---------------

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from pipeline.status import STALE_AFTER_S, STATES, StageRecord, domain_state, prepare_state  # noqa: E402


def dead_pid() -> int:
    """The PID of a process that has exited (and was reaped) on this host."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def ago(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds, timezone.utc).isoformat()


@pytest.mark.parametrize("pid, host, beat_age, expected", [
    ("dead", "here", STALE_AFTER_S + 60, "stale"),      # driver killed long ago on this host
    ("dead", "here", 5, "running"),                     # heartbeat still within the bound
    ("self", "here", STALE_AFTER_S * 10, "running"),    # driver alive here: a slow step, not a dead run
    (12345, "elsewhere", STALE_AFTER_S + 60, "stale"),  # another host, old heartbeat
    (12345, "elsewhere", 5, "running"),                 # another host, recent heartbeat
    (None, None, STALE_AFTER_S + 60, "stale"),          # no driver recorded: the heartbeat alone decides
])
def test_running_or_stale(tmp_path, pid, host, beat_age, expected):
    pid = {"dead": dead_pid(), "self": os.getpid()}.get(pid, pid)
    host = {"here": socket.gethostname()}.get(host, host)
    put(tmp_path, "runs/r/domains/debate.json", {"domain": "debate", "state": "running", "updated": ago(beat_age + 600),
                                                 "pid": pid, "host": host, "heartbeat": ago(beat_age)})
    st = domain_state(Store(str(tmp_path)), "r", "debate")
    assert st.state == expected, st
    if expected == "stale":
        assert "did not finish" in st.cause and "run the same command again" in st.cause


def test_stale_is_shown_by_the_cli(tmp_path, capsys):
    put(tmp_path, "runs/r/domains/medicine.json", {"domain": "medicine", "state": "running", "pid": dead_pid(),
                                                   "host": socket.gethostname(), "heartbeat": ago(3600)})
    assert run_status(output=str(tmp_path)) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("medicine"))
    assert "stale" in line and "is gone" in line and "running" not in line.split("stale")[0]


def test_interrupted_domain_keeps_its_cause(tmp_path):
    put(tmp_path, "runs/r/domains/ecology.json", {"domain": "ecology", "state": "interrupted", "updated": ago(1),
                                                  "error": "interrupted by Ctrl-C at step 12"})
    st = domain_state(Store(str(tmp_path)), "r", "ecology")
    assert (st.state, st.cause) == ("interrupted", "interrupted by Ctrl-C at step 12")


def test_prepare_partial_output_is_interrupted_then_finished(tmp_path):
    store = Store(str(tmp_path))
    assert prepare_state(store, None).state == "not started"
    put(tmp_path, "data/_work/sources/iam.json", {"fingerprint": "x"})   # a source done, then the run stopped
    st = prepare_state(store, None)
    assert st.state == "interrupted" and "partial output" in st.detail
    put(tmp_path, "data/_SUCCESS", {"fingerprint": "y"})
    assert prepare_state(store, None).state == "finished"


def test_stage_record_running_then_how_it_ended(tmp_path):
    store = Store(str(tmp_path))
    with StageRecord(store, "r", "prepare", "adapters prepare --config c.yaml"):
        rec = store.read_json("runs/r/stages/prepare.json")
        assert rec["state"] == "running" and rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
        assert rec["heartbeat"] and rec["command"] == "adapters prepare --config c.yaml"
        assert prepare_state(store, "r").state == "running"
    assert store.read_json("runs/r/stages/prepare.json")["state"] == "finished"
    with pytest.raises(KeyboardInterrupt):
        with StageRecord(store, "r", "train", "adapters train"):
            raise KeyboardInterrupt
    assert store.read_json("runs/r/stages/train.json")["state"] == "interrupted"
    with pytest.raises(ValueError):
        with StageRecord(store, "r", "report", "adapters report"):
            raise ValueError("boom")
    rec = store.read_json("runs/r/stages/report.json")
    assert rec["state"] == "failed" and rec["error"] == "ValueError: boom"


def test_prepare_killed_is_stale_with_its_partial_output(tmp_path):
    put(tmp_path, "runs/r/stages/prepare.json", {"stage": "prepare", "state": "running", "pid": dead_pid(),
                                                 "host": socket.gethostname(), "heartbeat": ago(STALE_AFTER_S + 5)})
    put(tmp_path, "data/sft/debate/train/part-0.parquet", "x")
    st = prepare_state(Store(str(tmp_path)), None)
    assert st.state == "stale" and "partial output" in st.detail


def test_report_and_status_agree_on_every_state(tmp_path):
    """Every state word, one domain each; the report's status is the status command's state."""
    from pipeline.config import load_config
    from pipeline.report import build_summary
    root = Path(__file__).resolve().parents[2]
    domains = ["fin", "fail", "skip", "intr", "run", "stale", "nostart", "unk", "empty"]
    out = tmp_path / "out"
    put(out, "adapters/fin/training_report.json", {"status": "finished", "val_loss": 1.0})
    put(out, "runs/demo/domains/fin.json", {"state": "failed", "error": "an older attempt"})  # the report is newer
    put(out, "runs/demo/domains/fail.json", {"state": "failed", "error": "RuntimeError: boom\nTraceback ..."})
    put(out, "runs/demo/domains/skip.json", {"state": "skipped", "error": "no SFT data for domain skip"})
    put(out, "runs/demo/domains/intr.json", {"state": "interrupted", "error": "stopped by Ctrl-C"})
    put(out, "runs/demo/domains/run.json", {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                                            "heartbeat": ago(1)})
    put(out, "runs/demo/domains/stale.json", {"state": "running", "pid": dead_pid(), "host": socket.gethostname(),
                                              "heartbeat": ago(STALE_AFTER_S + 1)})
    put(out, "runs/demo/domains/unk.json", "{not json")
    put(out, "data/manifest.json", {"domains": {"empty": {"status": "empty", "reason": "no records"}}})
    cfg = load_config(root / "configs" / "demo.yaml", output=str(out))
    cfg = cfg.model_copy(update={"domains": domains})   # invented domain names, one per state word
    report = build_summary(cfg, Store(str(out)))["domains"]
    status = collect_status(Store(str(out)), "demo", domains)["domains"]
    assert {d: report[d]["status"] for d in domains} == {d: status[d].state for d in domains}
    assert [status[d].state for d in domains] == ["finished", "failed", "skipped", "interrupted", "running", "stale",
                                                  "not started", "unknown", "skipped"]
    assert set(s.state for s in status.values()) == set(STATES)
    assert report["fail"]["cause"].startswith("RuntimeError: boom") and status["fail"].detail() == "RuntimeError: boom"


def test_status_without_config_lists_custom_domains_from_the_manifest(tmp_path, capsys):
    """A custom source's domain, prepared but not trained yet: `adapters status --output` lists it (with
    --config it always did); a custom domain's damaged report does not crash the table either."""
    out = tmp_path / "out"
    put(out, "data/_SUCCESS", "")
    put(out, "data/manifest.json", {"domains": {"debate": {}, "law": {"status": "ok"}, "tax": {"status": "ok"}}})
    put(out, "adapters/tax/training_report.json", {"status": "finished", "val_loss": "not a number"})
    assert run_status(output=str(out)) == 0
    lines = capsys.readouterr().out.splitlines()
    law = [ln for ln in lines if ln.startswith("law ")]
    tax = [ln for ln in lines if ln.startswith("tax ")]
    assert law and "not started" in law[0]
    assert tax and "finished" in tax[0] and "val loss ?" in tax[0]


def test_eval_stage_state(tree, capsys):
    """eval/matrix.json is the eval stage's output; its record wins when a later attempt did not finish."""
    store = Store(str(tree))
    assert collect_status(store, None, None)["stages"]["eval"].state == "not started"
    put(tree, "eval/matrix.json", {"models": ["base"], "datasets": ["debate", "medicine"]})
    ev = collect_status(store, None, None)["stages"]["eval"]
    assert ev.state == "finished" and "1 model(s) on 2 test set(s)" in ev.detail
    assert "not evaluated yet: debate (`adapters eval` evaluates them)" in ev.detail   # debate finished since
    put(tree, "eval/matrix.json", {"models": ["base", "debate"], "datasets": ["debate", "medicine"]})
    assert "not evaluated" not in collect_status(store, None, None)["stages"]["eval"].detail
    put(tree, "runs/demo/stages/eval.json", {"stage": "eval", "state": "failed", "updated": now(),
                                             "error": "OutOfMemoryError: CUDA out of memory\nmore"})
    ev = collect_status(store, None, None)["stages"]["eval"]
    assert (ev.state, ev.detail) == ("failed", "OutOfMemoryError: CUDA out of memory")
    assert run_status(output=str(tree)) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("eval ")]
    assert len(lines) == 1 and "failed" in lines[0]
    put(tree, "eval/matrix.json", "{broken")
    put(tree, "runs/demo/stages/eval.json", {"stage": "eval", "state": "finished", "updated": now()})
    assert collect_status(store, None, None)["stages"]["eval"].state == "unknown"
