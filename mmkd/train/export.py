"""``mmkd export``: a run's student as a complete, plain Hugging Face folder with a model card."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mmkd.train.rundir import DONE, RunDir

__all__ = ["export_command"]


def _stage_student(run: RunDir, stage: str | None, tmp: Path) -> tuple[Path, str]:
    """The folder of a stage's student: its saved folder when done, else rebuilt from its last checkpoint."""
    stages = run.manifest().data["stages"]
    if stage is None:
        done = [n for n, e in stages.items() if e.get("status") == DONE]
        with_ckpt = [n for n, e in stages.items() if e.get("checkpoint")]
        if not done and not with_ckpt:
            raise ValueError(f"{run.root}: no stage is done and none has a checkpoint; nothing to export")
        stage = (done or with_ckpt)[-1]
    if stage not in stages:
        raise ValueError(f"--stage {stage}: {run.root} has stages {', '.join(stages)}")
    entry = stages[stage]
    if entry.get("status") == DONE and entry.get("student"):
        return run.resolve(entry["student"]), stage
    if not entry.get("checkpoint"):
        raise ValueError(f"--stage {stage}: the stage is {entry.get('status')} and has no checkpoint to export")
    from mmkd.train.checkpoints import load_stage_checkpoint
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import Runner

    recipe = load_recipe(run.recipe_file, ["--run_dir", str(run.root)])
    # frozen parts (left out of DeepSpeed checkpoints) come from the stage's init_from
    runner = Runner(recipe)
    student = load_stage_checkpoint(runner.build_student(stage), run.resolve(entry["checkpoint"]),
                                    recipe.stage(stage).train)
    folder = tmp / "student"
    student.save_pretrained(str(folder))
    return folder, stage


def _export_adapter(run: RunDir, stage: str | None, out: str) -> str:
    """A LoRA stage's adapters alone, in peft's folder format, from the stage's last checkpoint."""
    from mmkd.models.export import export_adapter
    from mmkd.train.checkpoints import load_stage_checkpoint
    from mmkd.train.recipe import load_recipe
    from mmkd.train.runner import Runner

    stages = run.manifest().data["stages"]
    if stage is None:
        with_ckpt = [n for n, e in stages.items() if e.get("checkpoint")]
        if not with_ckpt:
            raise ValueError(f"--adapter-only: {run.root} has no stage checkpoint to take adapters from")
        stage = with_ckpt[-1]
    if stage not in stages:
        raise ValueError(f"--stage {stage}: {run.root} has stages {', '.join(stages)}")
    entry = stages[stage]
    if not entry.get("checkpoint"):
        raise ValueError(f"--adapter-only: stage {stage} has no checkpoint to take its adapters from")
    recipe = load_recipe(run.recipe_file, ["--run_dir", str(run.root)])
    student = load_stage_checkpoint(Runner(recipe).build_student(stage), run.resolve(entry["checkpoint"]),
                                    recipe.stage(stage).train)
    dest = export_adapter(student, out)
    print(f"exported the adapters of stage {stage!r} of {run.root} to {dest}")
    return str(dest)


def export_command(run_dir: str, out: str, stage: str | None = None, adapter_only: bool = False) -> str:
    """Write the student of a run as a plain Hugging Face folder that transformers loads without mmkd.

    The folder holds safetensors weights, config, the processor (tokenizer with its chat template, image
    processor), the generation config and a model card naming the recipe, the teacher and the evaluation
    results found in the run (RUN_DIR/eval/STAGE/*/metrics.json). A LoRA stage's student is the merged model.

    Args:
        run_dir: The run directory (holds manifest.json).
        out: Destination folder.
        stage: The stage whose student to export (default: the last stage done; an unfinished stage is
            exported from its last checkpoint).
        adapter_only: Write only a LoRA stage's adapters, in peft's format (``adapter_config.json``,
            ``adapter_model.safetensors``), from the stage's last checkpoint (default stage: the last one with a
            checkpoint); ``PeftModel.from_pretrained`` puts them on the stage's starting student.

    Returns:
        The destination folder.
    """
    from mmkd.models.export import export_student

    run = RunDir(run_dir)
    run.manifest()  # a one-line error when this is not a run directory
    if adapter_only:
        return _export_adapter(run, stage, out)
    recipe = run.read_recipe()
    with tempfile.TemporaryDirectory(prefix="mmkd-export-") as tmp:
        folder, stage = _stage_student(run, stage, Path(tmp))
        metrics: dict[str, Any] = {}
        for name, report in run.eval_metrics(stage).items():
            metrics[name] = {"accuracy": report.get("accuracy"),
                             **{k: v.get("accuracy") for k, v in (report.get("categories") or {}).items()}}
        teacher = None
        if recipe and recipe.get("teacher"):
            args = recipe["teacher"].get("init_args") or {}
            teacher = args.get("path") or recipe["teacher"]["class_path"]
        dest = export_student(str(folder), out, recipe=recipe, metrics=metrics or None, teacher=teacher)
    print(f"exported stage {stage!r} of {run.root} to {dest}")
    return str(dest)
