import math

import pytest
import torch

from mmkd.losses import ForwardKL, TopKKL, topk_from_logits


def _logits(seed=0, b=2, t=3, v=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g) * 2, torch.randn(b, t, v, generator=g) * 2


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_full_topk_is_forward_kl(tail):
    student, teacher = _logits()
    mask = torch.ones(2, 3, dtype=torch.bool)
    idx, lp, _ = topk_from_logits(teacher, teacher.shape[-1])
    got = TopKKL(tail=tail)(student, idx, lp, mask)
    assert got.item() == pytest.approx(ForwardKL()(student, teacher, mask).item(), rel=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_zero_at_equality_gradients_and_masking(tail):
    student, teacher = _logits()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    idx, lp, _ = topk_from_logits(student, 4)
    loss = TopKKL(tail=tail)
    assert loss(student, idx, lp, mask).item() == pytest.approx(0.0, abs=1e-6)
    idx, lp, _ = topk_from_logits(teacher, 4)
    lp.requires_grad_()
    s = student.clone().requires_grad_()
    value = loss(s, idx, lp, mask)
    value.backward()
    assert value.item() > 1e-3 and lp.grad is None
    assert s.grad[~mask].abs().sum() == 0 and s.grad[mask].abs().sum() > 0
    s2 = student.clone()
    s2[~mask] = float("nan")
    assert torch.equal(loss(s2, idx, lp, mask), value.detach())


def test_bucket_hand_computed():
    # Teacher top-2 of a 4-token vocabulary: p = 0.5, 0.3 (tail 0.2); student q = 0.4, 0.1, 0.25, 0.25.
    q = torch.tensor([0.4, 0.1, 0.25, 0.25])
    idx = torch.tensor([[0, 1]])
    lp = torch.tensor([[0.5, 0.3]]).log()
    expected = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.5)
    assert TopKKL().per_token(q.log()[None], idx, lp).item() == pytest.approx(expected, rel=1e-5)
    renorm = 0.625 * math.log(0.625 / 0.8) + 0.375 * math.log(0.375 / 0.2)
    assert TopKKL(tail="renormalize").per_token(q.log()[None], idx, lp).item() == pytest.approx(renorm, rel=1e-5)


def test_minus_inf_and_low_precision():
    student, teacher = _logits()
    mask = torch.ones(2, 3, dtype=torch.bool)
    idx, lp, _ = topk_from_logits(teacher, 3)
    student = student.clone()
    student[..., -1] = float("-inf")
    lp = lp.clone()
    lp[..., -1] = float("-inf")
    s = student.clone().requires_grad_()
    value = TopKKL()(s, idx, lp, mask)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    half = TopKKL()(student.half(), idx, lp.half(), mask)
    assert half.dtype == torch.float32
    assert torch.equal(half, TopKKL()(student.half().float(), idx, lp.half().float(), mask))


def test_bucket_refuses_a_temperature():
    with pytest.raises(ValueError, match="tail='bucket' needs temperature=1"):
        TopKKL(temperature=2.0)
    assert TopKKL(tail="renormalize", temperature=2.0).temperature == 2.0
