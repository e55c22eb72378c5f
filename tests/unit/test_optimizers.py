"""train.optimizer is a name of the optimizer table (pipeline/optimizers.py): config accepts exactly its
names (per domain too), and each entry builds a torch optimizer that trains."""
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, TrainHyper, load_config
from pipeline.optimizers import OPTIMIZERS, build_optimizer

DEMO = Path(__file__).resolve().parents[2] / "configs/demo.yaml"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_of_the_table_is_accepted_and_lowers_a_loss(name):
    cfg = load_config(DEMO, sets=[f"train.per_domain={{medicine: {{optimizer: {name}}}}}", "train.learning_rate=0.05"],
                      environ={})
    hyper = cfg.hyper_for("medicine")
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = build_optimizer(hyper, [w])
    assert isinstance(opt, torch.optim.Optimizer)
    first = float((w ** 2).sum().detach())
    for _ in range(20):
        opt.zero_grad()
        (w ** 2).sum().backward()
        opt.step()
    assert float((w ** 2).sum().detach()) < first / 2
    assert name in TrainHyper.model_fields["optimizer"].description   # the config's help lists it


def test_a_name_outside_the_table_is_refused_with_the_known_names():
    for key in ("train.optimizer", "train.per_domain.debate.optimizer"):
        with pytest.raises(ConfigError, match=r"optimizer: Input should be") as e:
            load_config(DEMO, sets=[f"{key}=lion"], environ={})
        assert all(f"'{n}'" in str(e.value) for n in OPTIMIZERS)
