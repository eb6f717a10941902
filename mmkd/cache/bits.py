"""Vectorized Golomb-family codes (Rice and exponential-Golomb) for rows of non-negative integers.

Every value ``v`` is split into a unary part ``u`` (written as ``u`` zeros and a one) and a binary field of
``w`` bits (written most significant bit first):

* Rice of order ``b``: ``u = v >> b``, field = the low ``b`` bits of ``v`` (``w = b``);
* exponential-Golomb of order ``b``: ``x = (v >> b) + 1``, ``u = floor(log2 x)``, field = ``x`` without its
  leading one followed by the low ``b`` bits of ``v`` (``w = u + b``).

Rice is the better code for geometric-like values (id gaps of a uniformly spread top-k), exponential-Golomb for
heavy-tailed ones (gaps between frequent and rare ids). Each row picks the code and order with the fewest bits.

A record's values are written as sections, all unary parts first, then all fields. Decoding is then
vectorized: the unary sections hold exactly one set bit per value, so the positions of the first ``m`` set bits
give every ``u`` at once; the widths follow from them, and the fields are read at offsets from a cumulative sum
of the widths.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "EXP_GOLOMB",
    "MAX_ORDER",
    "RICE",
    "BitReader",
    "BitWriter",
    "choose_codes",
    "golomb_join",
    "golomb_split",
    "golomb_widths",
]

RICE, EXP_GOLOMB = 0, 1
MAX_ORDER = 31
_FIELD_LIMIT = 56  # a field plus its bit offset inside a byte must fit one 64-bit window
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """``floor(log2 x)`` of integers ``1 <= x < 2**53``, exactly (frexp's exponent is exact, log2 may round up)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64) - 1


def choose_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest code per row.

    Args:
        values: ``(n, k)`` int64, non-negative.

    Returns:
        family ``(n,)`` and order ``(n,)``, uint8; ties go to Rice, then to the lower order, so the choice (and the
        bytes written) depend only on the values.
    """
    n, k = values.shape
    if n == 0 or k == 0:
        return np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8)
    # Beyond floor(log2(max)) + 1 both codes only grow (u is 0 and the field gains a bit per order), so stop there.
    orders = min(int(_floor_log2(np.array([max(int(values.max()), 1)]))[0]) + 2, MAX_ORDER + 1)
    rice = np.empty((n, orders), dtype=np.int64)
    expg = np.empty((n, orders), dtype=np.int64)
    for b in range(orders):
        q = values >> b
        rice[:, b] = q.sum(axis=1)
        expg[:, b] = 2 * _floor_log2(q + 1).sum(axis=1)
    fixed = k * (1 + np.arange(orders))
    # argmin takes the first minimum: Rice before exponential-Golomb, lower orders first.
    best = np.argmin(np.concatenate([rice + fixed, expg + fixed], axis=1), axis=1)
    return (best >= orders).astype(np.uint8), (best % orders).astype(np.uint8)


def golomb_split(
    values: np.ndarray, family: np.ndarray, order: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unary parts, fields and field widths of ``(n, k)`` non-negative int64 values under per-row codes ``(n,)``."""
    b = order.astype(np.int64)[:, None]
    low = values & ((np.int64(1) << b) - 1)
    q = values >> b
    eg_u = _floor_log2(q + 1)
    eg = family[:, None] == EXP_GOLOMB
    unary = np.where(eg, eg_u, q)
    field = np.where(eg, ((q + 1 - (np.int64(1) << eg_u)) << b) | low, low)
    width = np.where(eg, eg_u + b, np.broadcast_to(b, values.shape))
    if width.size and int(width.max()) > _FIELD_LIMIT:
        raise ValueError(f"a coded field of {int(width.max())} bits exceeds the {_FIELD_LIMIT}-bit limit")
    return unary, field, width


def golomb_widths(unary: np.ndarray, family: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Field widths ``(n, k)`` from the unary parts (what a decoder knows before it reads the fields)."""
    b = order.astype(np.int64)[:, None]
    return np.where(family[:, None] == EXP_GOLOMB, unary + b, np.broadcast_to(b, unary.shape))


def golomb_join(unary: np.ndarray, field: np.ndarray, family: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The values ``(n, k)`` back from their unary parts and fields (inverse of :func:`golomb_split`)."""
    b = order.astype(np.int64)[:, None]
    low = field & ((np.int64(1) << b) - 1)
    x = (np.int64(1) << unary) | (field >> b)
    return np.where(family[:, None] == EXP_GOLOMB, ((x - 1) << b) | low, (unary << b) | field)


class BitWriter:
    """Collects bits (as 0/1 bytes, vectorized) and packs them, most significant bit first, on :meth:`getvalue`."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []

    def unary(self, lengths: np.ndarray) -> None:
        """Append ``lengths[i]`` zeros and a one for each value."""
        ends = np.cumsum(lengths.astype(np.int64) + 1)
        bits = np.zeros(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
        bits[ends - 1] = 1
        self._chunks.append(bits)

    def fields(self, values: np.ndarray, widths: np.ndarray) -> None:
        """Append each value in ``widths[i]`` bits, most significant first (``widths[i] == 0`` writes nothing)."""
        if values.size == 0:
            return
        top = int(widths.max())
        word = next(size for size in (1, 2, 4, 8) if 8 * size >= top)
        # Each value as a big-endian word, unpacked to bits; keep the last w bits of each row (row-major order
        # lays the fields end to end).
        bits = np.unpackbits(values.astype(f">u{word}").view(np.uint8).reshape(-1, word), axis=1)
        keep = np.arange(8 * word)[None, :] >= (8 * word - widths.astype(np.int64))[:, None]
        self._chunks.append(bits[keep])

    def getvalue(self) -> bytes:
        if not self._chunks:
            return b""
        return np.packbits(np.concatenate(self._chunks)).tobytes()


class BitReader:
    """Random-access reads from packed bits: unary runs via the set-bit positions, fields via 64-bit windows."""

    def __init__(self, data: bytes | np.ndarray) -> None:
        raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data.astype(np.uint8)
        self.nbits = raw.size * 8
        self._raw = raw
        padded = np.concatenate([raw, np.zeros(8, dtype=np.uint8)])
        # The big-endian 64-bit word starting at every byte (overlapping, unaligned view: no copy).
        self._words = np.ndarray(shape=(raw.size + 1,), dtype=">u8", buffer=padded, strides=(1,))

    def unary(self, start: int, count: int) -> tuple[np.ndarray, int]:
        """``count`` unary values starting at bit ``start``; returns them and the bit position after the last."""
        if count == 0:
            return np.zeros(0, dtype=np.int64), start
        # Unpack only the bytes up to the count-th set bit (found with a per-byte popcount): the fields that
        # follow are most of the stream.
        first = start >> 3
        head = np.unpackbits(self._raw[first : first + 1])[: start & 7].sum() if start & 7 else 0
        seen = np.cumsum(_POPCOUNT[self._raw[first:]]) - head
        last = int(np.searchsorted(seen, count))
        if last >= seen.size:
            raise ValueError(f"bit stream ends after {int(seen[-1]) if seen.size else 0} of {count} unary codes")
        ones = np.flatnonzero(np.unpackbits(self._raw[first : first + last + 1]))
        ones = ones[ones >= (start & 7)][:count] + 8 * first
        lengths = np.diff(ones, prepend=start - 1) - 1
        return lengths.astype(np.int64), int(ones[-1]) + 1

    def fields(self, start: int, widths: np.ndarray) -> tuple[np.ndarray, int]:
        """Fields of the given widths laid end to end from bit ``start``; returns them and the next bit position."""
        widths = widths.astype(np.int64)
        offsets = start + np.cumsum(widths) - widths
        end = start + int(widths.sum())
        if end > self.nbits:
            raise ValueError(f"bit stream of {self.nbits} bits ends before bit {end}")
        if widths.size and int(widths.max()) > _FIELD_LIMIT:
            raise ValueError(f"a field of {int(widths.max())} bits exceeds the {_FIELD_LIMIT}-bit limit")
        words = self._words[offsets >> 3].astype(np.uint64)
        aligned = words << (offsets & 7).astype(np.uint64)
        values = (aligned >> (64 - widths).astype(np.uint64)).astype(np.int64)
        return np.where(widths > 0, values, 0), end
