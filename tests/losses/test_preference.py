import math

import pytest
import torch
import torch.nn.functional as F

from mmkd.losses import DPODistill, sequence_logprobs


def test_sequence_logprobs_against_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1, 4, -100], [-100, 2, 2, 0, -100, -100]])
    expected_sum, expected_mean = [], []
    for b in range(2):
        scored = [math.log(torch.softmax(logits[b, t - 1], -1)[labels[b, t]].item()) for t in range(1, 6)
                  if labels[b, t] != -100]
        expected_sum.append(sum(scored))
        expected_mean.append(sum(scored) / len(scored))
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx(expected_sum, rel=1e-5)
    assert sequence_logprobs(logits, labels, average=True).tolist() == pytest.approx(expected_mean, rel=1e-5)
    # Pre-shifted labels: position t scores labels[t].
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    assert sequence_logprobs(logits, shifted, shift=False).tolist() == pytest.approx(expected_sum, rel=1e-5)
    assert sequence_logprobs(logits.bfloat16(), labels).dtype == torch.float32
    none = sequence_logprobs(logits, torch.full((2, 6), -100))
    assert none.tolist() == [0.0, 0.0]


def test_dpo_sigmoid_value_metrics_and_gradients():
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -6.0], requires_grad=True)
    rc = torch.tensor([-5.5, -7.0], requires_grad=True)
    rr = torch.tensor([-5.5, -6.5], requires_grad=True)
    loss, metrics = DPODistill(beta=0.5, label_smoothing=0.1)(pc, pr, rc, rr)
    h = torch.tensor([1.0, -0.5])  # (pc - rc) - (pr - rr)
    expected = (-(0.9) * F.logsigmoid(0.5 * h) - 0.1 * F.logsigmoid(-0.5 * h)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["chosen_reward"].item() == pytest.approx(0.5 * (0.5 + 0.0) / 2)
    assert metrics["rejected_reward"].item() == pytest.approx(0.5 * (-0.5 + 0.5) / 2)
    assert metrics["margin"].item() == pytest.approx(0.5 * h.mean().item())
    assert metrics["accuracy"].item() == 0.5
    loss.backward()
    assert rc.grad is None and rr.grad is None
    assert pc.grad[0] < 0 and pr.grad[0] > 0  # lowering the loss raises chosen, lowers rejected


def test_dpo_ipo_and_equal_policy_and_reference():
    x = torch.tensor([-3.0, -4.0])
    loss, metrics = DPODistill(beta=0.1, loss_type="ipo")(x, x - 1, x, x - 1)
    assert loss.item() == pytest.approx((1 / 0.2) ** 2)
    assert metrics["margin"].item() == 0.0
    loss, _ = DPODistill()(x, x - 1, x, x - 1)
    assert loss.item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="label_smoothing applies"):
        DPODistill(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="one \\(B,\\) shape"):
        DPODistill()(x, x, x, x[:1])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_hinge_against_a_direct_computation():
    pc, pr = torch.tensor([-5.0, -7.0, -2.0]), torch.tensor([-6.0, -6.0, -9.0])
    rc, rr = torch.tensor([-5.5, -7.0, -3.0]), torch.tensor([-5.5, -6.5, -4.0])
    loss, _ = DPODistill(beta=0.5, loss_type="hinge")(pc, pr, rc, rr)
    hs = [((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert hs == [1.0, -0.5, 6.0]
    expected = sum(max(0.0, 1 - 0.5 * h) for h in hs) / 3  # the third pair is past the margin: 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_kto_pair_against_a_direct_computation():
    # TRL 0.7 / LLaVA-MoD: KL_w = max(0, mean(r_w)), KL_l = max(0, mean(r_l)); scores 1 - σ(β(r_w - KL_l)) for the
    # chosen half and 1 - σ(β(KL_w - r_l)) for the rejected half; mean over the 2B scores; KL estimates not detached.
    pc = torch.tensor([-5.0, -7.0, -2.0], requires_grad=True)
    pr = torch.tensor([-6.0, -6.0, -9.0], requires_grad=True)
    rc, rr = torch.tensor([-5.5, -7.5, -3.0]), torch.tensor([-5.5, -6.5, -4.0])
    beta = 0.3
    loss, metrics = DPODistill(beta=beta, loss_type="kto_pair")(pc, pr, rc, rr)
    r_w = [a - c for a, c in zip(pc.tolist(), rc.tolist())]  # [0.5, 0.5, 1.0]
    r_l = [b - d for b, d in zip(pr.tolist(), rr.tolist())]  # [-0.5, 0.5, -5.0]
    kl_w, kl_l = max(0.0, sum(r_w) / 3), max(0.0, sum(r_l) / 3)
    assert kl_l == 0.0 and kl_w == pytest.approx(2 / 3)
    scores = [1 - _sigmoid(beta * (r - kl_l)) for r in r_w] + [1 - _sigmoid(beta * (kl_w - r)) for r in r_l]
    assert loss.item() == pytest.approx(sum(scores) / 6, rel=1e-6)
    assert metrics["chosen_reward"].item() == pytest.approx(beta * sum(r_w) / 3)
    # The gradient flows through KL_w (positive): d/d pc_i has the direct term and the KL term of every rejected
    # score. With s = σ(β x), d(1 - s)/dx = -β s (1 - s).
    loss.backward()
    ds = [-beta * _sigmoid(beta * (r - kl_l)) * (1 - _sigmoid(beta * (r - kl_l))) for r in r_w]
    dk = sum(-beta * _sigmoid(beta * (kl_w - r)) * (1 - _sigmoid(beta * (kl_w - r))) for r in r_l)
    expected_grad = [(d + dk / 3) / 6 for d in ds]
    assert pc.grad.tolist() == pytest.approx(expected_grad, rel=1e-5)
    with pytest.raises(ValueError, match="not 'kto_pair'"):
        DPODistill(loss_type="kto_pair", label_smoothing=0.1)
    with pytest.raises(ValueError, match="expected one of sigmoid, ipo, hinge, kto_pair"):
        DPODistill(loss_type="bco")
