"""Kill-and-resume (byte-identical shards) and concurrent ranks, with real processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd.cache import CacheReader, finalize, verify

HERE = Path(__file__).parent
SCRIPT = HERE / "writer_proc.py"


def _start(folder, *args):
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(folder), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _run(folder, *args):
    proc = _start(folder, *args)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, (json.loads(out) if proc.returncode == 0 else None), err


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref") / "cache"
    rc, out, err = _run(folder)
    assert rc == 0, err
    assert out == {"written": 23, "skipped": 0, "committed": 0}
    return _files(folder)


@pytest.mark.parametrize("mode, complete", [("mid-write", 2), ("before-rename", 2), ("after-rename", 3)])
def test_sigkill_mid_shard_then_resume_gives_identical_shards(tmp_path, reference, mode, complete):
    folder = tmp_path / "cache"
    rc, _, err = _run(folder, "--kill", mode, "--kill-shard", "2")
    assert rc == -9, err
    # After the kill only complete shards are visible; the shard being written is left as a temporary file.
    shards = sorted(p.name for p in folder.glob("shard-*"))
    assert shards == [f"shard-r00000-{i:06d}.safetensors" for i in range(complete)]
    temporary = [p.name for p in folder.glob(".shard-*.tmp")]
    assert temporary == ([] if mode == "after-rename" else [".shard-r00000-000002.safetensors.tmp"])
    if mode == "mid-write":
        assert 0 < (folder / temporary[0]).stat().st_size < len(reference["shard-r00000-000002.safetensors"])
    assert len(CacheReader(folder)) == 5 * complete
    assert verify(folder).records == 5 * complete
    rc, out, err = _run(folder)
    assert rc == 0, err
    assert out == {"written": 23 - 5 * complete, "skipped": 5 * complete, "committed": 5 * complete}
    assert _files(folder).keys() == reference.keys()  # no temporary file left
    for name, data in reference.items():
        assert _files(folder)[name] == data, name


def test_two_ranks_write_one_folder_concurrently(tmp_path, make_records):
    folder = tmp_path / "cache"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_start(folder, "--rank", str(rank), "--ranks", "2", "--barrier", str(barrier)) for rank in (0, 1)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert [json.loads(out)["written"] for out, _ in results] == [12, 11]
    reader = CacheReader(folder)
    assert len(reader) == 23
    assert sorted(p.name for p in folder.glob("shard-*")) == [
        f"shard-r{rank:05d}-{seq:06d}.safetensors" for rank in (0, 1) for seq in range(3)
    ]
    for rec in make_records(23):
        got = reader.get(rec["key"])
        assert got.positions.tolist() == list(rec["positions"])
        if rec["positions"]:
            assert torch.equal(got.ids.sort(1).values, rec["ids"].sort(1).values)
    finalize(folder)
    report = verify(folder)
    assert report.records_per_rank == {0: 12, 1: 11} and report.merged_index == "current"
    assert len(CacheReader(folder)) == 23
