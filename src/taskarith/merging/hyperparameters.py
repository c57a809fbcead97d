"""The merging methods' hyper-parameters: defaults, valid ranges, and the check of a user's choice.

Kept apart from the methods themselves (torch code) so that the command line and the streaming merge
can list and validate methods without importing torch. Every method of
:data:`taskarith.merging.methods.MERGE_METHODS` and :data:`~taskarith.merging.methods.STATISTICS_METHODS`
has an entry here, and no other; :data:`METHOD_KINDS` says which kind each is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from taskarith.display import quoted
from taskarith.errors import TaskArithError

__all__ = [
    "DEFAULTS",
    "HYPERPARAMETERS",
    "LEARNED_METHODS",
    "METHOD_KINDS",
    "STATISTICS",
    "Hyperparameter",
    "check_hyperparameters",
    "check_method",
]


@dataclass(frozen=True)
class Hyperparameter:
    """One tunable number of a merging method: its default and the values that make sense."""

    default: float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # whether `low` itself is excluded
    high_open: bool = False  # whether `high` itself is excluded
    integer: bool = False
    meaning: str = ""

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def range_text(self) -> str:
        if math.isinf(self.low) and math.isinf(self.high):
            return "any finite number"
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        kind = "an integer in " if self.integer else ""
        return f"{kind}{left}{self.low:g}, {self.high:g}{right}"


_SCALING = Hyperparameter(1.0, meaning="multiplies the merged delta (lambda / alpha in the papers)")


def _density(default: float, meaning: str) -> Hyperparameter:
    # Density 0 would keep nothing (and make DARE divide by zero).
    return Hyperparameter(default, low=0.0, high=1.0, low_open=True, meaning=meaning)


HYPERPARAMETERS: dict[str, dict[str, Hyperparameter]] = {
    "task_arithmetic": {"scaling": _SCALING},
    "ties": {
        "density": _density(0.2, "fraction of each delta's entries kept, by magnitude (top-k%)"),
        "scaling": _SCALING,
    },
    "dare": {
        "density": _density(0.5, "probability of keeping an entry (1 - drop rate p)"),
        "scaling": _SCALING,
    },
    "dare_ties": {
        "density": _density(0.5, "probability of keeping an entry (1 - drop rate p)"),
        "scaling": _SCALING,
    },
    "breadcrumbs": {
        "density": _density(0.15, "fraction of each delta's entries kept (below the outliers)"),
        "gamma": Hyperparameter(
            0.01, low=0.0, high=1.0, high_open=True, meaning="fraction of largest-magnitude entries removed as outliers"
        ),
        "scaling": _SCALING,
    },
    "consensus": {
        "tall_lambda": Hyperparameter(0.4, low=0.0, meaning="TALL-mask threshold lambda"),
        "k": Hyperparameter(2, low=0.0, integer=True, meaning="minimum number of tasks whose masks keep an entry"),
        "scaling": _SCALING,
    },
    "tsv": {"scaling": _SCALING},
    "regmean": {
        "alpha": Hyperparameter(
            0.95, low=0.0, high=1.0, meaning="off-diagonal Gram entries times alpha (reduce_non_diagonal_ratio)"
        ),
        "gram_mean": Hyperparameter(
            1, low=0.0, high=1.0, integer=True, meaning="1: each Gram divided by its token count; 0: sums"
        ),
    },
    "fisher": {
        "epsilon": Hyperparameter(1e-6, low=0.0, meaning="added to every Fisher entry (minimal_fisher_weight)"),
        "normalize": Hyperparameter(
            0, low=0.0, high=1.0, integer=True, meaning="1: each model's Fisher scaled by 1 / its L2 norm"
        ),
    },
}

# What each method needs besides the deltas of one tensor: "tensor" (nothing: data-free, per tensor),
# "statistics" (per-layer statistics files, one per model: methods.STATISTICS_METHODS), "learned" (the
# vectors, the model and unlabeled inputs; their own modules in taskarith.merging).
METHOD_KINDS: dict[str, str] = {
    method: "statistics" if method in ("regmean", "fisher") else "tensor" for method in HYPERPARAMETERS
}
STATISTICS = frozenset(m for m, kind in METHOD_KINDS.items() if kind == "statistics")
# The learned methods by name, each AdaMerging at one granularity (merging/adamerging.py); torch-free here,
# so that `taskarith merge` can tell them apart without importing torch.
LEARNED_METHODS: dict[str, str] = {"adamerging": "layerwise", "adamerging_taskwise": "taskwise"}

DEFAULTS: dict[str, dict[str, float]] = {
    method: {key: spec.default for key, spec in specs.items()} for method, specs in HYPERPARAMETERS.items()
}


def check_method(name: str) -> str:
    """``name`` if it is a registered merging method, else an error listing the known ones."""
    if name not in HYPERPARAMETERS:
        raise TaskArithError(f"unknown merging method '{name}' (known: {', '.join(HYPERPARAMETERS)})")
    return name


def _number(method: str, key: str, raw: object, spec: Hyperparameter) -> float:
    # Strings are accepted so that `--param density=0.3` from a command line needs no special casing.
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise TaskArithError(f"{method} hyper-parameter '{key}' must be a number, got {quoted(raw)}")
    try:
        value = float(raw)
    except ValueError:
        raise TaskArithError(f"{method} hyper-parameter '{key}' must be a number, got {quoted(raw)}") from None
    if not math.isfinite(value) or not spec.contains(value) or (spec.integer and value != int(value)):
        raise TaskArithError(
            f"{method} hyper-parameter '{key}' = {quoted(raw)} is out of range: it must be {spec.range_text()}"
        )
    return int(value) if spec.integer else value


def check_hyperparameters(
    name: str, params: Mapping[str, object], *, models: int | None = None, statistics: bool | None = None
) -> dict[str, float]:
    """The method's full hyper-parameters: ``params`` validated, the rest filled from :data:`DEFAULTS`.

    Raises :class:`TaskArithError` for an unknown method, an unknown key (listing the accepted ones),
    or a value out of range (naming key and value). ``models``, the number of models or vectors merged
    when known, bounds the values that count them; ``statistics``, whether statistics files are given
    (when known), must match what the method needs.
    """
    specs = HYPERPARAMETERS[check_method(name)]
    if statistics is not None and statistics != (name in STATISTICS):
        raise TaskArithError(
            f"merging method '{name}' needs one statistics file per model (`taskarith statistics`)"
            if name in STATISTICS
            else f"merging method '{name}' uses no statistics; they are for {', '.join(sorted(STATISTICS))}"
        )
    unknown = sorted(str(key) for key in params if key not in specs)
    if unknown:
        raise TaskArithError(
            f"unknown hyper-parameter{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)} "
            f"for merging method '{name}' (accepted: {', '.join(specs) or 'none'})"
        )
    checked = {key: _number(name, key, params.get(key, spec.default), spec) for key, spec in specs.items()}
    if name == "breadcrumbs" and checked["density"] + checked["gamma"] > 1.0 + 1e-12:
        raise TaskArithError(
            f"breadcrumbs keeps 'density' = {checked['density']:g} and removes 'gamma' = {checked['gamma']:g} "
            f"as outliers; together they cannot exceed 1"
        )
    if name == "consensus" and models is not None and checked["k"] > models:
        # No entry can be kept by more masks than there are models: the merge would silently be the base.
        raise TaskArithError(
            f"consensus 'k' = {checked['k']:g} is more than the {models} models merged; an entry "
            f"kept by at least k of them cannot exist: use k <= {models}"
        )
    return checked
