"""What state each stage and domain is in, read from the output tree (local or s3://). `adapters status`,
the report (pipeline.report), the training scheduler (pipeline.train.schedule) and the CLI's checks all use
these functions, so they use the same words.

    domain_state(store, run_name, domain, manifest) -> DomainOutcome   the one reader of a domain's outcome
    write_outcome(store, run_name, domain, state, ...)                  the one writer of its state file
    write_fatal(store, run_name, domain, error) / clear_fatal(...)      its `fatal` field (see DomainOutcome)
    prepare_state(store, run_name) -> StageState
    collect_status(store, run_name, domains) -> {"stages": {stage: StageState}, "domains": {domain: DomainOutcome}}
    StageRecord(store, run_name, stage, command)   the CLI's record of a stage while it runs, then how it ended

States (``STATES``):
    finished     the domain's adapter is there / the stage completed
    failed       it stopped with an error (the cause is kept)
    skipped      a domain with nothing to train (no SFT data)
    interrupted  stopped by Ctrl-C, SIGTERM or SIGHUP; or prepare output that is partial, with no record saying why
    running      recorded as running and its driver is alive (heartbeat recent, or its PID alive on this host)
    stale        recorded as running, but the heartbeat is older than STALE_AFTER_S and the driver is gone
                 (its PID is not alive on this host, or it ran on another host): killed, or the machine went away
    not started  nothing recorded yet
    unknown      its state file cannot be read

Files read:
    runs/<run>/domains/<domain>.json    written by write_outcome: {"domain", "state", "error", "updated",
                                        "val_loss", "adapter_uri"} and, while running, "pid", "host" (the
                                        driver's) and "heartbeat" (UTC ISO time, refreshed at least every 60 s)
    runs/<run>/fatal/<domain>.json      written by write_fatal (a training worker): {"domain", "error"}
    runs/<run>/stages/<stage>.json      written by StageRecord: {"stage", "state", "error", "command", "updated",
                                        "pid", "host", "heartbeat"}
    adapters/<domain>/training_report.json   a finished adapter (status "finished", val_loss, adapter_uri, ...)
    data/_SUCCESS, data/manifest.json, data/sft/, data/_work/   the prepare stage's output
    data/download_manifest.json, report/summary.json           the download and report stages
    eval/matrix.json                     the eval stage's output ("models": base and the adapters it scored)

With a run name, that run's state files are read; without one (``adapters status --output`` only), every
run's, and the newest state of a domain or stage wins. Exit status of ``adapters status``: 0 when the
output could be read (whatever the states), 1 when it is missing or unreadable.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

from pipeline import layout
from pipeline.config import DOMAINS, load_config
from pipeline.errors import no_space, no_space_message, UsageError, UserFacingError
from pipeline.redaction import scrub
from pipeline.storage import BadStorageUri, Store

STATES = ("finished", "failed", "skipped", "interrupted", "running", "stale", "not started", "unknown")
STALE_AFTER_S = 180.0   # three missed heartbeats of the trials' 60 s
HEARTBEAT_S = 30.0      # how often StageRecord refreshes a running stage's heartbeat
STAGES = ("download", "prepare", "train", "eval", "report")


# ---- time and liveness --------------------------------------------------------------------------

def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch_seconds(ts: Any) -> Optional[float]:
    if ts in (None, ""):
        return None
    try:
        if isinstance(ts, (int, float)):
            return float(ts)
        t = datetime.fromisoformat(str(ts).replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    except (TypeError, ValueError, OverflowError):
        return None


def _ago(seconds: Optional[float]) -> str:
    if seconds is None:
        return "at an unknown time"
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} days ago"


def pid_alive(pid: Any, host: Any) -> Optional[bool]:
    """Whether the recorded process runs: True / False when it ran on this host, None when that cannot be told."""
    if not pid or not host or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (ValueError, OverflowError, OSError):
        return None
    return True


def liveness(rec: dict, now: Optional[float] = None) -> tuple[str, str]:
    """("running" | "stale", detail) for a record whose state is "running"."""
    now = time.time() if now is None else now
    beat = epoch_seconds(rec.get("heartbeat")) or epoch_seconds(rec.get("updated"))
    age = None if beat is None else now - beat
    alive = pid_alive(rec.get("pid"), rec.get("host"))
    who = f"pid {rec['pid']} on {rec.get('host') or '?'}" if rec.get("pid") else "its driver"
    if alive is not True and (age is None or age > STALE_AFTER_S):
        gone = "is gone" if alive is False else "cannot be checked from here"
        return "stale", (f"recorded as running, but the last heartbeat was {_ago(age)} and {who} {gone}: "
                         "it did not finish; run the same command again to resume")
    return "running", f"heartbeat {_ago(age)} ({who})"


# ---- reading ---------------------------------------------------------------------------------------

class Unreadable(dict):
    """A file that exists but is not a JSON object."""


def _read(store, rel: str) -> Optional[dict]:
    """The JSON object at rel; None when missing; Unreadable when damaged."""
    try:
        if not store.is_file(rel):
            return None
        d = store.read_json(rel)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - damaged JSON, undecodable bytes, a storage error: shown, not raised
        return Unreadable()
    return d if isinstance(d, dict) else Unreadable()


def _newest_record(store, kind: str, name: str, run_name: Optional[str],
                   listing: Optional[list[str]] = None) -> tuple[Optional[str], Optional[dict]]:
    """(run, record) of runs/<run>/<kind>/<name>.json: that run's, or the newest over all runs
    (``listing``: the .json files under runs/, when the caller has listed them already)."""
    if run_name is not None:
        return run_name, _read(store, layout.record(run_name, kind, name))
    if listing is None:
        listing = store.list_files(layout.RUNS, suffix=".json")
    found = []
    for rel in listing:
        parsed = layout.parse_record(rel)
        if parsed is not None and parsed[1:] == (kind, name):
            found.append((parsed[0], _read(store, rel)))
    if not found:
        return None, None
    return max(found, key=lambda x: (epoch_seconds((x[1] or {}).get("heartbeat")) or 0,
                                     epoch_seconds((x[1] or {}).get("updated")) or 0))


def cause_line(text: Any, limit: int = 300) -> str:
    """One line of an error text: its first line (the cause, by the contract of pipeline.train), or for a
    bare traceback its last line (the exception)."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    if not lines:
        return ""
    return (lines[-1] if lines[0].startswith("Traceback") else lines[0])[:limit]


