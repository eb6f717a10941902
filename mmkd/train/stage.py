"""Turn one resolved stage into a Trainer, the StageModule and a DataModule."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from mmkd.train.callbacks import StepCheckpoint, fault_callbacks
from mmkd.train.recipe import RecipeError, StageSpec, import_path
from mmkd.train.rundir import RunDir, flatten_config

__all__ = ["build_logger", "build_stage", "build_task_for", "parameter_counts"]


def _one_folder(args: dict[str, Any], state: dict[str, Any], run: RunDir) -> None:
    """CSV, TensorBoard: every stage writes into the logger's folder itself (no ``version_N`` per stage)."""
    args.setdefault("name", "")
    args.setdefault("version", "")


def _tensorboard_run(args: dict[str, Any], state: dict[str, Any], run: RunDir) -> None:
    _one_folder(args, state, run)
    args.setdefault("default_hp_metric", False)  # else a -1 placeholder curve under the first stage's prefix


def _mlflow_run(args: dict[str, Any], state: dict[str, Any], run: RunDir) -> None:
    import os

    args.setdefault("experiment_name", "mmkd")
    args.setdefault("run_name", run.root.name)
    uri = args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "file:"
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses a file store unless asked for one; a store in the run directory is what mmkd asks for.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if state.get("run_id"):
        args.setdefault("run_id", state["run_id"])


def _wandb_run(args: dict[str, Any], state: dict[str, Any], run: RunDir) -> None:
    import uuid

    state.setdefault("id", uuid.uuid4().hex[:12])
    args.setdefault("id", state["id"])  # WandbLogger passes resume="allow": a second stage or a resume continues it
    args.setdefault("project", "mmkd")
    args.setdefault("name", run.root.name)


def _record_mlflow(logger: Any, state: dict[str, Any]) -> None:
    run_id = logger.run_id  # creates the run on the recipe's first stage
    if state.get("run_id") == run_id:  # a later stage or a resume: the previous stage's end marked the run finished
        logger.experiment.update_run(run_id, status="RUNNING")
    state["run_id"] = run_id


# How a logger class keeps one run for the whole recipe: the init_args it gets unless the recipe sets them (from the
# state kept in logs/<logger>.json), and what to record there once it is built. Loggers not listed still share one
# folder and the stage prefixes, but start a new run per stage.
_ONE_RUN: dict[str, tuple[Callable[..., None], Callable[..., None] | None]] = {
    "TensorBoardLogger": (_tensorboard_run, None),
    "CSVLogger": (_one_folder, None),
    "MLFlowLogger": (_mlflow_run, _record_mlflow),
    "WandbLogger": (_wandb_run, None),
}


def build_logger(spec: dict[str, Any] | bool | None, run: RunDir, stage: str):
    """The stage's loggers: its CSV file, and the recipe's ``class_path`` logger when it names one.

    The CSV logger always writes ``stages/<stage>/logs/metrics.csv`` (``logger: false`` turns every logger off). A
    ``class_path`` logger holds one run for the whole recipe in ``logs/<logger>/`` (``logs/tensorboard``,
    ``logs/mlflow``, ``logs/wandb``): every stage logs into it with its keys prefixed by the stage's name
    (``sft-train/loss``), a resumed stage continues it, and the resolved recipe, flattened to its key paths, is logged
    as its hyper-parameters once per run. ``save_dir`` defaults to that folder; the recipe's ``init_args`` win.

    Returns:
        False, the CSV logger, or the CSV logger and the recipe's logger.
    """
    import json

    from lightning.pytorch.loggers import CSVLogger

    from mmkd.train.rundir import atomic_write_text, is_rank_zero

    if spec is False:
        return False
    csv = CSVLogger(save_dir=str(run.stage_dir(stage)), name=run.logs(stage).name, version="")
    if spec in (None, True):
        return csv
    cls = import_path(spec["class_path"])
    folder, state_file = run.run_logs(cls.__name__.lower().removesuffix("logger") or "logger")
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    args = dict(spec.get("init_args") or {})
    params = inspect.signature(cls).parameters
    if "save_dir" in params:
        args.setdefault("save_dir", str(folder))
    if "prefix" in params:
        args["prefix"] = "-".join(p for p in (args.get("prefix"), stage) if p)
    pin, record = next((_ONE_RUN[c.__name__] for c in cls.__mro__ if c.__name__ in _ONE_RUN), (None, None))
    if pin is not None:
        pin(args, state, run)
    if is_rank_zero():
        folder.mkdir(parents=True, exist_ok=True)
    logger = cls(**args)
    if is_rank_zero():
        if record is not None:
            record(logger, state)
        if not state.get("hyperparameters_logged"):
            if getattr(logger, "log_dir", None):
                Path(logger.log_dir).mkdir(parents=True, exist_ok=True)  # TensorBoard writes hparams.yaml only there
            logger.log_hyperparams(flatten_config(run.read_recipe() or {}))
            logger.save()
            state["hyperparameters_logged"] = True
        atomic_write_text(state_file, json.dumps(state, indent=2) + "\n")
    return [csv, logger]


