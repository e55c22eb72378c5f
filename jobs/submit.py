"""Submit the pipeline (or one stage) to a Ray cluster through Ray's ``JobSubmissionClient``.

    python -m jobs.submit --config configs/demo.yaml --output output/demo [--address http://HEAD:8265]
                          [--stage run|download|prepare|train|eval|report] [--set key=value ...]
                          [--domains a,b] [--raw-dir DIR] [--job-name NAME] [--no-wait] [--dry-run]

    make submit CONFIG=configs/default.yaml OUTPUT=s3://bucket/prefix RAY_ADDRESS=http://HEAD:8265

What it does, in order:

1. Loads and validates the config here, so a bad key fails in a second, not after the upload.
2. Builds the runtime_env: ``working_dir`` is the repository (the code and the small bundled
   fixtures), with ``excludes`` for the virtualenv, outputs, raw data directories, git, caches
   and anything that looks like a credential file. Its ``env_vars`` carry only the seed's
   documented switches (MAX_DOCS_PER_SOURCE, DOWNLOAD_ONLY, OFFLINE, ...) that are set here, plus
   TOKENIZERS_PARALLELISM / PYTHONUNBUFFERED. Credentials never go in it: a variable whose name
   looks like a secret is refused, and the finished runtime_env, metadata and entrypoint are
   checked for the values of the Ray token, AWS keys and HF token before anything is sent.
   S3 and Hugging Face credentials belong on the cluster's nodes (environment, IAM role, ~/.aws).
3. Local paths given here (``--output``, ``--raw-dir``) are made absolute, because the job runs in
   a copy of the repository elsewhere; on a multi-node cluster use ``s3://`` for ``--output``.
4. ``JobSubmissionClient.submit_job`` uploads the working_dir (zipped, content-addressed in the
   cluster's GCS) and submits ``python -m jobs.<stage> --config ... --output ...`` with the
   submission id, metadata and entrypoint resources. Token auth is on unless RAY_AUTH_MODE says
   otherwise: the client sends ``Authorization: Bearer <token>`` on every request (the log tail's
   websocket too). The token is the one Ray itself would load (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
   ~/.ray/auth_token); it is never printed or passed on a command line.
   Right after ``ray start`` the head's job agent may not be registered yet: the job server answers
   HTTP 500 "No available agent to submit job", and the dashboard may refuse connections for a
   moment. Both are retried with backoff for up to --retry-s seconds (default 60); nothing else is.
5. Prints the job id and the dashboard URL, follows the job's logs (``tail_job_logs``) unless
   ``--no-wait``, and exits 0 only if the job SUCCEEDED (1 otherwise, 2 for a problem found before
   sending, 130 on Ctrl-C, which leaves the job running and says how to stop it).

Job metadata (shown in the dashboard's job page and ``GET /api/jobs/``): ``job_name``,
``output_uri``, ``run_name``, ``stage``, ``config``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from pipeline.config import ConfigError, load_config
from pipeline.ownership import OUTPUT_MARKER
from pipeline.raycluster import WORKER_ENV
from pipeline.redaction import is_secret_name, redact_args, redact_url, scrub
from pipeline.sources import SETTINGS

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = {"run": "jobs.run_pipeline", "download": "jobs.download", "prepare": "jobs.prepare",
                 "train": "jobs.train", "eval": "jobs.eval", "report": "jobs.report"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
RETRY_S = 60.0   # how long a submission waits for a head that is still starting
T = TypeVar("T")

# Never shipped with the job (gitignore syntax, relative to the working dir). Ray also honours
# .gitignore / .rayignore; these are explicit so a missing .gitignore line cannot ship data.
EXCLUDES = [
    "/.git", "/.venv", "/venv", "/.venv-*", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache",
    "/build", "/dist", "/.whl", "/.devbundle", "/test-artifacts",
    # outputs and raw data at the top of the repo (fixtures/raw is small and ships: the demo needs it)
    "/output", "/outputs", "/raw", "/data", "/runs", "/checkpoints",
    # credential-looking files, anywhere: keys, tokens, env files, kubeconfigs
    ".env", ".env.*", ".envrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "id_rsa*",
    "id_dsa*", "id_ecdsa*", "id_ed25519*", ".ssh", ".gnupg", ".aws", ".ray", ".huggingface", "auth_token",
    "token", "*.token", "credentials", "*credentials.json", "service-account*.json", ".netrc", ".git-credentials",
    ".pypirc", ".kube", "kubeconfig", "*.kubeconfig", ".docker",
    # virtualenvs and caches anywhere (not only at the top)
    ".venv", "venv", ".venv-*", ".tox", ".nox", ".conda", ".mypy_cache", ".ruff_cache", ".cache",
]
# The package Ray uploads is capped at this size: the code and the small bundled fixtures are a few MB,
# so anything near it is data or a model that sits in the checkout and should be excluded.
MAX_PACKAGE_MB = float(os.environ.get("SUBMIT_MAX_PACKAGE_MB", "50"))

# The seed's documented switches: passed to the job when set here (they change what the job does),
# with the variables each source declares (SourceSpec.settings: DDO_*_URL, DOWNLOAD_OPENCASELIST, ...).
PASSTHROUGH_ENV = (
    "MAX_DOCS_PER_SOURCE", "MAX_SFT_PER_DOMAIN", "ALLOW_MISSING_DATA",
    "DOWNLOAD_ONLY", "DOWNLOAD_SKIP",
    "OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
)
_SECRET_VALUE_VARS = ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
                      "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class SubmitError(RuntimeError):
    """A problem the user can fix before anything is sent."""


# ---- pieces, each testable on its own --------------------------------------------------------

def job_address(cli_address: Optional[str], environ: Optional[dict] = None) -> str:
    env = os.environ if environ is None else environ
    addr = cli_address or env.get("RAY_API_SERVER_ADDRESS") or env.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr == "auto" or not addr.startswith(("http://", "https://")):
        # ray job submit talks to the dashboard's HTTP job server, not the GCS port.
        bare = addr.split("://")[-1]
        shown = addr if "@" not in bare else addr[: len(addr) - len(bare)] + "***@" + bare.rsplit("@", 1)[1]
        host = bare.rsplit("@", 1)[-1].split(":")[0] if addr != "auto" else "127.0.0.1"
        raise SubmitError(f"job address {shown!r} is not the dashboard URL: use http://{host}:8265 "
                          "(the head's dashboard port), via --address or RAY_ADDRESS")
    return addr.rstrip("/")


def is_local_address(addr: str) -> bool:
    host = addr.split("://", 1)[-1].split("/")[0].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def ray_token(environ: Optional[dict] = None) -> Optional[str]:
    """The token the ray CLI will send (same order as Ray: env var, token path, ~/.ray/auth_token)."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    home = Path(env.get("HOME") or Path.home())
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else home / ".ray" / "auth_token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def auth_headers(environ: Optional[dict] = None) -> dict[str, str]:
    """The Authorization header for the job server: token auth is on unless RAY_AUTH_MODE says otherwise.

    JobSubmissionClient would load the same token itself (when RAY_AUTH_MODE=token), but Ray's token
    loader keeps the first token a process loads; handing it over explicitly makes the token sent the
    one the payload was checked against, and lets one process submit with another environment."""
    env = os.environ if environ is None else environ
    if env.get("RAY_AUTH_MODE", "token").lower() != "token":
        return {}
    token = ray_token(env)
    if not token:
        raise SubmitError(
            "Ray token authentication is on but no token was found. Copy the head node's token "
            "(on the head: `ray get-auth-token`) into ~/.ray/auth_token on this machine, or point "
            "RAY_AUTH_TOKEN_PATH at a file holding it. (RAY_AUTH_MODE=disabled only for clusters "
            "started without auth.)")
    return {"Authorization": f"Bearer {token}"}


