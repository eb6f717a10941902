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


def _ce_to_target(student_logits, teacher_logits, t, temperature=1.0):
    """The official code's TAID value: −Σ softmax(((1−t)·z_S + t·z_T)/T) · log_softmax(z_S/T), mean over rows."""
    target = torch.softmax(((1 - t) * student_logits + t * teacher_logits) / temperature, -1)
    return -(target * torch.log_softmax(student_logits / temperature, -1)).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_update_value_is_the_cross_entropy_to_the_target(temperature):
    g = torch.Generator().manual_seed(3)
    s, te = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    taid = TAID(total_steps=100, t_start=0.3, update_on="ce", temperature=temperature, scale_by_t2=True)
    loss = taid(s, te, mask)
    value = taid.update_value(loss)
    expected = _ce_to_target(s[mask], te[mask], 0.3, temperature) * temperature**2
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert value.item() > loss.item()  # CE = KL + H(p_t), H > 0
    # The sum is cleared: the next value sees only the rows of the next loss.
    loss2 = taid(s[:1], te[:1], mask[:1])
    expected2 = _ce_to_target(s[:1][mask[:1]], te[:1][mask[:1]], 0.3, temperature) * temperature**2
    assert taid.update_value(loss2).item() == pytest.approx(expected2.item(), rel=1e-5)
    # The KL default hands the loss through unchanged, bit for bit the same loss as before.
    kl = TAID(total_steps=100, t_start=0.3, temperature=temperature, scale_by_t2=True)
    kl_loss = kl(s, te, mask)
    assert torch.equal(kl_loss, loss) and torch.equal(kl.update_value(kl_loss), kl_loss)
    with pytest.raises(ValueError, match="update_on='entropy'"):
        TAID(total_steps=10, update_on="entropy")
    with pytest.raises(ValueError, match="needs reduction"):
        TAID(total_steps=10, update_on="ce", reduction="none")


@pytest.mark.parametrize("requires_grad", [True, False])
def test_update_value_through_the_chunked_path(requires_grad):
    from mmkd.losses import chunked_token_loss

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 7, 6, generator=g, requires_grad=requires_grad)
    teacher_hidden = torch.randn(2, 7, 5, generator=g)
    head, teacher_head = torch.randn(13, 6, generator=g), torch.randn(13, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    taid = TAID(total_steps=100, t_start=0.55, update_on="ce")
    taid.step(2.0)  # t stays 0.55 on the first step
    loss = chunked_token_loss(taid, hidden, head, teacher_hidden, teacher_head, mask=mask, chunk_size=3)
    value = taid.update_value(loss)
    with torch.no_grad():
        expected = _ce_to_target((hidden @ head.t())[mask], (teacher_hidden @ teacher_head.t())[mask], 0.55)
        full = TAID(total_steps=100, t_start=0.55)(hidden @ head.t(), teacher_hidden @ teacher_head.t(), mask)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    # Summed reduction: the entropies are summed too.
    summed = TAID(total_steps=100, t_start=0.55, update_on="ce", reduction="sum")
    loss = chunked_token_loss(summed, hidden, head, teacher_hidden, teacher_head, mask=mask, chunk_size=4)
    assert summed.update_value(loss).item() == pytest.approx(expected.item() * int(mask.sum()), rel=1e-5)
