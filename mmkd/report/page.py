"""``mmkd report``: one self-contained HTML page (and its PNGs) for one run, or several side by side.

The page shows, per stage, each logged loss term against step, the learning rate and throughput when they were
logged, the stage's summary and its data summary; then every evaluation as one table with a column per run (and
stage) and a bar chart. With several runs every plot overlays them, one colour per run. Images are embedded as
``data:`` URIs, so the page can be mailed or archived alone; the same PNGs are written next to it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmkd.eval.categories import CATEGORIES
from mmkd.report import plots
from mmkd.report.run import EvalData, RunData, RunFiles, Series, StageData, read_run

LR = "train/lr"
"""The learning rate of the first parameter group, logged per optimizer step."""
THROUGHPUT = {"perf/samples_per_s": "samples / s", "perf/step_time_s": "s / step",
              "train/samples_per_s": "samples / s", "train/step_time_s": "s / step"}
"""Throughput columns logged per optimizer step, with their units; any other ``perf/`` column is plotted with them."""
PAGE = "index.html"

_MISSING = "–"


@dataclass(frozen=True)
class Table:
    """A table for the template: a header row and rows of text cells, the first cell of each row its label."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    """A figure for the template: its PNG file (next to the page) and the same bytes as base64."""

    file: str
    data: str
    caption: str


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """The folders' names, with their parents' names prefixed where two runs would share one."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]


def _order_terms(columns: set[str]) -> list[str]:
    """Loss terms in reading order: the total loss, the other training terms, validation, anything else."""
    def rank(column: str) -> tuple[int, str]:
        if column == "train/loss":
            return 0, column
        return (1 if column.startswith("train/") else 2 if column.startswith("val/") else 3), column

    return sorted(columns - set(_order_optimisation(columns)), key=rank)


def _order_optimisation(columns: set[str]) -> list[str]:
    """The learning rate, then throughput: the known columns, then any other ``perf/`` column."""
    known = [c for c in (LR, *THROUGHPUT) if c in columns]
    return known + sorted(c for c in columns if c.startswith("perf/") and c not in THROUGHPUT)


