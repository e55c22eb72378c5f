"""The watchdog of pipeline.raycluster stops a SIGKILLed driver's Ray as one (issue 23, item 10).

The CI failure it covers: a worker the raylet forked after the watchdog's last look at the driver's
descendants, whose raylet then died first, is re-parented to init, so it is nobody's descendant. Here
such processes are made without Ray (Ray's part is test_lifecycle's SIGKILL test): orphans of this
user that name the session in their command line, or that renamed themselves `ray::...` and keep a log
file open in the session directory; an orphan of another session must live on.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def _orphan(shell: str, pidfile: Path) -> int:
    """Start ``shell`` in the background of a shell that exits at once: the process is re-parented."""
    subprocess.run(["bash", "-c", f"({shell}) >/dev/null 2>&1 & echo $! > {pidfile}"], check=True)
    return int(pidfile.read_text())


def _gone(pid: int, created: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigkilled_driver_takes_its_session_orphans_along(tmp_path):
    session = tmp_path / "ray" / f"session_2026-01-01_00-00-00_{uuid.uuid4().hex[:8]}_4242"
    other = tmp_path / "ray" / "session_2026-01-01_00-00-00_other_4343"
    for d in (session, other):
        (d / "logs").mkdir(parents=True)
    driver = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from pipeline.raycluster import start_watchdog, tell_watchdog
        w = start_watchdog()
        tell_watchdog(w, sys.argv[1])
        print(w.pid, flush=True)
        time.sleep(600)
        """), str(session)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    watchdog = psutil.Process(int(driver.stdout.readline()))
    py = sys.executable
    orphans = {
        "names the session (a raylet's worker still starting)":
            _orphan(f"exec {py} -c 'import time; time.sleep(600)' --raylet-name={session}/sockets/raylet",
                    tmp_path / "a"),
        "renamed ray::IDLE, its log in the session":
            _orphan(f"exec -a ray::IDLE sleep 600 > {session}/logs/worker-1.out", tmp_path / "b"),
    }
    bystanders = {
        "another session's worker": _orphan(f"exec {py} -c 'import time; time.sleep(600)' "
                                            f"--raylet-name={other}/sockets/raylet", tmp_path / "c"),
        "another session's ray::IDLE": _orphan(f"exec -a ray::IDLE sleep 600 > {other}/logs/worker-1.out",
                                               tmp_path / "d"),
    }
    created = {pid: psutil.Process(pid).create_time() for pid in [*orphans.values(), *bystanders.values()]}
    try:
        assert all(psutil.Process(pid).ppid() != driver.pid for pid in orphans.values())
        time.sleep(1.5)   # the watchdog has read the session line
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.time() + 20
        while time.time() < deadline and not all(_gone(p, created[p]) for p in orphans.values()):
            time.sleep(0.2)
        left = [what for what, pid in orphans.items() if not _gone(pid, created[pid])]
        assert left == [], left
        assert [what for what, pid in bystanders.items() if _gone(pid, created[pid])] == []
        watchdog.wait(timeout=20)   # done: it exits after the sweep
    finally:
        for pid in [*orphans.values(), *bystanders.values()]:
            try:
                if psutil.Process(pid).create_time() == created[pid]:
                    os.kill(pid, signal.SIGKILL)
            except (psutil.Error, OSError):
                pass
        if driver.poll() is None:
            driver.kill()
