"""Recipe schema, YAML loading, command-line overrides and validation.

A recipe is one YAML file: shared ``teacher``, ``student`` and ``trainer`` sections and an ordered mapping of
``stages``. Components are ``class_path``/``init_args`` (jsonargparse, as LightningCLI does). Values several
stages share are written once at the top level and referenced with ``${name}``; jsonargparse's ``omegaconf+``
mode interpolates *after* command-line overrides, so ``--data_root X`` reaches every stage that uses it.

Every error a user can cause here is a :class:`RecipeError` whose message is one line that names the key
path and says what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

__all__ = [
    "EXECUTION_KEYS",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "ScheduleConfig",
    "StageConfig",
    "TrainerConfig",
    "load_recipe",
]


class RecipeError(ValueError):
    """A recipe or command-line override that does not fit the schema; the message is one line."""


@dataclass
class OptimizerConfig:
    """Optimizer of one stage.

    Args:
        name: ``adamw``, ``adam`` or ``sgd``.
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay; never applied to norms and biases.
        betas: Adam betas.
        eps: Adam epsilon.
        part_lr: Learning rate per student part (``projector: 1e-3``), overriding ``lr`` for that part.
    """

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    part_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine/linear decay or constant.

    Args:
        name: ``cosine``, ``linear`` or ``constant`` after warmup.
        warmup_ratio: Fraction of the stage's optimizer steps spent warming up (ignored if ``warmup_steps``).
        warmup_steps: Warmup length in optimizer steps.
        min_lr_ratio: Final learning rate as a fraction of the peak.
    """

    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """Lightning Trainer settings; in a stage, only the keys that are set override the recipe's.

    Args:
        accelerator: ``cpu``, ``gpu``, ``auto``.
        devices: Devices per node.
        num_nodes: Number of nodes.
        strategy: ``auto``, ``ddp``, ``deepspeed_stage_2``, ``deepspeed_stage_3``, ``deepspeed_stage_3_offload``,
            ``fsdp``.
        precision: ``32-true``, ``bf16-mixed``, ``16-mixed``, ...
        max_steps: Optimizer steps of the stage (-1: run ``max_epochs``).
        max_epochs: Epochs of the stage.
        gradient_clip_val: Gradient-norm clipping.
        log_every_n_steps: Logging interval.
        val_check_interval: Validation interval (Lightning semantics).
        limit_val_batches: Validation batches per check.
        logger: Any Lightning logger as ``class_path``/``init_args``; ``save_dir`` defaults to the stage folder.
            Default: CSV.
        enable_progress_bar: Show the rich progress bar.
        checkpoint_every_n_steps: Write a resumable checkpoint every N optimizer steps.
        keep_checkpoints: How many step checkpoints to keep per stage.
        num_workers: DataLoader workers per process.
    """

    accelerator: str | None = None
    devices: int | str | None = None
    num_nodes: int | None = None
    strategy: str | None = None
    precision: str | None = None
    max_steps: int | None = None
    max_epochs: int | None = None
    gradient_clip_val: float | None = None
    log_every_n_steps: int | None = None
    val_check_interval: float | int | None = None
    limit_val_batches: float | int | None = None
    logger: dict[str, Any] | bool | None = None
    enable_progress_bar: bool | None = None
    checkpoint_every_n_steps: int | None = None
    keep_checkpoints: int | None = None
    num_workers: int | None = None


TRAINER_DEFAULTS = TrainerConfig(
    accelerator="auto",
    devices=1,
    num_nodes=1,
    strategy="auto",
    precision="32-true",
    max_steps=-1,
    max_epochs=1,
    gradient_clip_val=1.0,
    log_every_n_steps=10,
    val_check_interval=1.0,
    limit_val_batches=1.0,
    logger=None,
    enable_progress_bar=True,
    checkpoint_every_n_steps=50,
    keep_checkpoints=2,
    num_workers=0,
)


@dataclass
class SQAEvalConfig:
    """ScienceQA-style evaluation of the student at the end of a stage (as ``mmkd eval`` scores it).

    Args:
        root: ScienceQA-layout folder.
        split: Split to score (keep ``test`` for reports; ``val`` while tuning).
        mode: ``likelihood`` or ``generate``.
        limit: Score only the first N questions.
        batch_size: Questions per batch.
        every_n_steps: Also score every N optimizer steps (0: only at the end).
    """

    root: str
    split: str = "val"
    mode: Literal["likelihood", "generate"] = "likelihood"
    limit: int | None = None
    batch_size: int = 16
    every_n_steps: int = 0


