import weakref

import pytest
import torch

from mmkd.losses import (
    JSD,
    TAID,
    ForwardKL,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TopKKL,
    TotalVariation,
    chunked_token_loss,
    fused_head_loss,
    topk_from_logits,
)

V, H, HT, N = 37, 8, 6, 13
LOSSES = {
    "fkl": lambda: ForwardKL(temperature=2.0, scale_by_t2=True),
    "rkl": lambda: ReverseKL(),
    "jsd": lambda: JSD(beta=0.4),
    "tv": lambda: TotalVariation(),
    "skl": lambda: SkewKL(alpha=0.1),
    "srkl": lambda: SkewReverseKL(alpha=0.1),
    "taid": lambda: TAID(total_steps=5, t_start=0.6),
}


def _setup(seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    teacher_hidden = torch.randn(N, HT, generator=g)
    teacher_weight = torch.randn(V, HT, generator=g) * 0.5
    teacher_bias = torch.randn(V, generator=g) * 0.1
    leaves = [hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
    leaves.append(b.to(dtype).requires_grad_() if bias else None)
    return leaves, (teacher_hidden.to(dtype), teacher_weight.to(dtype), teacher_bias.to(dtype))


def _grads(*tensors):
    return [t.grad.clone() for t in tensors if t is not None]


@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_equals_unchunked_value_and_gradients(name):
    loss = LOSSES[name]()
    (h, w, b), (th, tw, tb) = _setup()
    naive = loss.per_token(h @ w.t() + b, th @ tw.t() + tb).mean()
    naive.backward()
    expected = _grads(h, w, b)
    (h2, w2, b2), _ = _setup()
    chunked = chunked_token_loss(loss, h2, w2, th, tw, head_bias=b2, teacher_head_bias=tb, chunk_size=4)
    chunked.backward()
    assert chunked.item() == pytest.approx(naive.item(), abs=1e-5)
    for got, want in zip(_grads(h2, w2, b2), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_three_dim_inputs_with_masks_and_a_longer_teacher():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    teacher_hidden = torch.randn(2, 9, HT, generator=g)
    teacher_weight = torch.randn(V, HT, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 1:3] = True
    teacher_mask = torch.zeros(2, 9, dtype=torch.bool)
    teacher_mask[0, 5:8] = True
    teacher_mask[1, 4:6] = True
    loss = ForwardKL()
    naive = loss(hidden @ weight.t(), teacher_hidden @ teacher_weight.t(), mask, teacher_mask)
    grads = torch.autograd.grad(naive, [hidden, weight])
    chunked = chunked_token_loss(loss, hidden, weight, teacher_hidden, teacher_weight, mask=mask,
                                 teacher_mask=teacher_mask, chunk_size=2)
    for got, want in zip(torch.autograd.grad(chunked, [hidden, weight]), grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert chunked.item() == pytest.approx(naive.item(), abs=1e-5)
    bad = teacher_mask.clone()
    bad[1, 7] = True
    with pytest.raises(ValueError, match="sample 1"):
        chunked_token_loss(loss, hidden, weight, teacher_hidden, teacher_weight, mask=mask, teacher_mask=bad)


def test_precomputed_teacher_logits_and_topk_entries():
    (h, w, b), (th, tw, tb) = _setup(bias=False)
    teacher_logits = th @ tw.t()
    loss = ReverseKL(reduction="sum")
    naive = loss.per_token(h @ w.t(), teacher_logits).sum()
    chunked = chunked_token_loss(loss, h, w, teacher_logits=teacher_logits, chunk_size=5)
    torch.testing.assert_close(torch.autograd.grad(chunked, [h, w]), torch.autograd.grad(naive, [h, w]))
    idx, lp, _ = topk_from_logits(teacher_logits, 5)
    for tail in ("bucket", "renormalize"):
        topk = TopKKL(tail=tail)
        naive = topk.per_token(h @ w.t(), idx, lp).mean()
        chunked = chunked_token_loss(topk, h, w, teacher_topk_indices=idx, teacher_topk_logprobs=lp, chunk_size=3)
        assert chunked.item() == pytest.approx(naive.item(), abs=1e-5)
        torch.testing.assert_close(torch.autograd.grad(chunked, [h, w]), torch.autograd.grad(naive, [h, w]))


def test_frozen_head_gets_no_gradient_and_outer_scale_applies():
    (h, w, b), (th, tw, tb) = _setup(bias=False)
    w.requires_grad_(False)
    loss = ForwardKL()
    (3.0 * chunked_token_loss(loss, h, w, th, tw, chunk_size=4)).backward()
    assert w.grad is None
    h_ref = h.detach().clone().requires_grad_()
    (3.0 * loss.per_token(h_ref @ w.t(), th @ tw.t()).mean()).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)


def test_no_grad_gives_the_value_only():
    (h, w, b), (th, tw, tb) = _setup()
    with torch.no_grad():
        value = chunked_token_loss(ForwardKL(), h, w, th, tw, head_bias=b, teacher_head_bias=tb, chunk_size=4)
        naive = ForwardKL().per_token(h @ w.t() + b, th @ tw.t() + tb).mean()
    assert not value.requires_grad
    assert value.item() == pytest.approx(naive.item(), abs=1e-6)


def test_bf16_heads_match_the_naive_path():
    (h, w, b), (th, tw, tb) = _setup(dtype=torch.bfloat16, bias=False)
    loss = ForwardKL()
    naive = loss.per_token(h @ w.t(), th @ tw.t()).mean()
    gh, gw = torch.autograd.grad(naive, [h, w])
    chunked = chunked_token_loss(loss, h, w, th, tw, chunk_size=4)
    ch, cw = torch.autograd.grad(chunked, [h, w])
    assert chunked.dtype == torch.float32 and ch.dtype == torch.bfloat16 and cw.dtype == torch.bfloat16
    assert chunked.item() == pytest.approx(naive.item(), rel=1e-4)
    torch.testing.assert_close(cw.float(), gw.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ch.float(), gh.float(), atol=2e-2, rtol=2e-2)


def test_bad_arguments():
    (h, w, b), (th, tw, tb) = _setup()
    with pytest.raises(ValueError, match="exactly one teacher side"):
        chunked_token_loss(ForwardKL(), h, w)
    with pytest.raises(ValueError, match="reduction"):
        chunked_token_loss(ForwardKL(reduction="none"), h, w, th, tw)
    with pytest.raises(ValueError, match="TopKKL"):
        chunked_token_loss(TopKKL(), h, w, th, tw)
    with pytest.raises(ValueError, match="pass mask"):
        chunked_token_loss(ForwardKL(), h[None], w, th[None], tw)


@pytest.mark.parametrize("name", ["fkl", "jsd", "taid"])
def test_chunked_with_minus_inf_vocabulary_entries(name):
    loss = LOSSES[name]()
    (h, w, b), (th, tw, tb) = _setup()
    b.data[-3:] = float("-inf")  # masked vocabulary entries on both sides
    tb = tb.clone()
    tb[-3:] = float("-inf")
    naive = loss.per_token(h @ w.t() + b, th @ tw.t() + tb).mean()
    expected = torch.autograd.grad(naive, [h, w])
    chunked = chunked_token_loss(loss, h, w, th, tw, head_bias=b, teacher_head_bias=tb, chunk_size=5)
    got = torch.autograd.grad(chunked, [h, w])
    assert torch.isfinite(chunked) and all(torch.isfinite(g).all() for g in got)
    assert chunked.item() == pytest.approx(naive.item(), abs=1e-5)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_a_chunk_gradient_is_freed_before_the_next_chunk_starts():
    # The memory bound of the chunked path rests on this: at most one chunk's (n, V) tensors are alive.
    (h, w, _), _ = _setup(bias=False)
    alive = []

    def fn(logits, i, need_grad):
        assert all(ref() is None for ref in alive), f"chunk {i} starts with an earlier chunk's gradient alive"
        grad = torch.full_like(logits, 0.5)
        alive.append(weakref.ref(grad))
        return logits.sum(), grad

    groups = [slice(i, min(i + 4, N)) for i in range(0, N, 4)]
    fused_head_loss(h, w, None, groups, fn).backward()
    assert len(alive) == len(groups)
    torch.testing.assert_close(w.grad, 0.5 * h.detach().sum(0).expand(V, H))
    torch.testing.assert_close(h.grad, 0.5 * w.detach().sum(0).expand(N, H))
