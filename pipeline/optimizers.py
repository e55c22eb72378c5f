"""The optimizers ``train.optimizer`` names: one entry each (name -> description and builder).

Config validates ``train.optimizer`` (and ``train.per_domain.<domain>.optimizer``) against these names and
shows their descriptions; the recipe (pipeline/train/loop.py) builds the one named. Adding an optimizer
is one function and one entry here. Importing this module is cheap: torch is imported by a builder when
it runs (config imports this module, and config must load without torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Optimizer:
    description: str
    build: Callable[[Any, list], Any]    # (the domain's hyperparameters, the trainable parameters) -> torch optimizer


def _adamw(hyper, params: list):
    import torch
    return torch.optim.AdamW(params, lr=hyper.learning_rate, weight_decay=hyper.weight_decay)


def _sgd(hyper, params: list):
    import torch
    return torch.optim.SGD(params, lr=hyper.learning_rate, momentum=0.9, weight_decay=hyper.weight_decay)


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer("torch AdamW (betas 0.9, 0.999)", _adamw),   # the default
    "sgd": Optimizer("SGD with momentum 0.9", _sgd),
}


def build_optimizer(hyper, params: list):
    """The torch optimizer hyper.optimizer names, over params."""
    return OPTIMIZERS[hyper.optimizer].build(hyper, params)