def _numel(p: Any) -> int:
    """Elements of a parameter as the model sees it (a 4-bit tensor stores two per byte in a flat buffer)."""
    state = getattr(p, "quant_state", None)
    if state is not None:
        return int(state.shape.numel())
    return int(getattr(p, "ds_numel", None) or p.numel())  # a ZeRO-3 partition: the whole tensor's count


def parameter_counts(module: Any) -> dict[str, Any]:
    """The stage's trainable student parameters (in total and per part) and the student's total."""
    parts = {part: sum(_numel(p) for _, p in params) for part, params in module.named_trainable_groups().items()
             if part != "objectives"}
    total = sum(_numel(p) for p in {id(p): p for p in module.student.parameters()}.values())
    return {"trainable": sum(parts.values()), "total": total, "parts": parts}


def build_task_for(spec: StageSpec, student: nn.Module, teacher: nn.Module | None, total_steps: int):
    """The stage's task with its objectives, their context (widths, total steps) taken from the models."""
    from mmkd.objectives import build_objective
    from mmkd.tasks import build_task

    objectives = {o.name: build_objective(o.name, o.args, student=student, teacher=teacher, total_steps=total_steps)
                  for o in spec.objectives}
    return build_task(spec.task, spec.task_args, objectives, student=student, teacher=teacher)


def align_vocabularies(student: nn.Module, teacher: Any) -> None:
    """Same tokenizer, differently padded heads (151,936 vs 152,064 rows): both expose logits over len(tokenizer).
    ``teacher`` may be a teacher's input side (a stage that reads a teacher cache)."""
    from mmkd.models import ImageTextInputs, ImageTextModel, align_vocab

    if isinstance(teacher, ImageTextModel | ImageTextInputs) and isinstance(student, ImageTextModel):
        align_vocab(teacher, student)


def _task_and_data(spec: StageSpec, student: nn.Module, teacher: Any, dataset: Any) -> tuple[Any, Any, Any, int,
                                                                                              dict[str, Any]]:
    """The stage's task, collator and training set, checked before training (``Task.select_data``)."""
    from mmkd.cache.errors import CacheError

    where = f"stages.{spec.name}.task_args.teacher_cache"
    num_workers = int(spec.trainer.num_workers or 0)
    selected = dataset
    for _ in range(2):  # twice only when the check dropped records and the stage's length depends on the count
        total_steps = spec.total_steps(len(selected))
        task = build_task_for(spec, student, teacher if spec.needs_teacher else None, total_steps)
        try:
            collate = getattr(dataset, "collate_fn", None) or task.collator(student, teacher, spec.max_length)
            selected, checked = task.select_data(dataset, collate, num_workers)
        except CacheError as err:
            raise RecipeError(f"{where}: {' '.join(str(err).split())}") from None
        if spec.total_steps(len(selected)) == total_steps:
            return task, collate, selected, total_steps, checked
    raise RuntimeError("unreachable: the selection is the same on the second pass")