@dataclass
class StageConfig:
    """One stage of a recipe.

    Args:
        data: Training dataset (``class_path``/``init_args``), e.g. ``mmkd.data.LlavaConversations``.
        val_data: Optional validation dataset.
        kind: ``distill`` (DPT/SFT/DFT: LM and distillation objectives), ``preference`` (DPO with the teacher as
            reference) or ``clip`` (contrastive distillation of CLIP students).
        train: Student parts that train (``vision_tower``, ``projector``, ``language_model``, ``experts``,
            ``router``); every other part is frozen.
        objectives: Objective name -> weight; see docs/objectives.md for the names.
        objective_args: Objective name -> constructor arguments (temperature, ...).
        optimizer: Optimizer settings.
        schedule: Learning-rate schedule.
        batch_size: Global batch size (all devices, after gradient accumulation).
        micro_batch_size: Per-device batch; default: ``batch_size / (devices * num_nodes)``.
        max_length: Longest tokenised sample; longer ones are truncated on the answer side.
        trainer: Trainer overrides for this stage.
        init_from: Where the student starts: a previous stage's name, a student folder, or ``recipe`` (build
            the recipe's ``student``). Default: the previous stage's result (``recipe`` for the first stage).
        student_transform: Applied to the student after ``init_from``, e.g. ``mmkd.models.UpcycleToMoE``.
        use_teacher: Whether the stage needs the teacher (a plain fine-tuning stage does not).
        sqa_eval: Score the student on a ScienceQA-layout split when the stage ends (metrics in the manifest).
    """

    data: torch.utils.data.Dataset
    val_data: torch.utils.data.Dataset | None = None
    kind: Literal["distill", "preference", "clip"] = "distill"
    train: list[str] = field(default_factory=list)
    objectives: dict[str, float] = field(default_factory=dict)
    objective_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch_size: int = 8
    micro_batch_size: int | None = None
    max_length: int = 512
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    init_from: str | None = None
    student_transform: Callable[[Any], Any] | None = None
    use_teacher: bool = True
    sqa_eval: SQAEvalConfig | None = None


# Keys that change how a run executes, not what it computes: they may differ on resume.
EXECUTION_KEYS = (
    "run_dir",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.logger",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.checkpoint_every_n_steps",
    "trainer.keep_checkpoints",
    "trainer.num_workers",
    "trainer.val_check_interval",
    "trainer.limit_val_batches",
    "stages.*.trainer.accelerator",
    "stages.*.trainer.devices",
    "stages.*.trainer.num_nodes",
    "stages.*.trainer.strategy",
    "stages.*.trainer.logger",
    "stages.*.trainer.log_every_n_steps",
    "stages.*.trainer.enable_progress_bar",
    "stages.*.trainer.checkpoint_every_n_steps",
    "stages.*.trainer.keep_checkpoints",
    "stages.*.trainer.num_workers",
    "stages.*.trainer.val_check_interval",
    "stages.*.trainer.limit_val_batches",
    "stages.*.micro_batch_size",
    "stages.*.data.init_args.num_workers",
)

# Objectives that only one stage kind computes.
_KIND_OF = {"dpo": "preference", "clip_kd": "clip"}
_TOP_KEYS = {"seed", "run_dir", "teacher", "student", "trainer", "stages"}
_PARTS = {"vision_tower", "projector", "language_model", "experts", "router", "text_tower", "logit_scale"}


