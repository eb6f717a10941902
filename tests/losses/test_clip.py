import pytest
import torch
import torch.nn.functional as F

from mmkd.losses import CLIPDistill


def _embeds(seed=0, b=4, d=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


def test_kd_zero_when_student_equals_teacher_and_positive_otherwise():
    img, txt = _embeds()
    scale = torch.tensor(10.0)
    loss, terms = CLIPDistill(contrastive_weight=0.0)(img, txt, scale, img, txt, scale)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    t_img, t_txt = _embeds(1)
    loss, terms = CLIPDistill(contrastive_weight=0.0)(img, txt, scale, t_img, t_txt, scale)
    assert loss.item() > 1e-3 and terms["contrastive"].item() == 0.0


def test_terms_match_hand_computations():
    img, txt = _embeds()
    t_img, t_txt = _embeds(1, d=8)
    scale, t_scale = torch.tensor(5.0), torch.tensor(20.0)
    module = CLIPDistill(kd_weight=1.0, embedding_weight=0.5, contrastive_weight=2.0, student_dim=6, teacher_dim=8)
    loss, terms = module(img, txt, scale, t_img, t_txt, t_scale)
    s = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    t = t_scale * F.normalize(t_img, dim=-1) @ F.normalize(t_txt, dim=-1).t()
    kd = 0.5 * (F.kl_div(s.log_softmax(1), t.log_softmax(1), log_target=True, reduction="batchmean")
                + F.kl_div(s.t().log_softmax(1), t.t().log_softmax(1), log_target=True, reduction="batchmean"))
    labels = torch.arange(4)
    contrastive = 0.5 * (F.cross_entropy(s, labels) + F.cross_entropy(s.t(), labels))
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["contrastive"].item() == pytest.approx(contrastive.item(), rel=1e-5)
    emb_i = 1 - F.cosine_similarity(module.image_projector(img), t_img).mean()
    emb_t = 1 - F.cosine_similarity(module.text_projector(txt), t_txt).mean()
    assert terms["embedding"].item() == pytest.approx((0.5 * (emb_i + emb_t)).item(), rel=1e-5)
    assert loss.item() == pytest.approx((kd + 0.5 * terms["embedding"] + 2.0 * contrastive).item(), rel=1e-5)


def test_gradients_reach_student_and_projectors_only():
    img, txt = _embeds()
    t_img, t_txt = _embeds(1, d=8)
    img.requires_grad_()
    t_img.requires_grad_()
    module = CLIPDistill(embedding_weight=1.0, student_dim=6, teacher_dim=8, temperature=0.1)
    loss, _ = module(img, txt, torch.tensor(1.0), t_img, t_txt, torch.tensor(1.0))
    loss.backward()
    assert t_img.grad is None and img.grad.abs().sum() > 0
    assert module.image_projector.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass student_dim and teacher_dim"):
        CLIPDistill(embedding_weight=1.0)(img, txt, torch.tensor(1.0), t_img, t_txt, torch.tensor(1.0))