def _format(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"  # no exponent for long wall times
    return str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _score(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("count") is None:
        return _MISSING
    accuracy = entry.get("accuracy")
    shown = _MISSING if accuracy is None else f"{accuracy:.2f}"
    return f"{shown} ({entry.get('correct', 0)}/{entry['count']})"


class _Writer:
    """Writes each figure of one page next to the page as it is drawn, and keeps it for embedding."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def image(self, name: str, png: bytes, caption: str) -> Image:
        path = self.out / f"{_slug(name)}.png"
        path.write_bytes(png)
        return Image(path.name, base64.b64encode(png).decode("ascii"), caption)


def _stage_section(name: str, runs: Sequence[RunData], writer: _Writer) -> dict[str, Any]:
    present = [(i, run, next(s for s in run.stages if s.name == name)) for i, run in enumerate(runs)
               if any(s.name == name for s in run.stages)]
    labels = [run.name for _, run, _ in present]
    stages: list[StageData] = [stage for _, _, stage in present]
    metrics = sorted({k for s in stages for k in s.metrics})
    summary = Table(
        ("", *labels),
        (
            ("status", *(_format(s.status) for s in stages)),
            ("optimizer steps", *(_format(s.global_step) for s in stages)),
            ("wall time (s)", *(_format(s.wall_time_s) for s in stages)),
            *((f"final {k}", *(_format(s.metrics.get(k)) for s in stages)) for k in metrics),
            ("student", *(_format(s.student) for s in stages)),
        ),
    )
    data = [_flatten(s.data) for s in stages]
    keys = list(dict.fromkeys(k for d in data for k in d))
    data_table = Table(("", *labels), tuple((k, *(_format(d.get(k)) for d in data)) for k in keys)) if keys else None

    figures, notes = [], []
    series_runs = [run.name for run in runs]

    def by_run(column: str) -> list[Series | None]:
        found: list[Series | None] = [None] * len(runs)
        for i, _, stage in present:
            found[i] = stage.history.get(column)
        return found

    columns = {c for s in stages for c in s.history}
    terms = _order_terms(columns)
    if terms:
        png = plots.series_panels({t: by_run(t) for t in terms}, series_runs)
        figures.append(writer.image(f"{name}-loss", png, f"stage {name}: each logged term against optimizer step"))
    else:
        notes.append("no logged loss terms (stages/<stage>/logs/metrics.csv is missing or empty)")
    optimisation = _order_optimisation(columns)
    if optimisation:
        units = {LR: "learning rate", **THROUGHPUT}
        png = plots.series_panels({c: by_run(c) for c in optimisation}, series_runs, units)
        figures.append(writer.image(f"{name}-optimisation", png, f"stage {name}: learning rate and throughput"))
    elif terms:
        notes.append(f"learning rate and throughput not logged ({LR}, perf/samples_per_s, perf/step_time_s)")
    return {"name": name, "summary": summary, "data": data_table, "figures": figures, "notes": notes}


def _eval_section(name: str, runs: Sequence[RunData], writer: _Writer) -> dict[str, Any]:
    entries: list[tuple[int, RunData, EvalData]] = [(i, run, e) for i, run in enumerate(runs) for e in run.evals
                                                    if e.name == name]
    per_run = {i: sum(1 for j, _, _ in entries if j == i) for i, _, _ in entries}
    labels = [run.name if per_run[i] == 1 else f"{run.name} / {e.stage}" for i, run, e in entries]
    reports = [e.metrics for _, _, e in entries]
    categories = [c for c in CATEGORIES if any(c in (r.get("categories") or {}) for r in reports)]
    rows = [("mode", *(_format(r.get("mode")) for r in reports)),
            ("overall", *(_score(r) for r in reports))]
    rows += [(c, *(_score((r.get("categories") or {}).get(c)) for r in reports)) for c in categories]
    rows += [(label, *(_format(r.get(key)) for r in reports))
             for key, label in (("failed_parses", "failed parses"), ("missing", "missing answers"),
                                ("invalid_letters", "letters beyond the options"))]
    if any("exact_match" in r for r in reports):
        rows.append(("lmms-eval exact match", *(_score(r.get("exact_match")) for r in reports)))
        matched = [((r.get("exact_match") or {}).get("categories") or {}) for r in reports]
        rows += [(f"lmms-eval exact match {c}", *(_score(m.get(c)) for m in matched)) for c in categories]
    table = Table(("", *labels), tuple(rows))

    groups = ["overall", *categories]
    bars = {label: [r.get("accuracy"), *((r.get("categories") or {}).get(c, {}).get("accuracy") for c in categories)]
            for label, r in zip(labels, reports)}
    distinct = all(n == 1 for n in per_run.values())  # one column per run: each keeps its colour
    colours = [plots.colour(i) if distinct else plots.colour(k) for k, (i, _, _) in enumerate(entries)]
    png = plots.accuracy_bars(groups, bars, colours, f"{name}: accuracy by category (LLaVA's scorer)")
    figure = writer.image(f"eval-{name}", png, f"{name}: accuracy by category")
    return {"name": name, "table": table, "figure": figure}


def _provenance_table(runs: Sequence[RunData]) -> Table | None:
    """Where and with what each run was made (the manifest's provenance), a column per run."""
    flat = [_flatten(run.provenance) for run in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    if not keys:
        return None
    return Table(("", *(run.name for run in runs)), tuple((k, *(_format(f.get(k)) for f in flat)) for k in keys))


def _environment() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("mmkd.report", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None,
                 names: Sequence[str] | None = None) -> Path:
    """Write the report page of one run, or of several side by side, and its PNGs.

    Args:
        run_dirs: Run directories (``mmkd fit``'s, or any folder with ``eval/<stage>/<split>-<mode>/``, such as an
            evaluated teacher's); with several, every plot and table puts them side by side, in this order.
        out: The folder to write ``index.html`` and the PNGs into (created). Default: ``RUN/report/`` for one
            run, ``FIRST_RUN/report/compare/`` for several.
        names: The runs' names on the page (default: their folders' names, with the parent's where two clash).

    Returns:
        The page written.
    """
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("write_report: expected at least one run directory")
    if names is not None and len(names) != len(paths):
        raise ValueError(f"write_report: {len(names)} names for {len(paths)} run directories; expected one each")
    labels = list(names) if names is not None else _unique_names(paths)
    runs = [read_run(p, n) for p, n in zip(paths, labels)]
    folder = Path(out) if out is not None else RunFiles(paths[0]).report_dir / ("compare" if len(paths) > 1 else "")
    folder.mkdir(parents=True, exist_ok=True)
    writer = _Writer(folder)

    stage_names = list(dict.fromkeys(s.name for run in runs for s in run.stages))
    eval_names = list(dict.fromkeys(e.name for run in runs for e in run.evals))
    stages = [_stage_section(name, runs, writer) for name in stage_names]
    evals = [_eval_section(name, runs, writer) for name in eval_names]
    context = {
        "title": "mmkd report: " + " vs ".join(labels),
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "runs": [{"name": r.name, "colour": plots.colour(i), "path": str(r.path), "notes": r.notes}
                 for i, r in enumerate(runs)],
        "provenance": _provenance_table(runs),
        "stages": stages,
        "evals": evals,
    }
    page = folder / PAGE
    page.write_text(_environment().get_template("report.html.j2").render(**context), encoding="utf-8")
    return page
