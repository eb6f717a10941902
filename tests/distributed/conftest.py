"""Session fixtures: the single-process, DDP, ZeRO-2 and ZeRO-3 runs that several tests compare."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # importlib mode: the tests import dist_helpers by name
from dist_helpers import fit, manifest  # noqa: E402


@pytest.fixture(scope="session")
def zero_config(tmp_path_factory) -> Path:
    """ZeRO-3 partitions every parameter, however small (DeepSpeed keeps tensors under 1e5 elements whole)."""
    path = tmp_path_factory.mktemp("ds") / "zero.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return path


def _run(tmp_path_factory, name: str, assets: dict, devices: int, strategy: str, zero_config=None) -> Path:
    run = tmp_path_factory.mktemp(name) / "run"
    proc = fit(run, assets, devices, strategy, zero_config=zero_config)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert manifest(run)["stages"]["distill"]["status"] == "done"
    return run


@pytest.fixture(scope="session")
def single_run(tiny_assets, tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "single", tiny_assets, 1, "auto")


@pytest.fixture(scope="session")
def ddp_run(tiny_assets, tmp_path_factory) -> Path:
    return _run(tmp_path_factory, "ddp", tiny_assets, 2, "ddp")


@pytest.fixture(scope="session")
def zero2_run(tiny_assets, tmp_path_factory, zero_config) -> Path:
    return _run(tmp_path_factory, "zero2", tiny_assets, 2, "deepspeed_stage_2", zero_config)


@pytest.fixture(scope="session")
def zero3_run(tiny_assets, tmp_path_factory, zero_config) -> Path:
    return _run(tmp_path_factory, "zero3", tiny_assets, 2, "deepspeed_stage_3", zero_config)
