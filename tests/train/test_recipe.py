"""Recipe schema: overrides, interpolation, and one-line errors for every kind of bad recipe."""

from pathlib import Path

import pytest
import yaml

from mmkd.train.recipe import RecipeError, load_recipe

BASE = {
    "run_dir": "RUN",
    "data_root": "/data/base",
    "teacher": {"class_path": "mmkd.models.LlavaModel", "init_args": {"path": "${data_root}/teacher"}},
    "student": {"class_path": "mmkd.models.MLLMStudent",
                "init_args": {"vision": "${data_root}/vision", "language_model": "${data_root}/lm"}},
    "trainer": {"accelerator": "cpu", "devices": 1},
    "stages": {
        "dpt": {
            "data": {"class_path": "mmkd.data.ScienceQA", "init_args": {"root": "${data_root}/sqa", "split": "train"}},
            "train": ["projector"],
            "objectives": {"mdist": 1.0, "rdist": 1.0},
            "batch_size": 8,
        },
        "sft": {
            "data": {"class_path": "mmkd.data.ScienceQA", "init_args": {"root": "${data_root}/sqa", "split": "train"}},
            "train": ["projector", "language_model"],
            "objectives": {"lm": 1.0},
            "optimizer": {"lr": 2.0e-5},
            "batch_size": 8,
        },
    },
}


