"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are built as ``matplotlib.figure.Figure`` objects on their own Agg canvas, never through pyplot, so drawing
needs no display and touches no global state. Every run has one colour in every figure.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmkd.report.run import Series

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
_PANEL = (4.2, 2.8)  # inches per panel
_COLUMNS = 3  # panels per row
_MARKERS_UP_TO = 60  # points per line; past that, markers only clutter


def colour(index: int) -> str:
    """The colour of the run at ``index`` (cycling past nine runs)."""
    return _COLOURS[index % len(_COLOURS)]


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # No timestamp or version in the file, so the same data gives the same bytes.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def series_panels(panels: Mapping[str, Sequence[Series | None]], runs: Sequence[str], y_labels: Mapping[str, str]
                  | None = None) -> bytes:
    """A grid of line plots against step: one panel per metric, one line per run that logged it.

    Args:
        panels: ``{panel title: [the run's series or None, one per run]}``, in panel order.
        runs: The run names, in the order of the series (the legend).
        y_labels: Y-axis labels by panel title (default: none).

    Returns:
        The PNG.
    """
    y_labels = y_labels or {}
    columns = min(_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(_PANEL[0] * columns, _PANEL[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, series) in zip(axes, panels.items()):
        for i, (run, line) in enumerate(zip(runs, series)):
            if line is None:
                continue
            marker = "o" if len(line.steps) <= _MARKERS_UP_TO else None
            ax.plot(line.steps, line.values, color=colour(i), marker=marker, markersize=3, linewidth=1.5, label=run)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if title in y_labels:
            ax.set_ylabel(y_labels[title])
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _png(figure)


def accuracy_bars(labels: Sequence[str], columns: Mapping[str, Sequence[float | None]], colours: Sequence[str],
                  title: str) -> bytes:
    """Grouped bars of accuracy (percent) per category: one group per label, one bar per column.

    Args:
        labels: The groups (``overall``, ``NAT``, ...).
        columns: ``{column name: [accuracy or None per label]}`` (None: no bar, the category had no question).
        colours: One colour per column.
        title: The figure's title.

    Returns:
        The PNG.
    """
    width_in = min(12.5, max(6.0, 0.5 * len(labels) * max(1, len(columns)) ** 0.5 + 2))  # within the page
    figure = Figure(figsize=(width_in, 3.4), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(columns))
    for j, ((name, values), shade) in enumerate(zip(columns.items(), colours)):
        offset = (j - (len(columns) - 1) / 2) * width
        xs = [i + offset for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width=width * 0.95, color=shade, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 105)  # a bar at 100 stays visible under the frame
    ax.set_ylabel("accuracy %")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(figure)
