"""The output folder is the project's, and one run at a time uses it (issue 23.3).

    refuse_forbidden(cfg, store)            `/`, home, the raw dir, inside it or a custom source's folder
    claim_output(cfg, store, force=False)   before a stage writes: refuse a place that is not ours, mark it
    OutputLock(store, command)              a context manager: the one run writing to this output

Ownership: the project writes OUTPUT_MARKER at the output's root when it first uses it. It refuses `/`,
the home directory, the raw directory or anything inside it or inside a custom source's folder (prepare
would read its own output back as input), and a non-empty folder without the marker, unless `--force`
(even then the project deletes only what it wrote: see tiny.ensure_tiny). An output made before markers
existed is recognised by the files only the project writes (LEGACY_FILES) and marked.

The lock: LOCK_FILE at the output's root, created only if absent (locally O_CREAT|O_EXCL; on S3 a
conditional put, If-None-Match: *), holding the owner's host, pid, command and a heartbeat refreshed every
HEARTBEAT_S. A second run fails at once naming the owner. A lock whose heartbeat is older than STALE_AFTER_S,
or whose pid is gone on this host, is taken over with a line saying so.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from pipeline import layout
from pipeline.errors import UsageError, UserFacingError
from pipeline.status import epoch_seconds, pid_alive

log = logging.getLogger(__name__)

OUTPUT_MARKER = layout.OUTPUT_MARKER
LOCK_FILE = layout.LOCK_FILE
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0   # six missed heartbeats
# files only this project writes: an output made before the marker existed is recognised by one of them
LEGACY_FILES = (layout.MANIFEST, layout.PREPARED, layout.TINY_META, layout.REPORT_JSON)
LEGACY_DIRS = (layout.RUNS, layout.WORK)


class OutputRefused(UsageError):
    pass


class OutputLocked(UserFacingError):
    pass


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _forbidden(cfg, out: Path) -> Optional[str]:
    """Why a local output path may never be used, or None."""
    if out == Path(out.anchor):
        return "it is the filesystem root"
    if out == Path.home().resolve():
        return "it is your home directory"
    raw = cfg.data.raw_dir
    if raw and "://" not in str(raw):
        r = Path(raw).expanduser().resolve()
        if _inside(out, r):
            return f"it is inside the raw directory {r} (prepare would read it back as input)"
    for c in cfg.data.custom_sources:
        p = Path(c.path).expanduser()
        if "://" in c.path or not p.exists():
            continue
        folder = (p if p.is_dir() else p.parent).resolve()
        if _inside(out, folder):
            return f"it is inside the folder of custom source {c.name!r} ({folder}; prepare would read it back)"
    return None


def _made_by_us(store) -> bool:
    if store.is_file(OUTPUT_MARKER) or store.is_file(LOCK_FILE):
        return True
    return any(store.is_file(f) for f in LEGACY_FILES) or any(store.list_files(d, ".json") for d in LEGACY_DIRS)


def _has_entries(store) -> bool:
    if store.is_s3:
        return bool(store.list_files(""))
    root = Path(store.root)
    return root.is_dir() and any(root.iterdir())


def refuse_forbidden(cfg, store) -> None:
    """The places never used as output (before anything, even a write probe, touches them)."""
    if not store.is_s3:
        out = Path(store.root).expanduser().resolve()
        why = _forbidden(cfg, out)
        if why:
            raise OutputRefused(f"refusing --output {out}: {why}; choose a folder of its own, e.g. output/<name>")


def claim_output(cfg, store, force: bool = False) -> None:
    """Refuse an output that is not the project's (see the module docstring); mark it as ours."""
    refuse_forbidden(cfg, store)
    if not _made_by_us(store) and _has_entries(store):
        if not force:
            raise OutputRefused(
                f"refusing --output {store.uri_of()}: it is not empty and this project did not make it (no "
                f"{OUTPUT_MARKER}); choose a new or empty folder, or pass --force to use it anyway (nothing "
                "of yours in it is deleted, files the project writes there are replaced)")
        log.warning("--force: using %s, which this project did not make; files of the same names as the "
                    "project's are replaced, nothing else is deleted", store.uri_of())
    if not store.is_file(OUTPUT_MARKER):
        store.write_json(OUTPUT_MARKER, {"made_by": "domain-adapters", "created": _now(),
                                         "host": socket.gethostname()})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _age(rec: dict) -> Optional[float]:
    t = epoch_seconds(rec.get("heartbeat"))
    return None if t is None else time.time() - t


def _owner_gone(rec: dict) -> Optional[str]:
    """Why the lock's owner is gone (stale lock), or None while it may be alive."""
    alive = pid_alive(rec.get("pid"), rec.get("host"))
    if alive is False:
        return f"its process {rec.get('pid')} on {rec.get('host')} is gone"
    age = _age(rec)
    if age is None or age > STALE_AFTER_S:
        return f"its heartbeat is {'missing' if age is None else f'{age:.0f} s old'}"
    return None


class OutputLock:
    """The one run that writes to this output (see the module docstring)."""

    def __init__(self, store, command: str):
        self.store, self.command = store, command
        self.rec = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": _now()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- create only if absent --
    def _create(self) -> bool:
        data = json.dumps({**self.rec, "heartbeat": _now()}).encode()
        if self.store.is_s3:
            from botocore.exceptions import ClientError
            bucket, key = self.store.bucket, self.store.key(LOCK_FILE)
            try:
                self.store.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                    return False
                raise
        path = Path(self.store.root) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def acquire(self) -> None:
        for _ in range(3):
            if self._create():
                return self._start_heartbeat()
            try:
                rec = json.loads(self.store.read_bytes(LOCK_FILE))
            except Exception:  # noqa: BLE001 - released meanwhile, or half written: look again
                rec = None
            if rec is None:
                time.sleep(0.2)
                continue
            gone = _owner_gone(rec)
            if gone is None:
                raise OutputLocked(
                    f"{self.store.uri_of()} is in use by another run: pid {rec.get('pid')} on {rec.get('host')}, "
                    f"started {rec.get('started')}, heartbeat {rec.get('heartbeat')} ({rec.get('command')}); "
                    f"wait for it to end, or use another --output (its lock: {self.store.uri_of(LOCK_FILE)})")
            log.warning("taking over the lock of %s: %s (it was held by pid %s on %s: %s)", self.store.uri_of(),
                        gone, rec.get("pid"), rec.get("host"), rec.get("command"))
            self.store.delete(LOCK_FILE)
        raise OutputLocked(f"could not take the lock {self.store.uri_of(LOCK_FILE)}: another run keeps taking it")

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    self.store.write_json(LOCK_FILE, {**self.rec, "heartbeat": _now()})
                except Exception as e:  # noqa: BLE001 - a missed beat; the lock goes stale only after several
                    log.warning("lock heartbeat not written: %s", e)
        self._thread = threading.Thread(target=beat, name="output-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            rec = json.loads(self.store.read_bytes(LOCK_FILE))
            if rec.get("pid") == self.rec["pid"] and rec.get("host") == self.rec["host"]:
                self.store.delete(LOCK_FILE)
        except Exception:  # noqa: BLE001 - gone already
            pass

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
