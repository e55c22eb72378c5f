"""Fault injection for tests: the failures a real run meets, on demand, outside the training loop.

Tests set ``DOMAIN_ADAPTERS_FAULTS="domain:kind[:step],..."`` in the driver's environment (or pass a
``FaultPlan`` to ``train_domain``). The scheduler parses it once per domain and hands the typed plan
to the worker, which then runs ``with_faults(DomainRecipe, plan)``: a subclass whose overrides fail
at the planned moment and otherwise call the real recipe. The production loop holds no test hook.

    kind       what happens
    raise      RuntimeError at setup, every attempt (the domain fails; the others go on)
    crash:N    the worker process dies (os._exit) before step N, once (FailureConfig retries it)
    oom:N      torch.OutOfMemoryError before step N, every attempt (retried, then the domain fails)
    nan:N      the loss is NaN from step N on (NonFiniteLossError: fatal, nothing saved after N-1)
    no_cuda    the worker's CUDA check runs for real even where DOMAIN_ADAPTERS_FAKE_GPU=1 says to
               compute on the CPU (a node whose CUDA is unusable)
    exit:N     SystemExit before step N (in-process tests: dies like a killed worker, nothing cleaned up)
"""
from __future__ import annotations

import os
import time
from typing import Optional

from pydantic import BaseModel, ConfigDict

from pipeline.lm.device import worker_device

FAULTS_ENV = "DOMAIN_ADAPTERS_FAULTS"


class FaultPlan(BaseModel):
    """The faults planned for one domain (steps count from 1)."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    raise_at_setup: bool = False
    crash: Optional[int] = None
    oom: Optional[int] = None
    nan: Optional[int] = None
    no_cuda: bool = False
    exit: Optional[int] = None

    @classmethod
    def parse(cls, spec: Optional[str], domain: str) -> Optional["FaultPlan"]:
        """The plan for `domain` in a DOMAIN_ADAPTERS_FAULTS value, or None when it names none."""
        found: dict = {}
        for item in (spec or "").split(","):
            parts = item.strip().split(":")
            if len(parts) < 2 or parts[0] != domain:
                continue
            kind = parts[1]
            if kind == "raise":
                found["raise_at_setup"] = True
            elif kind == "no_cuda":
                found["no_cuda"] = True
            elif kind in ("crash", "oom", "nan", "exit"):
                found[kind] = int(parts[2]) if len(parts) > 2 else 1
            else:
                raise ValueError(f"{FAULTS_ENV}: unknown fault kind {kind!r} in {item!r}")
        return cls(**found) if found else None


def with_faults(recipe_cls: type, plan: Optional[FaultPlan]) -> type:
    """`recipe_cls`, or a subclass of it that injects `plan`'s faults."""
    if plan is None:
        return recipe_cls

    class FaultyRecipe(recipe_cls):  # type: ignore[misc, valid-type]
        def resolve_device(self) -> str:
            return worker_device(self.cfg, allow_fake_gpu=not plan.no_cuda)

        def setup(self) -> None:
            if plan.raise_at_setup:
                raise RuntimeError(f"injected failure for domain {self.domain} ({FAULTS_ENV})")
            super().setup()

        def train_step(self) -> None:
            import torch
            step = self.state.step + 1
            if plan.exit == step:
                raise SystemExit(f"injected exit before step {step}")
            if plan.oom == step:
                self.store.write_text(f"{self.run_dir}/faults/{self.domain}-oom-attempt-{os.getpid()}-{time.time_ns()}",
                                      "simulated OOM")
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory (simulated by {FAULTS_ENV} at step {step}). Lower "
                    "train.tokens_per_micro_batch or max_seq_length, or turn on train.gradient_checkpointing")
            if plan.crash == step:
                marker = f"{self.run_dir}/faults/{self.domain}-crash-{step}"
                if not self.store.exists(marker):
                    self.store.write_text(marker, "crashed once")
                    os._exit(1)
            super().train_step()

        def micro_loss(self, batch: dict):
            loss = super().micro_loss(batch)
            if plan.nan is not None and self.state.step + 1 >= plan.nan:
                loss = loss * float("nan")
            return loss

    FaultyRecipe.__name__ = f"Faulty{recipe_cls.__name__}"
    return FaultyRecipe