def write(tmp_path: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def variant(**stage_changes) -> dict:
    import copy

    recipe = copy.deepcopy(BASE)
    for dotted, value in stage_changes.items():
        node = recipe
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return recipe


def test_loads_with_defaults_and_order(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert r.stage_names == ["dpt", "sft"]
    assert r.config["stages"]["sft"]["optimizer"]["lr"] == 2e-5
    assert r.config["stages"]["dpt"]["optimizer"]["lr"] == 1e-4  # default
    assert r.config["stages"]["dpt"]["data"]["init_args"]["root"] == "/data/base/sqa"
    assert (r.stage("sft").micro_batch_size, r.stage("sft").accumulate) == (8, 1)


def test_stage_override_reaches_only_that_stage(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["--stages.sft.optimizer.lr", "1e-5"])
    assert r.config["stages"]["sft"]["optimizer"]["lr"] == 1e-5
    assert r.config["stages"]["dpt"]["optimizer"]["lr"] == 1e-4


def test_shared_value_override_reaches_every_stage(tmp_path):
    # omegaconf+ interpolates after overrides; plain omegaconf mode would keep /data/base here.
    r = load_recipe(write(tmp_path, BASE), ["--data_root", "/elsewhere"])
    for stage in ("dpt", "sft"):
        assert r.config["stages"][stage]["data"]["init_args"]["root"] == "/elsewhere/sqa"
    assert r.config["teacher"]["init_args"]["path"] == "/elsewhere/teacher"
    assert r.config["student"]["init_args"]["language_model"] == "/elsewhere/lm"


def test_accumulation_from_global_batch(tmp_path):
    r = load_recipe(write(tmp_path, variant(stages__sft__micro_batch_size=2)), ["--trainer.devices", "2"])
    assert (r.stage("sft").micro_batch_size, r.stage("sft").accumulate) == (2, 2)


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (BASE, ["--stages.sft.optimizer.lr", "fast"], "stages.sft.optimizer.lr: expected a float, got 'fast'"),
        (BASE, ["--stages.sft.optimizer.lx", "3"], "stages.sft.optimizer.lx: unknown key"),
        (variant(stages__sft__optimizer={"lr": 1e-5, "bogus": 1}), [], "stages.sft.optimizer.bogus: unknown key"),
        (variant(stages__dpt__data={"class_path": "mmkd.data.ScienceQA", "init_args": {"root": "x", "nope": 1}}),
         [], "stages.dpt.data.init_args.nope: unknown key"),
        (variant(stages__sft__batch_size="many"), [], "stages.sft.batch_size: expected an integer, got 'many'"),
        (variant(stages__sft__task="magic"), [], "stages.sft.task: unknown task 'magic' (expected one of distill, "
                                                 "preference, clip"),
        (variant(run_dir=...), [], "run_dir: required value missing"),
        (variant(student=...), [], "student: required value missing"),
        (variant(stages__dpt__train=[]), [], "stages.dpt.train: the stage trains nothing"),
        (variant(stages__dpt__train=["wings"]), [], "stages.dpt.train: unknown part 'wings'"),
        (variant(stages__dpt__objectives={"klx": 1.0}), [], "stages.dpt.objectives.klx: unknown objective"),
        (variant(stages__sft__objectives={}), [], "stages.sft.objectives: expected at least one objective"),
        (variant(teacher=...), [], "stages.dpt.objectives.mdist: a distillation objective needs a teacher"),
        (BASE, ["--trainer.devices", "3"], "stages.dpt.batch_size: 8 does not divide into devices"),
        (variant(stages__sft__init_from="sft"), [], "stages.sft.init_from: stage 'sft' does not run before 'sft'"),
        (variant(colour="blue", extra={"a": 1}), [], "extra: unknown key"),
        (BASE, ["--nonsense", "1"], "nonsense: unknown key"),
        (variant(stages__sft__objectives={"dpo": 1.0}), [],
         "stages.sft.objectives.dpo: a preference objective; the distill task computes tokens objectives (tasks that "
         "compute it: preference)"),
        (variant(stages__sft__task="clip"), [], "stages.sft.objectives.lm: a tokens objective; the clip task"),
        (variant(stages__sft__task="preference"), [],
         "stages.sft.objectives: a preference stage needs exactly one preference objective (dpo), got 0"),
        (variant(stages__dpt__objective_args={"mdist": {"temprature": 2.0}}), [],
         "stages.dpt.objective_args.mdist.temprature: unknown argument (expected one of response_weight, "),
        (variant(stages__sft__objective_args={"lm": {"x": 1}}), [], "stages.sft.objective_args.lm.x: unknown argument"),
        (variant(stages__dpt__objective_args={"rdist": {"on": "pixels"}}), [],
         "stages.dpt.objective_args.rdist.on: expected one of logits, hidden, got 'pixels'"),
        (variant(stages__sft__task_args={"on_overflow": 3}), [], "stages.sft.task_args.on_overflow: expected one of"),
        (variant(stages__sft__task_args={"overflow": "skip"}), [], "stages.sft.task_args.overflow: unknown argument"),
        (BASE, ["--trainer.strategy", "dpp"], "trainer.strategy: unknown strategy 'dpp'"),
        (BASE, ["--stages.sft.trainer.strategy", "zero9"], "stages.sft.trainer.strategy: unknown strategy 'zero9'"),
        (BASE, ["--trainer.precision", "bf17"], "trainer.precision: expected one of"),
        (BASE, ["--trainer.accelerator", "abacus"], "trainer.accelerator: unknown accelerator 'abacus'"),
        (BASE, ["--stages.sft.optimizer.name", "adamm"], "stages.sft.optimizer.name: expected adamw, adam, sgd or"),
        (BASE, ["--stages.sft.optimizer.name", "torch.optim.RMSprop",
                "--stages.sft.optimizer.args", '{"momentom": 0.9}'],
         "stages.sft.optimizer.args.momentom: unknown argument"),
        (BASE, ["--stages.sft.schedule.name", "cosin"], "stages.sft.schedule.name: expected one of"),
        (BASE, ["--trainer.logger", '{"class_path": "collections.OrderedDict"}'],
         "trainer.logger.class_path: collections.OrderedDict is not a Lightning logger"),
        (variant(stages__dpt__task_args={"teacher_cache": "C"}), [],
         "stages.dpt.task_args: teacher_cache: objective mdist needs the live teacher; a stage that reads a teacher "
         "cache takes topk_kl and teacher-free objectives"),
        (variant(stages__sft__task_args={"teacher_cache": "C"}), [],
         "stages.sft.task_args: teacher_cache is set but no objective reads it (add topk_kl)"),
        (variant(stages__sft__task_args={"teacher_cache": "C", "on_missing": "ignore"}), [],
         "stages.sft.task_args.on_missing: expected one of error, skip, got 'ignore'"),
        (variant(stages__sft__objectives={"topk_kl": 1.0}, stages__sft__objective_args={"topk_kl": {"k": 0}}), [],
         "stages.sft.objective_args.topk_kl: k=0: expected a positive number"),
        (variant(teacher=..., stages__dpt__objectives={"lm": 1.0}, stages__sft__objectives={"topk_kl": 1.0},
                 stages__sft__task_args={"teacher_cache": "C"}), [],
         "stages.sft.task_args.teacher_cache: a stage that reads a teacher cache needs the recipe's teacher section"),
        (variant(stages__sft__task="preference", stages__sft__objectives={"dpo": 1.0},
                 stages__sft__task_args={"teacher_cache": "C", "reference": "initial_student"}), [],
         "stages.sft.task_args: teacher_cache holds the teacher's log-probabilities; reference='initial_student'"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, recipe, overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, recipe), overrides)
    text = str(err.value)
    assert "\n" not in text
    assert message in text, text


def test_execution_keys_come_from_the_schema():
    from mmkd.train.recipe import EXECUTION_KEYS

    assert "stages.*.micro_batch_size" in EXECUTION_KEYS and "trainer.strategy" in EXECUTION_KEYS
    assert "stages.*.trainer.devices" in EXECUTION_KEYS and "run_dir" in EXECUTION_KEYS
    for identity in ("trainer.precision", "trainer.max_steps", "stages.*.optimizer.lr", "stages.*.batch_size"):
        assert identity not in EXECUTION_KEYS


def test_precision_values_are_lightnings():
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    from mmkd.train.recipe.schema import PRECISIONS

    lightning = set(typing.get_args(_PRECISION_INPUT_STR)) | set(typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    assert set(PRECISIONS) == lightning


def test_stages_resolve_to_frozen_specs(tmp_path):
    import dataclasses

    r = load_recipe(write(tmp_path, variant(stages__dpt__objective_args={"mdist": {"temperature": 2.0}})),
                    ["--stages.sft.optimizer.name", "torch.optim.RMSprop", "--stages.sft.optimizer.args",
                     '{"momentum": 0.5}', "--trainer.devices", "2"])
    dpt, sft = r.stage("dpt"), r.stage("sft")
    assert (dpt.index, dpt.init_from, sft.init_from) == (0, "recipe", "dpt")
    assert dpt.needs_teacher and not sft.needs_teacher
    assert [(o.name, o.weight, o.args) for o in dpt.objectives] == [("mdist", 1.0, {"temperature": 2.0}),
                                                                   ("rdist", 1.0, {})]
    assert sft.optimizer.name == "torch.optim.RMSprop" and sft.optimizer.args == {"momentum": 0.5}
    assert (sft.world_size, sft.micro_batch_size, sft.accumulate) == (2, 4, 1)
    assert sft.trainer.devices == 2 and sft.trainer.precision == "32-true"  # merged with the defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        sft.batch_size = 3


def test_duplicate_stage_names_are_refused(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False).replace("  sft:", "  dpt:")
    with pytest.raises(RecipeError, match=r"duplicate key 'dpt' at line \d+"):
        load_recipe(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "stages: [a: b\n"))
