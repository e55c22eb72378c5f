"""Job submission against a real local Ray cluster with token authentication (docs/CLUSTER.md's steps).

The ``ray_head`` fixture (tests/fixtures_ray.py) generates a token into a temporary HOME, starts
``ray start --head`` on 127.0.0.1 with the dashboard on a free port, and stops exactly that
cluster's processes afterwards, also when a test fails. Every submit here goes through
``jobs/submit.py`` (the code path of ``make submit``: Ray's JobSubmissionClient), the first one
right after ``ray start``, while the head's job agent may still be registering (then jobs.submit
retries "No available agent to submit job").
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import submit as jsubmit
from tests.fixtures_ray import ROOT, RayHead, ray_head, start_head, stop_cluster  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DOMAINS = ("debate", "medicine", "education", "ecology")
SUBMIT = [sys.executable, "-m", "jobs.submit"]

# A trivial job that exercises what the pipeline's driver does: pipeline.raycluster.ensure_ray
# inside a submitted job (no runtime_env conflict), a remote task that sees the job's env_vars,
# and a look at what the working_dir shipped.
TRIVIAL = r"""
import json, logging, os, ray, warnings
logging.basicConfig(level=logging.INFO)
from pipeline.config import load_config
from pipeline.raycluster import ensure_ray
ensure_ray(load_config("configs/demo.yaml"))
@ray.remote(num_cpus=0.1)
def probe():
    return {"tok_par": os.environ.get("TOKENIZERS_PARALLELISM"), "cwd_files": sorted(os.listdir(".")),
            "setup_hook": getattr(warnings.showwarning, "__module__", None),
            "worker_ray_address": os.environ.get("RAY_ADDRESS"), "gcs": ray.get_runtime_context().gcs_address}
