"""One pass over the student's head for several token objectives: the same values and gradients as one pass each."""

import pytest
import torch

from mmkd.contract import HEAD_GRADIENT
from mmkd.objectives import build_objective
from mmkd.tasks import build_task


@pytest.mark.parametrize("names", [["lm", "kl"], ["lm", "topk_kl"], ["lm", "jsd", "topk_kl"]])
def test_a_fused_head_pass_gives_the_separate_values_and_gradients(models, sqa_batch, names):
    teacher, student = models
    weights = {n: 0.5 + i for i, n in enumerate(names)}
    results = []
    for fused in (False, True):
        objectives = {n: build_objective(n, {}, student=student, teacher=teacher) for n in names}
        task = build_task("distill", {}, objectives, student=student, teacher=teacher)
        if fused:
            task.bind_weights(weights)
        student.zero_grad(set_to_none=True)
        terms = task.losses(student, teacher, sqa_batch)
        assert (HEAD_GRADIENT in terms) == fused
        carrier = terms.pop(HEAD_GRADIENT, torch.zeros(()))
        assert float(carrier) == 0.0
        (sum(weights[n] * terms[n] for n in names) + carrier).backward()
        grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
        results.append(({n: float(terms[n].detach()) for n in names}, grads))
    (separate, g0), (together, g1) = results
    assert together == pytest.approx(separate, rel=1e-6)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        scale = g0[k].abs().max().clamp(min=1e-6)  # the vision tower's key biases get a gradient of ~0 either way
        assert ((g0[k] - g1[k]).abs().max() / scale) < 1e-4, k
    student.zero_grad(set_to_none=True)


def test_taid_and_lone_objectives_keep_their_own_pass(models, sqa_batch):
    teacher, student = models
    objectives = {"lm": build_objective("lm", {}, student=student),
                  "taid": build_objective("taid", {}, student=student, teacher=teacher, total_steps=10)}
    task = build_task("distill", {}, objectives, student=student, teacher=teacher)
    task.bind_weights({"lm": 1.0, "taid": 1.0})
    assert HEAD_GRADIENT not in task.losses(student, teacher, sqa_batch)
    lone = build_task("distill", {}, {"lm": build_objective("lm", {}, student=student)}, student=student)
    lone.bind_weights({"lm": 1.0})
    assert HEAD_GRADIENT not in lone.losses(student, None, sqa_batch)
