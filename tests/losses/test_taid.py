import math

import pytest
import torch

from mmkd.losses import TAID, ForwardKL


def _reference_schedule(losses, total_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The TAID paper's update (Algorithm 1), written out with plain floats."""
    t, momentum, prev, ts = t_start, 0.0, None, []
    for n, loss in enumerate(losses):
        if prev is not None:
            delta = (prev - loss) / (prev + 1e-15)
            momentum = beta * momentum + (1 - beta) * delta
            t_lin = t_start + (t_end - t_start) * min(1.0, n / total_steps)
            t = min(t_end, max(t_lin, t + alpha * (1 / (1 + math.exp(-momentum))) * (1 - t)))
        prev = loss
        ts.append(t)
    return ts


@pytest.mark.parametrize("total_steps", [20, 100_000])
def test_t_follows_the_published_update(total_steps):
    # A falling then rising loss; with 20 steps the linear floor wins, with 100k steps the adaptive term does.
    losses = [5.0 * 0.9**i for i in range(30)] + [0.3 + 0.05 * i for i in range(20)]
    taid = TAID(total_steps=total_steps)
    got = [taid.step(torch.tensor(v)) for v in losses]
    assert got == pytest.approx(_reference_schedule(losses, total_steps), abs=1e-12)
    if total_steps == 20:
        assert got[-1] == 1.0  # capped at t_end
    else:
        assert got[-1] > 0.4 + 0.6 * len(losses) / total_steps  # adaptive steps beat the linear floor


def test_state_dict_round_trip_resumes_the_schedule():
    losses = [3.0, 2.5, 2.6, 2.0, 1.9, 1.7, 1.8, 1.5]
    taid = TAID(total_steps=1000)
    for v in losses[:5]:
        taid.step(v)
    resumed = TAID(total_steps=1000)
    resumed.load_state_dict(taid.state_dict())
    assert set(taid.state_dict()) == {"t", "momentum", "prev_loss", "num_steps"}
    assert resumed.interpolation == taid.interpolation and int(resumed.num_steps) == 5
    assert [resumed.step(v) for v in losses[5:]] == [taid.step(v) for v in losses[5:]]
    assert taid.interpolation == pytest.approx(_reference_schedule(losses, 1000)[-1], abs=1e-12)


def test_loss_interpolates_logits_and_forward_does_not_move_t():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    taid = TAID(total_steps=10, t_start=0.3)
    value = taid(student, teacher, mask)
    target = torch.softmax(0.7 * student + 0.3 * teacher, -1)
    expected = (target * (target.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert taid.interpolation == pytest.approx(0.3)
    at_one = TAID(total_steps=10, t_start=1.0)
    assert torch.allclose(at_one(student, teacher, mask), ForwardKL()(student, teacher, mask))


def test_non_adaptive_is_linear_and_bad_losses_are_skipped():
    taid = TAID(total_steps=10, adaptive=False)
    ts = [taid.step(v) for v in [1.0, 0.5, 0.4, 0.3]]
    assert ts == pytest.approx([0.4, 0.46, 0.52, 0.58])
    before = taid.interpolation
    taid.step(float("nan"))
    assert taid.interpolation == before and float(taid.prev_loss) == 0.3
    with pytest.raises(ValueError, match="total_steps=0"):
        TAID(total_steps=0)