def _abs_local(p: str) -> str:
    return p if "://" in p else str(Path(p).expanduser().resolve())


def runtime_env(working_dir: Path, extra_env: Optional[list[str]] = None, environ: Optional[dict] = None) -> dict:
    """working_dir + excludes + env_vars."""
    env = os.environ if environ is None else environ
    env_vars = dict(WORKER_ENV)
    for name in PASSTHROUGH_ENV + tuple(e for s in SETTINGS for e in s.env):
        if env.get(name, "").strip():
            env_vars[name] = env[name]
    for name in extra_env or []:
        if is_secret_name(name):
            raise SubmitError(
                f"--env {name}: that looks like a credential, and credentials never go in a job's "
                "runtime_env (it is stored in the cluster and shown in the dashboard). Give it to the "
                "cluster's nodes instead: their environment, an IAM role / instance profile, or ~/.aws.")
        if name not in env:
            raise SubmitError(f"--env {name}: not set in this shell")
        env_vars[name] = env[name]
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES) + output_excludes(Path(working_dir)),
            "env_vars": env_vars}


def output_excludes(working_dir: Path) -> list[str]:
    """Anchored excludes for every output folder this project made inside the working dir (its marker,
    pipeline.ownership.OUTPUT_MARKER): a run's output never ships, wherever it sits."""
    found = []
    for dirpath, dirnames, filenames in os.walk(working_dir):
        if OUTPUT_MARKER in filenames:
            found.append("/" + str(Path(dirpath).relative_to(working_dir)))
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "node_modules")]
    return [f for f in found if f != "/."]


