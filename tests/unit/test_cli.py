"""The CLI's exit status and messages for user errors (exit 2, one line, the right fix), failed domains
(exit 1, causes last), and what `--help` says. In-process `main()`; no Ray is started by these cases."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pipeline.cli import EXIT_STATUS, _verdict, main
from pipeline.config import load_config
from pipeline.raycluster import join_address, normalize_ray_address

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")


def run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out.splitlines(), cap.err.splitlines()


def errors(err: list[str]) -> list[str]:
    return [ln for ln in err if ln.startswith("error:")]


def test_help_documents_the_exit_status(capsys):
    for argv in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert EXIT_STATUS in out and "130  interrupted by Ctrl-C" in out
        assert "--verbose" in out or argv == ["--help"]
    readme = (ROOT / "README.md").read_text()
    for code in ("| 0 |", "| 1 |", "| 2 |", "| 130 |"):
        assert code in readme, f"README lacks the exit status row {code}"


def test_train_before_any_prepare_is_one_line_with_the_fix(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "train", "--config", DEMO, "--output", str(out))
    assert rc == 2
    assert errors(err) == [f"error: no prepared data under {out}/data: run "
                           f"`adapters prepare --config {DEMO} --output {out}` first"]
    assert not any("Traceback" in ln for ln in err)


def test_train_after_a_prepare_that_produced_nothing(tmp_path, capsys):
    """A real prepare over an empty raw directory (missing sources allowed) finishes with no SFT data."""
    out, raw = tmp_path / "out", tmp_path / "raw"
    raw.mkdir()
    rc, _, _ = run(capsys, "prepare", "--config", DEMO, "--output", str(out), "--raw-dir", str(raw),
                   "--set", "data.allow_missing=true")
    assert rc == 0 and (out / "data" / "_SUCCESS").is_file()
    rc, _, err = run(capsys, "train", "--config", DEMO, "--output", str(out), "--domains", "debate,ecology")
    assert rc == 2
    (line,) = errors(err)
    assert line.startswith("error: prepare produced no SFT data for debate, ecology (debate: no records")
    assert "adapters download" in line and f"`adapters prepare --config {DEMO} --output {out}` again" in line
    assert "first" not in line   # not "run prepare first": it ran


def test_train_after_an_interrupted_prepare(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "data" / "_work" / "sources").mkdir(parents=True)
    (out / "data" / "_work" / "sources" / "iam.json").write_text(json.dumps({"fingerprint": "x"}))
    rc, _, err = run(capsys, "train", "--config", DEMO, "--output", str(out))
    assert rc == 2
    assert errors(err) == [f"error: prepare did not finish (interrupted): run "
                           f"`adapters prepare --config {DEMO} --output {out}` again; it resumes"]


@pytest.mark.parametrize("sets, message", [
    (["domains=[debate,astrology]"], f"error: invalid config ({DEMO}): domains names ['astrology'], which no source provides"),
    (["data.sources=[iam]", "domains=[medicine]"], f"error: invalid config ({DEMO}): domain 'medicine' has none of its sources"),
    (["train.no_such_key=1"], "error: "),
    (["train.max_steps=-3"], "error: "),
])
def test_config_and_domain_errors_exit_2_before_anything_runs(tmp_path, capsys, sets, message):
    argv = ["run", "--config", DEMO, "--output", str(tmp_path / "out")]
    for s in sets:
        argv += ["--set", s]
    rc, _, err = run(capsys, *argv)
    assert rc == 2
    assert len(errors(err)) == 1 and errors(err)[0].startswith(message), err
    assert not (tmp_path / "out").exists()   # nothing ran, nothing written


def test_failed_domains_are_listed_last_with_their_cause(capsys, tmp_path):
    cfg = load_config(DEMO, output=str(tmp_path))
    results = {"debate": {"status": "finished"}, "medicine": {"status": "finished", "skipped": True},
               "ecology": {"status": "failed", "error": "RuntimeError: injected failure\nTraceback (most recent ..."},
               "education": {"status": "skipped", "error": "no SFT data for domain education (...)"}}
    from pipeline.logs import Console
    console = Console(False, sys.stdout, sys.stderr)   # no worker lines: it settles after its quiet time
    assert _verdict({"debate": {"status": "finished"}, "medicine": {"status": "finished", "skipped": True}}, cfg, None,
                    console) == 0
    assert _verdict(results, cfg, None, console) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: 2 of 4 domain(s) did not finish:"
    assert err[1].split() == ["ecology", "failed:", "RuntimeError:", "injected", "failure"]
    assert err[2].split()[:3] == ["education", "skipped:", "no"]
    assert err[3].strip().startswith("details: `adapters status --output")
    # a failed evaluation (train finished, or `adapters eval` alone): exit 1, its cause last, the command to re-run it
    from types import SimpleNamespace
    args = SimpleNamespace(config=DEMO)
    for res in ({"debate": {"status": "finished"}}, None):
        assert _verdict(res, cfg, args, console, "OutOfMemoryError: CUDA out of memory\nTraceback ...") == 1
        err = capsys.readouterr().err.splitlines()
        assert err == ["error: the evaluation failed: OutOfMemoryError: CUDA out of memory",
                       f"  details: the log file named above; `adapters eval --config {DEMO} --output {cfg.output}` "
                       "runs the evaluation again"]


def test_ray_address_local_means_a_local_ray(monkeypatch, tmp_path):
    cfg = load_config(DEMO, output=str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    normalize_ray_address(cfg)
    assert "RAY_ADDRESS" not in os.environ and join_address(cfg) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert join_address(cfg) == "10.0.0.1:6379"
    cfg.resources.ray_address = "local"   # the config's 'local' wins over the environment's address
    normalize_ray_address(cfg)
    assert join_address(cfg) is None and "RAY_ADDRESS" not in os.environ
    assert join_address(cfg, {"RAY_ADDRESS": "local"}) is None


def test_each_commands_help_says_what_it_does_and_lists_only_its_flags(capsys):
    seen = {}
    for cmd in ("download", "prepare", "train", "eval", "report", "run", "doctor", "status", "generate", "serve"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        desc = out.split("\n\n")[1].strip()      # usage, then the description
        assert not desc.startswith(("options:", "positional")) and desc.endswith("."), (cmd, desc)
        seen[cmd] = out
    assert "--raw-dir" in seen["prepare"] and "--raw-dir" not in seen["train"] and "--raw-dir" not in seen["status"]
    assert "--raw-dir" not in seen["report"] and "--domains" not in seen["download"]
    assert "--raw-dir" not in seen["eval"] and "--domains" in seen["eval"] and "--set" in seen["eval"]
    assert "no evaluation (that is eval)" in seen["train"] and "train, eval and report" in seen["run"]
    assert "--port" in seen["serve"] and "--max-batch-size" in seen["serve"]


def test_report_without_config_reads_the_settings_the_run_stored(tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(capsys, "report", "--output", str(out))
    assert rc == 2 and "pass --config with the run's YAML" in errors(err)[0]
    cfg = load_config(DEMO, output=str(out), sets=["run_name=stored"])
    out.mkdir()
    (out / "runs" / "stored").mkdir(parents=True)
    (out / "runs" / "stored" / "config.json").write_text(json.dumps(cfg.redacted()))
    rc, _, err = run(capsys, "report", "--output", str(out))
    assert rc == 0, err
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["run_name"] == "stored" and summary["reproducibility"]["config"]["model"]["base"] == "tiny"


def test_eval_before_any_training_is_one_line_with_the_fix(tmp_path, capsys):
    """`adapters eval` with prepared data but no finished adapter: exit 2, nothing ran, the stage recorded."""
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    from fixtures_train import write_sft
    from pipeline.storage import Store
    out = tmp_path / "out"
    write_sft(Store(str(out)), domains=["debate"], n=(8, 4, 4))
    rc, _, err = run(capsys, "eval", "--config", DEMO, "--output", str(out), "--domains", "debate")
    assert rc == 2 and not any("Traceback" in ln for ln in err)
    assert errors(err) == [f"error: no finished adapter of debate under {out}/adapters: run `adapters train --config "
                           f"{DEMO} --output {out}` first (`adapters status` shows each domain's state)"]
    assert not (out / "eval").exists()
    assert json.loads((out / "runs" / "demo" / "stages" / "eval.json").read_text())["state"] == "failed"
