"""Run a recipe's stages in order in a run directory that survives crashes and resumes.

Layout of ``RUN_DIR``::

    recipe.yaml              the resolved recipe of the run
    manifest.json            provenance and per-stage status (written atomically: temp, fsync, rename)
    stages/<name>/checkpoints/step-XXXXXXXX.ckpt
    stages/<name>/logs/      the stage's logger output (CSV by default)
    stages/<name>/student/   the student once the stage is done (safetensors + config)
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmkd import __version__
from mmkd.recipe import EXECUTION_KEYS, Recipe, RecipeError, instantiate

__all__ = ["Manifest", "RunError", "run_recipe"]

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


class RunError(RuntimeError):
    """A stage failed; the manifest records it and the next run retries from the last checkpoint."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_rank_zero() -> bool:
    # Before any process group exists only the launchers' variables tell ranks apart: Lightning's re-executed
    # ranks (LOCAL_RANK, NODE_RANK), torchrun (RANK), SLURM's srun (SLURM_PROCID). As in Lightning, the first rank
    # variable present decides (SLURM_PROCID is also set in jobs where SLURM does not launch the ranks).
    if os.environ.get("NODE_RANK", "0") != "0":
        return False
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return os.environ[key] == "0"
    return True


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _provenance() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "lightning", "transformers", "open_clip_torch", "deepspeed", "bitsandbytes", "timm"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    import torch

    return {
        "mmkd_version": __version__,
        "git_commit": _git_commit(),
        "packages": packages,
        "hardware": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [],
        },
    }


