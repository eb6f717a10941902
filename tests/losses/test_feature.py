import pytest
import torch
import torch.nn.functional as F

from mmkd.losses import FeatureDistill


def test_equal_widths_identity_zero_and_hand_value():
    x = torch.randn(2, 5, 4)
    loss = FeatureDistill(4, 4)
    assert isinstance(loss.projector, torch.nn.Identity)
    assert loss(x, x.clone()).item() == 0.0
    y = x + 0.5
    assert loss(x, y).item() == pytest.approx(0.25, rel=1e-6)
    cos = FeatureDistill(4, 4, kind="cosine")
    assert cos(x, 2 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert cos(x, -x).item() == pytest.approx(2.0, rel=1e-6)


def test_projector_learns_is_saved_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    loss = FeatureDistill(3, 5)
    assert set(loss.state_dict()) == {"projector.weight", "projector.bias"}
    student = torch.randn(2, 4, 3, requires_grad=True)
    teacher = torch.randn(2, 6, 5, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    teacher_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    value = loss(student, teacher, mask, teacher_mask)
    proj = loss.projector(student[mask])
    assert value.item() == pytest.approx(F.mse_loss(proj, teacher[teacher_mask]).item(), rel=1e-6)
    value.backward()
    assert teacher.grad is None and loss.projector.weight.grad.abs().sum() > 0
    assert student.grad[~mask].abs().sum() == 0
    fresh = FeatureDistill(3, 5)
    fresh.load_state_dict(loss.state_dict())
    assert fresh(student, teacher, mask, teacher_mask).item() == pytest.approx(value.item())


def test_vision_features_with_different_token_counts_are_pooled():
    student = torch.randn(3, 4, 6)
    teacher = torch.randn(3, 8, 6)
    pooled = teacher.view(3, 4, 2, 6).mean(2)
    assert FeatureDistill(6, 6)(student, teacher).item() == pytest.approx(F.mse_loss(student, pooled).item(), rel=1e-6)
    with pytest.raises(ValueError, match="feature widths 6"):
        FeatureDistill(6, 7)(student, teacher)
