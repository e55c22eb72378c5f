"""Your own data, end to end: configs/custom_example.yaml adds a fifth domain ("law") from a JSONL file
(fixtures/custom/law.jsonl) through `data.custom_sources`, and the real CLI prepares, trains, evaluates
and reports it like a built-in domain (issue 16 item 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_a_fifth_domain_from_a_jsonl_file_is_trained(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", "configs/custom_example.yaml", "--output", str(out),
           "--domains", "law", "--set", "train.max_steps=12", "--set", "train.eval_every=6",
           "--set", "train.checkpoint_every=6", "--set", "model.tiny.pretrain_steps=30",
           "--set", "eval.generation_samples=4", "--set", "resources.num_cpus=2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    manifest = json.loads((out / "data/manifest.json").read_text())
    law = manifest["sources"]["harbour_code"]
    assert law["domain"] == "law" and law["kept"] > 0 and law["read"] == law["kept"] + law["quarantined"] + \
        law["deduplicated"] + law["capped"]
    assert all(manifest["domains"]["law"]["sft_rows"][s] > 0 for s in ("train", "val", "test"))
    rep = json.loads((out / "adapters/law/training_report.json").read_text())
    assert rep["status"] == "finished" and rep["val_loss"] < rep["base_val_loss"]
    assert (out / "adapters/law/adapter_model.safetensors").is_file()
    summary = json.loads((out / "report/summary.json").read_text())
    assert summary["domains"]["law"]["status"] == "finished"
    matrix = json.loads((out / "eval/matrix.json").read_text())
    assert "law" in matrix["models"] and "law" in matrix["datasets"]