def build_stage(
    spec: StageSpec,
    student: nn.Module,
    teacher: Any,
    run: RunDir,
    on_saved: Callable[[Path, int], None],
    echo: Callable[[str], None] = print,
    datasets: tuple[Any, Any] | None = None,
):
    """Everything a stage needs to run: ``(trainer, module, datamodule)``.

    Args:
        spec: The resolved stage.
        student: The stage's starting student.
        teacher: The teacher when the stage's task needs one; the teacher's input side
            (:class:`mmkd.models.ImageTextInputs`) when it reads a teacher cache; else None.
        run: The run directory.
        on_saved: Called on rank 0 with ``(checkpoint path, step)`` once a checkpoint is complete.
        echo: Where progress messages go.
        datasets: The stage's ``(train, val)`` datasets when the caller already opened them.

    Returns:
        ``(trainer, module, datamodule)``; ``datamodule.checked`` holds what the task's data check counted.
    """
    from mmkd.data.datamodule import MMKDDataModule
    from mmkd.train.stage_module import StageModule
    from mmkd.train.strategies import build_strategy

    tr = spec.trainer
    if datasets is None:
        datasets = (spec.data.build(), spec.val_data.build() if spec.val_data else None)
    dataset, val_dataset = datasets
    if not (spec.needs_teacher or spec.needs_teacher_inputs):
        teacher = None
    align_vocabularies(student, teacher)
    task, collate, dataset, total_steps, checked = _task_and_data(spec, student, teacher, dataset)
    if spec.needs_teacher_inputs:
        teacher = None  # the stage reads the teacher from its cache: the module gets no teacher
    datamodule = MMKDDataModule(dataset, collate, val_dataset=val_dataset, batch_size=spec.micro_batch_size,
                                num_workers=int(tr.num_workers or 0), seed=spec.seed)
    datamodule.checked = checked
    module = StageModule(student, teacher, task, spec.weights, spec.train, optimizer=spec.optimizer,
                         schedule=spec.schedule, total_steps=total_steps, stage=spec.name)
    checkpoint = StepCheckpoint(run.checkpoints(spec.name), int(tr.checkpoint_every_n_steps or 50),
                                int(tr.keep_checkpoints or 2), on_saved)
    # Fault injection (tests only) goes first: a kill at step N lands before that step's checkpoint.
    callbacks: list[L.Callback] = [*fault_callbacks(spec.name), checkpoint]
    if spec.sqa_eval is not None:
        from dataclasses import asdict

        from mmkd.train.evaluation import ScienceQAEval

        sqa = asdict(spec.sqa_eval)
        callbacks.append(ScienceQAEval(out_dir=run.eval_dir(spec.name, sqa["split"], sqa["mode"]), **sqa))
    if tr.enable_progress_bar:
        from mmkd.train.callbacks import StageProgressBar

        callbacks.append(StageProgressBar(spec.name))
    trainer = L.Trainer(
        accelerator=tr.accelerator,
        devices=tr.devices,
        num_nodes=int(tr.num_nodes or 1),
        strategy=build_strategy(tr.strategy or "auto", accelerator=tr.accelerator, spec=spec, student=student),
        precision=tr.precision,
        max_steps=total_steps,
        max_epochs=-1,
        accumulate_grad_batches=spec.accumulate,
        gradient_clip_val=tr.gradient_clip_val if tr.gradient_clip_val else None,
        log_every_n_steps=int(tr.log_every_n_steps or 10),
        val_check_interval=tr.val_check_interval if val_dataset is not None else None,
        limit_val_batches=tr.limit_val_batches if val_dataset is not None else 0,
        num_sanity_val_steps=0,
        logger=build_logger(tr.logger, run, spec.name),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=bool(tr.enable_progress_bar),
        enable_model_summary=False,
        default_root_dir=str(run.stage_dir(spec.name)),
        deterministic=False,
    )
    world = trainer.num_devices * trainer.num_nodes
    counts = parameter_counts(module)
    trained = ", ".join(f"{part} {n:,}" for part, n in counts["parts"].items())
    echo(f"stage {spec.name}: {spec.task}, {len(dataset)} samples, {total_steps} optimizer steps of "
         f"{spec.batch_size} (micro-batch {spec.micro_batch_size} x {spec.accumulate} accumulation"
         f"{f' x {world} processes' if world > 1 else ''}); {counts['trainable']:,} of {counts['total']:,} "
         f"student parameters train ({trained})")
    return trainer, module, datamodule
