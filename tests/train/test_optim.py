"""The stage's optimizer and schedules: any torch.optim class, and mmkd's curves against transformers'."""

from __future__ import annotations

import pytest
import torch

from mmkd.train.optim import build_optimizer, build_scheduler
from mmkd.train.recipe import OptimizerConfig, ScheduleConfig


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), [
    ("cosine", "cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("linear", "linear", {}),
    ("constant", "constant_with_warmup", {}),
])
def test_after_the_warmup_mmkd_schedules_are_transformers_curves(ours, theirs, kwargs):
    from transformers import get_scheduler

    total, warmup = 20, 4
    min_ratio = kwargs.get("min_lr_rate", 0.0)
    mine = _lrs(build_scheduler(_optimizer(), ScheduleConfig(name=ours, warmup_steps=warmup,
                                                             min_lr_ratio=min_ratio), total), total)
    hf = _lrs(get_scheduler(theirs, _optimizer(), num_warmup_steps=warmup, num_training_steps=total,
                            scheduler_specific_kwargs=kwargs or None), total)
    assert mine[warmup:] == pytest.approx(hf[warmup:], abs=1e-12)
    # the one difference: mmkd's warmup counts the first step, transformers' starts at 0 (one step behind)
    assert mine[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert hf[:warmup] == pytest.approx([s / warmup for s in range(warmup)])


def test_a_transformers_scheduler_by_name():
    sched = build_scheduler(_optimizer(), ScheduleConfig(name="warmup_stable_decay", warmup_steps=2,
                                                         args={"num_decay_steps": 3}), 10)
    lrs = _lrs(sched, 10)
    assert lrs[:2] == pytest.approx([0.0, 0.5]) and lrs[2:7] == pytest.approx([1.0] * 5) and lrs[-1] < 0.5


def test_any_torch_optimizer_by_class_path_with_its_arguments():
    layer = torch.nn.Linear(3, 3)
    groups = {"projector": [("w", layer.weight), ("b", layer.bias)]}
    opt = build_optimizer(groups, OptimizerConfig(name="torch.optim.RMSprop", lr=0.01, weight_decay=0.1,
                                                  args={"momentum": 0.5, "alpha": 0.9}))
    assert isinstance(opt, torch.optim.RMSprop)
    assert opt.defaults["momentum"] == 0.5 and opt.defaults["alpha"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    adam = build_optimizer(groups, OptimizerConfig(name="torch.optim.AdamW", betas=(0.8, 0.9), eps=1e-6))
    assert adam.defaults["betas"] == (0.8, 0.9) and adam.defaults["eps"] == 1e-6  # passed where accepted
    sgd = build_optimizer(groups, OptimizerConfig(name="sgd", lr=0.1))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
