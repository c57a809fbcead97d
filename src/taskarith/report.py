"""Turning experiment data into tables: markdown for files, rich for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from rich.table import Table

from taskarith.display import cell


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def demo_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Addition table: one row per task, test accuracy in percent, then the mean."""
    add1, add = result["addition"]["alpha_1"], result["addition"]["alpha_searched"]
    header = ["task", "zero-shot", "fine-tuned", "merged a=1", f"merged a={add['alpha']:g}", "normalized"]
    names = result["tasks"]
    rows = [
        [
            name,
            _pct(result["zero_shot"][name]),
            _pct(result["finetuned"][name]),
            _pct(add1["accuracy"][name]),
            _pct(add["accuracy"][name]),
            _pct(add["normalized"][name]),
        ]
        for name in names
    ]
    rows.append(
        [
            "mean",
            _pct(sum(result["zero_shot"][n] for n in names) / len(names)),
            _pct(sum(result["finetuned"][n] for n in names) / len(names)),
            _pct(add1["mean_accuracy"]),
            _pct(add["mean_accuracy"]),
            _pct(add["mean_normalized"]),
        ]
    )
    return header, rows


def negation_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Negation table: target and control accuracy before and after subtracting the target's vector."""
    control = result["control_task"]
    header = ["negated task", "alpha", "target", "control"]
    rows = []
    for name, runs in result["negation"].items():
        for run in (runs["alpha_1"], runs["alpha_searched"]):
            rows.append(
                [
                    name,
                    f"{run['alpha']:g}",
                    f"{_pct(result['zero_shot'][name])} -> {_pct(run['target'])}",
                    f"{_pct(result['zero_shot'][control])} -> {_pct(run['control'])}",
                ]
            )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(header: list[str], rows: list[list[str]], title: str = "") -> Table:
    """A table of plain-text cells: task and model names come from outside and must not be read as markup."""
    table = Table(title=cell(title) if title else None)
    for i, name in enumerate(header):
        table.add_column(cell(name), justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*map(cell, row))
    return table


def demo_markdown(result: dict[str, Any]) -> str:
    add = result["addition"]["alpha_searched"]
    return (
        f"# taskarith demo: {result['model']['name']}\n\n"
        f"## Task addition\n\nTest accuracy (%). One encoder, pre + alpha * sum of the {len(result['tasks'])} task "
        f"vectors, each task scored with its own frozen zero-shot head; alpha={add['alpha']:g} was chosen on the "
        f"validation splits; normalized = merged (chosen alpha) / fine-tuned.\n\n"
        + markdown_table(*demo_rows(result))
        + f"\n\n## Task negation\n\nTest accuracy (%), pre-trained -> after subtracting alpha * tau. Control task: "
        f"{result['control_task']} (never fine-tuned); the searched alpha is the largest drop of the target keeping "
        f"control >= 95% of the pre-trained model's on validation.\n\n" + markdown_table(*negation_rows(result)) + "\n"
    )


# -------------------------------------------------------------------------------------------------
# The bench report


