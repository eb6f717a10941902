"""Turn one recipe stage into a Trainer, a LightningModule and a DataModule."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from mmkd.modules.callbacks import StepCheckpoint
from mmkd.recipe import Recipe, instantiate

__all__ = ["build_collate", "build_logger", "build_stage", "stage_total_steps"]


def build_logger(spec: Any, stage_dir: Path):
    """The stage's logger: CSV by default, or any Lightning logger given as ``class_path``/``init_args``."""
    from lightning.pytorch.loggers import CSVLogger

    if spec is False:
        return False
    if spec in (None, True):
        return CSVLogger(save_dir=str(stage_dir), name="logs", version="")
    spec = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    import importlib

    module_name, _, attr = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr)
    params = inspect.signature(cls).parameters
    if "save_dir" in params and "save_dir" not in spec["init_args"]:
        spec["init_args"]["save_dir"] = str(stage_dir / "logs")
    return instantiate(spec)


def build_collate(dataset: Any, stage: dict[str, Any], student: nn.Module, teacher: nn.Module | None):
    """The collate function of a stage: the dataset's own if it has one, else mmkd's for these models."""
    own = getattr(dataset, "collate_fn", None)
    if own is not None:
        return own
    if stage["kind"] == "clip":
        from mmkd.data.clip import CLIPCollator

        return CLIPCollator.for_models(student, teacher)
    if stage["kind"] == "preference":
        from mmkd.data import PreferenceCollator

        return PreferenceCollator.for_models(student, teacher, max_length=stage["max_length"])
    from mmkd.data import MultimodalCollator

    return MultimodalCollator.for_models(student, teacher, max_length=stage["max_length"])


def stage_total_steps(recipe: Recipe, name: str, n_samples: int) -> int:
    """Optimizer steps of a stage: ``max_steps`` when set, else whole global batches times epochs."""
    tr = recipe.stage_trainer(name)
    if tr.max_steps is not None and tr.max_steps > 0:
        return int(tr.max_steps)
    per_epoch = n_samples // recipe.stage(name)["batch_size"]
    if per_epoch < 1:
        raise ValueError(
            f"stages.{name}.data: {n_samples} samples make no full global batch of {recipe.stage(name)['batch_size']}"
        )
    return per_epoch * int(tr.max_epochs or 1)


def build_module(recipe: Recipe, name: str, student: nn.Module, teacher: nn.Module | None, total_steps: int):
    stage = recipe.stage(name)
    common = dict(
        objectives=stage["objectives"], objective_args=stage["objective_args"], train_parts=stage["train"],
        optimizer=stage["optimizer"], schedule=stage["schedule"], total_steps=total_steps, stage=name,
    )
    if stage["kind"] == "preference":
        from mmkd.modules.preference import PreferenceDistillModule

        return PreferenceDistillModule(student, teacher, **common)
    if stage["kind"] == "clip":
        from mmkd.modules.clip import CLIPDistillModule

        return CLIPDistillModule(student, teacher, **common)
    from mmkd.modules.distill import DistillModule

    return DistillModule(student, teacher if stage["use_teacher"] else None, **common)


def build_stage(
    recipe: Recipe,
    name: str,
    student: nn.Module,
    teacher: nn.Module | None,
    stage_dir: Path,
    on_saved: Callable[[Path, int], None],
    echo: Callable[[str], None] = print,
    datasets: tuple[Any, Any] | None = None,
):
    """Everything a stage needs to run: ``(trainer, module, datamodule)``.

    Args:
        datasets: The stage's ``(train, val)`` datasets when the caller already opened them.
    """
    from mmkd.data.datamodule import MMKDDataModule
    from mmkd.modules.strategies import build_strategy

    stage = recipe.stage(name)
    tr = recipe.stage_trainer(name)
    micro, accumulate = recipe.micro_batch(name)
    dataset, val_dataset = datasets or (instantiate(stage["data"]), instantiate(stage["val_data"]))
    collate = build_collate(dataset, stage, student, teacher)
    total_steps = stage_total_steps(recipe, name, len(dataset))
    datamodule = MMKDDataModule(
        dataset, collate, val_dataset=val_dataset, batch_size=micro, num_workers=int(tr.num_workers or 0),
        seed=recipe.seed,
    )
    module = build_module(recipe, name, student, teacher, total_steps)
    checkpoint = StepCheckpoint(stage_dir / "checkpoints", int(tr.checkpoint_every_n_steps or 50),
                                int(tr.keep_checkpoints or 2), on_saved, name)
    callbacks: list[L.Callback] = [checkpoint]
    if stage.get("sqa_eval"):
        from mmkd.modules.evaluation import ScienceQAEval

        callbacks.append(ScienceQAEval(out_dir=stage_dir.parent.parent / "eval" / name, **stage["sqa_eval"]))
    if tr.enable_progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=int(tr.num_nodes or 1),
        strategy=build_strategy(tr.strategy or "auto", accelerator=tr.accelerator, recipe=recipe, stage=name,
                                student=student),
        precision=tr.precision,
        max_steps=total_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=tr.gradient_clip_val if tr.gradient_clip_val else None,
        log_every_n_steps=int(tr.log_every_n_steps or 10),
        val_check_interval=tr.val_check_interval if val_dataset is not None else None,
        limit_val_batches=tr.limit_val_batches if val_dataset is not None else 0,
        num_sanity_val_steps=0,
        logger=build_logger(tr.logger, stage_dir),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=bool(tr.enable_progress_bar),
        enable_model_summary=False,
        default_root_dir=str(stage_dir),
        deterministic=False,
    )
    echo(f"stage {name}: {len(dataset)} samples, {total_steps} optimizer steps, micro-batch {micro}"
         f" x {accumulate} accumulation")
    return trainer, module, datamodule