# ---- domains -----------------------------------------------------------------------------------------

@dataclass
class DomainOutcome:
    """A domain's outcome, as `domain_state` reads it from the records the training writes. `state` and
    `cause` are what status and the report show; the scheduler decides from `recorded`, `report` and `fatal`.

    `fatal` is a field of the outcome kept in a file of its own (runs/<run>/fatal/<domain>.json): a training
    worker writes it, on another node, while the trial's heartbeat rewrites the state file every HEARTBEAT_S;
    in the same file one of the two writes could drop the other's."""
    domain: str
    state: str
    cause: Optional[str] = None          # why it is not finished (a failed domain's error, cause first)
    run: Optional[str] = None            # the run whose state file was read
    val_loss: Optional[float] = None
    adapter_uri: Optional[str] = None
    record: Optional[dict] = field(default=None, repr=False)   # the state file, as read
    report: Optional[dict] = field(default=None, repr=False)   # adapters/<domain>/training_report.json, as read
    fatal: Optional[str] = None          # a worker's error that retrying cannot help (this run's attempt)

    @property
    def recorded(self) -> Optional[str]:
        """The state the run's state file records (None without a readable one)."""
        return self.record.get("state") if isinstance(self.record, dict) else None

    @property
    def finished_report(self) -> Optional[dict]:
        """The training report when it is a readable one of a finished adapter (whichever identity)."""
        rep = self.report
        return rep if isinstance(rep, dict) and not isinstance(rep, Unreadable) and rep.get("status") == "finished" else None

    def detail(self) -> str:
        """One line for the status table."""
        if self.state == "finished":
            vl = f"{self.val_loss:.4f}" if isinstance(self.val_loss, (int, float)) else "?"  # a report's value: any type
            return f"val loss {vl}; adapter {self.adapter_uri}"
        return cause_line(self.cause)


