"""The optimization: SGD with mmsegmentation's poly decay, and one optimizer step over micro-batches.

The learning rate of iteration ``it`` is a pure function of the iteration and the config
(``lr_mult * (lr - min_lr) * (1 - it / iters) ** power + lr_mult * min_lr``), set before every step,
so a run resumed with another ``train.lr`` or schedule applies it from the resume iteration on.
A step over ``train.accum_steps`` micro-batches (gradient accumulation) is the whole batch's step: each
micro-batch's loss is weighted by its share of the batch's pixels, and BatchNorm's running statistics move
once per step as one batch would move them (``scale_batchnorm_momentum``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from engine.device import AUTOCAST
from engine.loss import compute_loss, counted_pixels
from models.segmentor import offset_parameters

BATCHNORM_MOMENTUM = 0.1  # the recipe's (torch's and mmsegmentation's default), per optimizer step


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


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, images: torch.Tensor,
    labels: torch.Tensor, config: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch, run as ``train.accum_steps`` micro-batches; the batch's detached losses.

    Each micro-batch's loss is weighted by its share of the pixels the loss normalises by (``counted_pixels``),
    so the summed gradients are the whole batch's. Under DDP the gradients are averaged over the processes on
    the last micro-batch only (``no_sync`` before it). ``train.amp`` must be resolved (``engine.device``).
    """
    tcfg, accum = config["train"], config["train"]["accum_steps"]
    total_pixels = counted_pixels(labels, tcfg["loss_norm"]).clamp(min=1)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    losses: dict[str, torch.Tensor] = {}
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum))):
        share = counted_pixels(y, tcfg["loss_norm"]) / total_pixels
        with model.no_sync() if ddp and i < accum - 1 else nullcontext():
            with torch.autocast(x.device.type, **AUTOCAST[tcfg["amp"]]):
                outputs = model(x)
            micro = compute_loss(outputs, y, config["model"]["aux_loss_weight"], tcfg["loss_op"], tcfg["loss_norm"])
            scaler.scale(micro["total"] * share).backward()
        for key, value in micro.items():
            losses[key] = losses.get(key, 0) + value.detach() * share
    scaler.step(optimizer)
    scaler.update()
    return losses


def scale_batchnorm_momentum(model: nn.Module, accum_steps: int) -> None:
    """Set every BatchNorm's momentum so that ``accum_steps`` micro-batches move the running statistics as one batch
    would: (1 - m) ** accum_steps = 1 - BATCHNORM_MOMENTUM, the same time constant in steps on every card."""
    momentum = 1 - (1 - BATCHNORM_MOMENTUM) ** (1 / accum_steps) if accum_steps > 1 else BATCHNORM_MOMENTUM
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
