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
    rdist = RDist(normalize=True)
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


@pytest.mark.parametrize("normalize", [False, True])
def test_rdist_from_outputs_on_logits_matches_explicit_logits(normalize):
    student, teacher, _, _ = _outputs()
    rdist = RDist(normalize=normalize)
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


def test_rdist_default_is_llava_kd_raw_logit_relation():
    # LLaVA-KD's training code: R = logits @ logitsᵀ of the visual positions (no row normalisation), loss
    # 1 − cos(vec(R_T), vec(R_S)); one image per micro-batch there, so the per-image mean here is the same value.
    g = torch.Generator().manual_seed(7)
    s_logits, t_logits = torch.randn(1, 9, V, generator=g), torch.randn(1, 9, V, generator=g) * 2 + 0.3
    visual = torch.zeros(1, 9, dtype=torch.bool)
    visual[0, 2:7] = True
    value = RDist()(s_logits, t_logits, visual, visual, 5, 5)
    s_img, t_img = s_logits[:, 2:7], t_logits[:, 2:7]
    s_rel, t_rel = s_img @ s_img.permute(0, 2, 1), t_img @ t_img.permute(0, 2, 1)
    official = 1 - F.cosine_similarity(t_rel.view(-1).unsqueeze(0), s_rel.view(-1).unsqueeze(0)).mean()
    assert value.item() == pytest.approx(official.item(), rel=1e-5)
    normalized = RDist(normalize=True)(s_logits, t_logits, visual, visual, 5, 5)
    assert abs(normalized.item() - value.item()) > 1e-3  # the two choices differ


# ---- any-resolution teachers: pair each image's base grid only ------------------------------------------------------
def _onevision_run(grid: int, tiles: int = 2) -> tuple[int, int]:
    """Visual tokens of one LLaVA-OneVision image: the base ``grid x grid`` first, then a ``tiles x tiles`` tiling
    of ``grid x grid`` tiles as one ``(tiles·grid) x (tiles·grid)`` map with a newline token after each row."""
    side = tiles * grid
    return grid * grid, grid * grid + side * (side + 1)


def _anyres_layout(images: list[int], run: int, prompt: int = 2, between: int = 1, answer: int = 2):
    """[prompt, image, text, image, ..., answer] per sample, right-padded: the visual mask and each image's start."""
    lengths = [prompt + n * run + max(n - 1, 0) * between + answer for n in images]
    visual = torch.zeros(len(images), max(lengths), dtype=torch.bool)
    starts = []
    for b, n in enumerate(images):
        pos, mine = prompt, []
        for _ in range(n):
            visual[b, pos : pos + run] = True
            mine.append(pos)
            pos += run + between
        starts.append(mine)
    return visual, starts


def _anyres_case(student_grid: int, teacher_grid: int, seed: int = 0):
    images = [1, 2]
    s_base, s_run = student_grid**2, student_grid**2  # a fixed-resolution student: its whole run is its grid
    t_base, t_run = _onevision_run(teacher_grid)
    s_vis, s_starts = _anyres_layout(images, s_run)
    t_vis, t_starts = _anyres_layout(images, t_run)
    g = torch.Generator().manual_seed(seed)
    student = ModelOutput(
        last_hidden=torch.randn(2, s_vis.shape[1], H, generator=g).requires_grad_(),
        head_weight=torch.randn(V, H, generator=g).requires_grad_(),
        vision_features=torch.randn(sum(images), s_run, H, generator=g),
        visual_mask=s_vis, image_base_tokens=s_base)
    teacher = ModelOutput(
        last_hidden=torch.randn(2, t_vis.shape[1], HT, generator=g), head_weight=torch.randn(V, HT, generator=g),
        vision_features=None,  # any-resolution: per-image counts differ, no stacked features
        visual_mask=t_vis, image_base_tokens=t_base)
    return student, teacher, (s_starts, s_base), (t_starts, t_base)


def _base_rows(features, starts, base):
    return [features[b, s : s + base] for b, mine in enumerate(starts) for s in mine]


