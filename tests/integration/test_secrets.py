"""No credential anywhere on disk or in a process listing (issue 18.1).

One real run of the pipeline to s3:// on the SeaweedFS server, with AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY in its environment and one domain failing (fault injection), in a subprocess
whose Ray keeps its session files under a directory of this test (RAY_TMPDIR). Afterwards the access
key and the secret key are searched for in: every object under the output prefix, every file of the
Ray session (logs of the raylet, GCS, runtime-env agent, workers, ...), the run's console output, and
the command lines of every process, sampled while the run was going.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _command_lines() -> list[str]:
    import psutil
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            out.append(" ".join(p.info["cmdline"] or []))
        except psutil.Error:
            continue
    return out


@pytest.fixture
def ray_tmp():
    """Short, under /tmp: Ray's socket paths (<temp>/ray/session_<time>_<pid>/sockets/plasma_store) must
    stay under 108 characters, which pytest's tmp_path does not leave room for."""
    d = Path(tempfile.mkdtemp(prefix="sec-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_no_credential_in_output_ray_logs_console_or_ps(s3_server, ray_tmp):
    bucket = s3_server.make_bucket()
    uri = f"s3://{bucket}/secrets-run"
    env = {**os.environ, **s3_server.env(), "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1",
           "DOMAIN_ADAPTERS_FAULTS": "ecology:raise"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline", "run", "--config", "configs/demo.yaml", "--output", uri,
           "--domains", "debate,ecology", "--set", "train.max_steps=4", "--set", "train.eval_every=2",
           "--set", "train.checkpoint_every=2", "--set", "model.tiny.pretrain_steps=5",
           "--set", "data.max_docs_per_source=30", "--set", "data.max_sft_per_domain=40",
           "--set", "resources.num_cpus=2", "--set", "train.eval_matrix=false"]
    listings: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            listings.extend(_command_lines())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        console, _ = proc.communicate(timeout=1500)
    finally:
        stop.set()
        sampler.join()
        proc.kill()
    assert proc.returncode != 0, "a domain failed: the run must not exit 0"
    secrets = {"secret key": s3_server.secret_key, "access key": s3_server.access_key}

    # the run really trained and wrote to S3, and the failing domain is recorded
    keys = s3_server.list_keys(bucket, "secrets-run/")
    assert "secrets-run/adapters/debate/adapter_model.safetensors" in keys, console[-3000:]
    assert "secrets-run/runs/demo/domains/ecology.json" in keys

    hits = []
    c = s3_server.client()
    for k in keys:
        body = c.get_object(Bucket=bucket, Key=k)["Body"].read()
        hits += [f"s3 object {k}: {name}" for name, v in secrets.items() if v.encode() in body]
    sessions = [p for p in ray_tmp.rglob("*") if p.is_file()]
    assert any("runtime_env" in p.name for p in sessions), "the Ray session files were not where expected"
    for p in sessions:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        hits += [f"ray file {p.relative_to(ray_tmp)}: {name}" for name, v in secrets.items() if v.encode() in data]
    hits += [f"console: {name}" for name, v in secrets.items() if v in console]
    assert listings, "no process listing was sampled"
    hits += [f"ps: {name} in {line[:80]}" for line in listings for name, v in secrets.items() if v in line]
    assert not hits, "credentials found:\n" + "\n".join(hits[:20])
