"""``mmkd cache`` on two processes (DDP replicas, ZeRO-3 partitions of the teacher) writes the records one process
writes: each record once, by one rank, with the same top-k."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from cache_recipe import mmkd, write_recipe  # noqa: E402

from mmkd.cache import CacheReader, verify  # noqa: E402


@pytest.fixture(scope="module")
def one_process(tiny_assets, tmp_path_factory):
    base = tmp_path_factory.mktemp("cache1")
    recipe = write_recipe(base / "r.yaml", tiny_assets, cache=None)
    proc = mmkd("cache", str(recipe), "--stage", "dft", "--codec", "raw", "--out", str(base / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "cache"


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_3"])
def test_two_processes_write_what_one_writes(one_process, tiny_assets, tmp_path, strategy):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_assets, cache=None, batch=4, micro=1)
    out = tmp_path / "cache"
    proc = mmkd("cache", str(recipe), "--stage", "dft", "--codec", "raw", "--out", str(out),
                "--trainer.devices", "2", "--trainer.strategy", strategy, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = sorted({p.name.split("-")[1] for p in out.glob("shard-*.safetensors")})
    assert ranks == ["r00000", "r00001"]
    report = verify(out)
    single, double = CacheReader(one_process), CacheReader(out)
    assert report.records == len(single) == len(double) == 72
    assert double.keys() == single.keys()
    for key in single.keys():
        a, b = single.get(key), double.get(key)
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.ids, b.ids), key
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0), key
