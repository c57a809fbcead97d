"""The claims ledger: every claim of the seed papers, checked against one bench run by a rule fixed in advance.

A claim compares two quantities measured per seed (a method's number against another method's, or against
a constant): the claimed direction of their difference is the claim. The verdict rule, fixed before any run
was read and never tuned afterwards:

* **holds** -- the difference has the claimed sign on the mean and on every seed, and its size exceeds
  twice the larger of the two sides' seed standard deviations;
* **does not hold** -- the same, with the opposite sign;
* **within noise** -- anything else.

With one seed the standard deviation is unknown and the verdict is marked *indicative*. An "at least"
claim (one method matches another) holds when the difference is within noise or clearly in its favour.
A claim whose numbers the run lacks (a method not run, a study not asked for) is listed as *not measured*
with the reason, never left out; one its numbers cannot decide (the random-initialization control when the
random model learns nothing) is *not applicable*, with the reason.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskarith.experiments.stats import correlation, off_diagonal

HOLDS, FAILS, NOISE, UNMEASURED, NOT_APPLICABLE = (
    "holds",
    "does not hold",
    "within noise",
    "not measured",
    "not applicable",
)

# (seed entry of results.json) -> the number, or None when this run lacks it.
Measure = Callable[[Mapping[str, Any]], "float | None"]


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def _method_metric(method: str, metric: Callable[[Mapping[str, Any]], float]) -> Measure:
    def measure(seed_entry: Mapping[str, Any]) -> float | None:
        run = seed_entry.get("methods", {}).get(method)
        return None if run is None else metric(run)

    return measure


METRICS: dict[str, tuple[str, Callable[[Mapping[str, Any]], float]]] = {
    # name -> (how the ledger writes it, value from one method's entry of a seed)
    "finetuned": ("mean single-task test accuracy", lambda r: _mean(r["finetuned"].values())),
    "add_abs_searched": (
        "addition, mean test accuracy at the searched alpha",
        lambda r: r["addition"]["alpha_searched"]["mean_accuracy"],
    ),
    "add_norm_searched": (
        "addition, mean normalized test accuracy at the searched alpha",
        lambda r: r["addition"]["alpha_searched"]["mean_normalized"],
    ),
    "add_norm_1": (
        "addition, mean normalized test accuracy at alpha = 1",
        lambda r: r["addition"]["alpha_1"]["mean_normalized"],
    ),
    "neg_target_searched": (
        "negation, mean target test accuracy at the control floor",
        lambda r: _mean(n["alpha_searched"]["target"] for n in r["negation"].values()),
    ),
    "xi": ("mean weight disentanglement error xi over the grid", lambda r: r["xi_mean"]),
}


def _incremental_final(method: str) -> Measure:
    def measure(seed_entry: Mapping[str, Any]) -> float | None:
        run = seed_entry.get("incremental", {}).get(method)
        return None if run is None else run["after_each_arrival"][-1]["mean_accuracy"]

    return measure


def _spearman_taujp_drop(methods: Sequence[str]) -> Measure:
    def measure(seed_entry: Mapping[str, Any]) -> float | None:
        runs = [seed_entry["methods"][m] for m in methods if m in seed_entry.get("methods", {})]
        xs = [x for r in runs for x in off_diagonal(r["taujp"])]
        ys = [y for r in runs for y in off_diagonal(r["interference_drop"])]
        return correlation(xs, ys)["spearman"] if len(xs) >= 3 else None

    return measure


def _nonlinear_advantage(task: str, classes: int) -> Measure:
    # The tangent code's nonlinear_advantage: (acc non-linear - acc linear) / (1 - 1/C), "linear" here meaning
    # linearly fine-tuned (the paper's use of it is not stated; protocol.md says which we take).
    def measure(seed_entry: Mapping[str, Any]) -> float | None:
        methods = seed_entry.get("methods", {})
        if "standard" not in methods or "linear" not in methods:
            return None
        gap = methods["standard"]["finetuned"][task] - methods["linear"]["finetuned"][task]
        return gap / (1 - 1 / classes)

    return measure


def _constant(value: float) -> Measure:
    return lambda seed_entry: value


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str
    statement: str
    comparison: str  # what is compared, as a reader checks it
    left: Measure
    right: Measure
    direction: str  # "higher": left > right is claimed; "lower": left < right; "at least": left >= right
    left_label: str
    right_label: str
    percent: bool = True  # the numbers are accuracies (shown in %) rather than xi or a correlation
    needs: str = ""  # why it may be unmeasured
    # Why the run's numbers cannot decide this claim (None: they can), from the seed entries.
    not_applicable: Callable[[Sequence[Mapping[str, Any]]], str | None] | None = None


TANGENT, TAUJP, TAK = (
    "tangent (Ortiz-Jiménez et al., NeurIPS 2023)",
    "tau-Jp (Yoshida et al., ICLR 2025)",
    "TAK (ICLR 2026)",
)


def _versus(key: str, paper: str, statement: str, metric: str, left: str, right: str, direction: str) -> Claim:
    label, value = METRICS[metric]
    sign = {"higher": ">", "lower": "<", "at least": ">="}[direction]
    return Claim(
        key,
        paper,
        statement,
        f"{label}: {left} {sign} {right}",
        _method_metric(left, value),
        _method_metric(right, value),
        direction,
        left,
        right,
        percent=metric != "xi",
        needs=f"the methods {left} and {right} in --method",
    )


def _positive(
    key: str, paper: str, statement: str, comparison: str, measure: Measure, label: str, **options: Any
) -> Claim:
    """A claim that one measured quantity is above zero."""
    return Claim(key, paper, statement, comparison, measure, _constant(0.0), "higher", label, "0", **options)


def claims_of(result: Mapping[str, Any]) -> list[Claim]:
    """Every claim the ledger checks, in the papers' order; the per-task rows follow the run's tasks."""
    classes = result.get("num_classes", {})
    rows = [
        _versus(
            "tangent.addition",
            TANGENT,
            "Linearized (tangent-space) fine-tuning improves task addition",
            "add_abs_searched",
            "linear",
            "standard",
            "higher",
        ),
        _versus(
            "tangent.negation",
            TANGENT,
            "Linearized fine-tuning improves task negation (forgets more, control kept)",
            "neg_target_searched",
            "linear",
            "standard",
            "lower",
        ),
        _versus(
            "tangent.disentanglement",
            TANGENT,
            "Linearized fine-tuning amplifies weight disentanglement",
            "xi",
            "linear",
            "standard",
            "lower",
        ),
        _versus(
            "tangent.posthoc_addition",
            TANGENT,
            "Post-hoc linearization of non-linear vectors improves task addition (normalized accuracy)",
            "add_norm_searched",
            "posthoc",
            "standard",
            "higher",
        ),
        _versus(
            "tangent.posthoc_single_task",
            TANGENT,
            "Post-hoc linearized models lose single-task accuracy (non-linear FT is not in the kernel regime)",
            "finetuned",
            "posthoc",
            "standard",
            "lower",
        ),
        _versus(
            "tangent.linear_over_posthoc",
            TANGENT,
            "Linearized fine-tuning beats post-hoc linearization in task addition",
            "add_abs_searched",
            "linear",
            "posthoc",
            "higher",
        ),
    ]
    for task in result.get("tasks", ()):
        if task in classes:
            rows.append(
                _positive(
                    f"tangent.nonlinear_advantage.{task}",
                    TANGENT,
                    f"Non-linear fine-tuning is more accurate than linearized fine-tuning on {task}",
                    f"non-linear advantage on {task}: (acc standard - acc linear) / (1 - 1/{classes[task]}) > 0",
                    _nonlinear_advantage(task, classes[task]),
                    "non-linear advantage",
                    needs="the methods standard and linear",
                )
            )
    rows += [
        _positive(
            "tangent.pretraining",
            TANGENT,
            "Weight disentanglement emerges from pre-training: a randomly initialized model fails at task arithmetic",
            "addition, mean normalized test accuracy at the searched alpha: pre-trained linear > random-init linear",
            _random_init_gap,
            "pre-trained - random init",
            needs="the random-initialization control (bench --random-init)",
            not_applicable=_random_init_unlearnt,
        ),
        Claim(
            "tangent.ntk_localization",
            TANGENT,
            "The NTK eigenfunctions of the pre-trained model are localized on one task's inputs",
            "top eigenvectors' mean largest task share of energy: pre-trained > random init",
            _ntk_localization("pretrained"),
            _ntk_localization("random_init"),
            "higher",
            "pre-trained",
            "random init",
            needs="the NTK study: bench --ntk-examples N, or taskarith ntk then claims --ntk",
        ),
        _versus(
            "taujp.one_shot",
            TAUJP,
            "tau-Jp regularization makes alpha = 1 work (one-shot addition)",
            "add_norm_1",
            "linear_taujp",
            "linear",
            "higher",
        ),
        Claim(
            "taujp.no_tuning",
            TAUJP,
            "With tau-Jp, alpha needs no tuning: one-shot matches tuned linear FT",
            "addition, mean normalized test accuracy: linear_taujp at alpha = 1 >= linear at the searched alpha",
            _method_metric("linear_taujp", METRICS["add_norm_1"][1]),
            _method_metric("linear", METRICS["add_norm_searched"][1]),
            "at least",
            "linear_taujp a=1",
            "linear a*",
            needs="the methods linear_taujp and linear",
        ),
        _versus(
            "taujp.addition",
            TAUJP,
            "tau-Jp improves task addition over linearized fine-tuning",
            "add_abs_searched",
            "linear_taujp",
            "linear",
            "higher",
        ),
        _versus(
            "taujp.single_task",
            TAUJP,
            "tau-Jp gives better accuracy on each task",
            "finetuned",
            "linear_taujp",
            "linear",
            "higher",
        ),
        _versus(
            "taujp.negation_vs_linear",
            TAUJP,
            "tau-Jp vectors forget better than linearized ones",
            "neg_target_searched",
            "linear_taujp",
            "linear",
            "lower",
        ),
        _versus(
            "taujp.negation_vs_standard",
            TAUJP,
            "tau-Jp vectors forget better than non-linear ones",
            "neg_target_searched",
            "linear_taujp",
            "standard",
            "lower",
        ),
        _versus(
            "taujp.disentanglement",
            TAUJP,
            "tau-Jp reduces interference between task vectors (lower xi)",
            "xi",
            "linear_taujp",
            "linear",
            "lower",
        ),
        _positive(
            "taujp.predicts_interference",
            TAUJP,
            "tau-Jp is related to interference: the larger tau-Jp, the larger the accuracy drop",
            "Spearman correlation over (vector, other task) pairs of all methods, tau-Jp vs accuracy drop > 0",
            _spearman_taujp_drop(result.get("profile", {}).get("methods", ())),
            "Spearman",
            percent=False,
        ),
        Claim(
            "taujp.incremental",
            TAUJP,
            "tau-Jp makes incremental learning more robust (future tasks unseen)",
            "mean test accuracy of the running sum at alpha = 1 after the last arrival: linear_taujp > linear",
            _incremental_final("linear_taujp"),
            _incremental_final("linear"),
            "higher",
            "linear_taujp",
            "linear",
            needs="linear_taujp in the incremental study",
        ),
        Claim(
            "taujp.public_checkpoints",
            TAUJP,
            "tau-Jp reinforces task arithmetic with fine-tuned checkpoints made elsewhere",
            "mean test accuracy of checkpoints + new task at alpha = 1: new task with tau-Jp > without",
            _checkpoint_side("taujp"),
            _checkpoint_side("plain"),
            "higher",
            "with tau-Jp",
            "plain",
            needs="the public-checkpoint study (bench --checkpoint)",
        ),
        Claim(
            "tak.matches_taujp",
            TAK,
            "Dataless TAK (K-FAC) matches tau-Jp in task addition",
            f"{METRICS['add_norm_1'][0]}: linear_kfac >= linear_taujp",
            _method_metric("linear_kfac", METRICS["add_norm_1"][1]),
            _method_metric("linear_taujp", METRICS["add_norm_1"][1]),
            "at least",
            "linear_kfac",
            "linear_taujp",
            needs="the methods linear_kfac and linear_taujp",
        ),
        _versus(
            "tak.negation",
            TAK,
            "TAK forgets better than tau-Jp",
            "neg_target_searched",
            "linear_kfac",
            "linear_taujp",
            "lower",
        ),
        _versus("tak.one_shot", TAK, "TAK makes alpha = 1 work", "add_norm_1", "linear_kfac", "linear", "higher"),
    ]
    return rows


def _random_init_gap(seed_entry: Mapping[str, Any]) -> float | None:
    reference = seed_entry.get("random_init")
    run = seed_entry.get("methods", {}).get("linear")
    if reference is None or run is None or not reference.get("applicable", False):
        return None
    value = METRICS["add_norm_searched"][1]
    return value(run) - value(reference["methods"]["linear"])


def _random_init_unlearnt(entries: Sequence[Mapping[str, Any]]) -> str | None:
    # Random heads on a random encoder may learn nothing: then no addition number says anything about
    # disentanglement, and the row says so instead of giving a verdict.
    reasons = [e["random_init"]["why"] for e in entries if "random_init" in e and not e["random_init"]["applicable"]]
    return reasons[0] if reasons else None


def _ntk_localization(model: str) -> Measure:
    def measure(seed_entry: Mapping[str, Any]) -> float | None:
        ntk = seed_entry.get("ntk")
        return None if ntk is None or model not in ntk else ntk[model]["mean_top_share"]

    return measure


def _checkpoint_side(label: str) -> Measure:
    def measure(seed_entry: Mapping[str, Any]) -> float | None:
        study = seed_entry.get("existing_checkpoints")
        return None if study is None else study[f"with_new_{label}"]["mean_accuracy"]

    return measure


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def verdict(left: Sequence[float | None], right: Sequence[float | None], direction: str) -> dict[str, Any]:
    """The fixed rule (module docstring) on per-seed values, paired by seed."""
    pairs = [
        (a, b)
        for a, b in zip(left, right, strict=True)
        if a is not None and b is not None and _finite(a) and _finite(b)
    ]
    if not pairs:  # the same keys as a measured row, so every row of results.json has one shape
        return {
            "verdict": UNMEASURED,
            "indicative": False,
            "seeds": 0,
            "left": None,
            "right": None,
            "difference": None,
            "twice_larger_std": None,
        }
    lefts, rights = [a for a, _ in pairs], [b for _, b in pairs]
    differences = [a - b for a, b in pairs]
    sign = -1.0 if direction == "lower" else 1.0
    spread = max(statistics.stdev(lefts), statistics.stdev(rights)) if len(pairs) > 1 else 0.0
    mean_difference = statistics.fmean(differences)

    def clear(towards: float) -> bool:
        return (
            towards * mean_difference > 0
            and all(towards * d > 0 for d in differences)
            and abs(mean_difference) > 2 * spread
        )

    if clear(sign):
        outcome = HOLDS
    elif clear(-sign):
        outcome = FAILS
    else:
        outcome = HOLDS if direction == "at least" else NOISE
    return {
        "verdict": outcome,
        "indicative": len(pairs) == 1,
        "seeds": len(pairs),
        "left": {"mean": statistics.fmean(lefts), "std": statistics.stdev(lefts) if len(pairs) > 1 else 0.0},
        "right": {"mean": statistics.fmean(rights), "std": statistics.stdev(rights) if len(pairs) > 1 else 0.0},
        "difference": {"mean": mean_difference, "per_seed": differences},
        "twice_larger_std": 2 * spread,
    }


def _seed_entries(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-seed entries with the single-run studies (checkpoints, NTK) attached to the first seed."""
    entries = [dict(entry) for entry in result.get("per_seed", {}).values()]
    for study in ("existing_checkpoints", "ntk"):
        if study in result and entries:
            entries[0][study] = result[study]
    return entries


