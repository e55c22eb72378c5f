"""Where a training or evaluation worker computes: checked on the worker's own node, never guessed.

    worker_device(cfg) -> "cpu" | "cuda:<i>"
    probe_cuda() -> what torch and the NVIDIA driver see (also `adapters doctor`'s cuda rows)

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
import re
import socket
import subprocess
import warnings
from typing import Any, Optional

from pipeline.errors import UserFacingError

log = logging.getLogger(__name__)

FAKE_GPU_ENV = "DOMAIN_ADAPTERS_FAKE_GPU"
GB = 1024 ** 3


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


# ---- what torch and the driver see (also `adapters doctor`'s cuda rows) -----------------------------

def probe_driver() -> dict[str, Optional[str]]:
    """The NVIDIA driver from `nvidia-smi`: {'driver': '575.57.08', 'driver_cuda': '12.9'} (the newest CUDA it
    runs, from the header), or Nones when there is no nvidia-smi / no driver."""
    try:
        r = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"driver": None, "driver_cuda": None}
    return parse_nvidia_smi(r.stdout)


def parse_nvidia_smi(header: str) -> dict[str, Optional[str]]:
    drv = re.search(r"Driver Version:\s*([\d.]+)", header)
    cu = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return {"driver": drv.group(1) if drv else None, "driver_cuda": cu.group(1) if cu else None}


def probe_cuda() -> dict[str, Any]:
    """What torch can see: {'available', 'cause', 'torch', 'runtime', 'gpus': [{name, memory_gb, cc, bf16}],
    'driver', 'driver_cuda'}."""
    import torch
    info: dict[str, Any] = {"torch": torch.__version__, "runtime": torch.version.cuda, "gpus": [], "cause": None,
                            **probe_driver()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            avail = torch.cuda.is_available()
        except Exception as e:  # pragma: no cover - is_available does not usually raise
            avail, info["cause"] = False, f"{type(e).__name__}: {e}"
    info["available"] = bool(avail)
    if not avail and info["cause"] is None:
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            info["cause"] = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        else:
            try:
                torch.cuda.init()
                info["cause"] = "torch.cuda.is_available() is False"
            except Exception as e:
                info["cause"] = f"{type(e).__name__}: {str(e).strip()}"
            extra = [str(w.message).strip() for w in caught if "CUDA" in str(w.message)]
            if extra and extra[0] not in info["cause"]:
                info["cause"] += f" ({extra[0]})"
        return info
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        info["gpus"].append({"index": i, "name": p.name, "memory_gb": p.total_memory / GB, "cc": f"{p.major}.{p.minor}",
                             "bf16": p.major >= 8})
    return info
