import math

import numpy as np
import pytest
import torch

from mmkd.cache import PackedCodec, RawCodec, teacher_topk
from mmkd.cache.codec import TAIL_STEP, build_codec, check_topk
from mmkd.losses import TopKKL


def _roundtrip(codec, ids, lp, tail, vocab):
    ids, lp, tail = check_topk(ids, lp, tail, ids.shape[1], vocab)
    columns = codec.encode(ids, lp, tail)
    return (ids, lp, tail), codec.decode(columns, ids.shape[0], ids.shape[1]), columns


def _by_id(ids, values):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def test_raw_is_exact():
    ids, lp, tail = teacher_topk(torch.randn(7, 300) * 4, 20)
    lp[2, -3:] = float("-inf")
    (i0, l0, t0), (i1, l1, t1), _ = _roundtrip(RawCodec(), ids, lp, tail, 300)
    assert np.array_equal(i1, ids.numpy()) and np.array_equal(l1, lp.numpy()) and np.array_equal(t1, tail.numpy())
    assert i1.dtype == np.int64 and l1.dtype == np.float32 and t1.dtype == np.float32


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("skewed", [True, False])
def test_packed_within_its_error_bound(teacher_like, k, skewed):
    vocab = 3000
    ids, lp, tail = teacher_topk(teacher_like(256, vocab, seed=k, skewed=skewed), k)
    codec = PackedCodec()
    (i0, l0, t0), (i1, l1, t1), columns = _roundtrip(codec, ids, lp, tail, vocab)
    # Ranked order on decoding, ids exact as a set.
    assert (np.diff(l1, axis=1) <= 0).all()
    si0, sl0 = _by_id(i0, l0.astype(np.float64))
    si1, sl1 = _by_id(i1, l1.astype(np.float64))
    assert np.array_equal(si0, si1)
    # The stated bound: own rounding + normalizer shift + tail code + the input's own inconsistency.
    gap = l0.max(1, keepdims=True) - sl0
    inconsistency = np.abs(np.log(np.exp(l0.astype(np.float64)).sum(1)) - np.log(-np.expm1(t0)))[:, None]
    bound = (codec.doubling_gap + gap) * codec.eps + (codec.doubling_gap + gap.max(1, keepdims=True)) * codec.eps
    bound = bound + TAIL_STEP / 2 + inconsistency + 1e-6 * (1 + np.abs(sl0))  # float32 output
    assert (np.abs(sl1 - sl0) <= bound).all()
    assert np.abs(t1.astype(np.float64) - t0).max() <= TAIL_STEP / 2 + 1e-6 * np.abs(t0).max()
    # The decoded top-k plus the decoded tail is a distribution: what TopKKL's tail bucket needs.
    total = np.exp(l1.astype(np.float64)).sum(1) + np.exp(t1.astype(np.float64))
    assert np.abs(total - 1).max() < 1e-5
    # Typical error is far inside the bound: p-weighted mean abs error of a few thousandths of a nat.
    assert (np.exp(sl0) * np.abs(sl1 - sl0)).sum(1).mean() < 0.01
    assert set(columns) == {"tail", "codes", "bits"}


@pytest.mark.parametrize("k", [16, 64])
def test_topk_kl_from_the_packed_cache_within_a_thousandth(teacher_like, k):
    """TopKKL from the decoded cache vs the uncompressed top-k, for a close student (KL ~ 0.05) and a far one."""
    vocab, n = 4096, 512
    teacher = teacher_like(n, vocab, seed=3)
    ids, lp, tail = teacher_topk(teacher, k)
    (_, _, _), (i1, l1, _), _ = _roundtrip(PackedCodec(), ids, lp, tail, vocab)
    loss = TopKKL(tail="bucket")
    g = torch.Generator().manual_seed(1)
    for std in (0.5, 1.0, 2.0):
        student = teacher + std * torch.randn(teacher.shape, generator=g)
        ref = loss.per_token(student, ids, lp).double()
        got = loss.per_token(student, torch.from_numpy(i1), torch.from_numpy(l1)).double()
        assert ref.mean() > 0.02
        assert abs(got.mean() - ref.mean()) / ref.mean() < 1e-3, (std, got.mean(), ref.mean())