def ledger(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per claim, measured on a bench ``result`` (the content of results.json)."""
    entries = _seed_entries(result)
    rows = []
    for claim in claims_of(result):
        left = [claim.left(e) for e in entries]
        right = [claim.right(e) for e in entries]
        row = {
            "key": claim.key,
            "paper": claim.paper,
            "claim": claim.statement,
            "comparison": claim.comparison,
            "direction": claim.direction,
            "left_label": claim.left_label,
            "right_label": claim.right_label,
            "percent": claim.percent,
            **verdict(left, right, claim.direction),
        }
        reason = claim.not_applicable(entries) if claim.not_applicable else None
        if reason:
            row.update(verdict=NOT_APPLICABLE, why=reason)
        elif row["verdict"] == UNMEASURED:
            row["why"] = (
                f"this run has no numbers for it (needs {claim.needs})"
                if claim.needs
                else "this run has no numbers for it"
            )
        rows.append(row)
    return rows


def _number(value: float, percent: bool) -> str:
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def ledger_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The ledger as a table: header and rows of strings (for markdown and the terminal)."""
    header = ["claim", "comparison", "left", "right", "difference per seed", "verdict"]
    table = []
    for row in rows:
        if row["verdict"] in (UNMEASURED, NOT_APPLICABLE):
            table.append([row["claim"], row["comparison"], "-", "-", "-", f"{row['verdict']}: {row['why']}"])
            continue
        pct = row["percent"]

        def side(name: str, row: Mapping[str, Any] = row, pct: bool = pct) -> str:
            spread, label = row[name], row[f"{name}_label"]
            if label == "0":  # a constant: no spread to show
                return label
            value = f"{label} {_number(spread['mean'], pct)}"
            return value if row["indicative"] else f"{value} ± {_number(spread['std'], pct)}"

        per_seed = ", ".join(
            f"{d:+.1f}" if pct else f"{d:+.3f}" for d in (100 * x if pct else x for x in row["difference"]["per_seed"])
        )
        outcome = row["verdict"] + (" (indicative: one seed)" if row["indicative"] else "")
        table.append([row["claim"], row["comparison"], side("left"), side("right"), per_seed, f"**{outcome}**"])
    return header, table


def ledger_brief(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The ledger narrow enough for a terminal: each claim by its key, the two sides' means and the verdict
    (``*``: one seed, indicative); the comparisons, spreads and reasons are in :func:`ledger_rows`."""
    table = []
    for row in rows:
        measured = row["verdict"] not in (UNMEASURED, NOT_APPLICABLE)
        sides = [_number(row[name]["mean"], row["percent"]) if measured else "-" for name in ("left", "right")]
        table.append([row["key"], *sides, row["verdict"] + ("*" if row.get("indicative") else "")])
    return ["claim", "left", "right", "verdict"], table


def ledger_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    counts = {HOLDS: 0, FAILS: 0, NOISE: 0, UNMEASURED: 0, NOT_APPLICABLE: 0}
    for row in rows:
        counts[row["verdict"]] += 1
    return counts
