"""Shared helpers of the teacher-cache tests: teacher-like distributions and deterministic records.

Tests get the helpers as fixtures; writer_proc.py (the subprocess writer) imports this module by name.
"""

import pytest
import torch

from mmkd.cache import CacheSpec, RawCodec, record_key, teacher_topk


def teacher_like_logits(n: int, vocab: int, seed: int = 0, skewed: bool = True) -> torch.Tensor:
    """``(n, V)`` peaked logits: Zipf-like prior + noise + a few boosted candidates, at a per-row temperature."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(vocab) if skewed else torch.randperm(vocab, generator=g)
    prior = -0.6 * torch.log1p(rank.float() / 20)
    z = prior + torch.randn(n, vocab, generator=g)
    cand = torch.multinomial(torch.softmax(prior, 0), n * 6, replacement=True, generator=g).view(n, 6)
    z.scatter_add_(1, cand, torch.rand(n, 6, generator=g) * 6 + 2)
    return z / (0.4 + torch.rand(n, 1, generator=g))


@pytest.fixture
def teacher_like():
    return teacher_like_logits


def make_records(count: int, k: int = 8, vocab: int = 500, seed: int = 0) -> list[dict]:
    """Deterministic records: varying lengths, a two-run position set every third record, sequence log-probs on
    every other one, and one record without top-k."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        n = 0 if i == 3 else 2 + (i * 7) % 9
        positions = list(range(5, 5 + n)) if i % 3 else list(range(2, 2 + n // 2)) + list(range(20, 20 + n - n // 2))
        rec = {"key": record_key([i, 17, 4], [bytes([i % 251]) * 3], positions), "positions": positions}
        if n:
            ids, lp, tail = teacher_topk(torch.randn(n, vocab, generator=g) * 3, k)
            rec.update(ids=ids, logprobs=lp, log_tail=tail)
        if i % 2:
            rec["sequence_logprobs"] = (-float(i) - 0.25, -2.0 * i - 0.5)
        records.append(rec)
    return records


def spec_for(k: int = 8, vocab: int = 500, codec=None, **overrides) -> CacheSpec:
    args = dict(
        teacher="org/teacher",
        revision="abc123",
        dtype="bfloat16",
        tokenizer="tok-sha:1111",
        processor={"size": 336, "sha": "2222"},
        vocab_size=vocab,
        k=k,
        codec=codec,
    )
    args.update(overrides)
    return CacheSpec(**args)


@pytest.fixture(name="make_records")
def make_records_fixture():
    return make_records


@pytest.fixture(name="spec_for")
def spec_for_fixture():
    return spec_for


@pytest.fixture
def records():
    return make_records(23)


@pytest.fixture(params=["raw", "packed"])
def spec(request):
    return spec_for(codec=RawCodec() if request.param == "raw" else None)
