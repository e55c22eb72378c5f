"""Ray Train's torch backend as a trial needs it (issue 23, item 7).

    trial_torch_config(cfg) -> TorchConfig    for the domain's TorchTrainer

Ray's own backend sets up a torch process group on every worker group before the training function
runs, with NCCL whenever the workers hold GPUs, also for a single worker. On a node whose torch cannot
use CUDA (a CPU-only build on a GPU node) that fails inside Ray Train ("Distributed package doesn't have
NCCL built in"), before the project's own CUDA check (pipeline.lm.device) could name the node and the
fix. Here the CUDA check runs first, on every worker, and a one-worker trial gets no process group at all:
it has nothing to all-reduce (pipeline.train.loop only syncs when the world is larger than one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from pipeline.lm.device import FAKE_GPU_ENV, worker_device


def _check_device(cfg) -> str:
    return worker_device(cfg)   # raises CudaUnavailableError naming the node


class _CheckedTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "CheckedTorchConfig") -> None:
        worker_group.execute(_check_device, backend_config.cfg)
        if len(worker_group) > 1:
            super().on_start(worker_group, backend_config)


@dataclass
class CheckedTorchConfig(TorchConfig):
    cfg: Any = None   # the run's config, for the workers' device check

    @property
    def backend_cls(self):
        return _CheckedTorchBackend


def trial_torch_config(cfg) -> CheckedTorchConfig:
    # the fake-GPU test hook computes on the CPU, where torch has no NCCL
    return CheckedTorchConfig(backend="gloo" if os.environ.get(FAKE_GPU_ENV) == "1" else None, cfg=cfg)