def _pm(spread: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    if spread["n"] == 0:
        return "n/a"
    text = f"{scale * spread['mean']:.{digits}f}"
    return text + (f" ± {scale * spread['std']:.{digits}f}" if spread["n"] > 1 else "")


def bench_main_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per method: task addition (absolute, normalized) and negation (target, control), in percent."""
    header = [
        "method",
        "fine-tuned",
        "add abs a=1",
        "add norm a=1",
        "add abs a*",
        "add norm a*",
        "a*",
        "neg target a=1",
        "neg control a=1",
        "neg target a*",
        "neg control a*",
        "xi mean",
    ]
    rows = []
    for method in result["profile"]["methods"]:
        s = result["summary"][method]
        chosen = ", ".join(f"{a:g}" for a in s["addition_alpha_chosen"])
        rows.append(
            [
                method,
                _pm(s["finetuned_mean"]),
                _pm(s["addition_alpha_1_accuracy"]),
                _pm(s["addition_alpha_1_normalized"]),
                _pm(s["addition_alpha_searched_accuracy"]),
                _pm(s["addition_alpha_searched_normalized"]),
                chosen,
                _pm(s["negation_alpha_1_target"]),
                _pm(s["negation_alpha_1_control"]),
                _pm(s["negation_alpha_searched_target"]),
                _pm(s["negation_alpha_searched_control"]),
                _pm(s["xi_mean"], scale=1.0, digits=3),
            ]
        )
    return header, rows


def bench_merge_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per fine-tuning method: normalized addition accuracy of the sum and of each merging method."""
    # The plain sum is always the first pair of columns; asking for task_arithmetic again would repeat it.
    merges = [m for m in result["profile"].get("merge_methods", []) if m != "task_arithmetic"]
    header = [
        "method",
        "task_arithmetic a=1",
        "task_arithmetic a*",
        *(f"{merge} {label}" for merge in merges for label in ("a=1", "a*")),
    ]
    rows = []
    for method in result["profile"]["methods"]:
        s = result["summary"][method]
        rows.append(
            [
                method,
                _pm(s["addition_alpha_1_normalized"]),
                _pm(s["addition_alpha_searched_normalized"]),
                *(
                    # RegMean and Fisher read each fine-tuned network's layers: not defined for linear vectors.
                    _pm(s["merging"][merge][f"{label}_normalized"]) if merge in s["merging"] else "n/a"
                    for merge in merges
                    for label in ("alpha_1", "alpha_searched")
                ),
            ]
        )
    return header, rows


def _claims(result: dict[str, Any]) -> list[str]:
    """The claims ledger: every claim of the papers with its numbers and the verdict of the fixed rule."""
    from taskarith.experiments.claims import ledger, ledger_counts, ledger_rows

    rows = result.get("claims") or ledger(result)
    counts = ledger_counts(rows)
    return [
        f"{counts['holds']} hold, {counts['does not hold']} do not hold, {counts['within noise']} are within "
        f"noise, {counts['not applicable']} are not applicable and {counts['not measured']} were not measured by "
        "this run. The rule, fixed before any run: a claim "
        "holds when the difference has the claimed sign on the mean and on every seed and exceeds twice the "
        "larger seed standard deviation; does not hold when the same is true with the opposite sign; is within "
        "noise otherwise (one seed: indicative). Differences per seed in points (accuracies) or units.",
        "",
        markdown_table(*ledger_rows(rows)),
    ]


def _grid(values: list[float]) -> str:
    """A grid as the papers write it when it is evenly spaced ({0, 0.05, ..., 1}), else every value."""
    steps = {round(b - a, 6) for a, b in pairwise(values)}
    if len(values) > 4 and len(steps) == 1:
        return f"{{{values[0]:g}, {values[1]:g}, ..., {values[-1]:g}}}"
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def _strengths(result: dict[str, Any]) -> str:
    parts = []
    for method, choice in result.get("reg_strength_selection", {}).items():
        if choice.get("criterion") == "fixed":
            parts.append(f"{method} {choice['chosen']:g} (fixed)")
        else:
            parts.append(
                f"{method} {choice['chosen']:g} (chosen on validation from {_grid(choice['grid'])}: "
                f"the sum at alpha = 1 over the unregularized vectors' accuracy)"
            )
    return "; ".join(parts) or "none"


def bench_markdown(result: dict[str, Any], figures: dict[str, str]) -> str:
    """The report: main table, claims checked, per-task numbers, interference, incremental learning."""
    p = result["profile"]
    seeds = len(p["seeds"])
    header, rows = bench_main_rows(result)
    parts = [
        f"# taskarith bench: {result['model']['name']}",
        "",
        f"Tasks: {', '.join(result['tasks'])}; control task for negation: {result['control_task']}. "
        f"{p['steps']} steps of batch {p['batch_size']} at lr {p['lr']:g} per task vector. Regularized methods protect "
        f"the other tasks of the suite{' and, for tau-Jp, the control task' if p.get('reg_control') else ''} "
        f"(tau-Jp: {p['reg_batch_size']} inputs per protected task and step, {p.get('reg_sampling', 'strict')} "
        f"sampling; K-FAC: {p['kfac_examples']} examples per task); lambda: "
        f"{_strengths(result)}. Test accuracy in percent on up to "
        f"{p['eval_limit'] or 'all'} examples per task, mean ± standard deviation over {seeds} seed(s); choices on up to "
        f"{p.get('val_limit') or p['eval_limit'] or 'all'} validation examples per task. "
        f"a* is the addition coefficient with the best mean normalized validation accuracy on {_grid(p['alpha_grid'])}; "
        f"negation's a* is the largest drop on the target keeping control >= 95% of its pre-trained validation "
        f"accuracy, from {_grid(p['negation_grid'])} (a = 0 always qualifies). "
        f"Wall time {result['wall_seconds']:.0f} s.",
        "",
        markdown_table(header, rows),
        "",
        "Zero-shot test accuracy: " + ", ".join(f"{k} {_pct(v)}" for k, v in result["zero_shot"].items()) + ".",
        "",
        "## Claims ledger",
        "",
        *_claims(result),
        "",
    ]
    first_seed = next(iter(result["per_seed"].values()))
    parts += [
        "## Per task (first seed, alpha = 1)",
        "",
        markdown_table(
            ["method", *result["tasks"]],
            [
                [
                    m,
                    *(
                        f"{_pct(r['addition']['alpha_1']['accuracy'][t])} / {_pct(r['finetuned'][t])}"
                        for t in result["tasks"]
                    ),
                ]
                for m, r in first_seed["methods"].items()
            ],
        ),
        "",
        "Each cell: merged model / the task's own fine-tuned model.",
        "",
    ]
    if p.get("merge_methods"):
        parts += [
            "## Merging methods",
            "",
            "Normalized task-addition accuracy (%) of each merging method (default hyper-parameters) applied to "
            "each fine-tuning method's vectors, at scaling 1 and at the scaling chosen on validation from "
            f"{p['alpha_grid']}; task_arithmetic is the plain sum of the first table.",
            "",
            markdown_table(*bench_merge_rows(result)),
            "",
        ]
    parts += [
        "## tau-Jp against measured interference",
        "",
        "For every method, vector i and other task j: tau-Jp (as published: the mean unsquared norm of the "
        "first-order change of task j's embeddings, validation inputs) and the drop of task j's test accuracy "
        "when vector i is added to vector j.",
        "",
        markdown_table(
            ["method", "Spearman", "Pearson", "pairs"],
            [
                [
                    m,
                    f"{result['summary'][m]['taujp_vs_drop']['spearman']:.2f}",
                    f"{result['summary'][m]['taujp_vs_drop']['pearson']:.2f}",
                    str(result["summary"][m]["taujp_vs_drop"]["points"]),
                ]
                for m in p["methods"]
            ],
        ),
        "",
    ]
    if "taujp_scatter" in figures:
        parts += [f"![tau-Jp vs accuracy drop]({figures['taujp_scatter']})", ""]
    parts += [
        "## Weight disentanglement error",
        "",
        f"xi(alpha_1, alpha_2) on up to {p['xi_limit']} test examples per task, grid {p['xi_grid']}; "
        "lower is more disentangled.",
        "",
    ]
    parts += [f"![xi {name}]({path})" for name, path in figures.items() if name.startswith("xi_")]
    parts += [""]
    incremental = first_seed["incremental"]
    if incremental:
        arrivals = [step["arrived"] for step in next(iter(incremental.values()))["after_each_arrival"]]
        parts += [
            "## Incremental learning",
            "",
            "Tasks arrive in order; regularized methods protect only the tasks seen so far. Mean test accuracy "
            "of the running sum (alpha = 1) over the tasks seen, after each arrival (first seed).",
            "",
            markdown_table(
                ["method", *[f"+{a}" for a in arrivals]],
                [
                    [m, *(_pct(step["mean_accuracy"]) for step in run["after_each_arrival"])]
                    for m, run in incremental.items()
                ],
            ),
            "",
        ]
        if "incremental" in figures:
            parts += [f"![incremental]({figures['incremental']})", ""]
    if "existing_checkpoints" in result:
        parts += _existing_section(result["existing_checkpoints"])
    if "ntk" in result:
        parts += ntk_section(result["ntk"], figures.get("ntk"))
    parts += ["All numbers are in results.json; this report was generated from it by `taskarith bench`.", ""]
    return "\n".join(parts)


def ntk_section(study: dict[str, Any], figure: str | None) -> list[str]:
    """The NTK localization study (`taskarith ntk`, `bench --ntk-examples`) as report lines."""
    labels = [label for label in ("pretrained", "random_init") if label in study]
    rows = [
        [
            label.replace("_", " "),
            study[label]["model"],
            f"{study[label]['mean_top_share']:.3f}",
            f"{study[label]['uniform_share']:.3f}",
            f"{sum(study[label]['eigenvalue_fraction']):.3f}",
            f"{study[label]['seconds']:.0f}",
        ]
        for label in labels
    ]
    lines = [
        "## NTK localization",
        "",
        f"Empirical NTK (trace over the pooled output's dimensions, exact) on {study['examples_per_task']} "
        f"{study['split']} inputs of each of {', '.join(study['tasks'])}; for each of the top {study['top']} "
        "eigenvectors u (unit norm), the share of its energy on each task, sum over the task's inputs of "
        "u(x)^2, and its largest share:",
        "",
        markdown_table(
            ["model", "name", "mean largest share", "spread evenly", "trace fraction of the top", "seconds"], rows
        ),
        "",
    ]
    return lines + ([f"![ntk]({figure})", ""] if figure else [])


def ntk_figure(study: dict[str, Any], path: Any) -> None:
    """Each model's top eigenvectors as bars stacked from their tasks' shares of energy, side by side."""
    from taskarith.display import shown
    from taskarith.plots import stacked_shares

    panels = {
        f"{label.replace('_', ' ')}\n{shown(study[label]['model'], 40)}": {
            shown(name, 40): study[label]["shares"][name] for name in study["tasks"]
        }
        for label in ("pretrained", "random_init")
        if label in study
    }
    stacked_shares(
        panels,
        path,
        title="share of each NTK eigenvector's energy on each task",
        xlabel="eigenvector (largest eigenvalue first)",
        ylabel="share of energy",
    )


def _existing_section(study: dict[str, Any]) -> list[str]:
    names, new = list(study["finetuned"]), study["new_task"]
    everyone = [*names, new]
    alone = study["merged_existing"]
    rows = [["checkpoints alone", *(_pct(alone[n]) for n in names), "-", _pct(sum(alone.values()) / len(alone))]]
    method = study.get("method", "standard_taujp")
    for label, title in (("plain", "+ new task, plain"), ("taujp", f"+ new task, {method}")):
        run = study[f"with_new_{label}"]
        rows.append([title, *(_pct(run["accuracy"][n]) for n in everyone), _pct(run["mean_accuracy"])])
    taujp = ", ".join(
        f"{n}: plain {study['with_new_plain']['taujp_on_checkpoint_tasks'][n]:.3g}, regularized "
        f"{study['with_new_taujp']['taujp_on_checkpoint_tasks'][n]:.3g}"
        for n in names
    )
    return [
        "## Fine-tuned checkpoints made elsewhere",
        "",
        "Task vectors built from model folders with no training record ("
        + ", ".join(f"{k}: `{v}`" for k, v in study["checkpoints"].items())
        + f"), read as {study.get('checkpoints_read_as', 'weights')}, all added at alpha = 1, then {new} "
        f"fine-tuned on top of them by {method} and by its unregularized mode, the penalty protecting "
        "the checkpoint tasks. Test accuracy (%):",
        "",
        markdown_table(["model", *everyone, "mean"], rows),
        "",
        f"tau-Jp of the new {new} vector on the checkpoint tasks' inputs: {taujp}.",
        "",
    ]


def bench_figures(result: dict[str, Any], out_dir: Any) -> dict[str, str]:
    """Heatmaps of xi (first seed, first pair, every method), tau-Jp vs drop scatter, incremental curves."""
    from pathlib import Path

    from taskarith.plots import heatmap, lines, scatter

    out = Path(out_dir)
    figures: dict[str, str] = {}
    first_seed = next(iter(result["per_seed"].values()))
    grid = result["profile"]["xi_grid"]
    for method, run in first_seed["methods"].items():
        if not run["xi"]:  # xi_seeds = 0 or xi_pairs = 0: no grid to draw
            continue
        pair, values = next(iter(run["xi"].items()))
        name = f"xi_{method}.png"
        first, second = pair.split("+", 1)
        heatmap(
            values,
            grid,
            grid,
            out / name,
            title=f"xi ({method}): {pair}",
            xlabel=f"alpha {second}",
            ylabel=f"alpha {first}",
            vmin=0.0,
            vmax=2.0,
            cmap="magma_r",
        )
        figures[f"xi_{method}"] = name
    groups: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
    for method, run in first_seed["methods"].items():
        xs = [x for i, row in enumerate(run["taujp"]) for j, x in enumerate(row) if i != j]
        ys = [y for i, row in enumerate(run["interference_drop"]) for j, y in enumerate(row) if i != j]
        groups[method] = (xs, [100 * y for y in ys])
    scatter(
        groups,
        out / "taujp_vs_drop.png",
        title="tau-Jp vs interference",
        xlabel="tau-Jp (log scale)",
        ylabel="accuracy drop (points)",
        logx=True,
    )
    figures["taujp_scatter"] = "taujp_vs_drop.png"
    incremental = first_seed["incremental"]
    if incremental:
        arrivals = [step["arrived"] for step in next(iter(incremental.values()))["after_each_arrival"]]
        lines(
            {m: [100 * s["mean_accuracy"] for s in run["after_each_arrival"]] for m, run in incremental.items()},
            arrivals,
            out / "incremental.png",
            title="incremental learning",
            xlabel="task arrived",
            ylabel="mean accuracy of seen tasks (%)",
        )
        figures["incremental"] = "incremental.png"
    if "ntk" in result:
        ntk_figure(result["ntk"], out / "ntk.png")
        figures["ntk"] = "ntk.png"
    return figures
