"""Read what a report shows from one run directory: the manifest, each stage's logged metrics, the evaluations.

Everything a run directory is made of is named in :class:`RunFiles` alone (its methods are those of the
orchestration's ``RunDir``, which will replace it). Reading is forgiving: a stage without logs, a run without
evaluations or without a manifest (a folder holding only ``eval/``, as an evaluated teacher's) give an emptier
report and a note, not an error.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RunFiles:
    """Where each file of a run directory is.

    Layout::

        manifest.json                        provenance and, per stage, status, steps, metrics and data summary
        stages/<stage>/logs/metrics.csv      the CSV logger's file: a ``step`` column and one column per metric
        eval/<stage>/<split>-<mode>/metrics.json

    Args:
        root: The run directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report_dir(self) -> Path:
        """Where the report of this run alone goes by default."""
        return self.root / "report"

    def metrics_csv(self, stage: str) -> Path:
        return self.root / "stages" / stage / "logs" / "metrics.csv"

    def eval_stages(self) -> list[str]:
        """The stages with an evaluation folder, sorted by name."""
        folder = self.root / "eval"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def eval_metrics(self, stage: str) -> dict[str, dict[str, Any]]:
        """Every evaluation of a stage: ``{"test-generate": metrics, ...}``; unreadable files are left out."""
        found = {}
        for path in sorted((self.root / "eval" / stage).glob("*/metrics.json")):
            data = _read_json(path)
            if isinstance(data, dict):
                found[path.parent.name] = data
        return found


@dataclass(frozen=True)
class Series:
    """One logged metric of one stage, by optimizer step.

    Attributes:
        steps: Increasing steps.
        values: The value at each step.
    """

    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class StageData:
    """What the manifest and the logs say about one stage.

    Attributes:
        name: The stage's name.
        status: ``done``, ``running``, ``failed``, ``pending`` (None when the manifest has no status).
        global_step: The optimizer steps taken.
        wall_time_s: Seconds the stage ran.
        metrics: The final metrics the manifest records.
        data: The data summary the manifest records (samples, truncated, skipped, ...), nested as recorded.
        student: Where the stage's student was written.
        history: The logged metrics by column name (``train/loss``, ``train/lr``, ...), from the CSV logger.
    """

    name: str
    status: str | None = None
    global_step: int | None = None
    wall_time_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    student: str | None = None
    history: dict[str, Series] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalData:
    """One evaluation of one stage.

    Attributes:
        stage: The stage whose student was evaluated.
        name: The evaluation folder's name, ``<split>-<mode>`` (``test-generate``).
        metrics: Its ``metrics.json`` (``ScienceQAAccuracy.report``, plus ``mode``).
    """

    stage: str
    name: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RunData:
    """Everything a report shows of one run.

    Attributes:
        name: The run's name on the page.
        path: The run directory.
        provenance: The manifest's ``created``, ``mmkd_version``, ``git_commit``, ``packages`` and ``hardware``.
        stages: The stages, in the manifest's order.
        evals: The evaluations, stage by stage in run order, then by folder name.
        notes: What was missing or could not be read.
    """

    name: str
    path: Path
    provenance: dict[str, Any]
    stages: tuple[StageData, ...]
    evals: tuple[EvalData, ...]
    notes: tuple[str, ...]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_metrics_csv(path: Path) -> dict[str, Series]:
    """The metrics of a CSV logger's file, by column.

    Lightning's CSV logger writes one row per logging call with empty cells for the metrics not logged then; a
    resumed stage can log a step twice, and the later row wins, as it is the run that went on.

    Args:
        path: A ``metrics.csv`` with a ``step`` column.

    Returns:
        ``{column: Series}`` for every column other than ``step`` and ``epoch`` with at least one finite value;
        empty when the file is missing or has no ``step`` column.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    by_column: dict[str, dict[int, float]] = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            continue
        for column, cell in row.items():
            if column in (None, "step", "epoch"):
                continue
            value = _number(cell)
            if value is not None:
                by_column.setdefault(column, {})[int(step)] = value
    return {
        column: Series(tuple(sorted(points)), tuple(points[s] for s in sorted(points)))
        for column, points in by_column.items()
    }


def _stage(name: str, entry: Any, files: RunFiles) -> StageData:
    entry = entry if isinstance(entry, dict) else {}
    metrics = {k: float(v) for k, v in (entry.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return StageData(
        name=name,
        status=entry.get("status"),
        global_step=entry.get("global_step"),
        wall_time_s=entry.get("wall_time_s"),
        metrics=metrics,
        data=entry.get("data") if isinstance(entry.get("data"), dict) else {},
        student=entry.get("student"),
        history=read_metrics_csv(files.metrics_csv(name)),
    )


def read_run(path: str | Path, name: str | None = None) -> RunData:
    """Read one run directory for a report.

    Args:
        path: The run directory (or any folder with ``eval/<stage>/<split>-<mode>/metrics.json``).
        name: Its name on the page (default: the folder's name).

    Returns:
        The run's data; what is missing is listed in ``notes``.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
    """
    files = RunFiles(path)
    if not files.root.is_dir():
        raise FileNotFoundError(f"{files.root}: no such run directory")
    notes = []
    manifest = _read_json(files.manifest_file) if files.manifest_file.is_file() else None
    if manifest is None:
        state = "unreadable" if files.manifest_file.is_file() else "absent"
        notes.append(f"{files.manifest_file.name} is {state}: no stages to show")
    manifest = manifest if isinstance(manifest, dict) else {}
    entries = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
    stages = tuple(_stage(stage, entry, files) for stage, entry in entries.items())
    notes += [f"stage {s.name}: no logged metrics ({files.metrics_csv(s.name)})" for s in stages if not s.history]
    order = [s.name for s in stages] + [s for s in files.eval_stages() if s not in entries]
    evals = tuple(EvalData(stage, folder, metrics) for stage in order
                  for folder, metrics in files.eval_metrics(stage).items())
    if not evals:
        notes.append("no evaluation (eval/<stage>/<split>-<mode>/metrics.json)")
    provenance = {k: manifest[k] for k in ("created", "mmkd_version", "git_commit", "packages", "hardware")
                  if k in manifest}
    return RunData(name or files.root.resolve().name, files.root, provenance, stages, evals, tuple(notes))