def _superseded(rep: dict, rec: Optional[dict], run: Optional[str]) -> bool:
    """Whether the run's own state (a later attempt that failed, was interrupted or is running) outranks a
    finished report in adapters/<domain>/: the report is another run_name's, or older than that state."""
    if not rec or rec.get("state") not in ("failed", "interrupted", "running"):
        return False
    if rep.get("run_name") not in (None, run):
        return True
    made, then = epoch_seconds(rep.get("finished_at")), epoch_seconds(rec.get("updated"))
    return made is not None and then is not None and then > made


def domain_state(store, run_name: Optional[str], domain: str, manifest: Optional[dict] = None,
                 now: Optional[float] = None, listing: Optional[list[str]] = None) -> DomainOutcome:
    """One domain's outcome. Its state, in this order:

    1. its state file cannot be read -> unknown
    2. adapters/<domain>/training_report.json says finished -> finished, unless this run's state file says
       failed / interrupted / running and the report is another run_name's or older than that state (a
       trial leaves an earlier adapter in place until its own export replaces it)
    3. its state file says failed / skipped / interrupted -> that, with the recorded cause
    4. its state file says running -> running or stale (``liveness``)
    5. its state file says finished, but the training report is gone -> not started (it will be trained again)
    6. no state file: data/manifest.json marks the domain empty -> skipped; else not started
    """
    run, rec = _newest_record(store, "domains", domain, run_name, listing)
    rep = _read(store, layout.training_report(domain))
    fatal = _read(store, layout.fatal(run, domain)) if run is not None else None
    out = DomainOutcome(domain, "not started", run=run, record=rec, report=rep,
                        fatal=fatal.get("error") if isinstance(fatal, dict) and fatal.get("error") else None)
    if isinstance(rec, Unreadable):
        out.state, out.cause = "unknown", f"{layout.domain_state(run, domain)} is not valid JSON"
        return out
    state = (rec or {}).get("state")
    if (rep is not None and not isinstance(rep, Unreadable) and rep.get("status", "finished") == "finished"
            and not _superseded(rep, rec, run)):
        out.state = "finished"
    elif state in ("failed", "skipped", "interrupted"):
        out.state = state
        out.cause = rec.get("error") or f"{state} (no cause recorded)"
    elif state == "running":
        out.state, live = liveness(rec, now)
        out.cause = ("training did not finish: " + live) if out.state == "stale" else f"training: {live}"
    elif isinstance(rep, Unreadable) and state in (None, "finished"):
        out.state, out.cause = "unknown", f"{layout.training_report(domain)} is unreadable (not a valid JSON object)"
    elif state == "finished":
        out.cause = (f"recorded as finished, but {layout.training_report(domain)} is gone: "
                     "the next `adapters train` trains it again")
    elif state is not None:
        out.state = str(state)
    else:
        dman = ((manifest or {}).get("domains") or {}).get(domain) or {}
        if dman.get("status") == "empty":
            out.state = "skipped"
            out.cause = f"no data: {dman.get('reason') or 'the domain has no records'}"
        else:
            out.cause = "not trained: no training report and no state file"
    if out.state == "finished":
        rep_ok = rep if isinstance(rep, dict) and not isinstance(rep, Unreadable) else {}
        out.cause = None
        out.val_loss = rep_ok.get("val_loss", (rec or {}).get("val_loss"))
        out.adapter_uri = rep_ok.get("adapter_uri") or (rec or {}).get("adapter_uri") or store.uri_of(layout.adapter(domain))
    return out