@dataclass
class Recipe:
    """A parsed, validated recipe.

    Attributes:
        path: The YAML file.
        config: The resolved configuration as plain data (interpolations applied, defaults filled).
        stage_names: Stage names in run order.
        parser: The jsonargparse parser, used to instantiate components lazily.
    """

    path: Path | None
    config: dict[str, Any]
    stage_names: list[str]
    parser: Any = field(repr=False, default=None)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    def stage(self, name: str) -> dict[str, Any]:
        return self.config["stages"][name]

    def stage_trainer(self, name: str) -> TrainerConfig:
        """The recipe's trainer settings with the stage's overrides and the defaults filled in."""
        merged = dict(vars(TRAINER_DEFAULTS))
        for layer in (self.config.get("trainer") or {}, self.stage(name).get("trainer") or {}):
            merged.update({k: v for k, v in layer.items() if v is not None})
        return TrainerConfig(**merged)

    def micro_batch(self, name: str) -> tuple[int, int]:
        """``(micro_batch_size, accumulate_grad_batches)`` of a stage, from its global batch."""
        stage, tr = self.stage(name), self.stage_trainer(name)
        world = _device_count(tr.devices) * int(tr.num_nodes or 1)
        micro = stage.get("micro_batch_size") or max(1, stage["batch_size"] // world)
        return micro, stage["batch_size"] // (world * micro)

    def dump(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)

    def instantiate(self, spec: dict[str, Any] | None) -> Any:
        """Build a ``class_path``/``init_args`` component."""
        return instantiate(spec)


def instantiate(spec: dict[str, Any] | None) -> Any:
    """Build a component from its ``class_path``/``init_args`` mapping (None stays None)."""
    if spec is None:
        return None
    import importlib

    module_name, _, attr = spec["class_path"].rpartition(".")
    target = getattr(importlib.import_module(module_name), attr)
    return target(**(spec.get("init_args") or {}))


def _device_count(devices: int | str | None) -> int:
    if devices in (None, "auto"):
        return 1
    if isinstance(devices, str):
        devices = devices.strip()
        if devices.startswith("[") or "," in devices:
            return len([d for d in devices.strip("[]").split(",") if d.strip()])
        return 1 if devices == "-1" else int(devices)
    return max(1, int(devices))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise RecipeError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: keys must be unique")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file as plain data, refusing duplicate keys."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe keys at the top level")
    return data


def _shared_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys outside the schema that hold scalars: shared values referenced with ``${...}``."""
    return {k: v for k, v in raw.items() if k not in _TOP_KEYS and (v is None or isinstance(v, (str, int, float)))}


def build_parser(stage_names: Sequence[str], shared: dict[str, Any]):
    """The jsonargparse parser of a recipe with these stages and shared values."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(parser_mode="omegaconf+", exit_on_error=False, prog="mmkd fit")
    parser.add_argument("--config", action=ActionConfigFile, help="The recipe YAML file.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every stage (data order, init, dropout).")
    parser.add_argument("--run_dir", type=str, required=True, help="Run directory (recipe, manifest, stages).")
    parser.add_argument("--teacher", type=nn.Module | None, default=None, help="Teacher model (class_path).")
    parser.add_argument("--student", type=nn.Module, required=True, help="Student model (class_path).")
    parser.add_class_arguments(TrainerConfig, "trainer")
    for key, value in shared.items():
        kind = type(value) if value is not None else str
        parser.add_argument(f"--{key}", type=kind | None, default=None, help="Shared value.")
    for name in stage_names:
        parser.add_class_arguments(StageConfig, f"stages.{name}")
    return parser


def _to_plain(value: Any) -> Any:
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        return {k: _to_plain(v) for k, v in vars(value).items()}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


_TYPE_NAMES = {"float": "a float", "int": "an integer", "str": "a string", "bool": "true or false", "dict": "a mapping",
               "list": "a list"}


def _describe_expected(detail: str) -> str | None:
    m = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)$", detail)
    if m:
        return f"expected {_TYPE_NAMES.get(m.group(1), 'a ' + m.group(1))}, got {m.group(2).strip()!r}"
    m = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", detail)
    if m:
        options = ", ".join(o.strip(" '\"") for o in m.group(1).split(","))
        return f"expected one of {options}, got {m.group(2).strip()!r}"
    m = re.match(r"Import path (\S+) does not correspond to a subclass of (\w+)", detail)
    if m:
        return f"expected the class_path of a {m.group(2)} subclass, got {m.group(1)}"
    m = re.match(r"Expected a (.+?)\. Got value: (.*)$", detail)
    if m:
        return f"expected {m.group(1)}, got {m.group(2).strip()!r}"
    return None


