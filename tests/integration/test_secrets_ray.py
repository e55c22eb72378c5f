"""Issue 23.4 with a real Ray: secrets given on the command line with `--set` (URL credentials and tokens, the
way a user passes them) reach neither Ray's session files (logs, events, the runtime-env agent's records)
nor the job table Ray keeps of every driver (its entrypoint: the dashboard's Jobs page and `ray list jobs`
show it to everyone who can reach the cluster), nor the process list, the output tree or the console; the
run itself still gets the real values.

One short training run (a demo domain retrained for a few steps, then its evaluation) on a `ray start`
cluster of its own (token auth, loopback), joined with `resources.ray_address` as on a shared cluster.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from tests.fixtures_demo import DEMO, Run
from tests.fixtures_ray import start_head, stop_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
TOKEN, QUERY_TOKEN, KEY, SECRET = "tok3nUSERINFO8841", "tok3nQUERY55120", "AKIAKEYINURL7731", "s3cretINURL90210"


def _files_holding(root: Path, secrets: tuple[str, ...]) -> list[str]:
    """Every file under ``root`` (binary ones too: pickles, Ray's event files) that holds one of ``secrets``."""
    found = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                found += [f"{p}: {s}" for s in secrets if s.encode() in data]
        except OSError:   # a socket or a file Ray removed meanwhile
            continue
    return found


def test_set_secrets_reach_no_ray_log_job_table_process_list_output_or_console(demo_run, tmp_path):
    src, _ = demo_run   # `make demo`'s output, shared by the session (tests/fixtures_demo.py)
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("logs"))
    secrets = (TOKEN, QUERY_TOKEN, KEY, SECRET)
    head = start_head(num_cpus=2)
    try:
        argv = ["train", "--config", DEMO, "--output", str(out), "--domains", "debate", "--set", "run_name=secrets",
                "--set", "train.max_steps=6", "--set", "train.checkpoint_every=3", "--set", "train.eval_every=3",
                "--set", "eval.max_examples=4", "--set", "eval.generation_samples=2", "--set", "eval.side_by_side=1",
                "--set", "eval.max_new_tokens=8", "--set", f"resources.ray_address={head.address}",
                "--set", f"data.download.ddo_debates_url=https://user:{TOKEN}@drive.example/f?token={QUERY_TOKEN}",
                "--set", f"storage.endpoint_url=http://{KEY}:{SECRET}@127.0.0.1:1"]
        run = Run(tmp_path, *argv, env={"HOME": str(head.home), "RAY_AUTH_MODE": "token"})
        run.wait_until(lambda: "Ray cluster:" in run.text(), 300, "the cluster joined")
        shown = " ".join(psutil.Process(run.proc.pid).cmdline())   # what `ps` shows any user of the machine
        rc = run.wait(timeout=600)
        assert rc == 0, run.text()[-4000:]
        assert "domain debate: finished" in run.text()
        status, body = head.api("/api/jobs/")
        assert status == 200, body
        drivers = [j for j in json.loads(body) if "run_name=secrets" in (j.get("entrypoint") or "")]
        assert drivers, body[-3000:]   # the run's driver is in the job table: its entrypoint is checked below
        assert "https://***@drive.example/f?token=***" in drivers[0]["entrypoint"], drivers[0]["entrypoint"]
        assert "run_name=secrets" in shown
        leaks = {"console": [s for s in secrets if s in run.text()],
                 "process list": [s for s in secrets if s in shown],
                 "job table": [s for s in secrets if s in body],
                 "Ray's session files": _files_holding(head.temp_dir, secrets),
                 "output": _files_holding(out, secrets)}
        assert not any(leaks.values()), leaks
    finally:
        stop_cluster(head.temp_dir)
        shutil.rmtree(head.temp_dir.parent, ignore_errors=True)
