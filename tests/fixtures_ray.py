"""A real local Ray cluster for job-submission tests: ``ray start --head`` on loopback with token auth.

Usage in a test module::

    from tests.fixtures_ray import ray_head  # noqa: F401  (pytest finds it by name)

    def test_x(ray_head):
        subprocess.run([ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url, ...],
                       env=ray_head.env, check=True)

How it isolates itself from the user's own Ray and from other tests on the same machine:

- HOME is a fresh temporary directory, and the token is generated there first
  (``ray get-auth-token --generate`` writes ``$HOME/.ray/auth_token``), so the user's real
  ``~/.ray/auth_token`` is neither read nor overwritten. Every process of the cluster inherits that
  HOME, so the job drivers find the same token file. The token is never put in an environment
  variable of the cluster, so it cannot leak through a job's environment or runtime_env.
- ``RAY_AUTH_MODE=token`` is set explicitly (auth is on; never switched off).
- The head binds to 127.0.0.1; GCS, dashboard and dashboard agent ports are free ports picked here.
  Its processes get RAY_ADDRESS pointing at it, so nothing in them attaches to another Ray on the machine.
- ``--temp-dir`` is a fresh directory, and stopping is done by process id: every process whose
  command line names that directory, plus all their descendants, gets SIGTERM then SIGKILL.
  ``ray stop`` is deliberately not used: it kills every Ray process on the machine, including
  other people's clusters and test runs.
- Stopping runs in a ``finally`` block, so it happens when the test fails too.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports: the sockets are bound at the same time (one after the other, a port freed by
    the first could be handed out again to the second: CI saw Ray refuse two components on one port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayHead:
    """What a test needs to talk to the cluster. ``env`` carries HOME (with the token file) and
    RAY_AUTH_MODE=token; it holds no token value."""
    address: str                 # GCS address, host:port
    dashboard_url: str           # http://127.0.0.1:PORT  (the job server)
    temp_dir: Path
    home: Path
    env: dict[str, str] = field(repr=False)
    ray: str = RAY

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def api(self, path: str, method: str = "GET", body: Optional[dict] = None,
            headers: Optional[dict[str, str]] = None, timeout: float = 30) -> tuple[int, str]:
        """Call the dashboard's REST API; returns (status, body). ``headers=None`` sends the token."""
        hdrs = self.auth_headers() if headers is None else headers
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs = {**hdrs, "Content-Type": "application/json"}
        req = urllib.request.Request(self.dashboard_url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")


def _cluster_pids(temp_dir: Path) -> set[int]:
    """Processes of this cluster only: those whose command line names our temp dir, and descendants."""
    import psutil

    needle = str(temp_dir)
    roots: set[int] = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(needle in (a or "") for a in (p.info["cmdline"] or [])):
                roots.add(p.pid)
        except psutil.Error:
            continue
    pids = set(roots)
    for pid in roots:
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    pids.discard(os.getpid())
    return pids


def stop_cluster(temp_dir: Path, grace_s: float = 1.0) -> int:
    """Stop the processes of the cluster that uses ``temp_dir`` (SIGTERM, then SIGKILL). Returns how many.

    ``grace_s`` 1: measured on a head started by start_head, every process that acts on SIGTERM is gone
    within 0.5 s, and four (the runtime-env agent among them) are still there after 8 s, so a
    longer grace only delays their SIGKILL (it was 5 s: ~4 s more per stopped cluster)."""
    import psutil

    from pipeline.raycluster import terminate

    pids = _cluster_pids(temp_dir)
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    psutil.wait_procs(terminate(procs, grace_s), timeout=5)
    # Workers started late (or re-parented) may still name the dir: one more pass, at once.
    for pid in _cluster_pids(temp_dir):
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    return len(pids)


def missing_dashboard_deps() -> list[str]:
    """Modules that ``ray[default]`` adds and the dashboard's job server needs, if absent."""
    import importlib.util
    from pipeline.raycluster import DASHBOARD_MODULES
    return [m for m in DASHBOARD_MODULES if importlib.util.find_spec(m) is None]


def wait_for_dashboard(url: str, headers: dict[str, str], timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    last: object = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(url + "/api/version", headers=headers)
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    # The job server is a dashboard module: wait until it answers too.
                    req = urllib.request.Request(url + "/api/jobs/", headers=headers)
                    with urllib.request.urlopen(req, timeout=5) as r2:
                        if r2.status == 200:
                            return
        except Exception as e:  # connection refused while starting
            last = e
        time.sleep(0.25)
    raise TimeoutError(f"Ray dashboard at {url} did not answer within {timeout_s}s (last error: {last})")


def start_head(num_cpus: int = 4, extra_env: Optional[dict[str, str]] = None, extra_args: Sequence[str] = (),
               gcs_port: Optional[int] = None, wait_for_jobs_api: bool = True) -> RayHead:
    """Start a token-authenticated head on loopback. Call ``stop_cluster(head.temp_dir)`` after.
    ``extra_args`` go to ``ray start --head`` (e.g. --autoscaling-config); ``gcs_port`` when the
    caller must know it beforehand (an autoscaling config names it); ``wait_for_jobs_api=False``
    returns as soon as ``ray start`` does, as a user's next command would run."""
    missing = missing_dashboard_deps()
    if missing:
        raise RuntimeError(
            f"the Ray dashboard / job server needs ray[default]; missing here: {', '.join(missing)}. "
            "Install it with: pip install 'ray[default]==2.60.0' (`ray job submit` cannot work without it)")
    base = Path(tempfile.mkdtemp(prefix="rayfx_"))  # short: Ray's socket paths must stay < 108 chars
    home = base / "home"
    temp_dir = base / "ray"
    home.mkdir()
    temp_dir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    env.update({
        "HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `python` = this venv
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    env.update(extra_env or {})
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    token_file = home / ".ray" / "auth_token"
    assert token_file.is_file(), f"ray get-auth-token --generate wrote no {token_file}"
    # distinct ports; a gcs_port the caller chose earlier is free too, so it may come back: left out
    ports = [p for p in free_ports(5) if p != gcs_port]
    gcs_port = gcs_port or ports.pop()
    dash_port, agent_port, metrics_port = ports[:3]
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
           f"--dashboard-agent-listen-port={agent_port}", f"--metrics-export-port={metrics_port}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats", *extra_args]
    head = RayHead(address=f"127.0.0.1:{gcs_port}", dashboard_url=f"http://127.0.0.1:{dash_port}",
                   temp_dir=temp_dir, home=home, env=env)
    try:
        # RAY_ADDRESS for the cluster's own processes only: Ray code inside them that looks for "the"
        # cluster (e.g. Ray Train's placement-group cleaner) then finds this one even when other Ray
        # instances run on the same machine, instead of failing with "Found multiple active Ray instances".
        start_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
        r = subprocess.run(cmd, env=start_env, cwd=str(ROOT), capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start --head failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        if wait_for_jobs_api:
            wait_for_dashboard(head.dashboard_url, head.auth_headers())
    except BaseException:
        stop_cluster(temp_dir)
        shutil.rmtree(base, ignore_errors=True)
        raise
    return head


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A token-authenticated Ray head on loopback for this module's tests; always stopped after."""
    head = start_head()
    try:
        yield head
    finally:
        n = stop_cluster(head.temp_dir)
        print(f"stopped {n} processes of the test Ray cluster at {head.temp_dir}")
        if os.environ.get("KEEP_RAY_TEMP") != "1":
            shutil.rmtree(head.temp_dir.parent, ignore_errors=True)
