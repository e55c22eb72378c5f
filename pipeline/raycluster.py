"""Connect to Ray once: the cluster a job was submitted to, a configured address, or a local one.

Three cases, in this order:

1. Inside ``ray job submit``: the job supervisor sets RAY_ADDRESS (and the job's runtime_env and
   metadata in RAY_JOB_CONFIG_JSON_ENV_VAR). We join that cluster and pass no runtime_env of our
   own, except environment variables the job did not set: Ray refuses a driver runtime_env that
   conflicts with the job's. ``resources.ray_address`` is ignored here: the job already runs on
   the cluster it was submitted to.
2. ``resources.ray_address`` ('auto' joins a ``ray start`` cluster on this machine; host:port or
   ray://host:10001 joins a remote one), else RAY_ADDRESS from the environment.
3. Neither: a local Ray for this process (no dashboard; ``ray.init`` turns token auth on for it).

Token authentication needs nothing here: Ray reads the token from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token itself. Nothing in this module logs it.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

log = logging.getLogger(__name__)

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Set for every worker of the run: tokenizers fork threads otherwise; logs stream as they happen.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


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
    """The runtime_env to give ray.init: WORKER_ENV keys the job does not already set, or None."""
    env = os.environ if environ is None else environ
    wanted = {k: env.get(k, v) for k, v in WORKER_ENV.items()}
    if job is not None:
        already = ((job.get("runtime_env") or {}).get("env_vars") or {})
        wanted = {k: v for k, v in wanted.items() if k not in already}
    return {"env_vars": wanted} if wanted else None


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
        ray.init(address=os.environ.get("RAY_ADDRESS") or "auto", runtime_env=runtime_env, log_to_driver=True)
    else:
        address = cfg.resources.ray_address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        else:
            kw = {}
            if cfg.resources.num_cpus:
                kw["num_cpus"] = cfg.resources.num_cpus
            log.info("starting a local Ray (%s)", kw or "all cores")
            ray.init(include_dashboard=False, runtime_env=runtime_env, **kw)
    log_cluster()


def log_cluster() -> dict[str, float]:
    """Log the cluster's resources, nodes and dashboard URL; returns the resources."""
    import ray

    res = ray.cluster_resources()
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception:  # noqa: BLE001 - informational only
        nodes = []
    gpus = res.get("GPU", 0)
    log.info("Ray cluster: %d node(s), %g CPU, %g GPU, %.1f GiB object store; resources: %s",
             len(nodes), res.get("CPU", 0), gpus, res.get("object_store_memory", 0) / 2**30,
             {k: v for k, v in sorted(res.items()) if not k.startswith("node:")})
    try:
        from ray._private.worker import get_dashboard_url
        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - private API; informational only
        url = None
    if url:
        log.info("Ray dashboard: %s", url if url.startswith("http") else f"http://{url}")
    return res
