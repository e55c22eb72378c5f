"""Issue 7, item 2: the driver killed (SIGKILL, no clean-up) after a checkpoint, then the same command
run again with the same output and run name -> it resumes from that checkpoint; a new run name
starts fresh. Real processes, a real local Ray, the demo config (one domain, few steps)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

SETS = ["--set", "train.max_steps=40", "--set", "train.checkpoint_every=10", "--set", "train.eval_every=20",
        "--set", "model.tiny.pretrain_steps=20", "--set", "eval.enabled=false"]


def _cmd(stage: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", stage, "--config", str(ROOT / "configs/demo.yaml"),
            "--output", str(out), "--domains", "debate", *SETS, *extra]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    return env


def _checkpoint_steps(out: Path, run: str) -> list[int]:
    steps = []
    for f in (out / "runs" / run / "train" / "debate").glob("checkpoint_*/train_state.json"):
        try:
            steps.append(json.loads(f.read_text())["step"])
        except (OSError, ValueError):
            pass  # being written
    return sorted(steps)


def test_driver_killed_after_checkpoint_resumes_and_new_run_name_starts_fresh(tmp_path):
    out = tmp_path / "out"
    subprocess.run(_cmd("prepare", out), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)

    # 1. start training, kill the whole process group (driver and its local Ray) once two checkpoints exist
    log1 = open(tmp_path / "run1.log", "w")
    p = subprocess.Popen(_cmd("train", out), cwd=ROOT, env=_env(), stdout=log1, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and len(_checkpoint_steps(out, "demo")) < 2 and p.poll() is None:
            time.sleep(1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    steps_before = _checkpoint_steps(out, "demo")
    assert len(steps_before) >= 2, (tmp_path / "run1.log").read_text()[-3000:]
    assert not (out / "adapters/debate/training_report.json").exists(), "killed run must not look finished"

    # 2. the same command again: resumes from a checkpoint of the killed run, not from step 0
    r = subprocess.run(_cmd("train", out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads((out / "adapters/debate/training_report.json").read_text())
    assert rep["status"] == "finished" and rep["steps"] == 40
    assert rep["resumed_from_step"] in steps_before and rep["resumed_from_step"] >= 10, rep["resumed_from_step"]
    assert f"resumed from step {rep['resumed_from_step']}" in r.stdout + r.stderr
    assert rep["val_loss"] < rep["base_val_loss"]

    # 3. a new run name on the same output starts fresh, though checkpoints of run "demo" are there
    #    (the finished adapter is removed first, as a user does to retrain; else it is skipped as done)
    import shutil
    shutil.rmtree(out / "adapters/debate")
    r = subprocess.run(_cmd("train", out, "--set", "run_name=fresh"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    fresh = json.loads((out / "adapters/debate/training_report.json").read_text())
    assert fresh["resumed_from_step"] is None and fresh["steps"] == 40
