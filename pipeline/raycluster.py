"""Connect to Ray once: the cluster a job was submitted to, a configured address, or a local one."""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(cfg) -> None:
    """Initialise Ray for the driver if it is not yet.

    Inside ``ray job submit`` RAY_ADDRESS is set and ``ray.init()`` joins that cluster. Otherwise
    ``resources.ray_address`` is used ('auto' joins a running ``ray start`` cluster), and with
    neither a local Ray is started for this process.
    """
    import ray

    if ray.is_initialized():
        return
    # Workers tokenize in their own processes: keep the Rust tokenizer from forking threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": os.environ["TOKENIZERS_PARALLELISM"]}}
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
    log.info("Ray resources: %s", ray.cluster_resources())
