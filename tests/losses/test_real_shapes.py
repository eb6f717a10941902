"""At the real student's shapes (Qwen2.5-0.5B: H = 896, V = 151,936) and 2,048 tokens, the training path's token
objectives never build a (tokens, V) tensor for either side, forward or backward.

The objectives run as a stage runs them (a distillation task's ``token_terms`` on the models' outputs: final hidden
states and LM heads, the fused head pass for ``lm`` + ``kl``, and ``kl`` alone through the chunked loss). Every
tensor that any aten op returns is recorded by a dispatch mode, backward included.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmkd.contract import HEAD_GRADIENT, DistillBatch, ModelInputs, ModelOutput
from mmkd.objectives import build_objective
from mmkd.tasks import build_task

V, H, T, ANSWERS = 151_936, 896, 2_048, 512


class LargestOutputs(TorchDispatchMode):
    """Of every tensor an op returns with a vocabulary-sized dimension (other than the (V, H) head and its
    gradient): the most rows it holds (numel / V), with its shape and op; and whether a (V, H) tensor was returned."""

    def __init__(self):
        super().__init__()
        self.rows = (0, (), "")
        self.head_sized = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and V in t.shape:
                if H in t.shape:
                    self.head_sized = True
                elif t.numel() // V > self.rows[0]:
                    self.rows = (t.numel() // V, tuple(t.shape), str(func))
        return out


def _outputs():
    g = torch.Generator().manual_seed(0)
    student = ModelOutput(last_hidden=torch.randn(1, T, H, generator=g).requires_grad_(),
                          head_weight=(torch.randn(V, H, generator=g) * 0.02).requires_grad_())
    teacher = ModelOutput(last_hidden=torch.randn(1, T, H, generator=g),
                          head_weight=torch.randn(V, H, generator=g) * 0.02)
    labels = torch.full((1, T), -100)
    labels[0, T - ANSWERS:] = torch.randint(0, V, (ANSWERS,), generator=g)
    ids = torch.zeros(1, T, dtype=torch.long)
    return student, teacher, DistillBatch(inputs=ModelInputs(ids, torch.ones_like(ids), {}), labels=labels)


def _largest(names, weights=None):
    student, teacher, batch = _outputs()
    task = build_task("distill", {}, {n: build_objective(n, {}) for n in names})
    if weights:
        task.bind_weights(weights)
    with LargestOutputs() as forward:
        terms = task.token_terms(student, teacher, batch)
    loss = sum(terms[n] for n in names) + terms.get(HEAD_GRADIENT, 0.0)
    with LargestOutputs() as backward:
        loss.backward()
    assert student.head_weight.grad is not None and student.last_hidden.grad is not None
    assert torch.isfinite(loss.detach()) and float(loss.detach()) > 0
    return forward, backward


def test_fused_lm_and_kl_at_real_shapes_never_build_a_tokens_by_vocabulary_tensor():
    forward, backward = _largest(["lm", "kl"], {"lm": 1.0, "kl": 1.0})
    # chunks of about 110 rows (64 MiB of float32 logits); the answer rows would be 512, the whole sequence 2,048
    assert 0 < forward.rows[0] <= ANSWERS // 4, forward.rows
    assert backward.rows[0] <= ANSWERS // 4, backward.rows  # (the fused pass computed its gradients going forward)
    assert backward.head_sized  # the backward was observed: it returned the head's gradient


@pytest.mark.slow  # the chunking of chunked_token_loss is covered at small shapes in test_chunked.py
def test_a_lone_divergence_at_real_shapes_is_chunked_too():
    forward, backward = _largest(["kl"])
    assert 0 < forward.rows[0] <= ANSWERS // 4, forward.rows
    assert backward.rows[0] <= ANSWERS // 4 and backward.head_sized, backward.rows


def test_the_lm_loss_alone_at_real_shapes_is_chunked_too():
    forward, backward = _largest(["lm"])
    assert 0 < forward.rows[0] <= ANSWERS // 4, forward.rows
    assert backward.rows[0] <= ANSWERS // 4 and backward.head_sized, backward.rows
