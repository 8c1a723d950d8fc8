"""The optimizer and the learning-rate schedule: SGD with mmsegmentation's poly decay, stepped per iteration.

The learning rate of iteration ``it`` is a pure function of the iteration and the config
(``lr_mult * (lr - min_lr) * (1 - it / iters) ** power + lr_mult * min_lr``), set before every step,
so a run resumed with another ``train.lr`` or schedule applies it from the resume iteration on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.segmentor import offset_parameters


def poly_factor(iteration: int, train_cfg: dict[str, Any]) -> float:
    """Learning-rate factor of the poly schedule: from 1 down to min_lr / lr at the last iteration."""
    floor = train_cfg["min_lr"] / train_cfg["lr"]
    progress = min(iteration / train_cfg["iters"], 1.0)
    return (1.0 - progress) ** train_cfg["poly_power"] * (1.0 - floor) + floor


def parameter_groups(model: nn.Module, train_cfg: dict[str, Any], offset_lr_mult: float) -> list[dict[str, Any]]:
    """SGD parameter groups: offset/mask predictors get ``offset_lr_mult``; optionally no decay on norms and biases.

    Each group carries ``lr_mult``, which the poly schedule multiplies into its learning rate.
    """
    offsets = {id(p) for p in offset_parameters(model)}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        lr_mult = offset_lr_mult if id(param) in offsets else 1.0
        no_decay = train_cfg["no_decay_norm_bias"] and (param.ndim <= 1)
        groups.setdefault((lr_mult, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": train_cfg["lr"] * lr_mult,
            "lr_mult": lr_mult,
            "weight_decay": 0.0 if no_decay else train_cfg["weight_decay"],
        }
        for (lr_mult, no_decay), params in groups.items()
    ]


def build_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.SGD:
    """SGD over ``parameter_groups`` with the config's momentum and weight decay."""
    tcfg = config["train"]
    return torch.optim.SGD(
        parameter_groups(model, tcfg, config["model"]["deform"]["offset_lr_mult"]), lr=tcfg["lr"], momentum=tcfg["momentum"]
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, iteration: int, train_cfg: dict[str, Any]) -> float:
    """Set every group's learning rate for ``iteration``; return the base one (lr_mult 1)."""
    factor = poly_factor(iteration, train_cfg)
    for group in optimizer.param_groups:
        group["lr"] = train_cfg["lr"] * group["lr_mult"] * factor
    return train_cfg["lr"] * factor