def package_facts(runtime_env: dict) -> dict:
    """The working_dir package exactly as Ray builds it (its own packager, this runtime_env's excludes and
    .gitignore as the job client uses them): {"bytes", "files", "largest": [(size, path)] top 5}."""
    import logging
    import tempfile
    import zipfile
    from ray._private.runtime_env.packaging import create_package
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    with tempfile.TemporaryDirectory(prefix="submit-pkg-") as d:
        target = Path(d) / "package.zip"
        create_package(runtime_env["working_dir"], target, include_gitignore=include_gitignore,
                       excludes=runtime_env["excludes"], logger=logging.getLogger("jobs.submit.package"))
        with zipfile.ZipFile(target) as z:
            files = [(i.file_size, i.filename) for i in z.infolist() if not i.is_dir()]
        return {"bytes": target.stat().st_size, "files": len(files), "names": sorted(n for _, n in files),
                "largest": sorted(files, reverse=True)[:5]}


def check_package(facts: dict, limit_mb: float = MAX_PACKAGE_MB) -> None:
    if facts["bytes"] > limit_mb * 2**20:
        big = ", ".join(f"{n} ({b / 2**20:.1f} MB)" for b, n in facts["largest"])
        raise SubmitError(f"the job's working_dir package is {facts['bytes'] / 2**20:.1f} MB ({facts['files']} files), "
                          f"over the {limit_mb:g} MB limit; largest: {big}. Exclude them (add them to .gitignore "
                          "or .rayignore, or move data to s3://), or raise SUBMIT_MAX_PACKAGE_MB")


def check_no_secrets(payload: dict, environ: Optional[dict] = None) -> None:
    """Refuse to send anything that contains the value of the Ray token or a cloud credential."""
    env = os.environ if environ is None else environ
    text = json.dumps(payload)
    values = {n: env.get(n, "") for n in _SECRET_VALUE_VARS}
    values["ray token"] = ray_token(env) or ""
    for name, value in values.items():
        if value and len(value) >= 8 and value in text:
            raise SubmitError(f"refusing to submit: the value of {name} appears in the job's runtime_env, "
                              "metadata or command line; remove it (credentials stay on the cluster's nodes)")


def job_command(stage: str, config_rel: str, output: str, raw_dir: Optional[str],
                sets: list[str], domains: Optional[str]) -> list[str]:
    cmd = ["python", "-m", STAGE_MODULES[stage], "--config", config_rel, "--output", output]
    if raw_dir:
        cmd += ["--raw-dir", raw_dir]
    for s in sets:
        cmd += ["--set", s]
    if domains:
        cmd += ["--domains", domains]
    return cmd


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _shipped(path: Path, root: Path) -> bool:
    """Whether a path inside the working dir travels with the job (not under an excluded top dir)."""
    if not _inside(path, root):
        return False
    parts = path.resolve().relative_to(root.resolve()).parts
    anchored = {e[1:] for e in EXCLUDES if e.startswith("/") and "*" not in e}
    anywhere = {e for e in EXCLUDES if not e.startswith("/") and "*" not in e}
    return not ((parts and parts[0] in anchored) or any(p in anywhere for p in parts))


