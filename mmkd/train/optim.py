"""The optimizer (per-part groups, no decay on norms and biases) and the learning-rate schedule of a stage.

mmkd's own schedules (``cosine``, ``linear``, ``constant``) warm up linearly and count the first step: step ``s`` of
the warmup gets ``(s + 1) / warmup`` of the peak, so no optimizer step runs at learning rate 0. After the warmup
they are exactly transformers' curves (``get_cosine_with_min_lr_schedule_with_warmup`` with
``min_lr_rate = min_lr_ratio``, ``get_linear_schedule_with_warmup`` to ``min_lr_ratio``, constant); transformers'
warmup starts at 0 instead, one step behind (a test shows both). Every other transformers scheduler is used through
``transformers.get_scheduler`` by its name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from mmkd.train.recipe.schema import MMKD_SCHEDULES, OptimizerConfig, ScheduleConfig
from mmkd.train.recipe.validate import optimizer_class

__all__ = ["build_optimizer", "build_scheduler", "warmup_schedule"]


def build_optimizer(named_groups: dict[str, list[tuple[str, nn.Parameter]]],
                    optimizer: OptimizerConfig) -> torch.optim.Optimizer:
    """Optimizer with one group per (part, decay) pair: per-part learning rate, no decay on norms and biases.

    Args:
        named_groups: Part name -> ``(parameter name, parameter)`` of the trainable parameters.
        optimizer: The stage's optimizer settings.
    """
    groups = []
    for part, params in named_groups.items():
        lr = optimizer.part_lr.get(part, optimizer.lr)
        decay = [p for n, p in params if p.ndim >= 2 and "norm" not in n.lower()]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "norm" not in n.lower())]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": optimizer.weight_decay, "name": part})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}.no_decay"})
    cls = optimizer_class(optimizer.name)
    if optimizer.name == "sgd":
        return cls(groups, lr=optimizer.lr, momentum=0.9, **optimizer.args)
    kwargs = dict(optimizer.args)
    accepted = inspect.signature(cls).parameters
    for key, value in (("betas", tuple(optimizer.betas)), ("eps", optimizer.eps)):
        if key in accepted:
            kwargs.setdefault(key, value)
    return cls(groups, lr=optimizer.lr, **kwargs)


def warmup_schedule(total_steps: int, warmup_steps: int, name: str, min_lr_ratio: float) -> Callable[[int], float]:
    """LambdaLR factor of mmkd's schedules: linear warmup, then cosine or linear decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The stage's scheduler, stepped once per optimizer step."""
    warmup = schedule.warmup_steps
    if warmup is None:
        warmup = int(round(schedule.warmup_ratio * total_steps))
    if schedule.name in MMKD_SCHEDULES:
        factor = warmup_schedule(total_steps, warmup, schedule.name, schedule.min_lr_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    from transformers import get_scheduler

    return get_scheduler(schedule.name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=dict(schedule.args) or None)
