import math

import pytest
import torch

from mmkd.losses import JSD, TAID, ForwardKL, ReverseKL, SkewKL, SkewReverseKL, TotalVariation, build_divergence

FACTORIES = {
    "fkl": lambda: ForwardKL(),
    "rkl": lambda: ReverseKL(),
    "jsd": lambda: JSD(beta=0.3),
    "tv": lambda: TotalVariation(),
    "skl": lambda: SkewKL(alpha=0.1),
    "srkl": lambda: SkewReverseKL(alpha=0.2),
    "taid": lambda: TAID(total_steps=10, t_start=0.4),
}


def _batch(seed: int = 0, b: int = 2, t: int = 5, v: int = 11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * 2
    teacher = torch.randn(b, t, v, generator=g) * 2
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, [0, 2, 3, 4]] = True
    return student, teacher, mask


P_T, P_S = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _mix(w: float, p: list[float], q: list[float]) -> list[float]:
    return [w * a + (1 - w) * b for a, b in zip(p, q)]


HAND = {
    "fkl": (ForwardKL(), _kl(P_T, P_S)),
    "rkl": (ReverseKL(), _kl(P_S, P_T)),
    "jsd": (JSD(beta=0.3), 0.3 * _kl(P_T, _mix(0.3, P_T, P_S)) + 0.7 * _kl(P_S, _mix(0.3, P_T, P_S))),
    "tv": (TotalVariation(), 0.2),
    "skl": (SkewKL(alpha=0.1), _kl(P_T, _mix(0.1, P_T, P_S))),
    "srkl": (SkewReverseKL(alpha=0.2), _kl(P_S, _mix(0.2, P_S, P_T))),
}


