"""The local Ray a run starts listens for HTTP (dashboard, Prometheus metrics, the agent's HTTP server)
on 127.0.0.1 only: those serve without Ray's auth token. Checked on the real processes with psutil: a
fresh interpreter starts the local Ray as `adapters` does (pipeline.raycluster.ensure_ray), runs a task,
and lists every listening socket of itself and its descendants."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, logging, psutil, ray
from pipeline.config import load_config
from pipeline.raycluster import ensure_ray, shutdown_ray
cfg = load_config("configs/demo.yaml", sets=["resources.num_cpus=1"], environ={})
ensure_ray(cfg)
ray.get(ray.remote(lambda: 1).remote())
me = psutil.Process()
pids = {p.pid: p.name() for p in me.children(recursive=True)}
pids[me.pid] = "driver"
found = [{"name": pids[c.pid], "ip": c.laddr.ip, "port": c.laddr.port}
         for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
print("LISTEN " + json.dumps({"sockets": found, "metrics_export_port": ray._private.worker.global_worker.node.metrics_export_port}))
shutdown_ray()
"""


def test_local_ray_serves_http_and_metrics_on_loopback_only(tmp_path):
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("LISTEN ")), None)
    assert line, (r.stdout + r.stderr)[-3000:]
    got = json.loads(line[len("LISTEN "):])
    socks = got["sockets"]
    by_port = {s["port"]: s for s in socks}
    # the metrics export port, the dashboard's metrics port (44227), the dashboard (8265), the agent's HTTP (52365)
    for port in (got["metrics_export_port"], 44227, 8265, 52365):
        assert port in by_port, (port, socks)
    http_like = [s for s in socks if s["port"] in (got["metrics_export_port"], 44227, 8265, 52365)
                 or "Agent" in s["name"] or s["name"] == "driver"]
    open_ = [s for s in http_like if s["ip"] not in ("127.0.0.1", "::1")]
    assert not open_, f"listening on every interface or the machine's address: {open_}"
