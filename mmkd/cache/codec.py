"""Codecs of a record's teacher top-k: ``RawCodec`` (exact) and ``PackedCodec`` (1.7-2.5 bytes per entry, K >= 64).

A codec turns the top-k of one record, ids ``(n, K)``, log-probabilities ``(n, K)`` and log tail masses
``(n,)`` (the log of the probability outside the top-k), into named arrays ("columns", first dimension of any
length) that the shard stores concatenated over records, and back. The decoded log-probabilities are what
``mmkd.losses.TopKKL`` takes; with ``PackedCodec`` they sum, per position, to exactly one minus the decoded
tail mass (up to float32 rounding), so TopKKL's tail bucket ``1 - Σ exp(logprobs)`` is the stored tail.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from mmkd.cache.bits import BitReader, BitWriter, choose_codes, golomb_join, golomb_split, golomb_widths
from mmkd.losses.topk import topk_from_logits

__all__ = ["CODECS", "PackedCodec", "RawCodec", "TopKCodec", "build_codec", "check_topk", "teacher_topk"]

# Log-probabilities a little above 0 are float rounding of p = 1; anything larger is not a log-probability.
_LOGPROB_SLACK = 1e-4
# The top-k masses of a normalized teacher sum to at most 1; allow float32 accumulation error.
_MASS_SLACK = 1e-3


# What the cache stores of a teacher's logits: the loss's own top-k (ids, log-probs, log tail), one function for the
# writer and for a live teacher, so both give TopKKL the same numbers.
teacher_topk = topk_from_logits


def check_topk(
    ids: Any, logprobs: Any, log_tail: Any, k: int, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one record's top-k and convert it to numpy; compute the log tail when it is not given.

    Args:
        ids: ``(n, K)`` integers in ``[0, V)``, distinct per row.
        logprobs: ``(n, K)`` floats: log-probabilities (``-inf`` allowed, NaN not), at most 1 in total per row.
        log_tail: ``(n,)`` or None (then ``log(1 - Σ exp(logprobs))``, less precise than :func:`teacher_topk`'s).
        k: The cache's K.
        vocab_size: The cache's V.

    Returns:
        ids int64, logprobs float32, log_tail float64 (all ``<= 0``).

    Raises:
        ValueError: One line saying what is wrong (the writer prefixes the record key).
    """
    ids = _numpy(ids)
    lp = _numpy(logprobs)
    if ids.ndim != 2 or ids.shape[1] != k or lp.shape != ids.shape:
        raise ValueError(f"top-k ids {ids.shape} and log-probs {lp.shape} must both be (n, {k})")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"top-k ids have dtype {ids.dtype}; expected integers")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"top-k ids span [{ids.min()}, {ids.max()}]; expected ids in [0, {vocab_size})")
    if ids.size and (np.diff(np.sort(ids, axis=1), axis=1) == 0).any():
        row = int(np.flatnonzero((np.diff(np.sort(ids, axis=1), axis=1) == 0).any(axis=1))[0])
        raise ValueError(f"top-k ids repeat an id at position {row}; expected distinct ids per position")
    lp = lp.astype(np.float32)
    bad = np.isnan(lp) | (lp > _LOGPROB_SLACK)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"log-probs at position {row} contain NaN or values > 0; expected log-probabilities")
    if lp.size and (~np.isfinite(lp)).all(axis=1).any():
        row = int(np.flatnonzero((~np.isfinite(lp)).all(axis=1))[0])
        raise ValueError(f"log-probs at position {row} are all -inf; expected the teacher's top-k")
    mass = np.exp(lp.astype(np.float64)).sum(axis=1)
    if (mass > 1 + _MASS_SLACK).any():
        row = int(np.argmax(mass))
        raise ValueError(
            f"top-k probabilities sum to {mass[row]:.4f} > 1 at position {row}; expected log-softmax values"
        )
    if log_tail is None:
        with np.errstate(divide="ignore"):
            tail = np.log1p(-np.minimum(mass, 1.0))
    else:
        tail = _numpy(log_tail).astype(np.float64)
        if tail.shape != (ids.shape[0],):
            raise ValueError(f"log tail mass has shape {tail.shape}; expected ({ids.shape[0]},)")
        if np.isnan(tail).any() or (tail > _LOGPROB_SLACK).any():
            raise ValueError("log tail mass contains NaN or values > 0; expected the log of a probability")
    return ids, lp, np.minimum(tail, 0.0)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class TopKCodec(ABC):
    """Turns one record's top-k into named arrays (columns) and back; subclasses register in ``CODECS``."""

    name: ClassVar[str]

    @abstractmethod
    def columns(self, k: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The columns this codec writes: dtype and shape after the first (ragged) dimension."""

    @abstractmethod
    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray) -> dict[str, np.ndarray]:
        """Columns of one record from what :func:`check_topk` returns (``(n, K)``, ``(n, K)``, ``(n,)``)."""

    @abstractmethod
    def decode(self, columns: Mapping[str, np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids ``(n, K)`` int64, log-probs ``(n, K)`` float32 and log tail ``(n,)`` float32 of one record."""

    def params(self) -> dict[str, Any]:
        """The codec's identity for the cache header: ``{"name": ..., **parameters}``."""
        return {"name": self.name, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class RawCodec(TopKCodec):
    """Uncompressed: int32 ids, float32 log-probs and float32 log tail, exactly as given (12 bytes per entry + 4)."""

    name: ClassVar[str] = "raw"

    def columns(self, k: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {
            "ids": (np.dtype(np.int32), (k,)),
            "logprobs": (np.dtype(np.float32), (k,)),
            "log_tail": (np.dtype(np.float32), ()),
        }

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "ids": ids.astype(np.int32),
            "logprobs": logprobs.astype(np.float32),
            "log_tail": log_tail.astype(np.float32),
        }

    def decode(self, columns: Mapping[str, np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            columns["ids"].astype(np.int64).reshape(n, k),
            columns["logprobs"].astype(np.float32).reshape(n, k),
            columns["log_tail"].astype(np.float32).reshape(n),
        )


# The tail is coded as its logit log(t / (1 - t)) on a uniform 16-bit grid over [-TAIL_LOGIT, TAIL_LOGIT]: relative
# precision on both t (which matters when the top-k holds nearly all the mass) and 1 - t (when it holds little).
# Code 0 is an exactly empty tail (top-k covering the whole distribution).
TAIL_LOGIT = 32.0
_TAIL_LEVELS = 65534
TAIL_STEP = 2 * TAIL_LOGIT / _TAIL_LEVELS


@dataclass(frozen=True)
class PackedCodec(TopKCodec):
    """Top-k sorted by id with Golomb-coded id gaps, log-probs quantized relative to the top-1, 16-bit tail.

    Per position: the K ids are sorted; their gaps (``id[0]``, ``id[i] - id[i-1] - 1``) are coded with the cheaper
    of a Rice and an exponential-Golomb code (order chosen per position). Each log-prob's gap below the top-1,
    ``g = top1 - logprob >= 0``, is quantized on a grid that is finest at the top: ``s = round(c(g) / logprob_step)``
    with ``c(g) = doubling_gap * log1p(g / doubling_gap)``, so the step is ``logprob_step`` at the top-1 and has
    doubled ``doubling_gap`` nats below it (low-probability entries weigh little in the KL). The levels are coded
    as ``max(s) - s`` with the same code family (most entries sit near the k-th log-prob, so these are small). The
    tail mass is a 16-bit logit code; two bytes give the two codes' family and order. The top-1 log-prob itself is
    not stored: it is whatever makes the top-k sum to one minus the tail, which also keeps the decoded
    distribution consistent.

    Error bound (tested): with ``eps = expm1(logprob_step / (2 * doubling_gap))``, an entry whose gap ``g_i`` is
    below ``max_logprob_gap`` decodes within ``(doubling_gap + g_i) * eps`` (its own rounding) ``+ (doubling_gap +
    g_max) * eps`` (the shift of the normalizer; ``g_max`` the row's largest gap) ``+ TAIL_STEP / 2`` (the tail's
    code) of the original, plus the input's own inconsistency ``|log Σ p - log(1 - tail)|`` (float rounding when
    the tail comes from :func:`teacher_topk`); the decoded log tail is within ``TAIL_STEP / 2``. Entries further
    below the top-1 decode to about ``max_logprob_gap`` below it (the nearest grid level; they carry less than
    e^-64 of the top-1's mass); ``-inf`` entries stay ``-inf``.

    Why this layout (measured by bench/cache_codec.py at V = 151,936 on teacher-like distributions): sorting by id
    lets the ids cost about log2(C(V, K)) / K bits (12.7 at K = 64 for uniformly spread ids, 8.3 with a realistic
    skew toward frequent ids) instead of 18 (or log2 V = 17.2) in ranked order, where the log-probs would be
    cheaper (2.6 bits as deltas) but not by enough. With the defaults the log-probs cost 5.9 bits, 0.8 bit less than
    a uniform 1/32-nat grid whose per-token KL error is 1.4 times larger; at K = 64 a position costs 120 (skewed
    ids) to 155 (uniform) bytes with every overhead, and the top-k KL from the decoded cache is within 5e-4 of the
    uncompressed one (a 1/48 top step saves 0.35 bit and reaches 1.2e-3 for a student close to its teacher).

    Args:
        logprob_step: Quantization step at the top-1, in nats.
        doubling_gap: Gap below the top-1, in nats, at which the step has doubled.
        max_logprob_gap: Log-probs further below the top-1 than this are stored at this gap.
    """

    name: ClassVar[str] = "packed"
    logprob_step: float = 1 / 80
    doubling_gap: float = 2.0
    max_logprob_gap: float = 64.0

    def __post_init__(self) -> None:
        if not 0 < self.logprob_step <= 1:
            raise ValueError(f"logprob_step={self.logprob_step}: expected a step in (0, 1] nats")
        if not self.doubling_gap > 0:
            raise ValueError(f"doubling_gap={self.doubling_gap}: expected a positive number of nats")
        # The cap bounds the coded levels (and so the field widths) whatever the input.
        if not 0 < self.max_logprob_gap <= 1000:
            raise ValueError(f"max_logprob_gap={self.max_logprob_gap}: expected a gap in (0, 1000] nats")

    @property
    def eps(self) -> float:
        """Relative rounding error of a gap: ``|decoded gap - gap| <= (doubling_gap + gap) * eps``."""
        return math.expm1(self.logprob_step / (2 * self.doubling_gap))

    def _level(self, gap: np.ndarray) -> np.ndarray:
        return self.doubling_gap * np.log1p(gap / self.doubling_gap) / self.logprob_step

    def _gap(self, level: np.ndarray) -> np.ndarray:
        return self.doubling_gap * np.expm1(level * (self.logprob_step / self.doubling_gap))

    def columns(self, k: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {
            "tail": (np.dtype(np.uint16), ()),
            "codes": (np.dtype(np.uint8), (2,)),
            "bits": (np.dtype(np.uint8), ()),
        }

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray) -> dict[str, np.ndarray]:
        n, k = ids.shape
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        lp = np.take_along_axis(logprobs, order, axis=1).astype(np.float64)
        finite = np.isfinite(lp)
        top = np.where(finite, lp, -np.inf).max(axis=1, initial=-np.inf)
        with np.errstate(invalid="ignore"):
            gap = np.clip(top[:, None] - lp, 0.0, self.max_logprob_gap)
        steps = np.where(finite, np.rint(self._level(np.where(finite, gap, 0.0))), 0).astype(np.int64)
        # -inf entries take the level just past the largest finite one, flagged per position.
        has_inf = ~finite.all(axis=1)
        smax = steps.max(axis=1, initial=0) + has_inf
        steps = np.where(finite, steps, smax[:, None])
        values = smax[:, None] - steps
        gaps = np.diff(ids, axis=1, prepend=-1) - 1
        id_family, id_order = choose_codes(gaps)
        lp_family, lp_order = choose_codes(values)
        id_unary, id_field, id_width = golomb_split(gaps, id_family, id_order)
        lp_unary, lp_field, lp_width = golomb_split(values, lp_family, lp_order)
        writer = BitWriter()
        writer.unary(np.concatenate([id_unary.ravel(), lp_unary.ravel()]))
        writer.fields(
            np.concatenate([id_field.ravel(), lp_field.ravel()]), np.concatenate([id_width.ravel(), lp_width.ravel()])
        )
        codes = np.stack(
            [(id_family << 5) | id_order, (lp_family << 5) | lp_order | (has_inf.astype(np.uint8) << 6)], 1
        )
        return {
            "tail": _tail_code(log_tail).reshape(n),
            "codes": codes.astype(np.uint8).reshape(n, 2),
            "bits": np.frombuffer(writer.getvalue(), dtype=np.uint8),
        }

    def decode(self, columns: Mapping[str, np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes = columns["codes"].reshape(n, 2)
        id_family, id_order = (codes[:, 0] >> 5) & 1, codes[:, 0] & 31
        lp_family, lp_order = (codes[:, 1] >> 5) & 1, codes[:, 1] & 31
        has_inf = ((codes[:, 1] >> 6) & 1).astype(bool)
        reader = BitReader(columns["bits"])
        unary, pos = reader.unary(0, 2 * n * k)
        id_unary, lp_unary = unary[: n * k].reshape(n, k), unary[n * k :].reshape(n, k)
        id_width, lp_width = golomb_widths(id_unary, id_family, id_order), golomb_widths(lp_unary, lp_family, lp_order)
        field, pos = reader.fields(pos, np.concatenate([id_width.ravel(), lp_width.ravel()]))
        if (pos + 7) // 8 != reader.nbits // 8:
            raise ValueError(f"packed top-k of {reader.nbits // 8} bytes: its codes end at byte {(pos + 7) // 8}")
        gaps = golomb_join(id_unary, field[: n * k].reshape(n, k), id_family, id_order)
        values = golomb_join(lp_unary, field[n * k :].reshape(n, k), lp_family, lp_order)
        ids = np.cumsum(gaps + 1, axis=1) - 1
        smax = values.max(axis=1, initial=0)
        steps = smax[:, None] - values
        neginf = has_inf[:, None] & (steps == smax[:, None])
        gap = np.where(neginf, np.inf, self._gap(steps.astype(np.float64)))
        log_tail, log_mass = _tail_decode(columns["tail"].reshape(n))
        # The top-1 is what makes the k entries sum to the stored top-k mass 1 - tail.
        top = log_mass - _logsumexp(-gap)
        lp = top[:, None] - gap
        # Ranked order (decreasing log-prob; ties by id, since the rows are id-sorted and the sort is stable).
        rank = np.argsort(steps, axis=1, kind="stable")
        return (
            np.take_along_axis(ids, rank, axis=1),
            np.take_along_axis(lp, rank, axis=1).astype(np.float32),
            log_tail.astype(np.float32),
        )


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp of ``(n, K)`` float64 whose row maxima are finite (every row has a finite top-1)."""
    m = x.max(axis=1, initial=-np.inf)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=1))


def _tail_code(log_tail: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = log_tail - np.log(-np.expm1(log_tail))
    level = np.rint(
        (np.clip(np.nan_to_num(logit, posinf=TAIL_LOGIT), -TAIL_LOGIT, TAIL_LOGIT) + TAIL_LOGIT) / TAIL_STEP
    )
    return np.where(np.isneginf(log_tail), 0, 1 + level).astype(np.uint16)


def _tail_decode(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log tail and log(1 - tail), float64, from 16-bit tail codes."""
    logit = (code.astype(np.float64) - 1) * TAIL_STEP - TAIL_LOGIT
    empty = code == 0
    log_tail = np.where(empty, -np.inf, -np.logaddexp(0.0, -logit))
    log_mass = np.where(empty, 0.0, -np.logaddexp(0.0, logit))
    return log_tail, log_mass


CODECS: dict[str, type[TopKCodec]] = {"raw": RawCodec, "packed": PackedCodec}


def build_codec(params: Mapping[str, Any]) -> TopKCodec:
    """The codec a header describes: ``{"name": "packed", "logprob_step": 0.03125, ...}``."""
    params = dict(params)
    name = params.pop("name", None)
    if name not in CODECS:
        raise ValueError(f"codec {name!r}: expected one of {', '.join(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as e:
        raise ValueError(f"codec {name!r}: {e}") from None
