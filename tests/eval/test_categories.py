from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmkd.eval.answer_key import load_question_file_key, load_scienceqa_key
from mmkd.eval.categories import problem_categories, prompt_categories, record_categories


@pytest.mark.parametrize(
    ("subject", "grade", "hint", "has_image", "expected"),
    [
        ("natural science", "grade2", "", True, {"NAT", "G1-6", "IMG"}),
        ("social science", "grade6", "A map.", False, {"SOC", "G1-6", "TXT"}),
        ("language science", "grade7", "", False, {"LAN", "G7-12", "NO"}),
        ("natural science", "grade12", "Read.", True, {"NAT", "G7-12", "TXT", "IMG"}),
        ("natural science", "grade10", " ", False, {"NAT", "G7-12", "TXT"}),  # ScienceQA tests truthiness
    ],
)
def test_problem_categories(subject: str, grade: str, hint: str, has_image: bool, expected: set[str]) -> None:
    assert problem_categories(subject, grade, hint, has_image) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<image>\nContext: A map.\nWhich?\nA. x\nB. y", {"IMG", "TXT"}),
        ("<image>\nWhich?\nA. x\nB. y", {"IMG"}),
        ("Context: N/A\nWhich?\nA. x\nB. y", {"NO"}),  # older question files
        ("Which?\nA. x\nB. y", {"NO"}),
        ("Context: Some text.\nWhich?\nA. x\nB. y", {"TXT"}),
    ],
)
def test_prompt_categories(prompt: str, expected: set[str]) -> None:
    assert prompt_categories(prompt) == expected


def test_categories_on_the_real_sample(sqa_sample: Path) -> None:
    problems = json.loads((sqa_sample / "problems.json").read_text())
    key = load_scienceqa_key(sqa_sample, "test")
    assert len(key.questions) == 50
    tally = {c: 0 for c in key.categories}
    for q in key.questions:
        p = problems[q.question_id]
        assert q.answer == "ABCDE"[p["answer"]] and q.num_choices == len(p["choices"])
        # Each problem is in exactly one subject, one grade band, and TXT/IMG or NO.
        assert len(q.categories & {"NAT", "SOC", "LAN"}) == 1
        assert len(q.categories & {"G1-6", "G7-12"}) == 1
        assert ("NO" in q.categories) == (not p["hint"] and not p["image"])
        assert ("IMG" in q.categories) == (p["image"] is not None)
        for c in q.categories:
            tally[c] += 1
    # Counted independently from the raw fields.
    expect = {
        "NAT": sum(problems[p]["subject"] == "natural science" for p in problems if problems[p]["split"] == "test"),
        "TXT": sum(bool(problems[p]["hint"]) for p in problems if problems[p]["split"] == "test"),
        "IMG": sum(bool(problems[p]["image"]) for p in problems if problems[p]["split"] == "test"),
    }
    for c, n in expect.items():
        assert tally[c] == n
    assert tally["NAT"] + tally["SOC"] + tally["LAN"] == 50
    assert tally["G1-6"] + tally["G7-12"] == 50
    assert tally["TXT"] + tally["IMG"] - sum(
        1 for q in key.questions if {"TXT", "IMG"} <= q.categories
    ) + tally["NO"] == 50
    assert min(tally.values()) > 0


def test_question_file_categories_agree_with_problems(sqa_sample: Path, sqa_reference: Path) -> None:
    # The question file alone determines IMG/TXT/NO exactly as problems.json does, on every sample test pid.
    from_problems = {q.question_id: q for q in load_scienceqa_key(sqa_sample, "test").questions}
    from_file = {q.question_id: q for q in load_question_file_key(sqa_reference / "llava_test_CQM-A.json").questions}
    assert set(from_problems) <= set(from_file)
    for pid, q in from_problems.items():
        other = from_file[pid]
        assert other.categories == q.categories & {"TXT", "IMG", "NO"}
        assert (other.answer, other.num_choices) == (q.answer, q.num_choices)


def test_record_categories() -> None:
    record = {
        "id": "7",
        "images": [],
        "messages": [{"role": "user", "content": "Which?\nA. x\nB. y"}, {"role": "assistant", "content": "A"}],
        "meta": {"subject": "language science", "grade": "grade9", "hint": "Read this.", "has_image": False},
    }
    assert record_categories(record) == {"LAN", "G7-12", "TXT"}
    record["meta"] = {}
    assert record_categories(record) == {"NO"}


def test_bad_split_and_file_name_the_problem(tmp_path: Path, sqa_sample: Path) -> None:
    with pytest.raises(ValueError, match="no split 'nope'"):
        load_scienceqa_key(sqa_sample, "nope")
    with pytest.raises(FileNotFoundError, match="problems.json"):
        load_scienceqa_key(tmp_path, "test")
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"id": "1", "conversations": [{"value": "Q?\nA. x\nB. y"}, {"value": "C"}]}]))
    with pytest.raises(ValueError, match="entry '1' answers 'C', expected one of its 2 option letters"):
        load_question_file_key(bad)
