"""``mmkd export``: a run's student as a complete, plain Hugging Face folder."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["export_command"]


def _stage_student(run: Path, manifest: dict[str, Any], stage: str | None, tmp: Path) -> tuple[Path, str]:
    """The folder of a stage's student: its saved folder when done, else rebuilt from its last checkpoint."""
    stages = manifest["stages"]
    if stage is None:
        done = [n for n, e in stages.items() if e.get("status") == "done"]
        with_ckpt = [n for n, e in stages.items() if e.get("checkpoint")]
        if not done and not with_ckpt:
            raise ValueError(f"{run}: no stage is done and none has a checkpoint; nothing to export")
        stage = (done or with_ckpt)[-1]
    if stage not in stages:
        raise ValueError(f"--stage {stage}: {run} has stages {', '.join(stages)}")
    entry = stages[stage]
    if entry.get("status") == "done" and entry.get("student"):
        return run / entry["student"], stage
    if not entry.get("checkpoint"):
        raise ValueError(f"--stage {stage}: the stage is {entry.get('status')} and has no checkpoint to export")
    from mmkd.modules.checkpoints import load_stage_checkpoint
    from mmkd.recipe import load_recipe
    from mmkd.runner import Runner

    recipe = load_recipe(run / "recipe.yaml", ["--run_dir", str(run)])
    # frozen parts (left out of DeepSpeed checkpoints) come from the stage's init_from
    student = load_stage_checkpoint(Runner(recipe).build_student(stage), run / entry["checkpoint"],
                                    recipe.stage(stage)["train"])
    folder = tmp / "student"
    student.save_pretrained(str(folder))
    return folder, stage


def export_command(run_dir: str, out: str, stage: str | None = None) -> str:
    """Write the student of a run as a plain Hugging Face folder that transformers loads without mmkd.

    The folder holds safetensors weights, config, the processor (tokenizer with its chat template, image
    processor), the generation config and a model card naming the recipe, the teacher and the evaluation
    results found in the run (RUN_DIR/eval/STAGE/*/metrics.json).

    Args:
        run_dir: The run directory (holds manifest.json).
        out: Destination folder.
        stage: The stage whose student to export (default: the last stage done; an unfinished stage is
            exported from its last checkpoint).

    Returns:
        The destination folder.
    """
    from mmkd.models.export import export_student

    run = Path(run_dir)
    manifest_path = run / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else None
    with tempfile.TemporaryDirectory(prefix="mmkd-export-") as tmp:
        folder, stage = _stage_student(run, manifest, stage, Path(tmp))
        metrics = {}
        for path in sorted((run / "eval" / stage).glob("*/metrics.json")):
            report = json.loads(path.read_text())
            metrics[path.parent.name] = {"accuracy": report.get("accuracy"),
                                         **{k: v.get("accuracy") for k, v in (report.get("categories") or {}).items()}}
        teacher = None
        if recipe and recipe.get("teacher"):
            args = recipe["teacher"].get("init_args") or {}
            teacher = args.get("path") or recipe["teacher"]["class_path"]
        dest = export_student(str(folder), out, recipe=recipe, metrics=metrics or None, teacher=teacher)
    print(f"exported stage {stage!r} of {run} to {dest}")
    return str(dest)
