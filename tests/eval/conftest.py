from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared"


@pytest.fixture
def sqa_sample() -> Path:
    root = SHARED / "scienceqa-sample"
    if not (root / "problems.json").is_file():
        pytest.skip(f"{root} is absent: the real ScienceQA sample is licensed CC BY-NC-SA and not in the repo")
    return root


@pytest.fixture
def sqa_reference() -> Path:
    root = SHARED / "scienceqa-reference"
    if not (root / "llava_test_CQM-A.json").is_file():
        pytest.skip(f"{root} is absent: LLaVA's ScienceQA test file and answer files are not in the repo")
    return root


# A synthetic ScienceQA split in ScienceQA's own layout: 6 test problems over every category.
PROBLEMS = {
    "1": {"question": "Which is red?", "choices": ["apple", "sky"], "answer": 0, "hint": "", "image": "image.png",
          "grade": "grade2", "subject": "natural science"},
    "2": {"question": "Which is a verb?", "choices": ["run", "blue", "cat"], "answer": 0, "hint": "Read.",
          "image": None, "grade": "grade8", "subject": "language science"},
    "3": {"question": "Which is a city?", "choices": ["Paris", "Nile", "Alps", "Sahara"], "answer": 0, "hint": "",
          "image": None, "grade": "grade5", "subject": "social science"},
    "4": {"question": "Which is a gas?", "choices": ["rock", "steam"], "answer": 1, "hint": "Think.",
          "image": "image.png", "grade": "grade11", "subject": "natural science"},
    "5": {"question": "Which is a noun?", "choices": ["cat", "run", "fast"], "answer": 0, "hint": "",
          "image": None, "grade": "grade3", "subject": "language science"},
    "6": {"question": "Which is largest?", "choices": ["ant", "whale"], "answer": 1, "hint": "",
          "image": None, "grade": "grade1", "subject": "natural science"},
    "9": {"question": "Not in test.", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
          "grade": "grade1", "subject": "natural science"},
}


def _write_sqa(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(PROBLEMS))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5", "6"], "train": ["9"]}))
    return root


@pytest.fixture(scope="session")
def sqa_problems() -> dict[str, dict]:
    return PROBLEMS


@pytest.fixture(scope="session")
def write_sqa() -> Callable[[Path], Path]:
    return _write_sqa
