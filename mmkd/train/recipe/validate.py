"""Checks beyond the schema's types, and resolution into frozen stage specs, all when the recipe loads.

Every name (task, objective, part, strategy, accelerator, optimizer, schedule, logger) and every argument bound to a
signature (task, objective and optimizer arguments) is checked here, before any stage runs: a typo in the last
stage's arguments ends the command with one line naming the key, and nothing is written.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from mmkd.contract import PART_NAMES
from mmkd.train.recipe.errors import RecipeError
from mmkd.train.recipe.schema import (
    MMKD_SCHEDULES,
    TRAINER_DEFAULTS,
    OptimizerConfig,
    ScheduleConfig,
    SQAEvalConfig,
    TrainerConfig,
)
from mmkd.train.recipe.spec import ComponentSpec, ObjectiveSpec, StageSpec, device_count, import_path

__all__ = ["OPTIMIZERS", "STRATEGY_PRESETS", "check_arguments", "optimizer_class", "resolve_stages"]

STRATEGY_PRESETS = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "deepspeed_stage_3_offload", "fsdp")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
OPTIMIZERS = {"adamw": "torch.optim.AdamW", "adam": "torch.optim.Adam", "sgd": "torch.optim.SGD"}


# ---- arguments bound to signatures -----------------------------------------------------------------------------
def _parameters(target: Callable[..., Any], skip: Iterable[str]) -> dict[str, inspect.Parameter]:
    params = inspect.signature(target).parameters
    return {n: p for n, p in params.items() if n not in set(skip) and n != "self"
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


@lru_cache(maxsize=256)
def _argument_parser(target: Any, skip: frozenset[str]):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(target, None, skip=set(skip), fail_untyped=False) if inspect.isclass(target) else \
        parser.add_function_arguments(target, None, skip=set(skip), fail_untyped=False)
    return parser


def check_arguments(target: Callable[..., Any], args: Mapping[str, Any], key: str, *, skip: Iterable[str] = (),
                    optional: Iterable[str] = ()) -> None:
    """Check ``args`` against ``target``'s signature: names, required values and types (jsonargparse's checks).

    Args:
        target: A class (its ``__init__``) or function.
        args: The recipe's arguments for it.
        key: The recipe key of ``args``, for messages (``stages.dft.objective_args.kl``).
        skip: Parameters the caller supplies itself (not recipe keys).
        optional: Required parameters the stage fills in when absent (an objective's context).

    Raises:
        RecipeError: One line naming ``key.<argument>`` and what was expected.
    """
    from jsonargparse import ArgumentError

    from mmkd.train.recipe.loading import format_parse_error

    if not isinstance(args, Mapping):
        raise RecipeError(f"{key}: expected a mapping of arguments, got {args!r}")
    params = _parameters(target, skip)
    accepts_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    for name in args:
        if name not in params and not accepts_any:
            known = ", ".join(params) or "none"
            raise RecipeError(f"{key}.{name}: unknown argument (expected one of {known})")
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in args and name not in set(optional):
            raise RecipeError(f"{key}.{name}: required value missing")
    fill = {n for n in optional if n not in args}
    parser = _argument_parser(target, frozenset(set(skip) | fill))
    try:
        parser.parse_object({k: v for k, v in args.items() if k in params})
    except ArgumentError as err:
        message = format_parse_error(str(err))
        raise RecipeError(f"{key}.{message}") from None
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{key}: {' '.join(str(err).split())}") from None


# ---- names ---------------------------------------------------------------------------------------------------------
def optimizer_class(name: str) -> type:
    """The optimizer class of a short name or class path."""
    import torch

    path = OPTIMIZERS.get(name, name)
    try:
        cls = import_path(path)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"expected {', '.join(OPTIMIZERS)} or the class path of a torch.optim.Optimizer, got {name!r}")
    return cls


def _check_trainer_section(section: Mapping[str, Any], key: str) -> None:
    strategy = section.get("strategy")
    if strategy is not None and strategy not in STRATEGY_PRESETS:
        from lightning.pytorch.strategies import StrategyRegistry

        if strategy not in StrategyRegistry.available_strategies():
            raise RecipeError(
                f"{key}.strategy: unknown strategy {strategy!r} (expected one of {', '.join(STRATEGY_PRESETS)} or a "
                "Lightning strategy name)"
            )
    accelerator = section.get("accelerator")
    if accelerator is not None and accelerator not in ACCELERATORS:
        from lightning.pytorch.accelerators import AcceleratorRegistry

        if accelerator not in AcceleratorRegistry.available_accelerators():
            raise RecipeError(f"{key}.accelerator: unknown accelerator {accelerator!r} (expected one of "
                              f"{', '.join(ACCELERATORS)})")
    devices = section.get("devices")
    if devices is not None:
        try:
            count = device_count(devices)
        except ValueError:
            count = 0
        if count < 1 and devices != "auto":
            raise RecipeError(f"{key}.devices: expected a positive count, 'auto', -1 or a list of ids, got {devices!r}")
    for name in ("num_nodes", "log_every_n_steps", "checkpoint_every_n_steps", "keep_checkpoints"):
        value = section.get(name)
        if value is not None and value < 1:
            raise RecipeError(f"{key}.{name}: expected a positive integer, got {value}")
    for name in ("num_workers", "gradient_clip_val"):
        value = section.get(name)
        if value is not None and value < 0:
            raise RecipeError(f"{key}.{name}: expected a number >= 0, got {value}")
    max_steps = section.get("max_steps")
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise RecipeError(f"{key}.max_steps: expected a positive number of steps or -1 (epochs), got {max_steps}")
    logger = section.get("logger")
    if isinstance(logger, dict):
        if "class_path" not in logger:
            raise RecipeError(f"{key}.logger: expected true, false or a class_path/init_args mapping")
        from lightning.pytorch.loggers import Logger

        try:
            cls = import_path(logger["class_path"])
        except (ImportError, AttributeError, ValueError) as err:
            raise RecipeError(f"{key}.logger.class_path: cannot import {logger['class_path']!r} ({err})") from None
        if not (inspect.isclass(cls) and issubclass(cls, Logger)):
            raise RecipeError(f"{key}.logger.class_path: {logger['class_path']} is not a Lightning logger")
        check_arguments(cls, logger.get("init_args") or {}, f"{key}.logger.init_args", optional=("save_dir",))
        import importlib.util

        packages = next((_LOGGER_PACKAGES[c.__name__] for c in cls.__mro__ if c.__name__ in _LOGGER_PACKAGES), ())
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise RecipeError(f"{key}.logger.class_path: {cls.__name__} needs the {packages[0]} package "
                              f"(pip install {_PIP_NAMES.get(packages[0], packages[0])})")


# Lightning's loggers import their package only when they start, in the middle of a run: checked at load instead.
_LOGGER_PACKAGES = {"TensorBoardLogger": ("tensorboard", "tensorboardX"), "MLFlowLogger": ("mlflow",),
                    "WandbLogger": ("wandb",), "CometLogger": ("comet_ml",), "NeptuneLogger": ("neptune",)}
_PIP_NAMES = {"mlflow": "mlflow-skinny", "comet_ml": "comet-ml"}


def _merged_trainer(config: Mapping[str, Any], stage: Mapping[str, Any]) -> TrainerConfig:
    merged = {f: getattr(TRAINER_DEFAULTS, f) for f in TrainerConfig.__dataclass_fields__}
    for layer in (config.get("trainer") or {}, stage.get("trainer") or {}):
        merged.update({k: v for k, v in layer.items() if v is not None})
    return TrainerConfig(**merged)


# ---- stages --------------------------------------------------------------------------------------------------------
def _objectives(stage: Mapping[str, Any], key: str, task_cls: Any) -> tuple[ObjectiveSpec, ...]:
    from mmkd.objectives import OBJECTIVES

    if not stage["objectives"]:
        raise RecipeError(f"{key}.objectives: expected at least one objective with a weight")
    for obj, weight in stage["objectives"].items():
        if obj not in OBJECTIVES:
            raise RecipeError(f"{key}.objectives.{obj}: unknown objective (expected one of {', '.join(OBJECTIVES)})")
        if weight < 0:
            raise RecipeError(f"{key}.objectives.{obj}: expected a weight >= 0, got {weight}")
        family = OBJECTIVES[obj].reads
        if family not in task_cls.accepts:
            takers = _tasks_reading(family)
            raise RecipeError(f"{key}.objectives.{obj}: a {family} objective; the {stage['task']} task computes "
                              f"{', '.join(task_cls.accepts)} objectives (tasks that compute it: {takers})")
    for family in task_cls.requires:
        named = [o for o in stage["objectives"] if OBJECTIVES[o].reads == family]
        if len(named) != 1:
            choices = ", ".join(n for n, c in OBJECTIVES.items() if c.reads == family)
            raise RecipeError(f"{key}.objectives: a {stage['task']} stage needs exactly one {family} objective "
                              f"({choices}), got {len(named)}")
    for obj in stage["objective_args"]:
        if obj not in stage["objectives"]:
            raise RecipeError(f"{key}.objective_args.{obj}: no objective of that name in {key}.objectives")
    specs = []
    for obj, weight in stage["objectives"].items():
        args = dict(stage["objective_args"].get(obj) or {})
        cls = OBJECTIVES[obj]
        check_arguments(cls, args, f"{key}.objective_args.{obj}", optional=cls.context)
        specs.append(ObjectiveSpec(obj, float(weight), args))
    return tuple(specs)


# Stand-ins for the context the stage fills in, so that an objective can be built when the recipe loads and its own
# checks of its values (a temperature > 0, 0 < beta < 1, ...) run then, not when its stage starts.
_PROBE_CONTEXT = {"total_steps": 1}
_PROBE_WIDTH = 8


def _probe(specs: tuple[ObjectiveSpec, ...], stage: Mapping[str, Any], key: str, task_cls: Any) -> None:
    """Build the stage's objectives and task with stand-in context: their own value checks run at load."""
    from mmkd.objectives import OBJECTIVES

    built = {}
    for spec in specs:
        cls = OBJECTIVES[spec.name]
        kwargs = dict(spec.args)
        for arg, source in cls.context.items():
            kwargs.setdefault(arg, _PROBE_CONTEXT.get(source, _PROBE_WIDTH))
        try:
            built[spec.name] = cls(**kwargs)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{key}.objective_args.{spec.name}: {' '.join(str(err).split())}") from None
    try:
        task_cls(built, **stage["task_args"])
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{key}.task_args: {' '.join(str(err).split())}") from None


def _tasks_reading(family: str) -> str:
    from mmkd.tasks import TASKS

    return ", ".join(n for n, t in TASKS.items() if family in t.accepts) or "none"


def _optimizer(stage: Mapping[str, Any], key: str) -> OptimizerConfig:
    opt = dict(stage["optimizer"])
    opt["betas"] = tuple(opt["betas"])
    try:
        cls = optimizer_class(opt["name"])
    except ValueError as err:
        raise RecipeError(f"{key}.optimizer.name: {err}") from None
    check_arguments(cls, opt["args"], f"{key}.optimizer.args", skip=("params", "lr", "weight_decay"))
    if not opt["lr"] >= 0:
        raise RecipeError(f"{key}.optimizer.lr: expected a learning rate >= 0, got {opt['lr']}")
    for part in opt["part_lr"]:
        if part not in PART_NAMES:
            raise RecipeError(f"{key}.optimizer.part_lr.{part}: unknown part (expected one of {', '.join(PART_NAMES)})")
    return OptimizerConfig(**opt)


def _schedule(stage: Mapping[str, Any], key: str) -> ScheduleConfig:
    sched = ScheduleConfig(**stage["schedule"])
    if not 0.0 <= sched.warmup_ratio <= 1.0:
        raise RecipeError(f"{key}.schedule.warmup_ratio: expected a fraction in [0, 1], got {sched.warmup_ratio}")
    if sched.warmup_steps is not None and sched.warmup_steps < 0:
        raise RecipeError(f"{key}.schedule.warmup_steps: expected >= 0, got {sched.warmup_steps}")
    if not 0.0 <= sched.min_lr_ratio <= 1.0:
        raise RecipeError(f"{key}.schedule.min_lr_ratio: expected a fraction in [0, 1], got {sched.min_lr_ratio}")
    if sched.args and sched.name in MMKD_SCHEDULES:
        raise RecipeError(f"{key}.schedule.args: mmkd's {sched.name} schedule takes no args (a transformers "
                          "scheduler does)")
    return sched


def resolve_stages(config: Mapping[str, Any], names: list[str]) -> dict[str, StageSpec]:
    """Check every stage of a parsed recipe and resolve it into a :class:`StageSpec`.

    Args:
        config: The parsed recipe as plain data.
        names: Stage names in run order.

    Raises:
        RecipeError: The first problem, in one line naming its key.
    """
    from mmkd.objectives import OBJECTIVES
    from mmkd.tasks import TASKS

    _check_trainer_section(config.get("trainer") or {}, "trainer")
    teacher = config.get("teacher")
    specs: dict[str, StageSpec] = {}
    for index, name in enumerate(names):
        stage = config["stages"][name]
        key = f"stages.{name}"
        _check_trainer_section(stage.get("trainer") or {}, f"{key}.trainer")
        if stage["task"] not in TASKS:
            raise RecipeError(f"{key}.task: unknown task {stage['task']!r} (expected one of {', '.join(TASKS)})")
        task_cls = TASKS[stage["task"]]
        check_arguments(task_cls, stage["task_args"], f"{key}.task_args", skip=("objectives",))
        if not stage["train"]:
            raise RecipeError(f"{key}.train: the stage trains nothing; name at least one student part")
        for part in stage["train"]:
            if part not in PART_NAMES:
                raise RecipeError(f"{key}.train: unknown part {part!r} (expected one of {', '.join(PART_NAMES)})")
        objectives = _objectives(stage, key, task_cls)
        _probe(objectives, stage, key, task_cls)
        transform = ComponentSpec.of(stage["student_transform"])
        if transform is not None:  # built once, so its own checks of its values (a LoRA rank >= 1) run at load
            try:
                transform.build()
            except (ValueError, TypeError) as err:
                raise RecipeError(f"{key}.student_transform: {' '.join(str(err).split())}") from None
        needs_teacher = task_cls.teacher_needed({o.name: OBJECTIVES[o.name] for o in objectives}, **stage["task_args"])
        if needs_teacher and teacher is None:
            culprit = next((o.name for o in objectives if OBJECTIVES[o.name].needs_teacher), None)
            where = f"{key}.objectives.{culprit}" if culprit else f"{key}.task_args"
            raise RecipeError(f"{where}: a distillation objective needs a teacher (set teacher)" if culprit else
                              f"{where}: the {stage['task']} task needs a teacher here (set teacher)")
        needs_inputs = task_cls.teacher_inputs_needed({o.name: OBJECTIVES[o.name] for o in objectives},
                                                      **stage["task_args"])
        if needs_inputs and teacher is None:
            raise RecipeError(f"{key}.task_args.teacher_cache: a stage that reads a teacher cache needs the recipe's "
                              "teacher section (its processor and identity are read, its weights are not loaded)")
        if stage["batch_size"] < 1:
            raise RecipeError(f"{key}.batch_size: expected a positive integer, got {stage['batch_size']}")
        if stage["max_length"] < 1:
            raise RecipeError(f"{key}.max_length: expected a positive integer, got {stage['max_length']}")
        trainer = _merged_trainer(config, stage)
        world = device_count(trainer.devices) * int(trainer.num_nodes or 1)
        micro = stage["micro_batch_size"] or max(1, stage["batch_size"] // world)
        if micro < 1:
            raise RecipeError(f"{key}.micro_batch_size: expected a positive integer, got {micro}")
        if stage["batch_size"] % (world * micro):
            raise RecipeError(
                f"{key}.batch_size: {stage['batch_size']} does not divide into devices x nodes x micro_batch_size"
                f" x accumulation ({world} x {micro} x k)"
            )
        init_from = stage["init_from"]
        if init_from is not None and init_from != "recipe" and init_from in names and init_from not in names[:index]:
            raise RecipeError(f"{key}.init_from: stage {init_from!r} does not run before {name!r}")
        sqa = stage.get("sqa_eval")
        specs[name] = StageSpec(
            name=name,
            index=index,
            seed=int(config["seed"]),
            task=stage["task"],
            task_args=dict(stage["task_args"]),
            objectives=objectives,
            data=ComponentSpec.of(stage["data"]),
            val_data=ComponentSpec.of(stage["val_data"]),
            train=tuple(stage["train"]),
            optimizer=_optimizer(stage, key),
            schedule=_schedule(stage, key),
            batch_size=int(stage["batch_size"]),
            micro_batch_size=int(micro),
            accumulate=stage["batch_size"] // (world * micro),
            world_size=world,
            max_length=int(stage["max_length"]),
            trainer=trainer,
            init_from=init_from or ("recipe" if index == 0 else names[index - 1]),
            student_transform=transform,
            sqa_eval=SQAEvalConfig(**sqa) if sqa else None,
            needs_teacher=bool(needs_teacher),
            needs_teacher_inputs=bool(needs_inputs),
        )
    return specs