# ---- writing a domain's outcome (the training scheduler and its workers) ----------------------------------

def write_outcome(store, run_name: str, domain: str, state: str, error: Optional[str] = None,
                  report: Optional[dict] = None, driver: Optional[dict] = None) -> dict:
    """The domain's state file in this run. driver: {"pid", "host"} of the process that runs the stage
    (for `adapters status`); report: the training report whose val_loss and adapter_uri it repeats."""
    rec = {"domain": domain, "state": state, "error": scrub(error) if error else error, "updated": utc_now(),
           "val_loss": (report or {}).get("val_loss"), "adapter_uri": (report or {}).get("adapter_uri")}
    if state == "running":
        rec.update(heartbeat=rec["updated"], **(driver or {}))
    store.write_json(layout.domain_state(run_name, domain), rec)
    return rec


def write_fatal(store, run_name: str, domain: str, error: str) -> None:
    """The outcome's `fatal` field: a worker's error that retrying cannot help (see DomainOutcome)."""
    store.write_json(layout.fatal(run_name, domain), {"domain": domain, "error": error})


def clear_fatal(store, run_name: str, domain: str) -> None:
    """A new attempt starts without the last one's fatal error."""
    if store.exists(layout.fatal(run_name, domain)):
        store.delete(layout.fatal(run_name, domain))


# ---- stages --------------------------------------------------------------------------------------------

@dataclass
class StageState:
    state: str
    detail: str = ""


def _recorded(rec: Optional[dict], now: Optional[float]) -> Optional[StageState]:
    """The state a stage record gives, or None without one."""
    if rec is None:
        return None
    if isinstance(rec, Unreadable):
        return StageState("unknown", "its record under runs/ is not valid JSON")
    state = rec.get("state")
    if state == "running":
        return StageState(*liveness(rec, now))
    return StageState(str(state or "unknown"), cause_line(rec.get("error")))


def prepare_state(store, run_name: Optional[str], now: Optional[float] = None,
                  listing: Optional[list[str]] = None) -> StageState:
    """finished (data/_SUCCESS), running, stale, failed, interrupted (also: partial output and no record
    saying otherwise) or not started."""
    _, rec = _newest_record(store, "stages", "prepare", run_name, listing)
    recorded = _recorded(rec, now)
    if recorded is not None and recorded.state == "running":
        return recorded
    if store.is_file(layout.PREPARED):
        man = _read(store, layout.MANIFEST) or {}
        doms = man.get("domains") or {}
        return StageState("finished", f"{len(doms)} domain(s) in {layout.MANIFEST}" if doms else "")
    partial = any(f != layout.DOWNLOAD_MANIFEST for f in store.list_files(layout.DATA))
    if recorded is not None and recorded.state not in ("finished",):
        if partial and recorded.state == "stale":
            recorded.detail += "; data/ holds partial output"
        return recorded
    if partial:
        return StageState("interrupted", "data/ holds partial output and no _SUCCESS (prepare stopped before "
                                         "the end): run `adapters prepare` again; it resumes")
    return StageState("not started")


