"""``mmkd cache`` end to end: a stage distilled from the cache against the same stage with the live teacher, resume
after a kill, preference distillation from cached reference log-probs, and bad input.

Every command is a real ``mmkd`` process. The stage is recipes/debug.yaml's distillation stage with ``lm +
topk_kl`` and a micro-batch of 1 (the cache's teacher forwards then see exactly the live teacher's inputs).
"""

import json
import os
from pathlib import Path

import pytest
import torch
from cache_recipe import mmkd, write_recipe
from safetensors.torch import load_file


def weights(run_dir: Path, stage: str = "dft") -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run_dir / "stages" / stage / "student").glob("*.safetensors")):
        out.update(load_file(f))
    assert out
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def raw_cache(tiny_assets, tmp_path_factory):
    """A raw (exact float32) cache of the train split, written by ``mmkd cache``."""
    base = tmp_path_factory.mktemp("raw")
    cache = base / "cache"
    recipe = write_recipe(base / "cached.yaml", tiny_assets, cache=str(cache))
    proc = mmkd("cache", str(recipe), "--stage", "dft", "--codec", "raw")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache, proc


def test_cache_command_writes_a_verified_cache(raw_cache):
    cache, proc = raw_cache
    header = json.loads((cache / "header.json").read_text())
    assert header["k"] == 64 and header["codec"]["name"] == "raw" and header["stored"] == ["answer"]
    assert header["extra"]["max_length"] == 160 and header["extra"]["weights"]  # the teacher's weight files
    assert "72 records" in proc.stdout and "cached already" in proc.stdout
    verified = mmkd("cache", "--verify", str(cache))
    assert verified.returncode == 0, verified.stderr
    assert "records" in verified.stdout


def test_raw_cache_gives_the_live_teachers_weights(raw_cache, tiny_assets, tmp_path):
    cache, _ = raw_cache
    cached = write_recipe(tmp_path / "c" / "cached.yaml", tiny_assets, cache=str(cache))
    live = write_recipe(tmp_path / "l" / "live.yaml", tiny_assets, cache=None)
    for recipe in (cached, live):
        proc = mmkd("fit", str(recipe))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "c" / "run"), weights(tmp_path / "l" / "run")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    m = json.loads((tmp_path / "c" / "run" / "manifest.json").read_text())
    assert m["stages"]["dft"]["data"]["teacher_cache"]["missing"] == 0
    assert m["stages"]["dft"]["data"]["teacher_cache"]["found"] == 72
    # the same steps really moved the student: the KL was logged
    assert m["stages"]["dft"]["metrics"]["train/topk_kl"] > 0