out = ray.get(probe.remote())
out["driver_files"] = sorted(os.listdir("."))
out["fixtures_raw"] = os.path.isdir("fixtures/raw")
out["resources"] = ray.cluster_resources().get("CPU")
print("PROBE " + json.dumps(out))
"""


def _args(**kw) -> argparse.Namespace:
    base = dict(config="configs/demo.yaml", output=None, raw_dir=None, set=[], domains=None, stage="run",
                address=None, job_name=None, submission_id=None, env=[], entrypoint_num_cpus=None,
                working_dir=str(ROOT), no_wait=False, dry_run=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _job(head: RayHead, submission_id: str) -> dict:
    status, body = head.api(f"/api/jobs/{submission_id}")
    assert status == 200, (status, body)
    return json.loads(body)


def _logs(head: RayHead, submission_id: str) -> str:
    status, body = head.api(f"/api/jobs/{submission_id}/logs")
    assert status == 200, (status, body)
    return json.loads(body)["logs"]


def _listed(head: RayHead) -> dict[str, dict]:
    status, body = head.api("/api/jobs/")
    assert status == 200, (status, body)
    return {j.get("submission_id"): j for j in json.loads(body)}


def _assert_no_token(head: RayHead, *texts: str) -> None:
    token = head.token
    assert len(token) >= 16
    for t in texts:
        assert token not in t, "the Ray auth token leaked"


def test_trivial_job_through_submit_path(ray_head: RayHead, tmp_path: Path) -> None:
    """Same runtime_env, metadata, auth and retry as `make submit`; only the entrypoint is a probe.
    The first test of the module: it submits right after `ray start`."""
    t0 = time.time()
    out = tmp_path / "out"
    plan = jsubmit.build(_args(output=str(out), address=ray_head.dashboard_url,
                               job_name="probe-job"), environ=ray_head.env)
    plan["entrypoint"] = ["python", "-c", TRIVIAL]
    out_text, err_text = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_text), contextlib.redirect_stderr(err_text):
        client = jsubmit.connect(ray_head.dashboard_url, ray_head.env)
        sid = jsubmit.submit(client, plan)
        status = jsubmit.follow(client, sid)
    printed = argparse.Namespace(out=out_text.getvalue(), err=err_text.getvalue())
    assert sid == plan["submission_id"]
    assert status == "SUCCEEDED", printed.out[-3000:]       # how jobs.submit decides its exit code
    job = _job(ray_head, sid)
    assert job["status"] == "SUCCEEDED", job
    # metadata: job name and output URI, as the dashboard's job API shows them
    listed = _listed(ray_head)
    assert sid in listed
    assert listed[sid]["metadata"]["job_name"] == "probe-job"
    assert listed[sid]["metadata"]["output_uri"] == str(out)
    logs = _logs(ray_head, sid)
    assert "PROBE {" in printed.out                    # tail_job_logs streamed the job's output
    probe = json.loads("{" + logs.split("PROBE {", 1)[1].splitlines()[0])
    assert probe["tok_par"] == "false"                 # the job's env_vars reach the workers
    assert probe["setup_hook"] == "pipeline.logs"      # worker_process_setup_hook ran in the job's worker
    assert probe["worker_ray_address"] == probe["gcs"]
    assert probe["fixtures_raw"] is True               # the demo's fixtures ship
    for never in (".venv", ".git", "output", "test-artifacts", ".devbundle", ".whl"):
        assert never not in probe["driver_files"], f"{never} was shipped with the job"
    assert "pipeline" in probe["driver_files"] and "jobs" in probe["driver_files"]
    assert "Ray cluster:" in logs                      # raycluster logs the resources
    # the token is in none of: the job's logs, runtime_env, metadata, entrypoint, what was printed
    _assert_no_token(ray_head, logs, json.dumps(job), printed.out, printed.err)
    assert "RAY_AUTH_TOKEN" not in json.dumps(job["runtime_env"])
    retries = printed.err.count("the head is still starting")
    print(f"trivial job: {time.time() - t0:.1f}s, {retries} retry(ies) while the head was starting")


def test_submit_right_after_ray_start(tmp_path: Path) -> None:
    """`ray start --head` and, at once, `make submit`'s code path: the dashboard or the head's job agent
    may not be ready ("No available agent to submit job", HTTP 500); jobs.submit retries until they are."""
    head = start_head(num_cpus=2, wait_for_jobs_api=False)
    try:
        r = subprocess.run([*SUBMIT, "--config", "configs/demo.yaml", "--output", str(tmp_path / "o"), "--stage",
                            "download", "--address", head.dashboard_url, "--no-wait"],
                           env=head.env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        sid = r.stdout.split(" as job ", 1)[1].split()[0]
        assert jsubmit.follow(jsubmit.connect(head.dashboard_url, head.env), sid) == "SUCCEEDED"
        print(f"submitted right after ray start; {r.stderr.count('the head is still starting')} retry(ies)")
    finally:
        stop_cluster(head.temp_dir)
        shutil.rmtree(head.temp_dir.parent, ignore_errors=True)


def test_doctor_sees_no_autoscaler(ray_head: RayHead, tmp_path: Path) -> None:
    """A plain `ray start --head` runs Ray's monitor with a read-only provider: not an autoscaler. A GPU
    config against it is a FAIL with the fix, not a queue that waits forever."""
    r = subprocess.run([sys.executable, "-m", "pipeline", "doctor", "--config", "configs/demo.yaml",
                        "--output", str(tmp_path / "o"), "--set", "resources.device=cuda"],
                       env={**ray_head.env, "RAY_ADDRESS": ray_head.address}, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=300)
    row = next((ln for ln in r.stdout.splitlines() if ln.startswith("ray ")), r.stdout + r.stderr)
    assert r.returncode == 1 and "FAIL" in row and "no autoscaler can add one" in row, r.stdout + r.stderr
    assert "resources.device: cpu" in row and "autoscaler" in row


def test_submit_refused_without_token(ray_head: RayHead, tmp_path: Path) -> None:
    before = set(_listed(ray_head))
    # 1. The REST API itself: no Authorization header -> 401, and no job is created.
    status, body = ray_head.api("/api/jobs/", method="POST", headers={},
                                body={"entrypoint": "echo should-not-run", "submission_id": "no-token-rest"})
    assert status == 401, (status, body)
    # 2. The ray CLI sending no token (client auth off, as on a machine without the token) -> refused.
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    env = {**ray_head.env, "HOME": str(empty_home), "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url,
                        "--submission-id", "no-token-cli", "--no-wait", "--", "echo", "should-not-run"],
                       env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "401" in r.stdout + r.stderr or "Unauthorized" in r.stdout + r.stderr, r.stdout + r.stderr
    # 3. jobs.submit with token auth on and no token anywhere: refused before sending, with the fix.
    r = subprocess.run([*SUBMIT, "--config", "configs/demo.yaml", "--output", str(tmp_path / "o"),
                        "--address", ray_head.dashboard_url, "--no-wait"],
                       env={**ray_head.env, "HOME": str(empty_home)}, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ray get-auth-token" in r.stderr
    assert set(_listed(ray_head)) == before


def test_submit_refused_with_wrong_token(ray_head: RayHead, tmp_path: Path) -> None:
    before = set(_listed(ray_head))
    wrong = "0" * 32
    status, body = ray_head.api("/api/jobs/", method="POST", headers={"Authorization": f"Bearer {wrong}"},
                                body={"entrypoint": "echo should-not-run", "submission_id": "wrong-token-rest"})
    assert status == 403, (status, body)
    # jobs.submit (the make submit path) with a wrong token: ray job submit is refused.
    env = {**ray_head.env, "RAY_AUTH_TOKEN": wrong}
    r = subprocess.run([*SUBMIT, "--config", "configs/demo.yaml", "--output", str(tmp_path / "o"),
                        "--address", ray_head.dashboard_url, "--no-wait"],
                       env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "403" in r.stdout + r.stderr or "Forbidden" in r.stdout + r.stderr, r.stdout + r.stderr
    assert wrong not in r.stdout + r.stderr
    assert set(_listed(ray_head)) == before


def _pipeline_landed() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("pipeline.download", "pipeline.prepare", "pipeline.train", "pipeline.report"))


DEMO_SETS = [  # small enough for 2 CPU cores; every stage and every domain still runs for real
    "train.max_steps=4", "train.eval_every=4", "train.checkpoint_every=2", "train.log_every=1",
    "train.eval_max_batches=1", "train.eval_matrix=false", "model.tiny.pretrain_steps=5",
    "data.max_sft_per_domain=40", "data.max_docs_per_source=40",
]
DEMO_TIMEOUT_S = int(os.environ.get("DEMO_JOB_TIMEOUT_S", "540"))


def _submit_demo(head: RayHead, out: Path, job_name: str, *extra: str) -> tuple[str, subprocess.CompletedProcess]:
    """`python -m jobs.submit` (what `make submit` runs), waiting for the job; on a timeout the
    failure shows the tail of the job's own log."""
    cmd = [*SUBMIT, "--config", "configs/demo.yaml", "--output", str(out), "--address", head.dashboard_url,
           "--job-name", job_name, *extra]
    for s in DEMO_SETS:
        cmd += ["--set", s]
    with (out.parent / f"{job_name}.submit.log").open("w+") as log:
        try:
            proc = subprocess.run(cmd, env=head.env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                                  text=True, timeout=DEMO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc = None
        log.seek(0)
        text = log.read()
    sid = next((ln.split(" as job ", 1)[1].split()[0] for ln in text.splitlines() if " as job " in ln), None)
    assert sid, text[-3000:]
    if proc is None:
        pytest.fail(f"job {sid} did not finish within {DEMO_TIMEOUT_S}s; its log ends:\n{_logs(head, sid)[-6000:]}")
    return sid, subprocess.CompletedProcess(cmd, proc.returncode, text, "")


def _wait(head: RayHead, sid: str, until, timeout_s: float, what: str) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = _job(head, sid)
        if until(job):
            return job
        time.sleep(2)
    pytest.fail(f"job {sid}: {what} not reached within {timeout_s:.0f}s; its log ends:\n{_logs(head, sid)[-6000:]}")


@pytest.mark.timeout(1200)
@pytest.mark.skipif(not _pipeline_landed(), reason="pipeline stages (download/prepare/train/report) not in the tree yet")
def test_demo_pipeline_job(ray_head: RayHead, tmp_path: Path) -> None:
    """`make submit CONFIG=configs/demo.yaml OUTPUT=...` against the cluster, as docs/CLUSTER.md says.

    The first submission is stopped (`stop_job`, what `ray job stop` does) once a training checkpoint exists; the same
    command submitted again (same output, same run_name; a new job id) must then finish the run."""
    t0 = time.time()
    out = tmp_path / "demo-out"
    terminal = ("SUCCEEDED", "FAILED", "STOPPED")
    # 1. submit and return at once (--no-wait), then stop the job after its first checkpoint
    sid1, r1 = _submit_demo(ray_head, out, "demo-e2e", "--no-wait")
    assert r1.returncode == 0, r1.stdout[-3000:]
    job1 = _wait(ray_head, sid1, lambda j: j["status"] in terminal or any((out / "runs").rglob("checkpoint_*")),
                 DEMO_TIMEOUT_S, "a checkpoint")
    assert job1["status"] not in ("FAILED", "STOPPED"), f"{job1['status']}:\n{_logs(ray_head, sid1)[-6000:]}"
    killed = job1["status"] != "SUCCEEDED"
    if killed:
        assert jsubmit.connect(ray_head.dashboard_url, ray_head.env).stop_job(sid1)
        _wait(ray_head, sid1, lambda j: j["status"] in terminal, 120, "a terminal state after `ray job stop`")
    t_killed = time.time() - t0
    # 2. the same command again, waiting for the end (what `make submit` does)
    t1 = time.time()
    sid, r = _submit_demo(ray_head, out, "demo-e2e")
    assert sid != sid1
    logs = _logs(ray_head, sid)
    assert r.returncode == 0, f"resubmitted job {sid} did not succeed:\n{logs[-6000:]}\n{r.stdout[-2000:]}"
    assert _job(ray_head, sid)["status"] == "SUCCEEDED"
    assert "dashboard: " + ray_head.dashboard_url in r.stdout
    # the output tree
    assert (out / "data" / "manifest.json").is_file()
    for d in DOMAINS:
        assert (out / "adapters" / d / "adapter_config.json").is_file(), d
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary
    # the dashboard's job API lists both jobs with their metadata
    listed = _listed(ray_head)
    for job_id in (sid1, sid):
        assert listed[job_id]["metadata"]["job_name"] == "demo-e2e"
        assert listed[job_id]["metadata"]["output_uri"] == str(out)
        assert listed[job_id]["metadata"]["run_name"] == "demo"
    # progress in the job logs: the CLI's stage lines and the training loop's step/loss lines
    logs1 = _logs(ray_head, sid1)
    assert "stage train: starting" in logs and "stage report: done" in logs
    assert re.search(r"step \d+/\d+ loss [\d.]+", logs1 + logs), "no step/loss lines in the jobs' logs"
    _assert_no_token(ray_head, logs, logs1, json.dumps(listed[sid]), json.dumps(listed[sid1]), r.stdout, r1.stdout,
                     *(p.read_text(errors="replace") for p in out.rglob("*.json")))
    print(f"demo pipeline: first job {'stopped after a checkpoint' if killed else 'finished'} at {t_killed:.1f}s; "
          f"resubmitted job finished in {time.time() - t1:.1f}s")
