"""Where a training or evaluation worker computes: checked on the worker's own node, never guessed.

    worker_device(cfg) -> "cpu" | "cuda:<i>"

With ``resources.device: cuda`` CUDA must work on the node the worker landed on: the driver's
pre-flight only sees the driver's node, and a worker on a node with a broken driver (the seed's
"error 304") would otherwise train on the CPU for days without a word. When it does not, this raises
``CudaUnavailableError`` (a fatal, per-domain failure) naming the node, torch's build and the cause.

Test hook: ``DOMAIN_ADAPTERS_FAKE_GPU=1`` in a worker's environment makes a cuda trial compute on
the CPU while it still holds its (fake) GPU resource, so that scheduling and autoscaling are
tested on CPU-only machines. It is logged loudly and never set by the pipeline itself.
"""
from __future__ import annotations

import logging
import os
import socket

from pipeline.errors import UserFacingError

log = logging.getLogger(__name__)

FAKE_GPU_ENV = "DOMAIN_ADAPTERS_FAKE_GPU"


class CudaUnavailableError(UserFacingError):
    """resources.device is cuda but this worker's node cannot use CUDA."""


def node_ip() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only for the message
        pass
    return socket.gethostname()


def worker_device(cfg, allow_fake_gpu: bool = True) -> str:
    """The torch device this worker trains on; raises CudaUnavailableError instead of falling back."""
    if cfg.resources.device == "cpu":
        return "cpu"
    if allow_fake_gpu and os.environ.get(FAKE_GPU_ENV) == "1":
        log.warning("%s=1: this cuda trial computes on the CPU (test hook; its GPU resource is still held)",
                    FAKE_GPU_ENV)
        return "cpu"
    import torch
    from pipeline.doctor import probe_cuda
    info = probe_cuda()
    if not info["available"]:
        raise CudaUnavailableError(
            f"resources.device is cuda but CUDA cannot be used on node {node_ip()} "
            f"(torch {info['torch']}, CUDA build {info['runtime'] or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}): {info['cause']}. "
            "Fix that node's driver or the container's GPU access (nvidia-smi must work there; "
            "`adapters doctor` says which torch build the driver needs), or set resources.device: cpu "
            "to train on CPUs on purpose.")
    return f"cuda:{torch.cuda.current_device()}"
