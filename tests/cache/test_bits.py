import numpy as np
import pytest

from mmkd.cache.bits import (
    EXP_GOLOMB,
    RICE,
    BitReader,
    BitWriter,
    choose_codes,
    golomb_join,
    golomb_split,
    golomb_widths,
)


def _roundtrip(values, family, order):
    unary, field, width = golomb_split(values, family, order)
    w = BitWriter()
    w.fields(np.array([5]), np.array([3]))  # an unaligned start
    w.unary(unary.ravel())
    w.fields(field.ravel(), width.ravel())
    data = w.getvalue()
    r = BitReader(data)
    head, pos = r.fields(0, np.array([3]))
    u, pos = r.unary(pos, values.size)
    u = u.reshape(values.shape)
    f, pos = r.fields(pos, golomb_widths(u, family, order).ravel())
    assert head[0] == 5 and (pos + 7) // 8 == len(data)
    return golomb_join(u, f.reshape(values.shape), family, order), len(data)


@pytest.mark.parametrize("scale", [1, 30, 5_000, 2**30])
def test_golomb_roundtrip_any_values(scale):
    rng = np.random.default_rng(scale)
    values = (rng.pareto(1.0, size=(13, 37)) * scale).astype(np.int64) % 2**31
    family, order = choose_codes(values)
    out, _ = _roundtrip(values, family, order)
    assert np.array_equal(out, values)
    for fam in (RICE, EXP_GOLOMB):  # every family and a range of orders, not just the chosen ones
        for b in (0, 3, 17):
            if fam == RICE and b < 10 and scale > 30:
                continue  # a low-order Rice code of huge values would be gigabytes of unary
            f, o = np.full(13, fam, np.uint8), np.full(13, b, np.uint8)
            assert np.array_equal(_roundtrip(values, f, o)[0], values)


def test_choice_is_the_cheapest_code():
    rng = np.random.default_rng(0)
    geometric = rng.geometric(1 / 300, size=(1, 64)).astype(np.int64)
    heavy = (rng.pareto(0.7, size=(1, 64)) * 20).astype(np.int64)
    family, _ = choose_codes(np.concatenate([geometric, heavy]))
    assert family.tolist() == [RICE, EXP_GOLOMB]
    _, size = _roundtrip(geometric, *choose_codes(geometric))
    for b in range(12):  # no fixed order beats the chosen one
        for fam in (RICE, EXP_GOLOMB):
            other = _roundtrip(geometric, np.array([fam], np.uint8), np.array([b], np.uint8))[1]
            assert size <= other


def test_truncated_stream_is_detected():
    values = np.arange(40, dtype=np.int64).reshape(2, 20)
    family, order = choose_codes(values)
    unary, field, width = golomb_split(values, family, order)
    w = BitWriter()
    w.unary(unary.ravel())
    w.fields(field.ravel(), width.ravel())
    data = w.getvalue()
    r = BitReader(data[: len(data) // 4])
    with pytest.raises(ValueError, match="ends"):
        u, pos = r.unary(0, values.size)
        r.fields(pos, golomb_widths(u.reshape(2, 20), family, order).ravel())