def build(args: argparse.Namespace, environ: Optional[dict] = None) -> dict:
    """Everything that will be sent (address, submission_id, metadata, runtime_env, entrypoint argv,
    entrypoint_num_cpus) and the job's dashboard URL; raises SubmitError before anything is sent."""
    env = os.environ if environ is None else environ
    sys.path.insert(0, str(REPO))

    for value in args.set:
        if redact_args([value]) != [value]:
            # the entrypoint is stored by the cluster and shown in the dashboard and `ray job list`
            raise SubmitError(f"--set {redact_args([value])[0]}: that holds a credential, and credentials never go "
                              "in a job's command line (the cluster stores it and the dashboard shows it). Give it "
                              "to the cluster's nodes instead: their environment or a config file there.")
    working_dir = Path(args.working_dir).resolve()
    config_path = Path(args.config)
    if not config_path.is_file():
        raise SubmitError(f"config {args.config} not found")
    if not _inside(config_path, working_dir):
        raise SubmitError(f"config {config_path} is outside the working dir {working_dir}: put it inside "
                          "(e.g. configs/) so it ships with the job")
    config_rel = str(config_path.resolve().relative_to(working_dir))
    output = _abs_local(args.output) if args.output else None
    raw_dir = _abs_local(args.raw_dir) if args.raw_dir else None
    try:
        cfg = load_config(config_path, sets=args.set, raw_dir=raw_dir, output=output, environ=dict(env))
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    if args.domains:
        unknown = [d for d in args.domains.split(",") if d.strip() and d.strip() not in cfg.domains]
        if unknown:
            raise SubmitError(f"--domains names {unknown}, which the config does not list ({cfg.domains})")
    # The job runs in a copy of the working dir: pass the output explicitly (the config's relative
    # default would land inside that temporary copy), and the raw dir when it does not ship.
    output = output or cfg.output
    if raw_dir is None and "://" not in cfg.data.raw_dir and not _shipped(Path(cfg.data.raw_dir), working_dir):
        raw_dir = cfg.data.raw_dir
    address = job_address(args.address, env)
    if "://" not in output and not is_local_address(address):
        print(f"note: output {output} is a local path on the cluster's nodes; with more than one node "
              "use s3://bucket/prefix (or a shared filesystem) so every worker writes to the same place",
              file=sys.stderr)
    stage = args.stage
    job_name = args.job_name or f"adapters-{stage}-{cfg.run_name}"
    submission_id = args.submission_id or (
        f"adapters-{cfg.run_name}-{stage}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}")
    metadata = {"job_name": job_name, "output_uri": redact_url(output), "run_name": cfg.run_name,
                "stage": stage, "config": config_rel}
    renv = runtime_env(working_dir, args.env, env)
    entry = job_command(stage, config_rel, output, raw_dir, args.set, args.domains)
    check_no_secrets({"runtime_env": renv, "metadata": metadata, "entrypoint": entry}, env)
    return {"address": address, "submission_id": submission_id, "metadata": metadata, "runtime_env": renv,
            "entrypoint": entry, "entrypoint_num_cpus": args.entrypoint_num_cpus,
            "dashboard_url": f"{address}/#/jobs/{submission_id}"}


# ---- talking to the job server -----------------------------------------------------------------

def _starting_up(e: Exception) -> bool:
    """A head that is still starting: no job agent registered yet (the job server's HTTP 500 "No
    available agent to submit job") or the dashboard not accepting connections yet. Auth errors,
    a bad request or a duplicate id are not retried."""
    return isinstance(e, ConnectionError) or (isinstance(e, RuntimeError) and "No available agent" in str(e))


def with_retry(call: Callable[[], T], what: str, retry_s: float = RETRY_S, sleep=time.sleep) -> T:
    """call() until it succeeds or fails for another reason than a starting head; waits 1, 2, 4, 8, 8..
    seconds between tries, at most retry_s in all. (Hand-written: Ray's client retries nothing, and
    one policy serves both the connection and the submission.)"""
    waited, delay = 0.0, 1.0
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not _starting_up(e) or waited + delay > retry_s:
                raise
            print(f"{what}: the head is still starting ({scrub(str(e).splitlines()[0][:160])}); retrying in {delay:.0f}s",
                  file=sys.stderr, flush=True)
            sleep(delay)
            waited, delay = waited + delay, min(8.0, delay * 2)


def connect(address: str, environ: Optional[dict] = None, retry_s: float = RETRY_S):
    """A JobSubmissionClient for the head's dashboard URL, with the token header (see auth_headers)."""
    from ray.job_submission import JobSubmissionClient
    headers = auth_headers(environ)
    return with_retry(lambda: JobSubmissionClient(address, headers=headers), "connecting", retry_s)


