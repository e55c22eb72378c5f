"""jobs.submit builds a runtime_env that ships code, never data or credentials; pipeline.raycluster
joins a submitted job without a conflicting runtime_env. No Ray cluster needed."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import submit as js
from pipeline.raycluster import WORKER_ENV, WORKER_SETUP_HOOK, driver_runtime_env, submitted_job_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-VALUE-never-shipped-0123456789"


def _args(**kw) -> argparse.Namespace:
    base = dict(config=str(ROOT / "configs/demo.yaml"), output=None, raw_dir=None, set=[], domains=None,
                stage="run", address="http://127.0.0.1:8265", job_name=None, submission_id=None, env=[],
                entrypoint_num_cpus=None, working_dir=str(ROOT), no_wait=False, dry_run=False)
    base.update(kw)
    return argparse.Namespace(**base)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True, exist_ok=True)
    (home / ".ray" / "auth_token").write_text(SECRET + "-raytoken")
    return {"HOME": str(home), "PATH": "/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ACCESS_KEY_ID": "AKIA" + SECRET, "HF_TOKEN": "hf_" + SECRET, **extra}


def test_plan_ships_code_not_data_or_credentials(tmp_path: Path) -> None:
    env = _env(tmp_path, MAX_SFT_PER_DOMAIN="50", OFFLINE="1")
    plan = js.build(_args(output="output/x", set=["train.max_steps=3"]), environ=env)
    sent = json.dumps({k: plan[k] for k in ("runtime_env", "metadata", "entrypoint")})
    assert SECRET not in sent
    renv = plan["runtime_env"]
    for must in ("/.venv", "/.git", "/output", "/raw", "/data", "/test-artifacts", "/.devbundle", ".env", "auth_token"):
        assert must in renv["excludes"]
    assert not any(e.startswith(("fixtures", "/fixtures")) for e in renv["excludes"])
    assert renv["env_vars"] == {**WORKER_ENV, "MAX_SFT_PER_DOMAIN": "50", "OFFLINE": "1"}
    # the output is absolute (the job runs in a copy of the repo); the demo's fixtures ship, so no --raw-dir
    assert plan["entrypoint"][:3] == ["python", "-m", "jobs.run_pipeline"]
    out = plan["entrypoint"][plan["entrypoint"].index("--output") + 1]
    assert Path(out).is_absolute() and out == str(Path("output/x").resolve())
    assert "--raw-dir" not in plan["entrypoint"]
    assert plan["metadata"]["job_name"] == "adapters-run-demo"
    assert plan["metadata"]["output_uri"] == out
    assert renv["working_dir"] == str(ROOT)
    assert plan["submission_id"].startswith("adapters-demo-run-")
    # two submissions of the same command get different ids (a resubmission is never refused as a duplicate)
    assert js.build(_args(output="output/x"), environ=env)["submission_id"] != plan["submission_id"]


def test_stage_entrypoints_and_sets(tmp_path: Path) -> None:
    plan = js.build(_args(stage="train", output="s3://bucket/p", set=["train.max_steps=2"], domains="debate"),
                    environ=_env(tmp_path))
    assert plan["entrypoint"] == ["python", "-m", "jobs.train", "--config", "configs/demo.yaml",
                                  "--output", "s3://bucket/p", "--set", "train.max_steps=2", "--domains", "debate"]


def test_secret_env_refused(tmp_path: Path) -> None:
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "RAY_AUTH_TOKEN", "DB_PASSWORD"):
        with pytest.raises(js.SubmitError, match="credential"):
            js.build(_args(env=[name]), environ=_env(tmp_path, DB_PASSWORD="x"))


def test_secret_value_in_passthrough_refused(tmp_path: Path) -> None:
    env = _env(tmp_path, DDO_DEBATES_URL=f"https://example.org/d.json?x={SECRET}")
    with pytest.raises(js.SubmitError, match="refusing to submit"):
        js.build(_args(), environ=env)


def test_bad_config_fails_before_submitting(tmp_path: Path) -> None:
    with pytest.raises(js.SubmitError, match="nonexistent_key"):
        js.build(_args(set=["train.nonexistent_key=1"]), environ=_env(tmp_path))


def test_gcs_address_is_explained() -> None:
    with pytest.raises(js.SubmitError, match="8265"):
        js.job_address("10.0.0.5:6379", {})
    assert js.job_address(None, {"RAY_ADDRESS": "http://h:8265/"}) == "http://h:8265"


def test_no_token_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(js.SubmitError, match="ray get-auth-token"):
        js.auth_headers({"HOME": str(tmp_path)})
    assert js.auth_headers({"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}) == {}
    assert js.auth_headers(_env(tmp_path)) == {"Authorization": f"Bearer {SECRET}-raytoken"}
    assert js.auth_headers({"RAY_AUTH_TOKEN": "tok-from-env-0123", **_env(tmp_path)}) == {
        "Authorization": "Bearer tok-from-env-0123"}          # Ray's order: the variable, then the files


def test_retry_only_while_the_head_is_starting() -> None:
    """The job server's answer while no job agent is registered (job_head.py), and a refused connection,
    are retried with backoff within the bound; anything else fails at once."""
    agent = RuntimeError("Request failed with status code 500: No available agent to submit job, "
                         "please try again later..")
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise agent if len(calls) == 1 else ConnectionError("Failed to connect to Ray at address: x.")
        return "adapters-x"
    assert js.with_retry(flaky, "submitting", retry_s=60, sleep=slept.append) == "adapters-x"
    assert slept == [1.0, 2.0]

    def always():
        raise agent
    slept.clear()
    with pytest.raises(RuntimeError, match="No available agent"):
        js.with_retry(always, "submitting", retry_s=10, sleep=slept.append)
    assert slept and sum(slept) <= 10                     # bounded

    def forbidden():
        calls.append(1)
        raise RuntimeError("Request failed with status code 400: bad runtime_env.")
    calls.clear()
    with pytest.raises(RuntimeError, match="400"):
        js.with_retry(forbidden, "submitting", retry_s=60, sleep=slept.append)
    assert len(calls) == 1                                 # not retried


def test_dry_run_cli_prints_plan_without_token(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "jobs.submit", "--config", "configs/demo.yaml", "--output",
                        str(tmp_path / "o"), "--dry-run"], cwd=str(ROOT), env=_env(tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["metadata"]["output_uri"] == str(tmp_path / "o")
    assert SECRET not in r.stdout + r.stderr


@pytest.mark.parametrize("stage", ["download", "prepare", "train", "eval", "report", "run_pipeline"])
def test_stage_modules_are_thin_cli_calls(stage: str) -> None:
    r = subprocess.run([sys.executable, "-m", f"jobs.{stage}", "--help"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--config" in r.stdout, r.stderr
    expected = "run" if stage == "run_pipeline" else stage
    assert f"adapters {expected}" in r.stdout


def test_raycluster_inside_a_job_adds_only_missing_env() -> None:
    job = {"runtime_env": {"env_vars": dict(WORKER_ENV)}, "metadata": {"job_name": "x"}}
    environ = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    assert submitted_job_config(environ) == job
    # env vars the job sets are not set again (Ray refuses a conflicting driver runtime_env); the worker
    # setup hook is added, as the job sets none
    assert driver_runtime_env(job, {}) == {"worker_process_setup_hook": WORKER_SETUP_HOOK}
    assert driver_runtime_env({"runtime_env": {}}, {}) == {"env_vars": WORKER_ENV,
                                                          "worker_process_setup_hook": WORKER_SETUP_HOOK}
    assert WORKER_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # reports of fast steps are not held back
    older = {"runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}}}
    assert driver_runtime_env(older, {}) == {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"},
                                             "worker_process_setup_hook": WORKER_SETUP_HOOK}
    own_hook = {"runtime_env": {**job["runtime_env"], "worker_process_setup_hook": "mine.setup"}}
    assert driver_runtime_env(own_hook, {}) is None          # the job's own hook stays; nothing to add
    assert submitted_job_config({}) is None
