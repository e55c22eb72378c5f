"""The local Ray a run starts listens on loopback only: its HTTP services (dashboard, Prometheus metrics,
the agent's HTTP server) serve without Ray's auth token, and nothing else needs to be reachable from
other machines. Checked on the real processes with psutil: a fresh interpreter starts the local Ray as
`adapters` does (pipeline.raycluster.ensure_ray), runs a task, and lists every listening socket of
itself and its descendants."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")

SCRIPT = r"""
import json, logging, psutil, ray
from pipeline.config import load_config
from pipeline.raycluster import ensure_ray, shutdown_ray
cfg = load_config("configs/demo.yaml", sets=["resources.num_cpus=1"], environ={})
ensure_ray(cfg)
ray.get(ray.remote(lambda: 1).remote())
import time
me = psutil.Process()
want = {ray._private.worker.global_worker.node.metrics_export_port, 44227, 8265, 52365}
deadline, found = time.time() + 90, {}
while True:   # the agents and exporters open their ports a while after ray.init on a busy machine: gather until all are seen
    pids = {p.pid: p.name() for p in me.children(recursive=True)}
    pids[me.pid] = "driver"
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            found[(c.laddr.ip, c.laddr.port)] = {"name": pids[c.pid], "ip": c.laddr.ip, "port": c.laddr.port}
    if want <= {k[1] for k in found} or time.time() > deadline:
        break
    time.sleep(1)
print("LISTEN " + json.dumps({"sockets": list(found.values()), "metrics_export_port": ray._private.worker.global_worker.node.metrics_export_port}))
shutdown_ray()
"""


def test_local_ray_serves_http_and_metrics_on_loopback_only():
    with tempfile.TemporaryDirectory(prefix="rp-", dir="/tmp") as tmp:   # short: Ray's socket paths have a limit
        env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("LISTEN ")), None)
    assert line, (r.stdout + r.stderr)[-3000:]
    got = json.loads(line[len("LISTEN "):])
    socks = got["sockets"]
    ports = {s["port"] for s in socks}
    # the agent's Prometheus exporter, the dashboard's metrics (44227), the dashboard (8265), the agent's HTTP (52365)
    assert {got["metrics_export_port"], 44227, 8265, 52365} <= ports, socks
    # before: the metrics on 0.0.0.0, the agents on the machine's address, gcs/raylet on '::'; now every one
    open_ = [s for s in socks if s["ip"] not in LOOPBACK]
    assert not open_, f"listening beyond loopback: {open_}"
