"""Recipe loading: YAML with unique keys, one jsonargparse parser per recipe, overrides, one-line errors.

A recipe is one YAML file: shared ``teacher``, ``student`` and ``trainer`` sections and an ordered mapping of
``stages``. Components are ``class_path``/``init_args`` (jsonargparse, as LightningCLI does). Values several
stages share are written once at the top level and referenced with ``${name}``; jsonargparse's ``omegaconf+``
mode interpolates *after* command-line overrides, so ``--data_root X`` reaches every stage that uses it.

Every error a user can cause here is a :class:`RecipeError` whose message is one line that names the key
path and says what was expected. Loading resolves every stage into a frozen :class:`StageSpec` and checks every
name and argument (:mod:`mmkd.train.recipe.validate`), so nothing is found wrong only when a stage starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from mmkd.train.recipe.errors import RecipeError
from mmkd.train.recipe.schema import StageConfig, TrainerConfig
from mmkd.train.recipe.spec import ComponentSpec, StageSpec

__all__ = ["Recipe", "build_parser", "format_parse_error", "load_recipe", "read_yaml"]

_TOP_KEYS = {"seed", "run_dir", "teacher", "student", "trainer", "stages"}


@dataclass
class Recipe:
    """A parsed, validated recipe.

    Attributes:
        path: The YAML file.
        config: The resolved configuration as plain data (interpolations applied, defaults filled): what
            ``recipe.yaml`` of the run holds and what a resumed run is compared with.
        stage_names: Stage names in run order.
        stages: The resolved stages.
        options: Command options that are not recipe keys (``--stage``, ``--restart_from``).
    """

    path: Path | None
    config: dict[str, Any]
    stage_names: list[str]
    stages: dict[str, StageSpec] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def teacher(self) -> ComponentSpec | None:
        return ComponentSpec.of(self.config.get("teacher"))

    @property
    def student(self) -> ComponentSpec:
        return ComponentSpec.of(self.config["student"])

    def stage(self, name: str) -> StageSpec:
        return self.stages[name]

    def dump(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


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
    if "Union subtypes" in text:  # an optional value (X | None): report the non-None alternative
        given = re.search(r"Given value: (.*?)$", text)
        expected = [m.group(1) for line in lines if (m := re.match(r"- Expected a (.+)$", line))
                    and "NoneType" not in m.group(1)]
        if given and expected:
            keys = [k.group(1) for line in lines if (k := re.match(r'Parser key "([^"]+)":?$', line))]
            described = _describe_expected(f"Expected a {expected[0]}. Got value: {given.group(1).strip()}")
            if keys and described:
                return f"{keys[-1]}: {described}"
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
    extra_arguments: Callable[[Any], None] | None = None,
) -> Recipe:
    """Load, override, interpolate, resolve and validate a recipe.

    Args:
        path: The recipe YAML file.
        overrides: Command-line arguments such as ``["--stages.sft.optimizer.lr", "1e-5"]``.
        extra_arguments: Adds command options (not recipe keys) to the parser; their values land in
            ``Recipe.options``.

    Raises:
        RecipeError: Any problem with the recipe, in one line naming the key.
    """
    from jsonargparse import ArgumentError

    from mmkd.train.recipe.validate import resolve_stages

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
    names = list(stages)
    recipe = Recipe(path=Path(path) if path else None, config=config, stage_names=names, options=options)
    recipe.stages = resolve_stages(config, names)
    return recipe


def _dests(parser) -> list[str]:
    return [a.dest for a in parser._actions if a.dest not in ("help", "config")]
