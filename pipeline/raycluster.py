"""Connect to Ray once per process, and leave nothing of a local Ray behind.

    ensure_ray(cfg)     join the cluster a job was submitted to or a configured one, else start a local one
    join_address(cfg)   the address to join, or None for a local Ray of this run's own
    normalize_ray_address(cfg)   'local' (config or RAY_ADDRESS) read as "not set" everywhere after (the CLI calls it)
    shutdown_ray()      stop the local Ray this process started (the CLI calls it on every way out; atexit too)
    setup_worker()      Ray's worker_process_setup_hook, given to every worker of the run through runtime_env

Which cluster, in this order:

1. Inside ``ray job submit``: the job supervisor sets RAY_ADDRESS (and the job's runtime_env and
   metadata in RAY_JOB_CONFIG_JSON_ENV_VAR). We join that cluster and add to the job's runtime_env
   only what it does not set: Ray refuses a driver runtime_env that conflicts with the job's.
   ``resources.ray_address`` is ignored there: the job already runs on the cluster it was submitted to.
2. ``join_address(cfg)``: ``resources.ray_address``, else RAY_ADDRESS ('auto' joins a ``ray start``
   cluster on this machine; host:port or ray://host:10001 a remote one). ``local`` means case 3.
3. Neither: a local Ray for this process, started with ``address="local"``. A plain ``ray.init()``
   would join whatever cluster Ray's ``ray_current_cluster`` file names (another ``ray start`` on the
   machine, perhaps another user's, whose token we do not have); when one is running, one INFO line says
   so. The dashboard starts when its dependencies are installed (``ray[default]``); its URL is logged.
   ``ray.init`` turns token auth on for it.

A local Ray's processes share the driver's fate (Linux PR_SET_PDEATHSIG) except two: the raylet's
dashboard agent and runtime-env agent notice the raylet's death within ~2 s, then try to report it to
the GCS, which died with the driver, and linger ~60 s (measured on Ray 2.60 after a SIGKILL of the
driver), and a worker the raylet forked just before the raylet died. ``shutdown_ray`` covers normal
exit, errors, Ctrl-C, SIGTERM and SIGHUP (the CLI turns them into KeyboardInterrupt; ``ensure_ray`` puts
its handlers back after ``ray.init``, which installs Ray's own ``sys.exit(15)``). For SIGKILL,
``start_watchdog`` runs a small process (``python -m pipeline.raycluster <pid>``), started before
``ray.init``, that the driver then tells its Ray session directory. The moment the driver is gone (its
stdin pipe closes without the driver's "bye") it stops the run's Ray as one: every process of this user
that is the driver's descendant (refreshed every second while the driver lives), names the session in
its command line (GCS, raylet, agents, a worker still starting) or has a file open in the session
directory (a worker after it renamed itself ``ray::...``: its log files), and their descendants. A
worker forked after the last refresh by a raylet that died first is re-parented to init, so the
descendants alone miss it (the CI failure of issue 23); the session does not. It sweeps several times
over a few seconds, freezing what it finds first. Ray's processes share the driver's process group,
but so may the user's own (a shell script's), so the group is not what is killed. Ray has a reaper
of this kind, but starts it only where the kernel offers no fate sharing (it does on Linux).

Token authentication needs nothing here: Ray reads the token from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token itself. Nothing in this module logs it.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from pipeline.logs import setup_worker as setup_worker_logs
from pipeline.redaction import masked_command_line

log = logging.getLogger(__name__)

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Set for every worker of the run (a value already in the environment wins): tokenizers fork threads
# otherwise; logs stream as they happen; Ray Train's controller takes a worker's report every health
# check (2 s by default) and the worker waits in ray.train.report until it does (a queue of one): polled
# every 0.5 s, fast steps (the demo's, a small model's) are not held back, at one small call per worker.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
WORKER_SETUP_HOOK = "pipeline.raycluster.setup_worker"
LOCAL = "local"
# what the dashboard needs beyond ray itself (the `default` extra of ray)
DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "opencensus", "prometheus_client", "grpc")

_local: dict[str, Any] = {}   # the local Ray this process started: {"watchdog": Popen or None}


def submitted_job_config(environ: Optional[dict] = None) -> Optional[dict[str, Any]]:
    """The runtime_env and metadata of the submitted job this driver runs in, or None outside a job."""
    env = os.environ if environ is None else environ
    raw = env.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {}


def driver_runtime_env(job: Optional[dict], environ: Optional[dict] = None) -> Optional[dict]:
    """The runtime_env to give ray.init: WORKER_ENV keys and the worker setup hook, less what the job sets."""
    env = os.environ if environ is None else environ
    job_env = ((job or {}).get("runtime_env") or {})
    wanted = {k: env.get(k, v) for k, v in WORKER_ENV.items() if k not in (job_env.get("env_vars") or {})}
    out: dict[str, Any] = {"env_vars": wanted} if wanted else {}
    if "worker_process_setup_hook" not in job_env:
        out["worker_process_setup_hook"] = WORKER_SETUP_HOOK
    return out or None


def join_address(cfg, environ: Optional[dict] = None) -> Optional[str]:
    """resources.ray_address, else RAY_ADDRESS; None (a local Ray) when neither is set or it is 'local'."""
    env = os.environ if environ is None else environ
    addr = (cfg.resources.ray_address or env.get("RAY_ADDRESS") or "").strip()
    return None if addr in ("", LOCAL) else addr


def normalize_ray_address(cfg) -> None:
    """'local' (resources.ray_address, else RAY_ADDRESS) means a local Ray of this run's own: make it read
    as 'nothing set' for the rest of the process (doctor's checks, Ray's own processes). The config's
    'local' wins over a RAY_ADDRESS in the environment, as any resources.ray_address does."""
    if (cfg.resources.ray_address or "").strip() == LOCAL:
        cfg.resources.ray_address = None
        os.environ.pop("RAY_ADDRESS", None)
    elif not cfg.resources.ray_address and os.environ.get("RAY_ADDRESS", "").strip() == LOCAL:
        del os.environ["RAY_ADDRESS"]


def current_cluster_file(environ: Optional[dict] = None) -> Path:
    """Where ``ray start`` records the cluster a plain ``ray.init()`` would join (Ray's own rule:
    RAY_TMPDIR, else TMPDIR on Linux, else /tmp; then ray/ray_current_cluster)."""
    env = os.environ if environ is None else environ
    base = env.get("RAY_TMPDIR") or (env.get("TMPDIR") if sys.platform.startswith("linux") else None) or "/tmp"
    return Path(base) / "ray" / "ray_current_cluster"


def running_cluster(environ: Optional[dict] = None) -> Optional[str]:
    """The address another ``ray start`` on this machine recorded, or None."""
    try:
        return current_cluster_file(environ).read_text().strip() or None
    except OSError:
        return None


def dashboard_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in DASHBOARD_MODULES)


def ensure_ray(cfg) -> None:
    """Initialise Ray for the driver if it is not yet, and log what the cluster offers."""
    import ray

    if ray.is_initialized():
        return
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    job = submitted_job_config()
    runtime_env = driver_runtime_env(job)
    if job is not None:
        meta = job.get("metadata") or {}
        log.info("running inside a submitted Ray job (job_name=%s, output_uri=%s); joining its cluster",
                 meta.get("job_name", "?"), meta.get("output_uri", "?"))
        if cfg.resources.ray_address:
            log.info("resources.ray_address=%s is ignored inside a submitted job", cfg.resources.ray_address)
        ctx = _init_keeping_signal_handlers(address=os.environ.get("RAY_ADDRESS") or "auto", runtime_env=runtime_env,
                                            log_to_driver=True)
    elif join_address(cfg):
        log.info("joining Ray cluster at %s", join_address(cfg))
        ctx = _init_keeping_signal_handlers(address=join_address(cfg), runtime_env=runtime_env, log_to_driver=True)
    else:
        ctx = _start_local(cfg, runtime_env)
    log_cluster(getattr(ctx, "dashboard_url", None))


LOOPBACK = "127.0.0.1"


def loopback_only() -> None:
    """Make the local Ray this process starts a loopback-only node, so that its Prometheus metrics (the
    dashboard's and the agent's exporters) and the agent's HTTP server bind 127.0.0.1, not every interface
    (they serve without the auth token). Ray 2.60 binds those to loopback exactly when the node's IP is
    loopback, and takes loopback as the node's IP when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is off (its
    single-machine mode; ray.init turns an explicit _node_ip_address=127.0.0.1 back into the machine's
    address). The constant is read at import, so it is set here too; the environment carries it to
    the processes Ray starts. Only for a local Ray: a joined cluster keeps its own addresses."""
    from ray._private import ray_constants
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _start_local(cfg, runtime_env: Optional[dict]):
    import ray

    kw: dict[str, Any] = {}
    if cfg.resources.num_cpus:
        kw["num_cpus"] = cfg.resources.num_cpus
    other = running_cluster()
    if other:
        log.info("a Ray cluster started with `ray start` runs on this machine (%s); this run starts its own "
                 "local Ray (set RAY_ADDRESS or resources.ray_address to join that one)", other)
    dashboard = dashboard_available()
    log.info("starting a local Ray (%s%s)", kw or "all cores", "" if dashboard else
             "; no dashboard: `pip install 'ray[default]'` for it")
    previous = os.environ.pop("RAY_ADDRESS", None)   # 'local' is ours to read; Ray's processes must not see it
    loopback_only()
    # the watchdog first: a SIGKILL during ray.init leaves Ray's first processes behind otherwise
    _local["watchdog"] = start_watchdog()
    atexit.register(shutdown_ray)
    try:
        ctx = _init_keeping_signal_handlers(address=LOCAL, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                                            runtime_env=runtime_env, log_to_driver=True, **kw)
    finally:
        if previous is not None:
            os.environ["RAY_ADDRESS"] = previous
    tell_watchdog(_local.get("watchdog"), (getattr(ctx, "address_info", None) or {}).get("session_dir"))
    return ctx


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _init_keeping_signal_handlers(**kw):
    """ray.init, with the process's SIGTERM and SIGHUP handlers as they were before it.

    ray.init installs its own SIGTERM handler (``sys.exit(15)``: exit 15, no clean-up of ours, and a C++
    stack dump from Ray's core worker on the way out). The CLI's handler (interrupt, clean up, exit 143)
    is put back; a SIGTERM that arrives during ray.init, while Ray's is in place, reaches Ray's as
    SystemExit(15) and is handed to the handler Ray replaced.

    SIGHUP is blocked in this thread while ray.init runs, so the local Ray's processes it starts (GCS,
    raylet, agents) inherit it blocked, as Ray's own start-up blocks SIGINT in them: a closed terminal
    sends SIGHUP to the whole process group, and a raylet ended by it makes Ray's core worker end the
    driver at once, before any clean-up (state `running` for good). The driver still gets it: another
    of its threads takes it, or this one once it is unblocked; the handler runs in the main thread."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in HANDLED_SIGNALS} if main else {}
    if main:   # inherited by the processes ray.init starts (see below)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    import ray._private.utils as ray_utils
    # ray.init records this process's command line (from /proc) as the job's entrypoint, shown by the
    # dashboard and `ray list jobs` to everyone who can reach the cluster: a `--set` secret must not be in it
    entrypoint, ray_utils.get_entrypoint_name = ray_utils.get_entrypoint_name, masked_command_line
    # Every signal that arrives is also written to this socket by Python's C-level handler, whatever its Python
    # handler then does: Ray's SIGTERM handler raises SystemExit, and where that lands in code that ignores
    # exceptions (logging's at-fork hook after Ray forks a process: "Exception ignored in _releaseLock") the
    # SIGTERM was lost and the run went on. Read after ray.init, it still reaches the CLI's handler.
    wake_r, wake_w = socket.socketpair() if main else (None, None)
    if main:
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    received = b""
    try:
        ctx = ray.init(**kw)
    except SystemExit as e:
        handler = before.get(signal.SIGTERM)
        if e.code == signal.SIGTERM and callable(handler):
            handler(signal.SIGTERM, None)   # raises what the handler raises (the CLI's: KeyboardInterrupt)
        raise
    finally:
        ray_utils.get_entrypoint_name = entrypoint
        for s, h in before.items():
            if h is not None:
                signal.signal(s, h)
        if main:
            signal.set_wakeup_fd(old_wakeup)
            with contextlib.suppress(BlockingIOError):
                received = wake_r.recv(4096)
            wake_r.close()
            wake_w.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    for s in HANDLED_SIGNALS:   # here, a signal that came during ray.init was not handled: its exception was lost
        if s in received and callable(before.get(s)):
            before[s](s, None)
    return ctx


