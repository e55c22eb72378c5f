"""`make demo`'s command, run once per test session and shared by the tests that read its output
(tests/integration/test_lifecycle.py: console and log file; test_eval_demo.py: the evaluation), and the
`Run` helper: an `adapters` process as a terminal runs it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


class Run:
    """An `adapters` process in a session of its own; SIGINT at its default, as in a terminal."""

    def __init__(self, tmp: Path, *argv: str, env: Optional[dict] = None, name: str = "run"):
        self.log = tmp / f"{name}.console"
        e = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DOMAIN_ADAPTERS_FAULTS")}
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=e,
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.seen: set[int] = set()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def remember_descendants(self) -> None:
        try:
            self.seen |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass

    def wait_until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.remember_descendants()
            if cond():
                return
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n{self.text()[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout}s:\n{self.text()[-4000:]}")

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout=timeout)

    def left_after(self, bound_s: float) -> list[str]:
        """The run's processes (seen while it ran) still alive ``bound_s`` after the driver ended."""
        deadline = time.time() + bound_s
        while True:
            alive = []
            for pid in self.seen:
                try:
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
                except psutil.Error:
                    continue
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.5)



@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`adapters run --config configs/demo.yaml` (what `make demo` runs), once: (output dir, Run)."""
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "out"
    run = Run(tmp, "run", "--config", DEMO, "--output", str(out), name="demo")
    rc = run.wait(timeout=900)
    assert rc == 0, run.text()[-6000:]
    return out, run