def collect_status(store, run_name: Optional[str], domains: Optional[list[str]],
                   now: Optional[float] = None) -> dict[str, Any]:
    """{'stages': {stage: StageState}, 'domains': {domain: DomainOutcome}} from an output Store."""
    manifest = _read(store, layout.MANIFEST)
    manifest = None if isinstance(manifest, Unreadable) else manifest
    listing = store.list_files(layout.RUNS, suffix=".json") if run_name is None else None
    if domains is None:
        found = {p[2] for p in map(layout.parse_record, listing or []) if p is not None and p[1] == "domains"}
        found |= {d for d in map(layout.adapter_domain, store.list_files(layout.ADAPTERS, suffix=layout.TRAINING_REPORT))
                  if d is not None}
        # prepared but not yet trained: a custom source's domain is known only from the manifest
        found |= {d for d in ((manifest or {}).get("domains") or {}) if isinstance(d, str)}
        domains = list(DOMAINS) + sorted(found - set(DOMAINS))
    doms = {d: domain_state(store, run_name, d, manifest, now, listing) for d in domains}

    stages: dict[str, StageState] = {}
    dm = _read(store, layout.DOWNLOAD_MANIFEST)
    if dm is None:
        stages["download"] = StageState("not started")
    elif isinstance(dm, Unreadable):
        stages["download"] = StageState("unknown", f"{layout.DOWNLOAD_MANIFEST} is not valid JSON")
    else:
        counts: dict[str, int] = {}
        for e in (dm.get("sources") or {}).values():
            counts[e.get("status", "?")] = counts.get(e.get("status", "?"), 0) + 1
        stages["download"] = StageState("finished", ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    stages["prepare"] = prepare_state(store, run_name, now, listing)
    stages["train"] = train_state(list(doms.values()),
                                  _recorded(_newest_record(store, "stages", "train", run_name, listing)[1], now))
    stages["eval"] = eval_state(store, [d.domain for d in doms.values() if d.state == "finished"],
                                _recorded(_newest_record(store, "stages", "eval", run_name, listing)[1], now))
    if store.is_file(layout.REPORT_JSON):
        stages["report"] = StageState("finished", store.uri_of(layout.REPORT_HTML) if store.is_file(layout.REPORT_HTML)
                                      else store.uri_of(layout.REPORT_JSON))
    else:
        stages["report"] = (_recorded(_newest_record(store, "stages", "report", run_name, listing)[1], now)
                            or StageState("not started"))
    return {"stages": stages, "domains": doms}


def eval_state(store, finished: list[str], recorded: Optional[StageState]) -> StageState:
    """The eval stage: a record saying running / stale / failed / interrupted wins (a failed re-run leaves the
    earlier eval/matrix.json in place); else finished when eval/matrix.json is there, with the finished
    adapters it has not scored named (`adapters eval` scores them); else the record or not started."""
    if recorded is not None and recorded.state in ("running", "stale", "failed", "interrupted", "unknown"):
        return recorded
    m = _read(store, layout.EVAL_MATRIX)
    if isinstance(m, Unreadable):
        return StageState("unknown", f"{layout.EVAL_MATRIX} is not valid JSON")
    if m is None:
        return recorded if recorded is not None and recorded.state != "finished" else StageState("not started")
    models = [x for x in (m.get("models") or []) if isinstance(x, str)]
    missing = [d for d in finished if d not in models]
    detail = f"{len(models)} model(s) on {len(m.get('datasets') or [])} test set(s): {store.uri_of(layout.EVAL_MATRIX)}"
    if missing:
        detail += f"; not evaluated yet: {', '.join(missing)} (`adapters eval` evaluates them)"
    return StageState("finished", detail)


def train_state(domains: list[DomainOutcome], recorded: Optional[StageState]) -> StageState:
    """The train stage: its record when there is one, else what its domains say; the detail counts them."""
    counts: dict[str, int] = {}
    for d in domains:
        counts[d.state] = counts.get(d.state, 0) + 1
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
    if recorded is None:
        first = next((s for s in ("running", "stale", "interrupted", "failed", "unknown") if s in counts), None)
        recorded = StageState(first or ("not started" if set(counts) <= {"not started"} else "finished"))
    recorded.detail = "; ".join(x for x in (recorded.detail, summary) if x)
    return recorded


# ---- the record the CLI keeps of a stage ----------------------------------------------------------------

class StageRecord:
    """runs/<run>/stages/<stage>.json while the CLI runs a stage: "running" with the driver's pid and host and
    a heartbeat a thread refreshes every HEARTBEAT_S; on exit finished, interrupted (KeyboardInterrupt) or
    failed (the exception's first line). Writing it never fails the stage (a warning is logged)."""

    def __init__(self, store, run_name: str, stage: str, command: str):
        self.store, self.rel = store, layout.stage_state(run_name, stage)
        self.base = {"stage": stage, "command": command, "pid": os.getpid(), "host": socket.gethostname()}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned = False

    def write(self, state: str, error: Optional[str] = None) -> None:
        now = utc_now()
        rec = {**self.base, "state": state, "error": scrub(error) if error else error, "updated": now}
        if state == "running":
            rec["heartbeat"] = now
        try:
            self.store.write_json(self.rel, rec)
        except Exception as e:  # noqa: BLE001 - the stage's own work decides its outcome, not its record
            if self._overwrite_in_place(rec, e):
                return
            if not self._warned:
                import logging
                logging.getLogger(__name__).warning("could not write %s: %s", self.store.uri_of(self.rel), e)
                self._warned = True

    def _overwrite_in_place(self, rec: dict, e: BaseException) -> bool:
        """On a full local disk the atomic write (a new file, then a rename) finds no room, but the record's
        own file has its blocks already: the record is rewritten in them (a few hundred bytes; not atomic,
        which only matters if the machine dies in these microseconds), so the stage says `failed` and why."""
        if no_space(e) is None or self.store.is_s3:
            return False
        try:
            with open(self.store.local_path(self.rel), "r+b") as f:
                f.write((json.dumps(rec, indent=2, default=str) + "\n").encode("utf-8"))
                f.truncate()
            return True
        except OSError:
            return False

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.write("running")

    def __enter__(self) -> "StageRecord":
        self.write("running")
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.base['stage']}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exc_type is None:
            self.write("finished")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.write("interrupted", "stopped by Ctrl-C, SIGTERM or SIGHUP")
        else:
            self.write("failed", str(exc) if isinstance(exc, UserFacingError) else
                       no_space_message(exc, self.store.uri) or f"{exc_type.__name__}: {exc}")
        return False


