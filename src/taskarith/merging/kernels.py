"""The bodies of task arithmetic and TIES, written once for NumPy arrays and torch tensors alike.

The in-memory merge (:mod:`taskarith.merging.methods`) calls them with torch tensors; the streaming
merge (:mod:`taskarith.merging.streaming`) calls them with NumPy arrays read straight from the
checkpoint files, so that merging checkpoints with these two methods never imports torch (its import
alone takes about two seconds, more than the rest of a 58M-parameter merge). Both array libraries
round every elementwise operation the same way (IEEE 754, one rounding per operation), and the
operations here run in the same order whichever library executes them, so the two paths give the
same bits; tests/test_merging_kernels.py checks it.

Only what both libraries spell alike is used (``abs``, ``*``, ``==``, ``.sum()``, ``.reshape``,
``.clip``, ``.cumsum``, ``where``, ``sign``, ``zeros_like``); the rest goes through :func:`_library`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

__all__ = ["count_down", "count_up", "disjoint_mean", "keep_top", "summed", "task_arithmetic", "ties", "top_k_mask"]

Array = TypeVar("Array", bound=Any)  # a numpy.ndarray or a torch.Tensor; one call never mixes the two
_CHUNK = 1 << 18  # entries per chunk of elementwise work: 1 MiB of float32, which stays in cache


def _library(array: Any) -> ModuleType:
    """numpy or torch, whichever the array belongs to (torch is already imported if it is a tensor)."""
    return np if isinstance(array, np.ndarray) else sys.modules["torch"]


def _copy(array: Array) -> Array:
    return array.copy() if isinstance(array, np.ndarray) else array.clone()


def _size(array: Any) -> int:
    return math.prod(array.shape)


def count_up(fraction: float, n: int) -> int:
    """ceil(fraction * n), so that a small tensor (a bias) still keeps at least one entry.

    Rounding first stops float noise from adding one: 0.7 * 10 is 7.000000000000001 in binary.
    """
    return min(n, math.ceil(round(fraction * n, 6)))


def count_down(fraction: float, n: int) -> int:
    """floor(fraction * n): removing outliers from a tiny tensor should not remove its only entries."""
    return min(n, math.floor(round(fraction * n, 6)))


def _kth_largest(magnitude: Any, k: int) -> Any:
    """The k-th largest entry of a flat array.

    NumPy's introselect is about ten times faster than torch's kthvalue on CPU (0.04 s against 0.39 s
    for 16M float32 entries on this machine), so CPU tensors go through it, sharing their memory.
    """
    n = _size(magnitude)
    if isinstance(magnitude, np.ndarray):
        return np.partition(magnitude, n - k)[n - k]
    torch = _library(magnitude)
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
        return magnitude.new_tensor(np.partition(magnitude.detach().numpy(), n - k)[n - k])
    return magnitude.kthvalue(n - k + 1).values


def top_k_mask(magnitude: Array, k: int) -> Array:
    """Boolean mask of the k largest entries of a flat array; ties go to the lowest indices.

    ``torch.topk`` breaks ties in an unspecified order, which would let the kept set change between
    devices or versions; a threshold plus an index-ordered tie-break is deterministic and avoids a
    full sort of a possibly huge tensor.
    """
    n = _size(magnitude)
    lib = _library(magnitude)
    if k <= 0:
        return lib.zeros_like(magnitude, dtype=bool)
    if k >= n:
        return lib.ones_like(magnitude, dtype=bool)
    threshold = _kth_largest(magnitude, k)
    above = magnitude > threshold
    at = magnitude == threshold
    still_needed = k - int(above.sum())
    if int(at.sum()) <= still_needed:  # the usual case: no tie to break
        return above | at
    # The first `still_needed` tied entries, by index (a handful: deltas are quantized to the base's ulp).
    tied = np.flatnonzero(at) if isinstance(at, np.ndarray) else at.nonzero().reshape(-1)
    above[tied[:still_needed]] = True
    return above


def keep_top(delta: Array, density: float, *, in_place: bool = False) -> Array:
    """The delta with all but its top-``density`` fraction (by magnitude) set to zero.

    ``in_place`` zeroes ``delta`` itself (when the caller owns it): one tensor less per task.
    """
    flat = delta.reshape(-1)
    mask = top_k_mask(abs(flat), count_up(density, _size(flat)))
    if in_place:  # flat is a view of a contiguous delta; if reshape had to copy, the copy is changed instead
        flat *= mask
        return flat.reshape(delta.shape)
    return (flat * mask).reshape(delta.shape)


def summed(arrays: Sequence[Array], *, in_place: bool = False) -> Array:
    """The sum, added one array at a time, into a fresh array (or into ``arrays[0]`` if ``in_place``).

    Summing in place instead of stacking keeps a merge of T models at a few tensors of memory rather
    than T more (a 32000 x 512 embedding is 65 MB per model).
    """
    total = arrays[0] if in_place else _copy(arrays[0])
    for array in arrays[1:]:
        total += array
    return total


def disjoint_mean(values: Sequence[Array]) -> Array:
    """TIES's elected sign and disjoint mean, entry by entry.

    The elected sign is the sign of the summed values (the "mass"), not a vote count. Where the mass
    cancels exactly, the authors' code takes the majority of the elected signs over the whole model;
    per tensor, the majority over this tensor is the closest we can do (counted in integers: a float32
    sum of more than 2**24 signs would round). If that cancels too, the entry merges to 0. The mean is
    over the tasks whose (non-zero) value agrees with the elected sign: dividing by the number of
    agreeing tasks rather than by T keeps a parameter that only one task moved at that task's full
    size instead of shrinking it by 1/T.

    Everything here is elementwise except the majority, so the work goes in cache-sized chunks, in two
    passes: tensor-sized temporaries (a dozen of them) made this three times slower on a 16M-entry
    embedding than the arithmetic itself. ``values`` may be a list or a stacked ``(T, ...)`` tensor.
    """
    lib = _library(values[0])
    flats = [value.reshape(-1) for value in values]
    n = _size(flats[0])
    merged = lib.empty_like(flats[0])  # the elected signs, then the means
    balance = 0
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        signs = lib.sign(summed([flat[part] for flat in flats]))
        balance += int((signs > 0).sum()) - int((signs < 0).sum())
        merged[part] = signs
    majority = float((balance > 0) - (balance < 0))
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        elected = merged[part]
        elected[elected == 0] = majority
        total, count = lib.zeros_like(elected), lib.zeros_like(elected)
        for flat in flats:
            value = flat[part]
            agrees = (lib.sign(value) == elected) & (elected != 0)
            total += lib.where(agrees, value, 0.0)
            count += agrees
        merged[part] = total / count.clip(min=1)
    return merged.reshape(values[0].shape)


def _scaled(fresh: Array, scaling: float) -> Array:
    """``scaling * fresh``, in place (``fresh`` must be the caller's own temporary); 1 costs nothing."""
    if scaling != 1.0:
        fresh *= scaling
    return fresh


def task_arithmetic(deltas: Sequence[Array], scaling: float, *, in_place: bool = False) -> Array:
    """scaling * sum_t tau_t, for deltas already in working precision (see methods.task_arithmetic).

    ``in_place`` lets the deltas be overwritten (a caller's own temporaries), which saves a copy.
    """
    return _scaled(summed(deltas, in_place=in_place), scaling)


def ties(deltas: Sequence[Array], density: float, scaling: float, *, in_place: bool = False) -> Array:
    """Trim, elect, disjoint mean, scale, for deltas already in working precision (see methods.ties).

    ``in_place`` lets the deltas be overwritten (a caller's own temporaries): T tensors less at the peak.
    """
    trimmed = [keep_top(delta, density, in_place=in_place) for delta in deltas]
    return _scaled(disjoint_mean(trimmed), scaling)