def format_parse_error(message: str) -> str:
    """Turn jsonargparse's nested, multi-line messages into one line naming the key path."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = " ".join(lines)
    m = re.search(r"unrecognized arguments: --([\w.-]+)", text)
    if m:
        return f"{m.group(1)}: unknown key"
    m = re.search(r"arguments are required: ([\w.-]+)", text)
    if m:
        return f"{m.group(1).lstrip('-')}: required value missing"
    path: list[str] = []
    in_class = False
    detail = ""
    for line in lines:
        key = re.match(r'Parser key "([^"]+)":?$', line)
        if key:
            path.append(("init_args." if in_class else "") + key.group(1))
            in_class = False
            continue
        if re.match(r"Problem with given class_path '([^']+)'", line):
            in_class = True
            continue
        group = re.match(r"Group '([^']+)' does not accept option '([^']+)'", line)
        if group:
            return f"{group.group(1)}.{group.group(2)}: unknown key"
        option = re.match(r"Option '([^']+)' is not accepted", line)
        if option:
            return ".".join([*path, ("init_args." if in_class else "") + option.group(1)]) + ": unknown key"
        detail = line
    where = ".".join(path)
    described = _describe_expected(detail) if detail else None
    if where:
        return f"{where}: {described or detail or 'invalid value'}"
    return (described or text)[:400]


def load_recipe(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    objective_names: set[str] | None = None,
    extra_arguments: Callable[[Any], None] | None = None,
) -> Recipe:
    """Load, override, interpolate and validate a recipe.

    Args:
        path: The recipe YAML file.
        overrides: Command-line arguments such as ``["--stages.sft.optimizer.lr", "1e-5"]``.
        objective_names: Known objective names (default: the registry of :mod:`mmkd.modules.objectives`).
        extra_arguments: Adds command options (not recipe keys) to the parser; their values land in
            ``Recipe.options``.

    Raises:
        RecipeError: Any problem with the recipe, in one line naming the key.
    """
    from jsonargparse import ArgumentError

    raw = read_yaml(path) if path is not None else {}
    stages = raw.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise RecipeError("stages: expected a mapping from stage name to stage, with at least one stage")
    for name in stages:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise RecipeError(f"stages.{name}: a stage name is letters, digits, '_' and '-'")
    shared = _shared_keys(raw)
    for key, value in raw.items():
        if key not in _TOP_KEYS and key not in shared:
            raise RecipeError(f"{key}: unknown key (expected one of {', '.join(sorted(_TOP_KEYS))} or a shared scalar)")
    parser = build_parser(list(stages), shared)
    extra_before = set(_dests(parser))
    if extra_arguments is not None:
        extra_arguments(parser)
    extra = set(_dests(parser)) - extra_before
    args = ["--config", str(path)] if path is not None else []
    try:
        ns = parser.parse_args([*args, *overrides])
    except ArgumentError as err:
        raise RecipeError(format_parse_error(str(err))) from None
    except RecipeError:
        raise
    except Exception as err:  # jsonargparse wraps some problems in other types
        raise RecipeError(format_parse_error(str(err))) from None
    config = _to_plain(ns)
    config.pop("config", None)
    config.pop("__path__", None)
    options = {k: config.pop(k) for k in list(config) if k in extra}
    recipe = Recipe(path=Path(path) if path else None, config=config, stage_names=list(stages), parser=parser,
                    options=options)
    validate(recipe, objective_names)
    return recipe


def _dests(parser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest not in ("help", "config")]


def validate(recipe: Recipe, objective_names: set[str] | None = None) -> None:
    """Checks beyond types: parts, objectives, batch arithmetic, stage references."""
    from mmkd.modules.objectives import OBJECTIVES, TEACHER_FREE

    teacher_free = set(TEACHER_FREE)
    if objective_names is None:
        objective_names = set(OBJECTIVES)
    seen: list[str] = []
    for name in recipe.stage_names:
        stage = recipe.stage(name)
        key = f"stages.{name}"
        if not stage["train"]:
            raise RecipeError(f"{key}.train: the stage trains nothing; name at least one student part")
        for part in stage["train"]:
            if part not in _PARTS:
                raise RecipeError(f"{key}.train: unknown part {part!r} (expected one of {', '.join(sorted(_PARTS))})")
        if not stage["objectives"]:
            raise RecipeError(f"{key}.objectives: expected at least one objective with a weight")
        for obj, weight in stage["objectives"].items():
            if obj not in objective_names:
                known = ", ".join(sorted(objective_names))
                raise RecipeError(f"{key}.objectives.{obj}: unknown objective (expected one of {known})")
            if weight < 0:
                raise RecipeError(f"{key}.objectives.{obj}: expected a weight >= 0, got {weight}")
        kind = stage["kind"]
        for obj in stage["objectives"]:
            if obj in _KIND_OF and kind != _KIND_OF[obj]:
                raise RecipeError(f"{key}.objectives.{obj}: needs kind: {_KIND_OF[obj]} (the stage is {kind})")
        needed = {v: k for k, v in _KIND_OF.items()}.get(kind)
        if needed is not None and needed not in stage["objectives"]:
            raise RecipeError(f"{key}.objectives: a {kind} stage needs the objective {needed}")
        for obj in stage["objective_args"]:
            if obj not in stage["objectives"]:
                raise RecipeError(f"{key}.objective_args.{obj}: no objective of that name in {key}.objectives")
        if stage["batch_size"] < 1:
            raise RecipeError(f"{key}.batch_size: expected a positive integer, got {stage['batch_size']}")
        tr = recipe.stage_trainer(name)
        world = _device_count(tr.devices) * int(tr.num_nodes or 1)
        micro = stage["micro_batch_size"] or max(1, stage["batch_size"] // world)
        if stage["batch_size"] % (world * micro):
            raise RecipeError(
                f"{key}.batch_size: {stage['batch_size']} does not divide into devices x nodes x micro_batch_size"
                f" x accumulation ({world} x {micro} x k)"
            )
        init_from = stage["init_from"]
        if init_from is not None and init_from != "recipe" and init_from in recipe.stage_names:
            if init_from not in seen:
                raise RecipeError(f"{key}.init_from: stage {init_from!r} does not run before {name!r}")
        if stage["kind"] == "distill":
            teacher_terms = [o for o in stage["objectives"] if o not in teacher_free]
            if teacher_terms and (not stage["use_teacher"] or recipe.config.get("teacher") is None):
                raise RecipeError(
                    f"{key}.objectives.{teacher_terms[0]}: a distillation objective needs a teacher"
                    " (set teacher, and use_teacher: true)"
                )
        seen.append(name)
