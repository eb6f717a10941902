from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmkd.eval.answer_key import KeyedQuestion
from mmkd.eval.categories import CATEGORIES
from mmkd.eval.metric import ScienceQAAccuracy

QUESTIONS = [
    KeyedQuestion("1", "A", 2, frozenset({"NAT", "G1-6", "IMG"})),
    KeyedQuestion("2", "B", 3, frozenset({"SOC", "G1-6", "TXT"})),
    KeyedQuestion("3", "C", 4, frozenset({"LAN", "G7-12", "NO"})),
    KeyedQuestion("4", "A", 2, frozenset({"NAT", "G7-12", "TXT", "IMG"})),
    KeyedQuestion("5", "B", 2, frozenset({"NAT", "G1-6", "NO"})),
    KeyedQuestion("6", "D", 5, frozenset({"SOC", "G7-12", "IMG"})),
    KeyedQuestion("7", "A", 3, frozenset({"LAN", "G1-6", "NO"})),
]
# right, wrong, right ("X. "), failed, invalid letter (C of two), right (The answer is), missing
TEXTS = ["A", "C", "C. lion", "maybe", "C", "Hmm. The answer is D.", None]


def test_counts_by_category() -> None:
    metric = ScienceQAAccuracy()
    metric.update(TEXTS[:3], QUESTIONS[:3])
    metric.update(TEXTS[3:], QUESTIONS[3:])
    report = metric.report()
    assert (report["correct"], report["count"]) == (3, 7)
    assert report["accuracy"] == pytest.approx(300 / 7)
    assert (report["failed_parses"], report["missing"], report["invalid_letters"]) == (1, 1, 1)
    cats = report["categories"]
    assert list(cats) == list(CATEGORIES)
    assert cats["NAT"] == {"accuracy": pytest.approx(100 / 3), "correct": 1, "count": 3}
    assert cats["SOC"] == {"accuracy": 50.0, "correct": 1, "count": 2}
    assert cats["LAN"] == {"accuracy": 50.0, "correct": 1, "count": 2}
    assert cats["IMG"] == {"accuracy": pytest.approx(200 / 3), "correct": 2, "count": 3}
    assert cats["TXT"] == {"accuracy": 0.0, "correct": 0, "count": 2}
    assert cats["NO"] == {"accuracy": pytest.approx(100 / 3), "correct": 1, "count": 3}
    assert cats["G1-6"]["count"] + cats["G7-12"]["count"] == 7
    flat = metric.compute()
    assert flat["IMG"].item() == pytest.approx(200 / 3) and flat["IMG/count"].item() == 3
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = metric.report()
    assert empty["count"] == 0 and empty["accuracy"] is None


def test_reported_categories_and_empty_category() -> None:
    metric = ScienceQAAccuracy(categories=("TXT", "IMG", "NO"))
    metric.update(["A"], QUESTIONS[:1])
    report = metric.report()
    assert list(report["categories"]) == ["TXT", "IMG", "NO"]
    assert report["categories"]["TXT"] == {"accuracy": None, "correct": 0, "count": 0}
    json.dumps(report)  # plain Python numbers only
    assert "NAT" not in metric.compute()
    with pytest.raises(ValueError, match="unknown categories"):
        ScienceQAAccuracy(categories=("IMAGE",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = ScienceQAAccuracy()
        # Uneven shards, as a sampler without padding gives them: rank 0 gets 4 questions, rank 1 gets 3.
        for i in range(rank, len(QUESTIONS), world_size):
            metric.update([TEXTS[i]], [QUESTIONS[i]])
        report = metric.report()
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_merge_to_the_single_process_result(tmp_path: Path) -> None:
    single = ScienceQAAccuracy()
    single.update(TEXTS, QUESTIONS)
    expected = single.report()
    # fork: the workers inherit the imported modules instead of importing torch again (seconds on 2 cores).
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == json.loads(json.dumps(expected))