def test_packed_special_values():
    vocab = 50
    ids = np.array([[3, 7, 1, 9], [0, 49, 2, 5], [10, 11, 12, 13]])
    lp = np.array(
        [
            [-0.1, -2.5, float("-inf"), float("-inf")],  # zero-probability entries
            [-1.0, -1.0, -200.0, -3.0],  # a tie, and an entry far below the top-1 (capped)
            [np.log(0.25)] * 4,  # the top-k holds all the mass: tail 0
        ],
        dtype=np.float32,
    )
    tail = np.log(-np.expm1(np.log(np.exp(lp.astype(np.float64)).sum(1))))
    tail[2] = -np.inf
    (_, _, _), (i1, l1, t1), _ = _roundtrip(PackedCodec(), ids, lp, tail, vocab)
    assert i1[0, :2].tolist() == [3, 7] and set(i1[0, 2:].tolist()) == {1, 9} and np.isneginf(l1[0, 2:]).all()
    assert i1[1].tolist() == [0, 49, 5, 2]  # ties by id, the capped entry last
    assert l1[1, 3] == pytest.approx(l1[1, 0] - 64.0, abs=0.5)  # the grid step there is 0.41
    assert np.isneginf(t1[2]) and np.allclose(l1[2], np.log(0.25), atol=1e-6)
    codec = PackedCodec()
    assert (codec.decode(codec.encode(*check_topk(ids, lp, tail, 4, vocab)), 3, 4)[1] == l1).all()
    empty = codec.encode(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32), np.zeros(0))
    assert [a.shape[0] for a in codec.decode(empty, 0, 4)] == [0, 0, 0]


def test_encoding_is_deterministic_and_compact(teacher_like):
    ids, lp, tail = teacher_topk(teacher_like(64, 151_936 // 16, seed=5), 64)
    a = PackedCodec().encode(*check_topk(ids, lp, tail, 64, 151_936))
    b = PackedCodec().encode(*check_topk(ids.clone(), lp.clone(), tail.clone(), 64, 151_936))
    assert all(np.array_equal(a[c], b[c]) for c in a)
    per_entry = sum(x.nbytes for x in a.values()) / ids.numel()
    assert per_entry < 2.5  # bytes per (id, log-prob) entry, everything the codec stores


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda i, lp, t: (i[:, :3], lp, t), r"must both be \(n, 4\)"),
        (lambda i, lp, t: (i + 100, lp, t), r"expected ids in \[0, 50\)"),
        (lambda i, lp, t: (np.concatenate([i[:, :1], i[:, :3]], 1), lp, t), "repeat an id at position 0"),
        (lambda i, lp, t: (i, np.where(lp == lp.max(), np.nan, lp), t), "NaN or values > 0"),
        (lambda i, lp, t: (i, lp + 1.0, t), "NaN or values > 0"),
        (lambda i, lp, t: (i, np.full_like(lp, -np.inf), t), "all -inf"),
        (lambda i, lp, t: (i, np.full_like(lp, np.log(0.5)), t), r"sum to 2\.0000 > 1"),
        (lambda i, lp, t: (i, lp, t[:1]), "log tail mass has shape"),
        (lambda i, lp, t: (i.astype(np.float32), lp, t), "expected integers"),
    ],
)
def test_check_topk_refuses_bad_input(mutate, match):
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    lp = np.log(np.array([[0.5, 0.2, 0.1, 0.1], [0.4, 0.3, 0.2, 0.05]], dtype=np.float32))
    tail = np.log(np.array([0.1, 0.05]))
    with pytest.raises(ValueError, match=match):
        check_topk(*mutate(ids, lp, tail), 4, 50)


def test_tail_computed_when_missing():
    lp = np.log(np.array([[0.5, 0.25]], dtype=np.float32))
    _, _, tail = check_topk(np.array([[0, 1]]), lp, None, 2, 10)
    assert tail[0] == pytest.approx(math.log(0.25), rel=1e-6)


def test_codec_params_roundtrip():
    codec = PackedCodec(logprob_step=1 / 64, doubling_gap=3.0)
    assert build_codec(codec.params()) == codec and build_codec(RawCodec().params()) == RawCodec()
    with pytest.raises(ValueError, match="expected one of raw, packed"):
        build_codec({"name": "zip"})
    with pytest.raises(ValueError, match="logprob_step"):
        PackedCodec(logprob_step=0)