def test_kill_and_resume_write_byte_identical_shards(tiny_assets, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_assets, cache=None)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = ("cache", str(recipe), "--stage", "dft", "--batch-size", "4", "--shard-records", "16")
    assert mmkd(*args, "--out", str(whole)).returncode == 0
    killed = mmkd(*args, "--out", str(resumed), fault="kill:7")  # after 28 records: 1 complete shard of 16
    assert killed.returncode != 0
    assert list(shard_bytes(resumed)) == ["shard-r00000-000000.safetensors"]
    again = mmkd(*args, "--out", str(resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "16 cached already" in again.stdout
    assert shard_bytes(resumed) == shard_bytes(whole)
    assert len(shard_bytes(whole)) == 5  # 72 records: 4 shards of 16 and one of 8
    assert not list(resumed.glob(".*tmp*"))


def test_preference_from_cached_reference_logprobs_matches_the_live_teacher(tiny_assets, tmp_path):
    cache = tmp_path / "cache"
    cached = write_recipe(tmp_path / "c" / "cached.yaml", tiny_assets, cache=str(cache), preference=True)
    live = write_recipe(tmp_path / "l" / "live.yaml", tiny_assets, cache=None, preference=True)
    proc = mmkd("cache", str(cached), "--stage", "dft")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((cache / "header.json").read_text())["stored"] == ["sequence_logprobs"]
    for recipe in (cached, live):
        proc = mmkd("fit", str(recipe))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "c" / "run"), weights(tmp_path / "l" / "run")
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- bad input: one line naming the file or record, exit 2, nothing half-written ---------------------------------
def _error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("mmkd: error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_a_truncated_shard_is_named(raw_cache, tiny_assets, tmp_path):
    cache, _ = raw_cache
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in cache.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    shard = sorted(broken.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = _error_line(mmkd("cache", "--verify", str(broken)))
    assert shard.name in line
    recipe = write_recipe(tmp_path / "fit" / "r.yaml", tiny_assets, cache=str(broken))
    proc = mmkd("fit", str(recipe))
    line = _error_line(proc)
    assert shard.name in line and "teacher_cache" in line
    assert not (tmp_path / "fit" / "run" / "stages" / "dft" / "student").exists()


def test_a_cache_of_another_teacher_is_refused(raw_cache, tiny_assets, tmp_path):
    cache, _ = raw_cache
    other = tmp_path / "teacher-copy"
    other.mkdir()
    for p in Path(tiny_assets["teacher"]).iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    recipe = write_recipe(tmp_path / "r.yaml", tiny_assets, cache=str(cache), teacher=str(other))
    line = _error_line(mmkd("fit", str(recipe)))
    assert "stale teacher cache" in line and "teacher is" in line and str(cache) in line


def test_a_cache_with_another_k_is_refused(raw_cache, tiny_assets, tmp_path):
    cache, _ = raw_cache
    recipe = write_recipe(tmp_path / "r.yaml", tiny_assets, cache=str(cache), k=32)
    line = _error_line(mmkd("fit", str(recipe)))
    assert "k is 64, expected 32" in line


def test_a_record_missing_from_the_cache_is_named_or_skipped(raw_cache, tiny_assets, tmp_path):
    cache, _ = raw_cache
    # the same problems and images, with a split "mixed" = the cached train split + 8 val problems
    sqa = Path(tiny_assets["root"]) / "sqa"
    root = tmp_path / "sqa"
    root.mkdir()
    for name in ("problems.json", "images", "tokenizer"):
        (root / name).symlink_to(sqa / name)
    splits = json.loads((sqa / "pid_splits.json").read_text())
    extra = splits["val"][:8]
    splits["mixed"] = splits["train"] + extra
    (root / "pid_splits.json").write_text(json.dumps(splits))
    recipe = write_recipe(tmp_path / "e" / "r.yaml", tiny_assets, cache=str(cache), split="mixed", sqa_root=str(root))
    line = _error_line(mmkd("fit", str(recipe)))
    assert "is not in the teacher cache" in line and "on_missing: skip" in line
    assert any(f"record '{pid}'" in line for pid in extra), line
    m = json.loads((tmp_path / "e" / "run" / "manifest.json").read_text())
    assert m["stages"]["dft"]["status"] == "failed"
    assert not (tmp_path / "e" / "run" / "stages" / "dft" / "student").exists()
    recipe = write_recipe(tmp_path / "s" / "r.yaml", tiny_assets, cache=str(cache), split="mixed", sqa_root=str(root),
                          on_missing="skip")
    proc = mmkd("fit", str(recipe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counted = json.loads((tmp_path / "s" / "run" / "manifest.json").read_text())["stages"]["dft"]["data"]
    assert counted["teacher_cache"]["missing"] == 8 and counted["teacher_cache"]["found"] == 72
    assert set(counted["teacher_cache"]["first_missing"]) <= set(extra)


def test_an_unwritable_output_folder_is_named_and_nothing_is_written(tiny_assets, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_assets, cache=None)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        # /sys refuses new folders even to root, for whom a read-only folder is still writable
        out = locked / "cache" if not os.access(locked, os.W_OK) else Path("/sys/mmkd-cache-test/cache")
        line = _error_line(mmkd("cache", str(recipe), "--stage", "dft", "--out", str(out)))
        assert str(out) in line and "cannot write" in line
        assert not out.exists() and not list(locked.iterdir())
    finally:
        locked.chmod(0o700)
