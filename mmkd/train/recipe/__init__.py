"""The recipe: schema, YAML loading and overrides, one-line errors, validation and frozen stage specs.

Nothing here imports Lightning at load time (a strategy or logger name outside mmkd's presets is looked up in
Lightning's registry only when one is named), so bad-input errors answer before the training stack loads.
"""

from mmkd.train.recipe.errors import RecipeError
from mmkd.train.recipe.loading import Recipe, build_parser, format_parse_error, load_recipe, read_yaml
from mmkd.train.recipe.schema import (
    EXECUTION_KEYS,
    TRAINER_DEFAULTS,
    OptimizerConfig,
    ScheduleConfig,
    SQAEvalConfig,
    StageConfig,
    TrainerConfig,
)
from mmkd.train.recipe.spec import ComponentSpec, ObjectiveSpec, StageSpec, device_count, import_path

__all__ = [
    "EXECUTION_KEYS",
    "TRAINER_DEFAULTS",
    "ComponentSpec",
    "ObjectiveSpec",
    "OptimizerConfig",
    "Recipe",
    "RecipeError",
    "SQAEvalConfig",
    "ScheduleConfig",
    "StageConfig",
    "StageSpec",
    "TrainerConfig",
    "build_parser",
    "device_count",
    "format_parse_error",
    "import_path",
    "load_recipe",
    "read_yaml",
]
