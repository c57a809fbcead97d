"""Figures written straight to PNG files, with no display and no pyplot global state.

Figures are built with matplotlib's object API on an Agg canvas, so plotting works on headless
machines and from threads, and never leaves open figures behind. Files are written atomically.
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taskarith.errors import TaskArithError
from taskarith.io import atomic_path


def _label(value: Any) -> str:
    # Numeric ticks (e.g. alpha grids) print compactly: 0.5, not 0.5000000001 or np.float64(0.5).
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{float(value):g}"
    return str(value)


def _text_color(rgba: Sequence[float]) -> str:
    # Relative luminance of the cell colour decides dark or light text, so values stay readable on any cmap.
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "white"


def heatmap(
    matrix: Any,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    path: str | os.PathLike,
    *,
    title: str,
    value_format: str = ".2g",
    cmap: str = "viridis",
    colorbar_label: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = True,
    dpi: int = 150,
) -> Path:
    """Write ``matrix`` (rows x columns, numbers; NaN shows as a blank cell) as an annotated heatmap PNG."""
    # Deferred: importing matplotlib costs time that commands without figures should not pay.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    try:
        values = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TaskArithError(f"heatmap {title!r}: the matrix is not a grid of numbers ({exc})") from None
    if values.ndim != 2 or 0 in values.shape:
        raise TaskArithError(f"heatmap {title!r}: expected a non-empty 2-D matrix, got shape {values.shape}")
    n_rows, n_cols = values.shape
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise TaskArithError(
            f"heatmap {title!r}: matrix is {n_rows}x{n_cols} but there are {len(row_labels)} row labels "
            f"and {len(col_labels)} column labels"
        )
    rows, cols = [_label(v) for v in row_labels], [_label(v) for v in col_labels]

    # Size the figure to the grid and the longest labels so nothing overlaps or gets cut off.
    longest_row = max(len(r) for r in rows)
    longest_col = max(len(c) for c in cols)
    width = min(30.0, 2.5 + 0.09 * longest_row + 0.85 * n_cols + 1.5)
    height = min(30.0, 1.8 + 0.06 * longest_col + 0.6 * n_rows)
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    masked = np.ma.masked_invalid(values)
    image = axes.imshow(masked, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(n_cols), labels=cols)
    axes.set_yticks(range(n_rows), labels=rows)
    if longest_col > 4 or n_cols > 8:
        axes.tick_params(axis="x", labelrotation=40)
        for tick in axes.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    axes.set_title(title)
    if xlabel:
        axes.set_xlabel(xlabel)
    if ylabel:
        axes.set_ylabel(ylabel)
    colorbar = figure.colorbar(image, ax=axes)
    if colorbar_label:
        colorbar.set_label(colorbar_label)

    if annotate:
        size = 9 if max(n_rows, n_cols) <= 10 else 7
        for r in range(n_rows):
            for c in range(n_cols):
                value = values[r, c]
                if not math.isfinite(value):
                    continue
                color = _text_color(image.cmap(image.norm(value)))
                axes.text(c, r, format(value, value_format), ha="center", va="center", color=color, fontsize=size)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return target