class Manifest:
    """The run's ``manifest.json``: provenance and the status of each stage."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        if not path.is_file():
            return None
        try:
            return cls(path, json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise RecipeError(f"{path}: the manifest is not valid JSON ({err.msg}); restore it or use a new run_dir")

    @classmethod
    def create(cls, path: Path, stage_names: list[str]) -> Manifest:
        data = {"created": _now(), **_provenance(), "changes": [],
                "stages": {name: {"status": PENDING} for name in stage_names}}
        return cls(path, data)

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": PENDING})

    def update(self, name: str, **values: Any) -> None:
        self.stage(name).update(values)
        self.save()

    def save(self) -> None:
        if _is_rank_zero():
            atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: value}


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def is_execution_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pat) or fnmatch.fnmatchcase(key, pat + ".*") for pat in EXECUTION_KEYS)


def _stage_of(key: str) -> str | None:
    parts = key.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "stages" else None


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
        self.recipe = recipe
        self.run_dir = recipe.run_dir
        self.only_stage = only_stage
        self.restart_from = restart_from
        self.echo = echo
        self._teacher = None
        self._datasets: dict[str, tuple[Any, Any]] = {}
        self._students: dict[str, Any] = {}
        for key, name in (("--stage", only_stage), ("--restart-from", restart_from)):
            if name is not None and name not in recipe.stage_names:
                raise RecipeError(f"{key}: no stage {name!r} in the recipe (stages: {', '.join(recipe.stage_names)})")

    # ---- planning (nothing written until every check passed) ---------------------------------------------------
    def prepare(self) -> Manifest:
        manifest_path = self.run_dir / "manifest.json"
        manifest = Manifest.load(manifest_path)
        recipe_path = self.run_dir / "recipe.yaml"
        changes: list[str] = []
        if manifest is not None and recipe_path.is_file():
            import yaml

            old = yaml.safe_load(recipe_path.read_text()) or {}
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
                    f"{recipe_path}: the recipe changed what this run computes ({shown}); "
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
            manifest = Manifest.create(manifest_path, self.recipe.stage_names)
        for name in self.recipe.stage_names:
            manifest.stage(name)
        if changes:
            manifest.data.setdefault("changes", []).append({"time": _now(), "keys": changes})
        if self.restart_from is not None:
            self._archive_from(manifest, self.restart_from)
        if _is_rank_zero():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(recipe_path, self.recipe.dump())
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
            stage = self.recipe.stage(name)
            loaded = []
            for key in ("data", "val_data"):
                try:
                    loaded.append(instantiate(stage[key]))
                except (ValueError, OSError) as err:
                    raise RecipeError(f"stages.{name}.{key}: {_one_line(err)}") from None
            self._datasets[name] = (loaded[0], loaded[1])
        if not names:
            return
        try:
            if any(self._needs_teacher(n) for n in names):
                self.teacher()
        except (ModelNotFoundError, OSError) as err:
            raise RecipeError(f"teacher: {_one_line(err)}") from None
        try:
            self._students[names[0]] = self.build_student(names[0])
        except (ModelNotFoundError, OSError) as err:
            raise RecipeError(f"student: {_one_line(err)}") from None

    def _needs_teacher(self, name: str) -> bool:
        return bool(self.recipe.stage(name)["use_teacher"]) and self.recipe.config.get("teacher") is not None

    def _init_elsewhere(self, stage: str) -> bool:
        init = self.recipe.stage(stage)["init_from"]
        return init is not None and init not in self.recipe.stage_names

    def _archive_from(self, manifest: Manifest, first: str) -> None:
        names = self.recipe.stage_names[self.recipe.stage_names.index(first):]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for name in names:
            folder = self.run_dir / "stages" / name
            if folder.exists() and _is_rank_zero():
                target = self.run_dir / "archive" / stamp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), str(target))  # kept, not deleted: nothing is lost
            manifest.data["stages"][name] = {"status": PENDING}

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

    def student_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name / "student"

    def _student_class(self):
        import importlib

        module_name, _, attr = self.recipe.config["student"]["class_path"].rpartition(".")
        return getattr(importlib.import_module(module_name), attr)

    def build_student(self, name: str):
        """The stage's starting student: ``init_from``, then ``student_transform``.

        Seeded right here, so fresh parts (a new projector, a new router) get the same initial weights whether
        the student is built during the pre-flight checks or when its stage starts.
        """
        import lightning as L

        L.seed_everything(self.recipe.seed + self.recipe.stage_names.index(name), verbose=False)
        stage = self.recipe.stage(name)
        index = self.recipe.stage_names.index(name)
        init = stage["init_from"] or ("recipe" if index == 0 else self.recipe.stage_names[index - 1])
        if init == "recipe":
            student = instantiate(self.recipe.config["student"])
        else:
            folder = self.student_dir(init) if init in self.recipe.stage_names else Path(init)
            if not folder.is_dir():
                raise RecipeError(f"stages.{name}.init_from: {folder} is not a student folder (is stage {init} done?)")
            student = self._student_class().from_pretrained(str(folder))
        transform = instantiate(stage["student_transform"])
        return transform(student) if transform is not None else student

    def teacher(self):
        from mmkd.modules.teacher import is_partitioned

        if self._teacher is not None and is_partitioned(self._teacher):
            self._teacher = None  # a ZeRO-3 stage split it into partitions: load it whole again
        if self._teacher is None and self.recipe.config.get("teacher") is not None:
            self._teacher = instantiate(self.recipe.config["teacher"])
        return self._teacher

    def run_stage(self, manifest: Manifest, name: str) -> None:
        import lightning as L
        import torch

        from mmkd.modules.builders import build_stage

        stage_dir = self.run_dir / "stages" / name
        entry = manifest.stage(name)
        ckpt = entry.get("checkpoint")
        ckpt_path = Path(ckpt) if ckpt else None
        if ckpt_path is not None and not ckpt_path.is_absolute():
            ckpt_path = self.run_dir / ckpt_path
        if ckpt_path is not None and not ckpt_path.exists():
            raise RunError(f"stage {name}: the manifest points at {ckpt_path}, which is missing")
        resume = ckpt_path is not None
        self.echo(f"stage {name}: {'resuming from ' + ckpt_path.name if resume else 'starting'}")
        manifest.update(name, status=RUNNING, started=entry.get("started") or _now(), error=None,
                        attempts=int(entry.get("attempts", 0)) + 1)
        t0 = time.time()
        seed = self.recipe.seed
        L.seed_everything(seed, workers=True, verbose=False)

        def on_saved(path: Path, step: int) -> None:
            manifest.update(name, checkpoint=str(path.relative_to(self.run_dir)), global_step=step)

        try:
            student = self._students.pop(name, None) or self.build_student(name)
            teacher = self.teacher() if self._needs_teacher(name) else None
            data = self._datasets.pop(name, None)
            trainer, module, datamodule = build_stage(
                self.recipe, name, student, teacher, stage_dir, on_saved, echo=self.echo, datasets=data
            )
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if resume else None)
            if trainer.interrupted:
                raise RunError(f"stage {name}: interrupted at step {trainer.global_step}")
            final_dir = self.student_dir(name)
            if trainer.is_global_zero:
                from mmkd.modules.checkpoints import final_student

                tmp = final_dir.with_name(".student.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                last = entry.get("checkpoint")  # under DeepSpeed, the whole fp32 student comes from it
                final_student(module, trainer.strategy, last and self.run_dir / last,
                              lambda: self.build_student(name)).save_pretrained(str(tmp))
                from mmkd.modules.callbacks import fsync_path

                fsync_path(tmp)
                shutil.rmtree(final_dir, ignore_errors=True)
                os.replace(tmp, final_dir)
            trainer.strategy.barrier("mmkd_student_saved")  # other ranks' next stage reads this folder
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                       if torch.is_tensor(v) and v.numel() == 1}
            data_summary = _sum_over_ranks(module.data_stats)
            data_summary["counted_from_step"] = int(module.data_stats_from_step)  # > 0 after a resume
            reader_summary = getattr(datamodule.train_dataset, "summary", None)
            if callable(reader_summary):
                data_summary["reader"] = reader_summary()
            manifest.update(
                name, status=DONE, ended=_now(), global_step=int(trainer.global_step),
                wall_time_s=round(float(entry.get("wall_time_s", 0.0)) + time.time() - t0, 2),
                metrics=metrics, student=str(final_dir.relative_to(self.run_dir)),
                data=data_summary,
            )
        except RecipeError:
            manifest.update(name, status=FAILED, ended=_now(), error="bad recipe value")
            raise
        except BaseException as err:
            first = (str(err).strip().splitlines() or [""])[0]
            message = f"{type(err).__name__}: {first}"[:500]
            manifest.update(name, status=FAILED, ended=_now(), error=message,
                            wall_time_s=round(float(entry.get("wall_time_s", 0.0)) + time.time() - t0, 2))
            if isinstance(err, KeyboardInterrupt):
                raise
            raise RunError(f"stage {name} failed: {message}") from err


def _sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-rank counters summed over all ranks (every rank calls this; one small all-gather)."""
    from mmkd.modules.distill import gather_objects

    total: dict[str, int] = {}
    for part in gather_objects(dict(counts)):
        for key, value in (part or {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_recipe(recipe: Recipe, *, only_stage: str | None = None, restart_from: str | None = None,
               echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage of ``recipe``; returns the manifest data."""
    return Runner(recipe, only_stage=only_stage, restart_from=restart_from, echo=echo).run()


def summary_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage for the end-of-run table."""
    rows = []
    for name, entry in manifest["stages"].items():
        metrics = entry.get("metrics") or {}
        losses = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("train/")}
        if "sqa/accuracy" in metrics:
            losses["sqa_accuracy"] = metrics["sqa/accuracy"]
        rows.append({"stage": name, "status": entry.get("status"), "steps": entry.get("global_step"),
                     "wall_time_s": entry.get("wall_time_s"), "losses": losses, "student": entry.get("student")})
    return rows
