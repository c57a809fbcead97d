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
    figure, axes = _figure(width, height)

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

    return _save(figure, path, dpi)


def _figure(width: float, height: float) -> tuple[Any, Any]:
    # Deferred: importing matplotlib costs time that commands without figures should not pay.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | os.PathLike, dpi: int, format: str | None = None) -> Path:
    buffer = io.BytesIO()
    # A figure a command may later replace says so in its PNG text chunk (see png_format).
    metadata = {"Software": "taskarith", **({"Description": format} if format else {})}
    figure.savefig(buffer, format="png", dpi=dpi, metadata=metadata)
    target = Path(path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return target


def scatter(
    groups: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    dpi: int = 150,
) -> Path:
    """One coloured point series per group (name -> (xs, ys)), with a legend."""
    if not groups or any(len(xs) != len(ys) for xs, ys in groups.values()):
        raise TaskArithError(f"scatter {title!r}: needs at least one group of equally long x and y values")
    figure, axes = _figure(6.0, 4.2)
    for name, (xs, ys) in groups.items():
        axes.scatter(list(xs), list(ys), label=name, s=28, alpha=0.8)
    if logx:
        axes.set_xscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.axhline(0.0, color="grey", linewidth=0.6)
    axes.legend(fontsize=8)
    return _save(figure, path, dpi)


def lines(
    series: dict[str, Sequence[float]],
    x_labels: Sequence[Any],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    dpi: int = 150,
) -> Path:
    """One line per series (name -> one value per x label), with markers and a legend."""
    if not series or any(len(values) != len(x_labels) for values in series.values()):
        raise TaskArithError(f"line plot {title!r}: every series needs one value per x label ({len(x_labels)})")
    figure, axes = _figure(6.0, 4.2)
    for name, values in series.items():
        axes.plot(range(len(x_labels)), list(values), marker="o", label=name)
    axes.set_xticks(range(len(x_labels)), labels=[_label(x) for x in x_labels])
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.legend(fontsize=8)
    return _save(figure, path, dpi)


def stacked_shares(
    panels: dict[str, dict[str, Sequence[float]]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    dpi: int = 150,
) -> Path:
    """Side-by-side panels (name -> {part -> one share per bar}) of bars stacked from their parts' shares."""
    if not panels or any(not parts for parts in panels.values()):
        raise TaskArithError(f"stacked bars {title!r}: every panel needs at least one part")
    for name, parts in panels.items():
        if len({len(values) for values in parts.values()}) != 1:
            raise TaskArithError(f"stacked bars {title!r}: the parts of panel {name!r} differ in length")
    figure, _ = _figure(4.0 * len(panels), 3.6)
    figure.clear()
    axes_row = figure.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for axes, (name, parts) in zip(axes_row, panels.items(), strict=True):
        bottom = np.zeros(len(next(iter(parts.values()))))
        for part, values in parts.items():
            heights = np.asarray(values, dtype=float)
            axes.bar(np.arange(1, len(heights) + 1), heights, bottom=bottom, label=part, width=0.8)
            bottom += heights
        axes.set(title=name, xlabel=xlabel)
    axes_row[0].set_ylabel(ylabel)
    axes_row[-1].legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    return _save(figure, path, dpi)


TRAINING_CURVES_FORMAT = "taskarith.training_curves/1"


def training_curves(lines: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str, dpi: int = 150) -> Path:
    """A training log's curves, one panel each: loss, penalty (if logged), learning rate, validation accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        (key, label)
        for key, label in (
            ("loss", "task loss"),
            ("penalty", "penalty"),
            ("lr", "learning rate"),
            ("val_accuracy", "validation accuracy"),
        )
        if any(key in line for line in lines)
    ]
    if not panels:
        raise TaskArithError(f"training curves {title!r}: the log has no logged step yet")
    figure = Figure(figsize=(4.2 * len(panels), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    for axes, (key, label) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        points = sorted((line["step"], line[key]) for line in lines if key in line)
        axes.plot([s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None)
        axes.set_xlabel("step")
        axes.set_title(label)
        if key in ("loss", "penalty") and all(v > 0 for _, v in points):
            axes.set_yscale("log")
    return _save(figure, path, dpi, TRAINING_CURVES_FORMAT)


def png_format(path: str | os.PathLike) -> str | None:
    """The taskarith format a PNG written by :func:`_save` records, or None (not a PNG, or not ours)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.info.get("Software") != "taskarith":
                return None
            return str(image.info.get("Description") or "") or None
    except (OSError, UnidentifiedImageError, ValueError):
        return None
