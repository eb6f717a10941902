"""CLIPDistill: CLIP-KD's terms against hand computations, and the global batch across two processes."""

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mmkd.losses import CLIPDistill, clamp_logit_scale_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_icl_term_against_the_official_formula():
    # CLIP-KD's icl_loss: the student's projected, normalised image (text) embeddings against the teacher's
    # normalised text (image) embeddings, multiplied by the raw cross_logit_scale parameter, labels on the diagonal.
    img, txt = _embeds()
    t_img, t_txt = _embeds(1, d=8)
    module = CLIPDistill(kd_weight=0.0, contrastive_weight=0.0, icl_weight=1.0, student_dim=6, teacher_dim=8)
    assert module.icl_logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    loss, terms = module(img, txt, torch.tensor(1.0), t_img, t_txt, torch.tensor(1.0))
    with torch.no_grad():
        s_img = F.normalize(module.image_projector(img), dim=1)
        s_txt = F.normalize(module.text_projector(txt), dim=1)
    n_t_img, n_t_txt = F.normalize(t_img, dim=1), F.normalize(t_txt, dim=1)
    c = math.log(1 / 0.07)
    manual = []
    for anchors, others in ((s_img, n_t_txt), (s_txt, n_t_img)):
        logits = c * anchors @ others.t()
        manual.append(sum(-logits[i, i] + torch.logsumexp(logits[i], 0) for i in range(4)) / 4)
    expected = 0.5 * (manual[0] + manual[1])
    assert terms["icl"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert module.icl_logit_scale.grad is not None and module.icl_logit_scale.grad.abs() > 0
    # Exponentiated scale: exp(c) multiplies the similarities (CLIP's convention for its own scale).
    exp_module = CLIPDistill(kd_weight=0.0, contrastive_weight=0.0, icl_weight=2.0, icl_exp_scale=True)
    _, exp_terms = exp_module(img, txt, torch.tensor(1.0), img * 2 + 1, txt - 1, torch.tensor(1.0))
    labels = torch.arange(4)
    s_i, s_t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    t_i, t_t = F.normalize(img * 2 + 1, dim=1), F.normalize(txt - 1, dim=1)
    direct = 0.5 * (F.cross_entropy((1 / 0.07) * s_i @ t_t.t(), labels) + F.cross_entropy((1 / 0.07) * s_t @ t_i.t(),
                                                                                          labels))
    assert exp_terms["icl"].item() == pytest.approx(direct.item(), rel=1e-5)


def test_icl_disabled_adds_no_parameter_and_keeps_the_loss():
    img, txt = _embeds()
    t_img, t_txt = _embeds(1)
    scale = torch.tensor(7.0)
    plain = CLIPDistill(embedding_weight=0.3)
    assert plain.icl_logit_scale is None and "icl_logit_scale" not in plain.state_dict()
    loss, terms = plain(img, txt, scale, t_img, t_txt, scale)
    assert terms["icl"].item() == 0.0
    with_icl = CLIPDistill(embedding_weight=0.3, icl_weight=0.5)
    loss_icl, terms_icl = with_icl(img, txt, scale, t_img, t_txt, scale)
    assert loss_icl.item() == pytest.approx(loss.item() + 0.5 * terms_icl["icl"].item(), rel=1e-6)


def test_mse_mean_is_clip_kd_fd_loss():
    # CLIP-KD: fd_loss = F.mse_loss(normalize(proj(s_img)), t_img) + F.mse_loss(normalize(proj(s_txt)), t_txt), the
    # teacher's features normalised, an element mean per modality and a sum over the two; weight 2000.
    img, txt = _embeds(b=5, d=6)
    t_img, t_txt = _embeds(3, b=5, d=8)
    module = CLIPDistill(kd_weight=0.0, contrastive_weight=0.0, embedding_weight=2000.0, student_dim=6,
                         teacher_dim=8, embedding_kind="mse_mean")
    loss, terms = module(img, txt, torch.tensor(1.0), t_img, t_txt, torch.tensor(1.0))
    with torch.no_grad():
        parts = []
        for s, t, proj in ((img, t_img, module.image_projector), (txt, t_txt, module.text_projector)):
            d = F.normalize(proj(s), dim=1) - F.normalize(t, dim=1)
            parts.append(sum(float(x) ** 2 for x in d.flatten()) / d.numel())
    assert terms["embedding"].item() == pytest.approx(parts[0] + parts[1], rel=1e-5)
    assert loss.item() == pytest.approx(2000.0 * (parts[0] + parts[1]), rel=1e-5)
    # The same distance as "mse" per row, divided by the width, and summed (not averaged) over the two modalities.
    _, mse_terms = CLIPDistill(kd_weight=0.0, contrastive_weight=0.0, embedding_weight=1.0, embedding_kind="mse")(
        img, txt, torch.tensor(1.0), img + 0.5, txt * 3, torch.tensor(1.0))
    _, mean_terms = CLIPDistill(kd_weight=0.0, contrastive_weight=0.0, embedding_weight=1.0,
                                embedding_kind="mse_mean")(img, txt, torch.tensor(1.0), img + 0.5, txt * 3,
                                                           torch.tensor(1.0))
    assert mean_terms["embedding"].item() == pytest.approx(2 * mse_terms["embedding"].item() / 6, rel=1e-5)
    with pytest.raises(ValueError, match="embedding_kind='l1'"):
        CLIPDistill(embedding_kind="l1")


def test_clamp_logit_scale_in_place():
    scale = torch.nn.Parameter(torch.tensor(5.0))
    assert clamp_logit_scale_(scale) is scale
    assert scale.item() == pytest.approx(math.log(100))
    scale.data.fill_(-0.3)
    clamp_logit_scale_(scale)
    assert scale.item() == 0.0
    scale.data.fill_(2.0)
    clamp_logit_scale_(scale)
    assert scale.item() == 2.0 and scale.requires_grad


# ---- one process on the whole batch == two processes on its halves -------------------------------------------------
def _distributed_inputs(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"x": torch.randn(n, 5, generator=g), "txt": torch.randn(n, 6, generator=g),
            "t_img": torch.randn(n, 8, generator=g), "t_txt": torch.randn(n, 8, generator=g)}


def _distributed_loss(inputs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Every term on, through a tiny image "encoder" (the part DDP would average); gradients of interest."""
    torch.manual_seed(0)  # the same encoder, projectors and scales on every process
    encoder = torch.nn.Linear(5, 6)
    module = CLIPDistill(kd_weight=1.0, embedding_weight=2000.0, contrastive_weight=1.0, student_dim=6,
                         teacher_dim=8, embedding_kind="mse_mean", icl_weight=1.0)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    img = encoder(inputs["x"][rows])
    img.retain_grad()
    txt = inputs["txt"][rows].clone().requires_grad_()
    loss, _ = module(img, txt, log_scale.exp(), inputs["t_img"][rows], inputs["t_txt"][rows], torch.tensor(20.0))
    loss.backward()
    return {"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad, "encoder_grad": encoder.weight.grad,
            "scale_grad": log_scale.grad, "icl_scale_grad": module.icl_logit_scale.grad,
            "projector_grad": module.image_projector.weight.grad}


def _gather_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {}
        for n, split in ((8, (4, 4)), (5, (3, 2))):  # even halves, and uneven shards (a short last batch)
            start = sum(split[:rank])
            results[n] = _distributed_loss(_distributed_inputs(n), slice(start, start + split[rank]))
        torch.save(results, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    # fork: the workers inherit the imported modules instead of importing torch again (seconds on 2 cores).
    mp.start_processes(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for n, split in ((8, (4, 4)), (5, (3, 2))):
        single = _distributed_loss(_distributed_inputs(n), slice(0, n))
        starts = [0, split[0]]
        for r in range(2):
            got, rows = ranks[r][n], slice(starts[r], starts[r] + split[r])
            # The same global loss on every rank, and each rank's own rows get the single-process gradient rows.
            torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["img_grad"], single["img_grad"][rows], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["txt_grad"], single["txt_grad"][rows], rtol=1e-5, atol=1e-7)
            # Parameters applied after the gather see every row: the whole gradient on each rank (DDP's mean of
            # identical values leaves it unchanged).
            for key in ("scale_grad", "icl_scale_grad", "projector_grad"):
                torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-7)
        # The encoder sees only its rank's rows: the ranks' gradients sum to the single-process one, so DDP's mean
        # gives 1/W of it, as in open_clip and CLIP-KD.
        ddp_mean = (ranks[0][n]["encoder_grad"] + ranks[1][n]["encoder_grad"]) / 2
        torch.testing.assert_close(ddp_mean * 2, single["encoder_grad"], rtol=1e-5, atol=1e-7)