def submit(client, plan: dict, retry_s: float = RETRY_S) -> str:
    """Upload the working_dir and submit. When a retried submission finds its id taken, the earlier try went
    through after all (its reply was lost): that job is ours. A taken id on the first try is an error."""
    tries = 0

    def once() -> str:
        nonlocal tries
        tries += 1
        try:
            return client.submit_job(entrypoint=shlex.join(plan["entrypoint"]), runtime_env=plan["runtime_env"],
                                     metadata=plan["metadata"], submission_id=plan["submission_id"],
                                     entrypoint_num_cpus=plan.get("entrypoint_num_cpus"))
        except RuntimeError as e:
            if tries > 1 and "already exists" in str(e):
                return plan["submission_id"]
            raise
    return with_retry(once, "submitting", retry_s)


def follow(client, submission_id: str) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            print(chunk, end="", flush=True)
    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log stream broke off: the status below still tells the outcome
        print(f"\n(log stream ended: {str(e).splitlines()[0][:200]})", file=sys.stderr)
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        time.sleep(2)
        status = client.get_job_status(submission_id)
    return str(status.value)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config inside the repository, e.g. configs/demo.yaml")
    p.add_argument("--output", help="s3://bucket/prefix, or a local path on the cluster (made absolute here)")
    p.add_argument("--raw-dir", help="raw data directory on the cluster's nodes (made absolute here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--domains", help="comma-separated subset of the config's domains")
    p.add_argument("--stage", choices=sorted(STAGE_MODULES), default="run", help="default: run (all stages)")
    p.add_argument("--address", help=f"the head's dashboard URL (default: RAY_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("--job-name", help="metadata job_name (default: adapters-<stage>-<run_name>)")
    p.add_argument("--submission-id", help="default: adapters-<run_name>-<stage>-<UTC time>-<random>")
    p.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="also pass this (non-secret) environment variable to the job, e.g. HF_ENDPOINT")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default: none)")
    p.add_argument("--working-dir", default=str(REPO), help="code shipped with the job (default: the repository)")
    p.add_argument("--retry-s", type=float, default=RETRY_S,
                   help=f"how long to retry while the head is still starting (default {RETRY_S:g})")
    p.add_argument("--no-wait", action="store_true", help="return after submitting; do not stream logs")
    p.add_argument("--dry-run", action="store_true", help="print what would be sent, send nothing")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    sys.path.insert(0, str(REPO))
    args = _parser().parse_args(argv)
    try:
        plan = build(args)
        facts = package_facts(plan["runtime_env"])
        print(f"working_dir package: {facts['bytes'] / 2**20:.2f} MB, {facts['files']} files "
              f"(from {plan['runtime_env']['working_dir']})", file=sys.stderr)
        check_package(facts)
        if args.dry_run:
            print(scrub(json.dumps({k: plan[k] for k in ("address", "submission_id", "metadata", "runtime_env",
                                                         "entrypoint", "dashboard_url")}, indent=2)))
            return 0
        client = connect(plan["address"], retry_s=args.retry_s)
    except SubmitError as e:
        print(f"error: {scrub(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - unreachable head, auth refused: Ray's message says which
        print(f"error: cannot reach the job server at {redact_url(plan['address'])}: {scrub(e)}", file=sys.stderr)
        return 1
    sid = plan["submission_id"]
    print(f"Submitting {plan['metadata']['job_name']} as job {sid} to {redact_url(plan['address'])}")
    print(f"  output: {plan['metadata']['output_uri']}")
    print(f"  dashboard: {redact_url(plan['dashboard_url'])}", flush=True)
    try:
        submit(client, plan, retry_s=args.retry_s)
    except Exception as e:  # noqa: BLE001 - auth refused, bad request, head gone: Ray's message says which
        print(f"error: job {sid} was not submitted: {scrub(e)}", file=sys.stderr)
        return 1
    if args.no_wait:
        print(f"Submitted. Follow it: ray job logs -f {sid}   dashboard: {redact_url(plan['dashboard_url'])}")
        return 0
    try:
        status = follow(client, sid)
    except KeyboardInterrupt:
        print(f"\nStopped following; job {sid} keeps running. Follow it: ray job logs -f {sid}   "
              f"stop it: ray job stop {sid}", file=sys.stderr)
        return 130
    print(f"Job {sid}: {status}   dashboard: {redact_url(plan['dashboard_url'])}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
