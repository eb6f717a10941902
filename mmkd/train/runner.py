"""Run a recipe's stages in order in a run directory that survives crashes and resumes.

The run directory's layout is :class:`mmkd.train.rundir.RunDir`'s. Nothing is written until every check passed:
the recipe (every stage's names and arguments, at load), the comparison with the recorded recipe, every dataset of
the stages to run, and the first stage's models.
"""

from __future__ import annotations

import fnmatch
import inspect
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmkd.train.recipe import EXECUTION_KEYS, Recipe, RecipeError, StageSpec
from mmkd.train.rundir import DONE, FAILED, PENDING, RUNNING, Manifest, RunDir, flatten_config, now, publish

__all__ = ["RunError", "Runner", "recipe_diff", "run_recipe", "summary_rows"]


class RunError(RuntimeError):
    """A stage failed; the manifest records it and the next run retries from the last checkpoint."""




def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes."""
    a, b = flatten_config(old), flatten_config(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def is_execution_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(key, pat + ".*") for pat in EXECUTION_KEYS)


def _stage_of(key: str) -> str | None:
    parts = key.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stages" else None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class Runner:
    """Runs the stages of one recipe in its run directory.

    Args:
        recipe: The parsed recipe.
        only_stage: Run just this stage (earlier stages must be done).
        restart_from: Rerun this stage and every later one, even if done or the recipe changed.
        echo: Where progress messages go.
    """

    def __init__(self, recipe: Recipe, *, only_stage: str | None = None, restart_from: str | None = None,
                 echo: Callable[[str], None] = print):
        from mmkd.train.teachers import TeacherPool

        self.recipe = recipe
        self.run_dir = RunDir(recipe.run_dir)
        self.only_stage = only_stage
        self.restart_from = restart_from
        self.echo = echo
        teacher = recipe.teacher
        self.teachers = TeacherPool(teacher.build if teacher is not None else None,
                                    _view_of(teacher) if teacher is not None else None)
        self._datasets: dict[str, tuple[Any, Any]] = {}
        self._students: dict[str, Any] = {}
        for key, name in (("--stage", only_stage), ("--restart-from", restart_from)):
            if name is not None and name not in recipe.stage_names:
                raise RecipeError(f"{key}: no stage {name!r} in the recipe (stages: {', '.join(recipe.stage_names)})")

    # ---- planning (nothing written until every check passed) ---------------------------------------------------
    def prepare(self) -> Manifest:
        run = self.run_dir
        manifest = run.load_manifest()
        changes: list[str] = []
        old = run.read_recipe() if manifest is not None else None
        if old is not None:
            diff = recipe_diff(old, self.recipe.config)
            restart_index = self.recipe.stage_names.index(self.restart_from) if self.restart_from else None
            refused = []
            for key in diff:
                stage = _stage_of(key)
                if is_execution_key(key):
                    changes.append(key)
                elif stage in self.recipe.stage_names and (
                    manifest.stage(stage)["status"] == PENDING
                    or restart_index is not None and self.recipe.stage_names.index(stage) >= restart_index
                ):
                    changes.append(key)  # that stage has not computed anything that the change would contradict
                elif restart_index is not None and stage is None and restart_index == 0:
                    changes.append(key)
                else:
                    refused.append(key)
            if refused:
                shown = ", ".join(refused[:8]) + (" ..." if len(refused) > 8 else "")
                raise RecipeError(
                    f"{run.recipe_file}: the recipe changed what this run computes ({shown}); "
                    "use --restart-from STAGE to rerun from a stage, or a new run_dir"
                )
        if self.only_stage is not None:
            index = self.recipe.stage_names.index(self.only_stage)
            for earlier in self.recipe.stage_names[:index]:
                status = manifest.stage(earlier)["status"] if manifest else PENDING
                if status != DONE and not self._init_elsewhere(self.only_stage):
                    raise RecipeError(f"--stage {self.only_stage}: earlier stage {earlier!r} is {status}, not done")
        self._preflight(self._stages_to_run(manifest))
        if manifest is None:
            manifest = run.new_manifest(self.recipe.stage_names)
        for name in self.recipe.stage_names:
            manifest.stage(name)
        if changes:
            manifest.data.setdefault("changes", []).append({"time": now(), "keys": changes})
        if self.restart_from is not None:
            names = self.recipe.stage_names[self.recipe.stage_names.index(self.restart_from):]
            run.archive(names)
            for name in names:
                manifest.data["stages"][name] = {"status": PENDING}
        run.write_recipe(self.recipe.dump())
        manifest.save()
        return manifest

    def _stages_to_run(self, manifest: Manifest | None) -> list[str]:
        if self.only_stage is not None:
            return [self.only_stage]
        names = self.recipe.stage_names
        first_restart = names.index(self.restart_from) if self.restart_from else len(names)
        return [n for i, n in enumerate(names)
                if i >= first_restart or manifest is None or manifest.stage(n)["status"] != DONE]

    def _preflight(self, names: list[str]) -> None:
        """Open every dataset and build the models of the first stage before anything is written.

        Bad data files and missing models thus end the command with one line and an untouched run directory.
        """
        from mmkd.models.errors import ModelNotFoundError

        for name in names:
            spec = self.recipe.stage(name)
            loaded = []
            for key, component in (("data", spec.data), ("val_data", spec.val_data)):
                try:
                    loaded.append(component.build() if component is not None else None)
                except (ValueError, OSError) as err:
                    raise RecipeError(f"stages.{name}.{key}: {_one_line(err)}") from None
            self._datasets[name] = (loaded[0], loaded[1])
        if not names:
            return
        try:
            if self.recipe.stage(names[0]).needs_teacher:
                self.teachers.get()
            elif any(self.recipe.stage(n).needs_teacher or self.recipe.stage(n).needs_teacher_inputs for n in names):
                # A later stage needs it: check its source now without loading it (the first stage would release it).
                teacher = self.recipe.teacher
                check = getattr(teacher.target(), "check_source", None)
                if callable(check):
                    check(**teacher.init_args)
        except (ModelNotFoundError, OSError) as err:
            raise RecipeError(f"teacher: {_one_line(err)}") from None
        try:
            self._students[names[0]] = self.build_student(names[0])
        except (ModelNotFoundError, OSError) as err:
            raise RecipeError(f"student: {_one_line(err)}") from None
        self._check_later_transforms(names)

    def _init_elsewhere(self, stage: str) -> bool:
        init = self.recipe.stage(stage).init_from
        return init not in self.recipe.stage_names and init != "recipe"

    # ---- running --------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        manifest = self.prepare()
        names = [self.only_stage] if self.only_stage else self.recipe.stage_names
        for name in names:
            if manifest.stage(name)["status"] == DONE:
                self.echo(f"stage {name}: done, skipped")
                continue
            self.run_stage(manifest, name)
        return manifest.data

    def student_class(self) -> type:
        """The class of the recipe's student (it reloads every later stage's student with ``from_pretrained``)."""
        return self.recipe.student.target()

    def reload_student(self, folder: Path) -> Any:
        """A stage's student folder loaded as the recipe's student class, with the recipe's loading options
        (dtype, attention implementation, gradient checkpointing, ... where ``from_pretrained`` takes them)."""
        cls = self.student_class()
        accepted = inspect.signature(cls.from_pretrained).parameters
        options = {k: v for k, v in self.recipe.student.init_args.items() if k in accepted and k != "folder"}
        return cls.from_pretrained(str(folder), **options)

    def build_student(self, name: str) -> Any:
        """The stage's starting student: ``init_from``, then ``student_transform``.

        Seeded right here, so fresh parts (a new projector, a new router) get the same initial weights whether
        the student is built during the pre-flight checks or when its stage starts.
        """
        import lightning as L

        spec = self.recipe.stage(name)
        L.seed_everything(self.recipe.seed + spec.index, verbose=False)
        init = spec.init_from
        if init == "recipe":
            student = self.recipe.student.build()
        else:
            folder = self.run_dir.student(init) if init in self.recipe.stage_names else Path(init)
            if not folder.is_dir():
                raise RecipeError(f"stages.{name}.init_from: {folder} is not a student folder (is stage {init} done?)")
            student = self.reload_student(folder)
        transform = spec.student_transform.build() if spec.student_transform is not None else None
        if transform is None:
            return student
        try:
            return transform(student)
        except ValueError as err:  # the transform's arguments do not fit this student (a LoRA target matches nothing)
            raise RecipeError(f"stages.{name}.student_transform: {_one_line(err)}") from None

    def _check_later_transforms(self, names: list[str]) -> None:
        """Check later stages' transforms that can (``check(student)``: LoRA's targets) against the first stage's
        student, while each stage starts from the one before and keeps its layers (no transform, or a checkable one)."""
        student = self._students[names[0]]
        for previous, name in zip(names, names[1:]):
            spec = self.recipe.stage(name)
            if spec.init_from != previous:
                return
            if spec.student_transform is None:
                continue
            check = getattr(spec.student_transform.build(), "check", None)
            if check is None:
                return  # this transform may change the layers a later stage's check would look for
            try:
                check(student)
            except ValueError as err:
                raise RecipeError(f"stages.{name}.student_transform: {_one_line(err)}") from None

    def _later_needs_teacher(self, name: str) -> bool:
        names = self.recipe.stage_names
        return any(self.recipe.stage(n).needs_teacher for n in names[names.index(name) + 1:])

    def _teacher_for(self, spec: StageSpec) -> Any:
        """The teacher for a stage that needs it (its input side for a stage that reads it from a cache); before one
        that does not, the teacher is released."""
        if spec.needs_teacher:
            return self.teachers.get()
        self.teachers.release(needed_later=self._later_needs_teacher(spec.name))
        if spec.needs_teacher_inputs:
            from mmkd.models.errors import ModelNotFoundError

            try:
                return self.teachers.inputs()
            except (ModelNotFoundError, OSError) as err:
                raise RecipeError(f"teacher: {_one_line(err)}") from None
        return None

    def run_stage(self, manifest: Manifest, name: str) -> None:
        import lightning as L
        import torch

        from mmkd.train.stage import build_stage, parameter_counts

        run = self.run_dir
        spec = self.recipe.stage(name)
        entry = manifest.stage(name)
        ckpt = entry.get("checkpoint")
        ckpt_path = run.resolve(ckpt) if ckpt else None
        if ckpt_path is not None and not ckpt_path.exists():
            raise RunError(f"stage {name}: the manifest points at {ckpt_path}, which is missing")
        resume = ckpt_path is not None
        if resume:  # a fresh start is announced by the stage's size line (mmkd.train.stage.build_stage)
            self.echo(f"stage {name}: resuming from {ckpt_path.name}")
        manifest.update(name, status=RUNNING, started=entry.get("started") or now(), error=None,
                        attempts=int(entry.get("attempts", 0)) + 1)
        t0 = time.time()

        def on_saved(path: Path, step: int) -> None:
            manifest.update(name, checkpoint=run.relative(path), global_step=step)

        try:
            teacher = self._teacher_for(spec)  # loaded (or released) before seeding: loading draws nothing here
            L.seed_everything(self.recipe.seed, workers=True, verbose=False)
            student = self._students.pop(name, None) or self.build_student(name)
            data = self._datasets.pop(name, None)
            trainer, module, datamodule = build_stage(spec, student, teacher, run, on_saved, echo=self.echo,
                                                      datasets=data)
            parameters = parameter_counts(module)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if resume else None)
            if trainer.interrupted:
                raise RunError(f"stage {name}: interrupted at step {trainer.global_step}")
            final_dir = run.student(name)
            if trainer.is_global_zero:
                from mmkd.train.checkpoints import final_student

                tmp = final_dir.with_name(".student.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                last = entry.get("checkpoint")  # under DeepSpeed, the whole fp32 student comes from it
                final_student(module, trainer.strategy, last and run.resolve(last),
                              lambda: self.build_student(name)).save_pretrained(str(tmp))
                publish(tmp, final_dir)
            trainer.strategy.barrier("mmkd_student_saved")  # other ranks' next stage reads this folder
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if torch.is_tensor(v) and v.numel() == 1}
            data_summary = _sum_over_ranks(module.data_stats)
            data_summary["counted_from_step"] = int(module.data_stats_from_step)  # > 0 after a resume
            reader_summary = getattr(datamodule.train_dataset, "summary", None)
            if callable(reader_summary):
                data_summary["reader"] = reader_summary()
            data_summary.update(getattr(datamodule, "checked", None) or {})  # the same on every rank: not summed
            manifest.update(
                name, status=DONE, ended=now(), global_step=int(trainer.global_step),
                wall_time_s=round(float(entry.get("wall_time_s", 0.0)) + time.time() - t0, 2),
                metrics=metrics, student=run.relative(final_dir), data=data_summary, parameters=parameters,
            )
        except RecipeError:
            manifest.update(name, status=FAILED, ended=now(), error="bad recipe value")
            raise
        except BaseException as err:
            first = (str(err).strip().splitlines() or [""])[0]
            message = f"{type(err).__name__}: {first}"[:500]
            manifest.update(name, status=FAILED, ended=now(), error=message,
                            wall_time_s=round(float(entry.get("wall_time_s", 0.0)) + time.time() - t0, 2))
            if isinstance(err, KeyboardInterrupt):
                raise
            raise RunError(f"stage {name} failed: {message}") from err


def _view_of(teacher: Any) -> Callable[[], Any]:
    """Builds the recipe teacher's input side without its weights (a stage that reads it from a cache)."""

    def build() -> Any:
        make = getattr(teacher.target(), "input_view", None)
        if make is None:
            raise RecipeError(f"teacher: {teacher.class_path} cannot be read from a teacher cache (it has no "
                              "input_view; use mmkd.models.LlavaModel with the teacher's folder)")
        return make(**teacher.init_args)

    return build


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-rank counters summed over all ranks (every rank calls this; one small all-gather)."""
    from mmkd.train.stage_module import gather_objects

    total: dict[str, int] = {}
    for part in gather_objects(dict(counts)):
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total


def run_recipe(recipe: Recipe, *, only_stage: str | None = None, restart_from: str | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage of ``recipe``; returns the manifest data."""
    return Runner(recipe, only_stage=only_stage, restart_from=restart_from, echo=echo).run()


# Logged per step but not loss terms: left out of the end-of-run table.
_NOT_LOSSES = ("lr",)


def summary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage for the end-of-run table."""
    rows = []
    for name, entry in manifest["stages"].items():
        metrics = entry.get("metrics") or {}
        losses = {k.split("/", 1)[1]: v for k, v in metrics.items()
                  if k.startswith("train/") and k.split("/", 1)[1] not in _NOT_LOSSES}
        if "sqa/accuracy" in metrics:
            losses["sqa_accuracy"] = metrics["sqa/accuracy"]
        rows.append({"stage": name, "status": entry.get("status"), "steps": entry.get("global_step"),
                     "wall_time_s": entry.get("wall_time_s"), "losses": losses, "student": entry.get("student")})
    return rows


