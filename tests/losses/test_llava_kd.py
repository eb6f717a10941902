import pytest
import torch
import torch.nn.functional as F

from mmkd.contract import ModelOutput
from mmkd.losses import MDist, RDist, ReverseKL

V, H, HT = 23, 8, 12
S_IMG, T_IMG = 4, 6  # visual tokens per image: student 4, teacher 6


def _layout(images: list[int], per_image: int, prompt: int = 2, answer: int = 3):
    """Sequences of [prompt, images..., answer], right-padded; returns visual and answer masks."""
    lengths = [prompt + n * per_image + answer for n in images]
    t = max(lengths)
    visual = torch.zeros(len(images), t, dtype=torch.bool)
    answer_mask = torch.zeros(len(images), t, dtype=torch.bool)
    for b, n in enumerate(images):
        visual[b, prompt : prompt + n * per_image] = True
        answer_mask[b, prompt + n * per_image : lengths[b]] = True
    return visual, answer_mask


def _outputs(seed=0, images=(0, 1, 2), bias=True):
    g = torch.Generator().manual_seed(seed)
    s_vis, s_ans = _layout(list(images), S_IMG)
    t_vis, t_ans = _layout(list(images), T_IMG)
    n_img = sum(images)
    student = ModelOutput(
        last_hidden=torch.randn(len(images), s_vis.shape[1], H, generator=g).requires_grad_(),
        head_weight=torch.randn(V, H, generator=g).requires_grad_(),
        head_bias=(torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None,
        vision_features=torch.randn(n_img, S_IMG, H, generator=g),
        visual_mask=s_vis,
    )
    teacher = ModelOutput(
        last_hidden=torch.randn(len(images), t_vis.shape[1], HT, generator=g),
        head_weight=torch.randn(V, HT, generator=g),
        head_bias=torch.randn(V, generator=g) * 0.1 if bias else None,
        vision_features=torch.randn(n_img, T_IMG, HT, generator=g),
        visual_mask=t_vis,
    )
    return student, teacher, s_ans, t_ans


def _manual_visual_fkl(s_logits, t_logits, s_vis, t_vis):
    values = []
    for b in range(s_logits.shape[0]):
        s_rows, t_rows = s_logits[b, s_vis[b]], t_logits[b, t_vis[b]]
        for i in range(s_rows.shape[0] // S_IMG):
            s_img = s_rows[i * S_IMG : (i + 1) * S_IMG]
            t_img = F.adaptive_avg_pool1d(t_rows[i * T_IMG : (i + 1) * T_IMG].t()[None], S_IMG)[0].t()
            p = t_img.log_softmax(-1)
            values.append((p.exp() * (p - s_img.log_softmax(-1))).sum(-1))
    return torch.cat(values).mean()


def test_mdist_with_0_1_2_images_matches_a_manual_computation():
    student, teacher, s_ans, t_ans = _outputs()
    s_logits, t_logits = student.logits(), teacher.logits()
    mdist = MDist(response_weight=0.5, visual_weight=2.0)
    got = mdist(s_logits, t_logits, s_ans, t_ans, visual_mask=student.visual_mask,
                teacher_visual_mask=teacher.visual_mask, tokens_per_image=S_IMG, teacher_tokens_per_image=T_IMG)
    response = mdist.response_divergence(s_logits, t_logits, s_ans, t_ans)
    visual = _manual_visual_fkl(s_logits, t_logits, student.visual_mask, teacher.visual_mask)
    assert got.item() == pytest.approx((0.5 * response + 2.0 * visual).item(), rel=1e-5)
    # Equal images per side: pooling a sample's images together equals pooling each image.
    whole = mdist.visual_loss(s_logits, t_logits, student.visual_mask, teacher.visual_mask)
    assert whole.item() == pytest.approx(visual.item(), rel=1e-5)


def test_mdist_from_outputs_equals_full_logits_value_and_gradients():
    student, teacher, s_ans, t_ans = _outputs()
    mdist = MDist(visual_divergence=ReverseKL())
    full = mdist(student.logits(), teacher.logits(), s_ans, t_ans, visual_mask=student.visual_mask,
                 teacher_visual_mask=teacher.visual_mask, tokens_per_image=S_IMG, teacher_tokens_per_image=T_IMG)
    leaves = [student.last_hidden, student.head_weight, student.head_bias]
    expected = torch.autograd.grad(full, leaves)
    chunked = mdist.from_outputs(student, teacher, s_ans, t_ans, chunk_size=3)
    assert chunked.item() == pytest.approx(full.item(), abs=1e-5)
    for got, want in zip(torch.autograd.grad(chunked, leaves), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_mdist_zero_at_equality_and_image_count_errors():
    student, _, s_ans, _ = _outputs()
    logits = student.logits()
    kwargs = dict(visual_mask=student.visual_mask, tokens_per_image=S_IMG, teacher_tokens_per_image=S_IMG)
    assert MDist()(logits, logits.detach(), s_ans, **kwargs).item() == pytest.approx(0.0, abs=1e-6)
    _, teacher, _, t_ans = _outputs(images=(0, 2, 2))
    with pytest.raises(ValueError, match="sample 1: student sees 1 images but teacher sees 2"):
        MDist()(logits, teacher.logits(), s_ans, t_ans, visual_mask=student.visual_mask,
                teacher_visual_mask=teacher.visual_mask, tokens_per_image=S_IMG, teacher_tokens_per_image=T_IMG)
    _, teacher, _, t_ans = _outputs(images=(1, 1, 2))
    with pytest.raises(ValueError, match="sample 0: student has 0 visual tokens but teacher has 6"):
        MDist()(logits, teacher.logits(), s_ans, t_ans[:, : teacher.logits().shape[1]],
                visual_mask=student.visual_mask, teacher_visual_mask=teacher.visual_mask)


def test_mdist_without_images_has_no_visual_term():
    student, teacher, s_ans, t_ans = _outputs(images=(0, 0))
    mdist = MDist()
    got = mdist.from_outputs(student, teacher, s_ans, t_ans)
    assert got.item() == pytest.approx(mdist.response_divergence(student.logits(), teacher.logits(), s_ans,
                                                                  t_ans).item(), rel=1e-5)


def test_rdist_0_1_2_images_hand_value_zero_and_gradients():
    student, teacher, _, _ = _outputs()
    s_logits, t_logits = student.logits(), teacher.logits()
    rdist = RDist()
    value = rdist(s_logits, t_logits, student.visual_mask, teacher.visual_mask, S_IMG, T_IMG)
    losses = []
    for b in range(3):
        s_rows, t_rows = s_logits[b, student.visual_mask[b]], t_logits[b, teacher.visual_mask[b]]
        for i in range(s_rows.shape[0] // S_IMG):
            x = F.normalize(s_rows[i * S_IMG : (i + 1) * S_IMG], dim=-1)
            tx = F.adaptive_avg_pool1d(t_rows[i * T_IMG : (i + 1) * T_IMG].t()[None], S_IMG)[0].t()
            tx = F.normalize(tx, dim=-1)
            losses.append(1 - F.cosine_similarity((x @ x.t()).flatten(), (tx @ tx.t()).flatten(), dim=0))
    assert len(losses) == 3
    assert value.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    # Widths may differ; scaling features changes nothing; equal features give 0.
    assert rdist(s_logits * 3, t_logits, student.visual_mask, teacher.visual_mask, S_IMG, T_IMG).item() == (
        pytest.approx(value.item(), rel=1e-5))
    hidden = student.last_hidden
    assert rdist(hidden, hidden.detach(), student.visual_mask, None, S_IMG, S_IMG).item() == pytest.approx(0, abs=1e-6)
    teacher_hidden = teacher.last_hidden.clone().requires_grad_()
    rdist(hidden, teacher_hidden, student.visual_mask, teacher.visual_mask, S_IMG, T_IMG).backward()
    assert teacher_hidden.grad is None and hidden.grad.abs().sum() > 0


def test_rdist_from_outputs_on_logits_matches_explicit_logits():
    student, teacher, _, _ = _outputs()
    rdist = RDist()
    explicit = rdist(student.logits(), teacher.logits(), student.visual_mask, teacher.visual_mask, S_IMG, T_IMG)
    leaves = [student.last_hidden, student.head_weight, student.head_bias]
    expected = torch.autograd.grad(explicit, leaves)
    via_head = rdist.from_outputs(student, teacher, on="logits")
    assert via_head.item() == pytest.approx(explicit.item(), abs=1e-5)
    for got, want in zip(torch.autograd.grad(via_head, leaves), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    hidden = rdist.from_outputs(student, teacher, on="hidden")
    assert hidden.item() == pytest.approx(
        rdist(student.last_hidden, teacher.last_hidden, student.visual_mask, teacher.visual_mask, S_IMG,
              T_IMG).item(), rel=1e-6)
    empty, teacher0, _, _ = _outputs(images=(0, 0))
    assert rdist.from_outputs(empty, teacher0).item() == 0.0


def test_visual_groups_with_a_per_image_count_on_one_side_only():
    """Any-resolution teachers have no fixed count: their images are the runs of consecutive visual positions."""
    from mmkd.losses._common import visual_groups

    student = torch.zeros(2, 12, dtype=torch.bool)
    student[0, 1:3] = student[0, 4:6] = True  # two images of 2 tokens, text between
    student[1, 0:2] = True
    teacher = torch.zeros(2, 20, dtype=torch.bool)
    teacher[0, 1:6] = teacher[0, 7:10] = True  # 5 and 3 tokens
    teacher[1, 2:9] = True
    groups = visual_groups(student, teacher, 2, None)
    assert [(b, s.tolist(), t.tolist()) for b, s, t in groups] == [
        (0, [1, 2], [1, 2, 3, 4, 5]), (0, [4, 5], [7, 8, 9]), (1, [0, 1], [2, 3, 4, 5, 6, 7, 8])]
    teacher[0, 6] = True  # the teacher's two images now touch: one run against two student images
    with pytest.raises(ValueError, match="sample 0: student sees 2 images but teacher sees 1"):
        visual_groups(student, teacher, 2, None)
