"""Correlations over paired measurements, shared by the bench summary and the claims ledger."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["correlation", "off_diagonal"]


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return math.nan
    return statistics.correlation(xs, ys)


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def correlation(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman (Pearson of ranks, ties averaged) correlation of paired values."""
    return {"pearson": _pearson(xs, ys), "spearman": _pearson(_ranks(xs), _ranks(ys)), "points": len(xs)}


def off_diagonal(matrix: Sequence[Sequence[float]]) -> list[float]:
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]
