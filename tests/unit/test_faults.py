"""Fault injection is a collaborator the recipe is given (pipeline/train/faults.py), not a subclass of it:
each planned fault fires at its seam and step, and a recipe without a plan holds NO_FAULTS, which does nothing.
(The faults inside a real training run: tests/unit/test_train_core.py and tests/integration.)"""
import threading
from types import SimpleNamespace

import pytest
import torch

from pipeline.storage import Store
from pipeline.train.faults import NO_FAULTS, FaultPlan, Faults, with_faults
from pipeline.train.loop import DomainRecipe


def _recipe(tmp_path):
    return SimpleNamespace(domain="debate", run_dir="runs/r", store=Store(str(tmp_path)))


def test_each_fault_fires_at_its_seam_and_step_only(tmp_path):
    r = _recipe(tmp_path)
    f = Faults(FaultPlan.parse("debate:oom:3,debate:nan:4,medicine:raise", "debate"))
    f.at_setup(r)                                  # raise is medicine's, not debate's
    f.before_step(r, 2)
    with pytest.raises(torch.OutOfMemoryError, match="simulated .* at step 3"):
        f.before_step(r, 3)
    assert [p.rsplit("/", 1)[-1].startswith("debate-oom-attempt-") for p in r.store.list_files("runs/r/faults")] == [True]
    assert f.step_loss(3, 1.5) == 1.5
    assert all(f.step_loss(s, 1.5) != f.step_loss(s, 1.5) for s in (4, 5))   # NaN from step 4 on
    with pytest.raises(RuntimeError, match="injected failure for domain debate"):
        Faults(FaultPlan.parse("debate:raise", "debate")).at_setup(r)
    with pytest.raises(SystemExit):
        Faults(FaultPlan.parse("debate:exit:2", "debate")).before_step(r, 2)
    assert Faults(FaultPlan.parse("debate:no_cuda", "debate")).real_cuda_check and not NO_FAULTS.real_cuda_check
    hang = Faults(FaultPlan.parse("debate:hang:3", "debate"))
    hang.before_step(r, 2)                         # not its step: returns
    stuck = threading.Thread(target=hang.before_step, args=(r, 3), daemon=True)   # stays until the process ends
    stuck.start()
    stuck.join(timeout=2.5)
    assert stuck.is_alive()


def test_no_plan_means_no_faults_and_the_recipe_is_never_subclassed(tmp_path):
    r = _recipe(tmp_path)
    for step in range(1, 50):
        NO_FAULTS.before_step(r, step)
        assert NO_FAULTS.step_loss(step, 2.0) == 2.0
    NO_FAULTS.at_setup(r)
    assert not r.store.exists("runs/r/faults")
    assert with_faults(DomainRecipe, None) is DomainRecipe
    factory = with_faults(DomainRecipe, FaultPlan.parse("debate:nan:2", "debate"))
    assert factory.func is DomainRecipe and isinstance(factory.keywords["faults"], Faults)
