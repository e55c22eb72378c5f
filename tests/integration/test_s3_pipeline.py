"""The whole demo pipeline with --output s3://bucket/prefix against the SeaweedFS server.

One run (subprocess: `python -m pipeline run --config configs/demo.yaml --output s3://...`, made
smaller with --set) with a worker crash injected in one domain after its first checkpoint, so:
  - every expected object is in the bucket, and each is read back (JSON parsed, Parquet read);
  - the crashed domain resumed from its checkpoint stored in S3 (training_report.resumed_from_step);
  - no S3 credential appears in any object written, nor in the run's output;
  - a second identical run skips the finished work (idempotent) and leaves the same adapters.
Skipped while the train stage is not in the tree.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest


ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ["debate", "medicine", "education", "ecology"]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.slow


def _train_stage_present() -> bool:
    try:
        from pipeline.train import run_train  # noqa: F401
        from pipeline.prepare import run_prepare  # noqa: F401
    except Exception:
        return False
    return True


def _run(s3_server, uri: str, faults: str = "", timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, **s3_server.env(), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    if faults:
        env["DOMAIN_ADAPTERS_FAULTS"] = faults
    sets = ["train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=2", "train.log_every=2",
            "model.tiny.pretrain_steps=10", "data.max_docs_per_source=60", "data.max_sft_per_domain=80",
            "resources.max_concurrent_trials=2", "resources.cpus_per_trial=1", "resources.num_cpus=2",
            "storage.retries=8"]
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", "configs/demo.yaml", "--output", uri]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "s3_demo_run.log", "a") as f:  # the whole run's output, kept for a look afterwards
        f.write(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}\n")
    return r


def test_demo_run_to_s3_every_object_present_and_readable(s3_server):
    if not _train_stage_present():
        pytest.skip("the train stage (pipeline/train) is not in the tree yet")
    bucket = s3_server.make_bucket()
    prefix = "demo-run"
    (ARTIFACTS / "s3_demo_run.log").unlink(missing_ok=True)
    uri = f"s3://{bucket}/{prefix}"
    t0 = time.monotonic()
    r = _run(s3_server, uri, faults="medicine:crash:5")
    first_s = time.monotonic() - t0
    log_text = r.stdout + r.stderr
    assert r.returncode == 0, log_text[-6000:]
    assert s3_server.secret_key not in log_text

    keys = [k[len(prefix) + 1:] for k in s3_server.list_keys(bucket, prefix + "/")]
    c = s3_server.client()

    def get(rel: str) -> bytes:
        return c.get_object(Bucket=bucket, Key=f"{prefix}/{rel}")["Body"].read()

    must = ["data/manifest.json", "data/_SUCCESS", "eval/matrix.json",
            "report/summary.json", "report/summary.md", "report/summary.html",
            "report/loss_curves.png", "report/perplexity.png", "report/eval_matrix.png"]
    for d in DOMAINS:
        must += [f"adapters/{d}/adapter_config.json", f"adapters/{d}/adapter_model.safetensors",
                 f"adapters/{d}/training_report.json", f"runs/demo/domains/{d}.json"]
    missing = [k for k in must if k not in keys]
    if missing:
        states = {d: get(f"runs/demo/domains/{d}.json").decode()[:2000] for d in DOMAINS
                  if f"runs/demo/domains/{d}.json" in keys}
        pytest.fail(f"missing objects: {missing}\nstates: {json.dumps(states, indent=1)}\n"
                    f"(whole log: {ARTIFACTS / 's3_demo_run.log'})")
    for d in DOMAINS:
        assert any(k.startswith(f"data/corpus/{d}/") and k.endswith(".parquet") for k in keys), d
        for s in ("train", "val", "test"):
            assert any(k.startswith(f"data/sft/{d}/{s}/") and k.endswith(".parquet") for k in keys), (d, s)
        assert any(k.startswith(f"runs/demo/train/{d}/") for k in keys), f"no Ray storage for {d} in S3"
    # read every object back: JSON parses, Parquet reads, nothing holds a credential
    secret = s3_server.secret_key.encode()
    for k in keys:
        body = get(k)
        assert secret not in body and s3_server.access_key.encode() not in body, k
        ray_owned = k.startswith(("runs/demo/train/", "runs/demo/tune/"))  # Ray's own formats: read, not parsed
        try:
            if k.endswith(".json") and not ray_owned:
                json.loads(body)
            elif k.endswith(".parquet"):
                pq.read_table(io.BytesIO(body))
        except Exception as e:
            pytest.fail(f"{k} ({len(body)} bytes) does not read back: {e}")
    summary = json.loads(get("report/summary.json"))
    assert {d: summary["domains"][d]["status"] for d in DOMAINS} == {d: "finished" for d in DOMAINS}
    assert summary["domains"]["debate"]["adapter_uri"] == f"{uri}/adapters/debate"
    assert set(json.loads(get("eval/matrix.json"))["models"]) == {"base", *DOMAINS}
    # the medicine worker died at step 5 and came back from a checkpoint stored in S3 (step 4; or step 3, the
    # evaluation that lowered the val loss, or 2, when Ray had not yet registered the later one: a worker
    # that dies right after reporting loses it)
    med = json.loads(get("adapters/medicine/training_report.json"))
    assert med["resumed_from_step"] in (2, 3, 4) and med["steps"] == 6, med.get("resumed_from_step")
    assert "faults/medicine-crash-5" in " ".join(keys)

    # the same command again: finished work is skipped, adapters untouched
    before = {d: get(f"adapters/{d}/adapter_model.safetensors") for d in DOMAINS}
    t0 = time.monotonic()
    r2 = _run(s3_server, uri)
    second_s = time.monotonic() - t0
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-4000:]
    assert {d: get(f"adapters/{d}/adapter_model.safetensors") for d in DOMAINS} == before
    print(f"\ndemo run to s3://: {first_s:.0f}s ({len(keys)} objects), re-run {second_s:.0f}s")