def shutdown_ray() -> None:
    """Stop the local Ray this process started (its processes end with it); nothing for a joined cluster."""
    if not _local:
        return
    import ray

    watchdog = _local.pop("watchdog", None)
    try:
        if ray.is_initialized():
            ray.shutdown()
    finally:
        stop_watchdog(watchdog)


def log_cluster(dashboard_url: Optional[str] = None) -> dict[str, float]:
    """Log the cluster's nodes, CPUs, GPUs, object store, custom resources and dashboard URL in one line;
    returns the resources."""
    import ray

    res = ray.cluster_resources()
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - informational only
        nodes = []
    custom = {k: v for k, v in sorted(res.items())
              if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")}
    url = (dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}") if dashboard_url else None
    log.info("Ray cluster: %d node(s), %g CPU, %g GPU, %.1f GiB object store%s; dashboard: %s",
             len(nodes), res.get("CPU", 0), res.get("GPU", 0), res.get("object_store_memory", 0) / 2**30,
             f"; other resources: {custom}" if custom else "", url or "none")
    return res


def setup_worker() -> None:
    """worker_process_setup_hook: runs once in every Ray worker process of the run (local or submitted).

    Pins RAY_ADDRESS to the worker's own cluster (Ray's State API, which Ray Train's placement-group
    cleaner calls, otherwise looks up ray_current_cluster and may query another cluster on the machine),
    and makes warnings one line each (pipeline.logs)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    setup_worker_logs()


# ---- the watchdog for a SIGKILLed driver -----------------------------------------------------------

def start_watchdog() -> Optional[subprocess.Popen]:
    """Start the orphan watchdog for this process's local Ray (see the module docstring)."""
    try:
        return subprocess.Popen([sys.executable, "-m", "pipeline.raycluster", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    except OSError as e:
        log.warning("could not start the watchdog that stops this run's Ray if the driver is killed: %s", e)
        return None


def tell_watchdog(proc: Optional[subprocess.Popen], session_dir: Optional[str]) -> None:
    """Give the watchdog the local Ray's session directory (what names this run's Ray processes)."""
    if proc is None or not session_dir or proc.poll() is not None:
        return
    try:
        proc.stdin.write(f"session {session_dir}\n".encode())
        proc.stdin.flush()
    except (OSError, ValueError) as e:
        log.warning("could not tell the watchdog this run's Ray session: %s", e)


def stop_watchdog(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.stdin.write(b"bye\n")
        proc.stdin.close()
        proc.wait(timeout=10)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        proc.kill()


def watch(driver_pid: int, interval_s: float = 1.0, grace_s: float = 3.0, sweep_s: float = 4.0) -> int:
    """The watchdog's loop: refresh the driver's descendants every ``interval_s`` and read the driver's
    lines ("session <dir>", "bye"); when stdin closes without "bye", sweep the run's Ray (``sweep``)
    every 0.25 s for ``sweep_s``, then SIGKILL what is still alive ``grace_s`` later."""
    known: dict[int, float] = {}   # pid -> start time of every process seen as the run's
    session: Optional[str] = None
    while True:
        _add_descendants(driver_pid, known)
        ready, _, _ = select.select([sys.stdin], [], [], interval_s)
        if ready:
            line = sys.stdin.readline()
            if line.strip() == "bye":
                return 0
            if line.startswith("session "):
                session = line[len("session "):].strip() or None
                continue
            if line == "":
                break
    sweep(known, session, sweep_s, grace_s)
    return 0


def sweep(known: dict[int, float], session: Optional[str], sweep_s: float, grace_s: float) -> None:
    """Stop the run's Ray processes: each round freezes what is known or names ``session`` (a raylet
    then forks no more), adds their descendants, and SIGTERMs (then continues) the new ones; rounds go
    on for ``sweep_s`` (a process forked while a round ran is found by the next); ``grace_s`` later,
    SIGKILL for those left."""
    import psutil

    signalled: dict[int, Any] = {}
    end = time.monotonic() + sweep_s
    while True:
        _add_session_processes(session, known)
        procs = [p for p in _still_known(known) if p.pid not in signalled]   # the signalled are exiting
        for p in procs:
            try:
                p.suspend()
            except psutil.Error:
                continue
        for p in procs:
            _add_descendants(p.pid, known)
        for p in terminate_send([p for p in _still_known(known) if p.pid not in signalled]):
            signalled[p.pid] = p
        if time.monotonic() >= end:
            break
        time.sleep(0.25)
    psutil.wait_procs(list(signalled.values()), timeout=grace_s)
    for p in _still_known(known):
        try:
            p.kill()
        except psutil.Error:
            pass


def session_processes(session_dir: str) -> list:
    """This user's processes of the Ray session ``session_dir``: named in the command line (its
    directory name is unique: start time and the driver's pid), or with a file open under it (a worker
    that renamed itself ``ray::...`` keeps its log files there). Not this process."""
    import psutil

    name = os.path.basename(session_dir.rstrip("/"))
    prefix = session_dir.rstrip("/") + "/"
    me, uid = os.getpid(), os.getuid()
    found = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.pid == me or p.info["uids"] is None or p.info["uids"].real != uid:
                continue
            cmd = " ".join(p.info["cmdline"] or ())
            if name in cmd or (cmd.startswith("ray::") and any(f.path.startswith(prefix) for f in p.open_files())):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _add_session_processes(session: Optional[str], known: dict[int, float]) -> None:
    if not session:
        return
    import psutil
    for p in session_processes(session):
        try:
            known.setdefault(p.pid, p.create_time())
        except psutil.Error:
            continue


def _still_known(known: dict[int, float]) -> list:
    """The processes of known still running (same pid and start time, not a reused pid)."""
    import psutil
    procs = []
    for pid, created in known.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created:
                procs.append(p)
        except psutil.Error:
            continue
    return procs


def _add_descendants(pid: int, known: dict[int, float]) -> None:
    """Add pid's descendants (not this watchdog) to known, with their start times; a gone pid adds none."""
    import psutil
    try:
        for p in psutil.Process(pid).children(recursive=True):
            if p.pid != os.getpid():
                known.setdefault(p.pid, p.create_time())
    except psutil.Error:
        pass


def terminate_send(procs: list) -> list:
    """SIGTERM each psutil.Process and continue it (a stopped process acts on SIGTERM once continued);
    returns those signalled."""
    import psutil

    sent = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
            p.resume()
            sent.append(p)
        except psutil.Error:
            continue
    return sent


def terminate(procs: list, grace_s: float) -> list:
    """SIGTERM each psutil.Process, then SIGKILL those still alive after ``grace_s``; returns those killed."""
    import psutil

    _, alive = psutil.wait_procs(terminate_send(procs), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return alive


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C for the driver's terminal is not for us
    raise SystemExit(watch(int(sys.argv[1])))
