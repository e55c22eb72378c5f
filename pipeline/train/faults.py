"""Fault injection for tests: the failures a real run meets, on demand, outside the training loop.

Tests set ``DOMAIN_ADAPTERS_FAULTS="domain:kind[:step],..."`` in the driver's environment (or pass a
``FaultPlan`` to ``train_domain``). The scheduler parses it once per domain and hands the typed plan
to the worker, which gives the recipe a ``Faults`` collaborator built from it (``DomainRecipe(...,
faults=Faults(plan))``; ``with_faults(DomainRecipe, plan)`` is that as a recipe factory). The recipe
calls its collaborator at three seams, none inside the micro-batch loop: once at setup (``at_setup``,
and ``real_cuda_check`` when it resolves its device), once before each optimizer step
(``before_step``), and once on each step's summed loss (``step_loss``). Without a plan the recipe
holds ``NO_FAULTS``, whose seams do nothing.

    kind       what happens
    raise      RuntimeError at setup, every attempt (the domain fails; the others go on)
    crash:N    the worker process dies (os._exit) before step N, once (FailureConfig retries it)
    oom:N      torch.OutOfMemoryError before step N, every attempt (retried, then the domain fails)
    nan:N      the loss is NaN from step N on (NonFiniteLossError: fatal, nothing saved after N-1)
    no_cuda    the worker's CUDA check runs for real even where DOMAIN_ADAPTERS_FAKE_GPU=1 says to
               compute on the CPU (a node whose CUDA is unusable)
    exit:N     SystemExit before step N (in-process tests: dies like a killed worker, nothing cleaned up)
    hang:N     the worker stops before step N until its process is killed (a run killed mid-training that
               cannot finish while its workers notice they are orphaned)
"""
from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict

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
    hang: Optional[int] = None

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
            elif kind in ("crash", "oom", "nan", "exit", "hang"):
                found[kind] = int(parts[2]) if len(parts) > 2 else 1
            else:
                raise ValueError(f"{FAULTS_ENV}: unknown fault kind {kind!r} in {item!r}")
        return cls(**found) if found else None


class Faults:
    """The recipe's fault-injection collaborator: fails at the moments `plan` names, else does nothing."""

    def __init__(self, plan: Optional[FaultPlan] = None):
        self.plan = plan or FaultPlan()

    @property
    def real_cuda_check(self) -> bool:
        """no_cuda: the worker's CUDA check runs for real even where DOMAIN_ADAPTERS_FAKE_GPU=1."""
        return self.plan.no_cuda

    def at_setup(self, recipe) -> None:
        if self.plan.raise_at_setup:
            raise RuntimeError(f"injected failure for domain {recipe.domain} ({FAULTS_ENV})")

    def before_step(self, recipe, step: int) -> None:
        """Before optimizer step `step` (counted from 1) of `recipe`."""
        plan = self.plan
        if plan.exit == step:
            raise SystemExit(f"injected exit before step {step}")
        while plan.hang == step:
            time.sleep(1)
        if plan.oom == step:
            import torch
            recipe.store.write_text(f"{recipe.run_dir}/faults/{recipe.domain}-oom-attempt-{os.getpid()}-{time.time_ns()}",
                                    "simulated OOM")
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (simulated by {FAULTS_ENV} at step {step}). Lower "
                "train.tokens_per_micro_batch or max_seq_length, or turn on train.gradient_checkpointing")
        if plan.crash == step:
            marker = f"{recipe.run_dir}/faults/{recipe.domain}-crash-{step}"
            if not recipe.store.exists(marker):
                recipe.store.write_text(marker, "crashed once")
                os._exit(1)

    def step_loss(self, step: int, loss: float) -> float:
        """The summed loss of step `step`, as this worker measured it: NaN from plan.nan on."""
        return float("nan") if self.plan.nan is not None and step >= self.plan.nan else loss


NO_FAULTS = Faults()


def with_faults(recipe_cls: type, plan: Optional[FaultPlan]) -> Callable[..., Any]:
    """A factory of `recipe_cls` recipes holding `plan`'s faults as their collaborator (`recipe_cls` itself
    without a plan); train_domain takes it as its recipe_cls."""
    return recipe_cls if plan is None else functools.partial(recipe_cls, faults=Faults(plan))
