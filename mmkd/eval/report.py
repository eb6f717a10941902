"""Print a ScienceQA report as a table and write it as ``metrics.json``."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(report: Mapping[str, Any]) -> Table:
    """A rich table of a ``metrics.json`` report: one row overall, then one per category.

    Args:
        report: As ``ScienceQAAccuracy.report``; when it has ``exact_match``, lmms-eval's accuracy is a last column.

    Returns:
        The table.
    """
    matches = report.get("exact_match")
    table = Table()
    table.add_column("category")
    table.add_column("accuracy %", justify="right")
    table.add_column("correct", justify="right")
    table.add_column("count", justify="right")
    if matches is not None:
        table.add_column("lmms-eval exact match %", justify="right")

    def extra(row: Mapping[str, Any] | None) -> list[str]:
        return [] if matches is None else [_percent(row["accuracy"] if row else None)]

    table.add_row("overall", _percent(report["accuracy"]), str(report["correct"]), str(report["count"]),
                  *extra(matches), style="bold")
    for name, row in report.get("categories", {}).items():
        match_row = (matches or {}).get("categories", {}).get(name)
        table.add_row(name, _percent(row["accuracy"]), str(row["correct"]), str(row["count"]), *extra(match_row))
    return table


def print_report(report: Mapping[str, Any], title: str, console: Console | None = None) -> None:
    """Print a title line, the table of a report, and the counts of answers that could not be right.

    Args:
        report: As ``ScienceQAAccuracy.report``.
        title: What was scored (model, data, mode).
        console: Where to print (default: a new stdout console).
    """
    console = console or Console()
    console.print(f"[bold]{title}[/bold]")
    console.print(format_table(report))
    counts = [f"failed parses {report['failed_parses']}", f"missing answers {report['missing']}"]
    if "invalid_letters" in report:
        counts.append(f"letters beyond the options {report['invalid_letters']}")
    console.print(", ".join(counts) + " (all counted wrong)")


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write JSON atomically (temporary file in the same folder, fsync, rename), creating the folder.

    Args:
        data: What to write.
        path: The file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