# ---- `adapters status` -------------------------------------------------------------------------------------

def _print_table(rows: list[tuple[str, str, str]], head: tuple[str, str, str]) -> None:
    w0 = max(len(r[0]) for r in rows + [head])
    w1 = max(len(r[1]) for r in rows + [head])
    for r in [head] + rows:
        print(f"{r[0].ljust(w0)}  {r[1].ljust(w1)}  {r[2]}".rstrip())


def run_status(config_path: Optional[str] = None, output: Optional[str] = None,
               sets: Optional[list[str]] = None, domains: Optional[list[str]] = None) -> int:
    """Print the stage and domain states; ``domains`` (from --domains) narrows the list."""
    wanted = domains
    run_name: Optional[str] = None
    domains: Optional[list[str]] = None
    storage_cfg = None
    if config_path:
        cfg = load_config(config_path, sets=sets, output=output)
        uri, run_name, domains, storage_cfg = cfg.output, cfg.run_name, list(cfg.domains), cfg.storage
    elif output:
        uri = output
    else:
        raise UsageError("status needs --output URI (or --config FILE)")
    try:
        store = Store(uri, storage_cfg)
        if not store.exists(""):
            print(f"nothing at {store.uri}: no stage has written there yet (check --output)")
            return 1
        if wanted:
            domains = list(wanted)
        st = collect_status(store, run_name, domains)
    except BadStorageUri:   # a malformed URI is a usage error (exit 2), not an unreadable output
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable output is this command's answer
        print(f"cannot read {uri}: {type(e).__name__}: {e}")
        return 1
    print(f"output: {store.uri}" + (f"   run: {run_name}" if run_name else ""))
    _print_table([(k, v.state, v.detail) for k, v in st["stages"].items()], ("stage", "state", "detail"))
    print()
    _print_table([(d, r.state, r.detail()) for d, r in st["domains"].items()], ("domain", "state", "detail"))
    return 0