def test_base_grid_pairing_with_a_2x2_tiling():
    # Student 2x2 grid; teacher base 2x2 (4 tokens) then a 2x2 tiling: 4x4 tile map + 4 newlines = 20 more tokens.
    student, teacher, (s_starts, s_base), (t_starts, t_base) = _anyres_case(2, 2)
    assert (s_base, t_base) == (4, 4) and int(teacher.visual_mask[0].sum()) == 24
    s_logits, t_logits = student.logits(), teacher.logits()
    s_rows = torch.cat(_base_rows(s_logits, s_starts, s_base))
    t_rows = torch.cat(_base_rows(t_logits, t_starts, t_base))  # the base grids only, token for token
    mdist = MDist(response_weight=0.0)
    no_answers = torch.zeros_like(student.visual_mask)
    kwargs = dict(visual_mask=student.visual_mask, teacher_visual_mask=teacher.visual_mask, tokens_per_image=4)
    paired = mdist(s_logits, t_logits, no_answers, torch.zeros_like(teacher.visual_mask), **kwargs, base_tokens=4,
                   teacher_base_tokens=4)
    expected = mdist.visual_divergence.per_token(s_rows, t_rows).mean()
    assert paired.item() == pytest.approx(expected.item(), rel=1e-6)
    # Without base grids the teacher's whole run (base + tiles + newlines) is pooled 24 -> 4: another value.
    whole = mdist(s_logits, t_logits, no_answers, torch.zeros_like(teacher.visual_mask), **kwargs)
    runs = [t_logits[b, s : s + 24] for b, mine in enumerate(t_starts) for s in mine]
    pooled = torch.cat([F.adaptive_avg_pool1d(r.t()[None], 4)[0].t() for r in runs])
    assert whole.item() == pytest.approx(mdist.visual_divergence.per_token(s_rows, pooled).mean().item(), rel=1e-6)
    assert abs(whole.item() - paired.item()) > 1e-3
    # RDist relates the same base-grid tokens; the output contract carries image_base_tokens to both.
    rdist = RDist()
    per_image = [rdist._relation_loss(rdist._gram(s), rdist._gram(t)) for s, t in
                 zip(_base_rows(s_logits, s_starts, 4), _base_rows(t_logits, t_starts, 4))]
    assert rdist.from_outputs(student, teacher).item() == pytest.approx(torch.stack(per_image).mean().item(),
                                                                       rel=1e-4)
    answers = torch.zeros_like(student.visual_mask)
    assert mdist.from_outputs(student, teacher, answers, torch.zeros_like(teacher.visual_mask)).item() == (
        pytest.approx(paired.item(), rel=1e-5))


def _adaptive_grid_mean(rows, g, side):
    """adaptive_avg_pool2d written out: output cell (i, j) averages input rows floor(i·g/s)..ceil((i+1)·g/s)."""
    out = []
    for i in range(side):
        for j in range(side):
            r0, r1 = (i * g) // side, -((-(i + 1) * g) // side)
            c0, c1 = (j * g) // side, -((-(j + 1) * g) // side)
            out.append(torch.stack([rows[r * g + c] for r in range(r0, r1) for c in range(c0, c1)]).mean(0))
    return torch.stack(out)


@pytest.mark.parametrize("student_grid,teacher_grid", [(2, 4), (2, 3)])
def test_base_grids_of_different_sizes_pool_on_the_2d_grid(student_grid, teacher_grid):
    from mmkd.losses._common import pool_grid

    student, teacher, (s_starts, s_base), (t_starts, t_base) = _anyres_case(student_grid, teacher_grid, seed=1)
    s_logits, t_logits = student.logits(), teacher.logits()
    s_rows = torch.cat(_base_rows(s_logits, s_starts, s_base))
    t_pooled = torch.cat([_adaptive_grid_mean(r, teacher_grid, student_grid)
                          for r in _base_rows(t_logits, t_starts, t_base)])
    torch.testing.assert_close(pool_grid(_base_rows(t_logits, t_starts, t_base)[0], student_grid),
                               t_pooled[: s_base], rtol=1e-6, atol=1e-6)
    mdist = MDist(response_weight=0.0)
    none_s, none_t = torch.zeros_like(student.visual_mask), torch.zeros_like(teacher.visual_mask)
    got = mdist(s_logits, t_logits, none_s, none_t, visual_mask=student.visual_mask,
                teacher_visual_mask=teacher.visual_mask, tokens_per_image=s_base, base_tokens=s_base,
                teacher_base_tokens=t_base)
    assert got.item() == pytest.approx(mdist.visual_divergence.per_token(s_rows, t_pooled).mean().item(), rel=1e-5)
    # The chunked path pools hidden states on the grid: the same value.
    chunked = mdist.from_outputs(student, teacher, none_s, none_t, chunk_size=3)
    assert chunked.item() == pytest.approx(got.item(), rel=1e-5)
    # 1-D pooling of the same base grid (what a side without grids gets) is another value.
    t_flat = torch.cat([F.adaptive_avg_pool1d(r.t()[None], s_base)[0].t()
                        for r in _base_rows(t_logits, t_starts, t_base)])
    flat = mdist.visual_divergence.per_token(s_rows, t_flat).mean()
    assert abs(flat.item() - got.item()) > 1e-4


def test_without_base_grids_pairing_is_unchanged_bit_for_bit():
    from mmkd.losses import aligned_visual_rows

    student, teacher, _, _ = _outputs()
    s_logits, t_logits = student.logits(), teacher.logits()
    rows, t_rows = aligned_visual_rows(s_logits, t_logits, student.visual_mask, teacher.visual_mask, S_IMG, T_IMG)
    want = []
    for b in range(3):
        image_rows = t_logits[b, teacher.visual_mask[b]]
        for i in range(image_rows.shape[0] // T_IMG):
            want.append(F.adaptive_avg_pool1d(image_rows[i * T_IMG : (i + 1) * T_IMG].t().unsqueeze(0),
                                              S_IMG).squeeze(0).t())
    assert torch.equal(t_rows, torch.cat(want)) and torch.equal(rows, s_logits[student.visual_mask])


def test_base_grid_longer_than_an_image_is_a_one_line_error():
    student, teacher, _, _ = _anyres_case(2, 2)
    with pytest.raises(ValueError, match="sample 0: an image has 4 student visual tokens, fewer than its "
                                         "image_base_tokens=9"):
        RDist()(student.logits(), teacher.logits(), student.visual_mask, teacher.visual_mask, None, None, 9, 4)
