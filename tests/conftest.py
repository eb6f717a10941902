"""Shared fixtures: offline tiny assets (synthetic world + tiny model folders), built once per session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    """The assets of recipes/debug.yaml and recipes/tiny/ (world of 120 problems, tiny teacher, student parts)."""
    from mmkd.assets import prepare_tiny_assets

    return prepare_tiny_assets(tmp_path_factory.mktemp("tiny"), n=120, seed=0)
