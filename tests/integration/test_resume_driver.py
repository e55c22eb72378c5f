"""Your own data, and a driver that dies (issues 7 item 2, 16 item 2). configs/custom_example.yaml adds
a fifth domain ("law") from a JSONL file (fixtures/custom/law.jsonl) through `data.custom_sources`:
1. `adapters run` prepares it and starts training; the driver is killed (SIGKILL, no clean-up, with its
   local Ray) once two checkpoints exist (its worker stopped after them by a `hang` fault: Ray's workers
   outlive the kill by seconds and could otherwise finish the run meanwhile);
2. the same command again resumes from one of those checkpoints, not from step 0, and prepares, trains,
   evaluates and reports the custom domain like a built-in one;
3. a new run name on the same output starts fresh.
Real processes, a real local Ray."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.train.faults import FAULTS_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CONFIG = ROOT / "configs/custom_example.yaml"
RUN = "custom_example"   # its run_name
SETS = ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=10", "--set", "train.eval_every=20",
        "--set", "model.tiny.pretrain_steps=30", "--set", "eval.generation_samples=4", "--set", "resources.num_cpus=2"]


def _cmd(stage: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", stage, "--config", str(CONFIG), "--output", str(out),
            "--domains", "law", *SETS, *extra]


def _env(faults: str = "") -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    env.pop(FAULTS_ENV, None)
    if faults:
        env[FAULTS_ENV] = faults
    return env


def _checkpoint_steps(out: Path, run: str) -> list[int]:
    steps = []
    for f in (out / "runs" / run / "train" / "law").glob("checkpoint_*/train_state.json"):
        try:
            steps.append(json.loads(f.read_text())["step"])
        except (OSError, ValueError):
            pass  # being written
    return sorted(steps)


def test_custom_domain_driver_killed_after_checkpoint_resumes_and_new_run_name_starts_fresh(tmp_path):
    out = tmp_path / "out"

    # 1. prepare and start training, kill the whole process group (driver and its local Ray) once two
    #    checkpoints exist
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(_cmd("run", out), cwd=ROOT, env=_env("law:hang:21"), stdout=log1, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.time() + 400
    run_procs: list = []
    try:
        while time.time() < deadline and len(_checkpoint_steps(out, RUN)) < 2 and p.poll() is None:
            time.sleep(1)
        run_procs = psutil.Process(p.pid).children(recursive=True)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    # Ray's workers are in process groups of their own: the training worker outlives the group's SIGKILL until
    # it finds its raylet gone (about 3 s); the checkpoints of the killed run are those there once all its
    # processes have ended
    psutil.wait_procs(run_procs, timeout=60)
    steps_before = _checkpoint_steps(out, RUN)
    assert len(steps_before) >= 2 and steps_before[-1] == 20, (tmp_path / "run1.log").read_text()[-3000:]
    assert not (out / "adapters/law/training_report.json").exists(), "killed run must not look finished"

    # 2. the same command again: resumes from a checkpoint of the killed run, not from step 0
    r = subprocess.run(_cmd("run", out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "adapters/law/training_report.json").read_text())
    assert rep["status"] == "finished" and rep["steps"] == 40
    assert rep["resumed_from_step"] == 20, rep["resumed_from_step"]   # the newest checkpoint of the killed run
    assert f"resumed from step {rep['resumed_from_step']}" in r.stdout + r.stderr
    assert rep["val_loss"] < rep["base_val_loss"]
    assert (out / "adapters/law/adapter_model.safetensors").is_file()
    #    the custom source went through prepare like a built-in one, and the domain is in the report
    manifest = json.loads((out / "data/manifest.json").read_text())
    law = manifest["sources"]["harbour_code"]
    assert law["domain"] == "law" and law["kept"] > 0 and law["read"] == law["kept"] + law["quarantined"] + \
        law["deduplicated"] + law["capped"]
    assert all(manifest["domains"]["law"]["sft_rows"][s] > 0 for s in ("train", "val", "test"))
    summary = json.loads((out / "report/summary.json").read_text())
    assert summary["domains"]["law"]["status"] == "finished"
    matrix = json.loads((out / "eval/matrix.json").read_text())
    assert "law" in matrix["models"] and "law" in matrix["datasets"]

    # 3. a new run name on the same output starts fresh, though checkpoints of the first run are there
    #    (the finished adapter is removed first, as a user does to retrain; else it is skipped as done)
    shutil.rmtree(out / "adapters/law")
    r = subprocess.run(_cmd("train", out, "--set", "run_name=fresh", "--set", "eval.enabled=false"), cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fresh = json.loads((out / "adapters/law/training_report.json").read_text())
    assert fresh["resumed_from_step"] is None and fresh["steps"] == 40
