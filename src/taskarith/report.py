"""Turning experiment data into tables: markdown for files, rich for the terminal."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def demo_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Addition table: one row per task, test accuracy in percent, then the mean."""
    add1, add = result["addition"]["alpha_1"], result["addition"]["alpha_searched"]
    header = ["task", "zero-shot", "fine-tuned", "merged a=1", f"merged a={add['alpha']:g}", "normalized"]
    names = result["tasks"]
    rows = [[name, _pct(result["zero_shot"][name]), _pct(result["finetuned"][name]), _pct(add1["accuracy"][name]),
             _pct(add["accuracy"][name]), _pct(add["normalized"][name])] for name in names]
    rows.append(["mean", _pct(sum(result["zero_shot"][n] for n in names) / len(names)),
                 _pct(sum(result["finetuned"][n] for n in names) / len(names)),
                 _pct(add1["mean_accuracy"]), _pct(add["mean_accuracy"]), _pct(add["mean_normalized"])])
    return header, rows


def negation_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Negation table: target and control accuracy before and after subtracting the target's vector."""
    control = result["control_task"]
    header = ["negated task", "alpha", "target", "control"]
    rows = []
    for name, runs in result["negation"].items():
        for run in (runs["alpha_1"], runs["alpha_searched"]):
            rows.append([name, f"{run['alpha']:g}", f"{_pct(result['zero_shot'][name])} -> {_pct(run['target'])}",
                         f"{_pct(result['zero_shot'][control])} -> {_pct(run['control'])}"])
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rich_table(header: list[str], rows: list[list[str]], title: str = "") -> Table:
    table = Table(title=title or None)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
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
        f"control >= 95% of the pre-trained model's on validation.\n\n"
        + markdown_table(*negation_rows(result))
        + "\n"
    )
