"""``mmkd eval MODEL``: where a run directory's, a folder's or a hub id's weights are."""

import json
from pathlib import Path

import pytest

from mmkd.train.evaluate import resolve_model


def test_resolve_model(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo"
    for stage in ("sft", "dft"):
        (run / "stages" / stage / "student").mkdir(parents=True)
        (run / "stages" / stage / "student" / "config.json").write_text("{}")
    manifest = {"stages": {"sft": {"status": "done", "student": "stages/sft/student"}, "dft": {"status": "running"}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    folder, model_id, found = resolve_model(str(run))
    assert (folder, model_id, found.root) == (run / "stages/sft/student", "demo/sft", run)
    with pytest.raises(ValueError, match="--stage dft: the stage is running, expected done"):
        resolve_model(str(run), "dft")
    with pytest.raises(ValueError, match="--stage nope"):
        resolve_model(str(run), "nope")
    folder = run / "stages" / "dft" / "student"
    assert resolve_model(str(folder)) == (folder, "student", None)
    with pytest.raises(FileNotFoundError, match="expected a run directory"):
        resolve_model(str(tmp_path))
