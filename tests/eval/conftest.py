from __future__ import annotations

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