@pytest.mark.parametrize("name", list(HAND))
def test_hand_computed_values(name):
    loss, expected = HAND[name]
    # Logits are log-probabilities shifted by an arbitrary constant: the softmax must undo the shift.
    student = torch.tensor(P_S).log().view(1, 1, 3) + 3.0
    teacher = torch.tensor(P_T).log().view(1, 1, 3) - 1.0
    value = loss(student, teacher, torch.ones(1, 1, dtype=torch.bool))
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_zero_when_student_equals_teacher_and_positive_otherwise(name):
    loss = FACTORIES[name]()
    student, teacher, mask = _batch()
    assert loss(student, student.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(student, teacher, mask).item() > 1e-3


@pytest.mark.parametrize("name", list(FACTORIES))
def test_masked_positions_change_nothing(name):
    loss = FACTORIES[name]()
    student, teacher, mask = _batch()
    reference = loss(student, teacher, mask)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[~mask] = float("nan")
    teacher2[~mask] = 1e4
    assert torch.equal(loss(student2, teacher2, mask), reference)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_student_never_teacher(name):
    loss = FACTORIES[name]()
    student, teacher, mask = _batch()
    student.requires_grad_()
    teacher.requires_grad_()
    loss(student, teacher, mask).backward()
    assert teacher.grad is None
    assert student.grad[mask].abs().sum() > 0
    assert student.grad[~mask].abs().sum() == 0


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_give_float32_answer(name, dtype):
    loss = FACTORIES[name]()
    student, teacher, mask = _batch()
    low = loss(student.to(dtype), teacher.to(dtype), mask)
    assert low.dtype == torch.float32
    assert torch.equal(low, loss(student.to(dtype).float(), teacher.to(dtype).float(), mask))
    assert low.item() == pytest.approx(loss(student, teacher, mask).item(), rel=3e-2)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_minus_inf_vocabulary_entries_give_no_nan(name):
    loss = FACTORIES[name]()
    student, teacher, mask = _batch()
    dropped = loss(student[..., :-2], teacher[..., :-2], mask)
    student, teacher = student.clone(), teacher.clone()
    student[..., -2:] = float("-inf")
    teacher[..., -2:] = float("-inf")
    student.requires_grad_()
    value = loss(student, teacher, mask)
    value.backward()
    # Masked vocabulary entries behave exactly as if they were not in the vocabulary.
    assert value.item() == pytest.approx(dropped.item(), rel=1e-5)
    assert torch.isfinite(student.grad).all()
    assert student.grad[..., -2:].abs().sum() == 0


def test_forward_kl_finite_when_teacher_masks_an_entry_the_student_keeps():
    student, teacher, mask = _batch()
    teacher = teacher.clone()
    teacher[..., 0] = float("-inf")
    student.requires_grad_()
    value = ForwardKL()(student, teacher, mask)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_teacher_mask_selects_the_same_tokens_in_a_longer_teacher_sequence(name):
    loss = FACTORIES[name]()
    student, teacher, mask = _batch()
    # The teacher sees 3 more (visual) tokens in front: its answer positions are shifted by 3.
    long_teacher = torch.cat([torch.randn(2, 3, teacher.shape[-1]), teacher], dim=1)
    teacher_mask = torch.cat([torch.zeros(2, 3, dtype=torch.bool), mask], dim=1)
    assert torch.allclose(loss(student, long_teacher, mask, teacher_mask), loss(student, teacher, mask))


def test_differing_token_counts_name_the_sample():
    student, teacher, mask = _batch()
    teacher_mask = mask.clone()
    teacher_mask[1, 1] = True
    with pytest.raises(ValueError, match="sample 1: mask selects 4 answer tokens but teacher_mask selects 5"):
        ForwardKL()(student, teacher, mask, teacher_mask)
    with pytest.raises(ValueError, match="pass teacher_mask"):
        ForwardKL()(student, teacher[:, :4], mask)


def test_temperature_and_t2_scaling():
    student, teacher, mask = _batch()
    base = ForwardKL()(student / 2, teacher / 2, mask)
    assert torch.allclose(ForwardKL(temperature=2.0)(student, teacher, mask), base)
    assert torch.allclose(ForwardKL(temperature=2.0, scale_by_t2=True)(student, teacher, mask), 4 * base)


def test_jsd_limits_approach_forward_and_reverse_kl():
    student, teacher, mask = _batch()
    fkl, rkl = ForwardKL()(student, teacher, mask), ReverseKL()(student, teacher, mask)
    eps = 1e-5  # JSD(β) = β·FKL + O(β²): the ratio converges linearly in β
    assert (JSD(beta=eps)(student, teacher, mask) / eps).item() == pytest.approx(fkl.item(), rel=5e-3)
    assert (JSD(beta=1 - eps)(student, teacher, mask) / eps).item() == pytest.approx(rkl.item(), rel=5e-3)
    assert JSD(beta=0.5)(student, teacher, mask).item() <= math.log(2)
    with pytest.raises(ValueError, match="beta=0"):
        JSD(beta=0.0)


def test_skew_zero_is_plain_kl_and_reductions():
    student, teacher, mask = _batch()
    assert torch.allclose(SkewKL(alpha=0.0)(student, teacher, mask), ForwardKL()(student, teacher, mask))
    assert torch.allclose(SkewReverseKL(alpha=0.0)(student, teacher, mask), ReverseKL()(student, teacher, mask))
    per = ForwardKL(reduction="none")(student, teacher, mask)
    assert per.shape == (int(mask.sum()),)
    assert torch.allclose(ForwardKL(reduction="sum")(student, teacher, mask), per.sum())
    assert torch.allclose(ForwardKL()(student, teacher, mask), per.mean())


def test_per_token_on_flat_rows_and_empty_selection():
    student, teacher, mask = _batch()
    loss = ReverseKL()
    assert torch.allclose(loss.per_token(student[mask], teacher[mask]).mean(), loss(student, teacher, mask))
    s = student.clone().requires_grad_()
    empty = loss(s, teacher, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and s.grad is not None


def test_build_divergence_and_bad_arguments():
    assert isinstance(build_divergence("jsd", beta=0.2), JSD)
    with pytest.raises(ValueError, match="divergence 'kl'"):
        build_divergence("kl")
    with pytest.raises(ValueError, match="temperature=0"):
        ForwardKL(temperature=0)
    with pytest.raises(ValueError, match="reduction='avg'"):
        ForwardKL(reduction="avg")
