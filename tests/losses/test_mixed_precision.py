"""Under bf16 autocast (Lightning's bf16-mixed), with a bf16 head that trains: the chunked head pass accumulates its
head gradient in float32 across chunks, and RDist takes one float32 view of a head, not two."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmkd.contract import ModelOutput
from mmkd.losses import ForwardKL, RDist, chunked_token_loss


def test_a_chunked_divergence_over_several_chunks_runs_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    n, h, v = 10, 16, 50
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.1).bfloat16().requires_grad_()
    t_hidden, t_weight = torch.randn(n, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) * 0.1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 4 chunks of 3, 3, 3, 1 rows
        loss = chunked_token_loss(ForwardKL(), hidden, weight, t_hidden, t_weight, chunk_size=3)
    loss.backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    ref_w, ref_h = weight.detach().float().requires_grad_(), hidden.detach().float().requires_grad_()
    ref = ForwardKL().per_token(ref_h @ ref_w.t(), t_hidden.float() @ t_weight.float().t()).mean()
    ref.backward()
    assert abs(float(loss) - float(ref)) < 2e-2 * float(ref)
    assert torch.allclose(weight.grad.float(), ref_w.grad, atol=2e-2 * float(ref_w.grad.abs().max()))


class _HeadCopies(TorchDispatchMode):
    def __init__(self, shape):
        super().__init__()
        self.shape, self.copies = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape and out.dtype == torch.float32:
            self.copies += 1
        return out


def test_rdist_on_logits_takes_one_float32_view_of_a_bf16_head():
    g = torch.Generator().manual_seed(0)
    v, h, tokens = 300, 8, 4

    def output():
        mask = torch.zeros(1, 6, dtype=torch.bool)
        mask[0, 1:1 + tokens] = True
        return ModelOutput(last_hidden=torch.randn(1, 6, h, generator=g).bfloat16().requires_grad_(),
                           head_weight=(torch.randn(v, h, generator=g) * 0.1).bfloat16().requires_grad_(),
                           visual_mask=mask, image_base_tokens=tokens)

    student, teacher = output(), output()
    with _HeadCopies((v, h)) as seen:
        loss = RDist().from_outputs(student, teacher, on="logits")
    assert torch.isfinite(loss) and seen.copies == 2  # one float32 view per head (student, teacher), no more
    loss.backward()
    assert student.head_weight.grad is not None
