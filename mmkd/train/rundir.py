"""The run directory: its layout, its manifest, and the one atomic write everything in it goes through.

Layout of ``RUN_DIR``::

    recipe.yaml                  the resolved recipe of the run
    manifest.json                provenance and per-stage status (written atomically: temp, fsync, rename, fsync)
    stages/<name>/checkpoints/   step-XXXXXXXX.ckpt (a file, or a folder under DeepSpeed)
    stages/<name>/logs/          the stage's CSV log (metrics.csv)
    stages/<name>/student/       the student once the stage is done (a plain transformers folder)
    logs/<logger>/               a ``class_path`` logger's one run of all stages; logs/<logger>.json its run's id
    eval/<stage>/<split>-<mode>/ answers.jsonl and metrics.json (``mmkd eval``, per-stage ``sqa_eval``)
    report/                      ``mmkd report``'s page and plots
    caches/<stage>/              ``mmkd cache``'s teacher cache of a stage (by default)
    archive/<time>/<stage>/      stages moved aside by ``--restart-from`` (kept, never deleted)

Runner, export, eval, cache, report and the callbacks take every path from :class:`RunDir`; nothing else spells the
layout out.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["DONE", "FAILED", "PENDING", "RUNNING", "Manifest", "RunDir", "atomic_write_text", "flatten_config",
           "fsync_entry", "fsync_path", "is_rank_zero", "publish"]

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


def flatten_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe mapping as ``{"stages.sft.optimizer.lr": value, ...}`` (an empty mapping keeps its key)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten_config(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: value}


def now() -> str:
    """The current UTC time, as the manifest records times."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, also before any process group exists.

    Only the launchers' variables tell ranks apart then: Lightning's re-executed ranks (LOCAL_RANK, NODE_RANK),
    torchrun (RANK), SLURM's srun (SLURM_PROCID). As in Lightning, the first rank variable present decides
    (SLURM_PROCID is also set in jobs where SLURM does not launch the ranks).
    """
    if os.environ.get("NODE_RANK", "0") != "0":
        return False
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return os.environ[key] == "0"
    return True


def fsync_entry(path: Path) -> None:
    """fsync one file or directory entry (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file, or every file of a folder and the folder itself."""
    path = Path(path)
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file():
                fsync_entry(child)
    fsync_entry(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never a mix.

    Temporary file in the same folder, fsync, rename over the target, fsync of the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_entry(path.parent)


def publish(tmp: Path, final: Path) -> None:
    """Make a completely written file or folder ``tmp`` visible as ``final``: fsync it, replace, fsync the parent."""
    fsync_path(tmp)
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final, ignore_errors=True)
    elif final.exists():
        final.unlink()
    os.replace(tmp, final)
    fsync_entry(final.parent)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """mmkd's version and commit, the main packages' versions and the hardware, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from mmkd import __version__

    packages = {}
    for name in ("torch", "lightning", "transformers", "open_clip_torch", "deepspeed", "bitsandbytes", "timm", "peft"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
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
    """The run's ``manifest.json``: provenance and the status of each stage. Only rank 0 writes it."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = Path(path)
        self.data = data

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": PENDING})

    def update(self, name: str, **values: Any) -> None:
        self.stage(name).update(values)
        self.save()

    def save(self) -> None:
        if is_rank_zero():
            atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=False) + "\n")


class RunDir:
    """The paths of one run directory (see the module docstring), its manifest and recipe.

    Args:
        root: The run directory.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- paths --------------------------------------------------------------------------------------------------
    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def checkpoints(self, stage: str) -> Path:
        return self.stage_dir(stage) / "checkpoints"

    def logs(self, stage: str) -> Path:
        return self.stage_dir(stage) / "logs"

    def run_logs(self, logger: str) -> tuple[Path, Path]:
        """A recipe-wide logger's folder (``logs/tensorboard``) and its state file (run id, hyper-parameters marker)."""
        return self.root / "logs" / logger, self.root / "logs" / f"{logger}.json"

    def metrics_csv(self, stage: str) -> Path:
        """The CSV logger's file of a stage."""
        return self.logs(stage) / "metrics.csv"

    def student(self, stage: str) -> Path:
        return self.stage_dir(stage) / "student"

    def eval_dir(self, stage: str, split: str | None = None, mode: str | None = None) -> Path:
        folder = self.root / "eval" / stage
        return folder / f"{split}-{mode}" if split is not None else folder

    def eval_metrics(self, stage: str) -> dict[str, dict[str, Any]]:
        """Every evaluation of a stage found in the run: ``{"test-generate": metrics, ...}``."""
        out = {}
        for path in sorted(self.eval_dir(stage).glob("*/metrics.json")):
            try:
                out[path.parent.name] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
        return out

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def cache_dir(self, stage: str) -> Path:
        return self.root / "caches" / stage

    def relative(self, path: Path) -> str:
        """``path`` as the manifest records it: relative to the run directory."""
        return str(Path(path).relative_to(self.root))

    def resolve(self, recorded: str) -> Path:
        """A path recorded in the manifest, absolute."""
        path = Path(recorded)
        return path if path.is_absolute() else self.root / path

    # -- manifest and recipe ------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_file.is_file()

    def load_manifest(self) -> Manifest | None:
        """The manifest, or None for a new run directory; a corrupt one is a one-line error."""
        if not self.manifest_file.is_file():
            return None
        try:
            return Manifest(self.manifest_file, json.loads(self.manifest_file.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.manifest_file}: the manifest is not valid JSON ({err.msg}); restore it or use a "
                             "new run_dir") from None

    def manifest(self) -> Manifest:
        """The manifest of an existing run (one-line error if this is not a run directory)."""
        manifest = self.load_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.root}: not a run directory (no manifest.json)")
        if not isinstance(manifest.data.get("stages"), dict):
            raise ValueError(f"{self.manifest_file}: expected a JSON object with 'stages' (an mmkd run manifest)")
        return manifest

    def new_manifest(self, stage_names: list[str]) -> Manifest:
        data = {"created": now(), **provenance(), "changes": [],
                "stages": {name: {"status": PENDING} for name in stage_names}}
        return Manifest(self.manifest_file, data)

    def read_recipe(self) -> dict[str, Any] | None:
        """The recorded ``recipe.yaml`` as plain data, or None."""
        if not self.recipe_file.is_file():
            return None
        import yaml

        return yaml.safe_load(self.recipe_file.read_text()) or {}

    def write_recipe(self, text: str) -> None:
        if is_rank_zero():
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.recipe_file, text)

    def archive(self, stages: list[str]) -> Path | None:
        """Move these stages' folders to ``archive/<time>/`` (kept, not deleted); returns the archive folder."""
        if not is_rank_zero():
            return None
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        target_root = self.root / "archive" / stamp
        for name in stages:
            folder = self.stage_dir(name)
            if folder.exists():
                target_root.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), str(target_root / name))
        return target_root

    # -- finished students --------------------------------------------------------------------------------------
    def finished_student(self, stage: str | None = None) -> tuple[Path, str]:
        """The student folder of a done stage (default: the last one done) and the stage's name.

        Raises:
            ValueError: No stage is done, or ``stage`` is not a done stage of this run (one line).
        """
        stages = self.manifest().data["stages"]
        done = [n for n, e in stages.items() if isinstance(e, dict) and e.get("status") == DONE]
        if stage is None:
            if not done:
                raise ValueError(f"{self.manifest_file}: no stage is done yet; expected at least one finished stage")
            stage = done[-1]
        elif stage not in stages:
            raise ValueError(f"--stage {stage}: {self.manifest_file} has stages {list(stages)}")
        elif stage not in done:
            raise ValueError(f"--stage {stage}: the stage is {stages[stage].get('status')}, expected done")
        recorded = stages[stage].get("student")
        folder = self.resolve(recorded) if recorded else self.student(stage)
        if not (folder / "config.json").is_file() and not any(folder.glob("*config*.json")):
            raise FileNotFoundError(f"{folder}: stage {stage!r} is done but its student folder has no config")
        return folder, stage
