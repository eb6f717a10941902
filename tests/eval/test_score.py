from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkd.eval.answer_key import count_options, load_question_file_key
from mmkd.eval.score import score_answer_file


@pytest.mark.parametrize(
    ("name", "correct", "img_correct", "failed", "invalid"),
    [("answers_llava-v1.5-13b.jsonl", 3155, 1445, 5, 33), ("answers_llava-13b-v0.jsonl", 3855, 1775, 0, 1)],
)
def test_reproduces_published_llava_scores(
    sqa_reference: Path, name: str, correct: int, img_correct: int, failed: int, invalid: int
) -> None:
    key = load_question_file_key(sqa_reference / "llava_test_CQM-A.json")
    report = score_answer_file(sqa_reference / name, key)
    assert (report["correct"], report["count"]) == (correct, 4241)
    assert (report["categories"]["IMG"]["correct"], report["categories"]["IMG"]["count"]) == (img_correct, 2017)
    assert set(report["categories"]) == {"TXT", "IMG", "NO"}
    assert (report["failed_parses"], report["invalid_letters"], report["missing"]) == (failed, invalid, 0)
    assert round(report["accuracy"], 2) == {3155: 74.39, 3855: 90.90}[correct]
    assert round(report["categories"]["IMG"]["accuracy"], 2) == {3155: 71.64, 3855: 88.00}[correct]


def test_count_options() -> None:
    assert count_options("Q?\nA. x\nB. y\nC. z") == 3
    instruction = "Answer with the option's letter from the given choices directly."
    assert count_options(f"<image>\nQ?\nA. x\nB. y\n{instruction}") == 2
    assert count_options("Q about B. and A. things\nA. x\nC. y") == 1
    assert count_options("Which closing?\nA. See you,\nJanet\nB. See You,\nJanet") == 2
    assert count_options("no options") == 0


def test_option_counts_of_the_real_file(sqa_reference: Path) -> None:
    entries = json.loads((sqa_reference / "llava_test_CQM-A.json").read_text())
    counts = [count_options(e["conversations"][0]["value"]) for e in entries]
    assert min(counts) == 2 and max(counts) == 5
