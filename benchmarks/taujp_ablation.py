"""Ablation of the published tau-Jp: squared vs unsquared penalty, strict vs cyclical sampling, the control
task in or out of the regularization set, each at a lambda chosen on validation by the one-shot criterion.

Every variant runs the bench protocol (`taskarith.experiments.bench.run_bench`) on one suite at quick size,
beside plain linear fine-tuning, from one cache folder, so the plain vectors are trained once.

    python benchmarks/taujp_ablation.py            # -> benchmarks/results/taujp_ablation.json (+ .md)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from environment import machine

from taskarith.data import load_task
from taskarith.experiments.bench import PROFILES, run_bench
from taskarith.io import write_json, write_text
from taskarith.models import load_pretrained
from taskarith.report import markdown_table

RESULTS = Path(__file__).parent / "results"
GRID = (0.1, 1.0, 10.0)

# name -> (method, profile overrides); the first is the published form.
VARIANTS: dict[str, tuple[str, dict]] = {
    "published (unsquared, strict, control in)": ("linear_taujp", {}),
    "squared": ("linear_taujp_sq", {}),
    "cyclical": ("linear_taujp", {"reg_sampling": "cyclical"}),
    "control out": ("linear_taujp", {"reg_control": False}),
}


def _pct(spread: dict) -> str:
    return f"{100 * spread['mean']:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="text", choices=("text", "vision"))
    parser.add_argument("--cache", type=Path, default=Path("results/taujp-ablation-cache"))
    parser.add_argument("--out", type=Path, default=RESULTS / "taujp_ablation.json")
    args = parser.parse_args()

    base = PROFILES[(args.suite, "quick")]
    pretrained = load_pretrained(base.model)
    tasks = [load_task(name) for name in base.tasks]
    control = load_task(base.control)
    started = time.perf_counter()
    runs = {}
    for name, (method, overrides) in VARIANTS.items():
        profile = replace(
            base,
            methods=("linear", method),
            incremental_methods=(),
            xi_grid=(0.0,),
            reg_strengths={"taujp": GRID, "taujp_sq": GRID},
            **overrides,
        )
        begun = time.perf_counter()
        result = run_bench(
            pretrained,
            tasks,
            control,
            profile,
            args.cache,
            on_stage=lambda stage, name=name: print(f"[{name}] {stage}", flush=True),
        )
        summary = result["summary"]
        runs[name] = {
            "method": method,
            "overrides": overrides,
            "lambda": result["reg_strength_selection"][method],
            "summary": {m: summary[m] for m in ("linear", method)},
            "zero_shot": result["zero_shot"],
            "seconds": round(time.perf_counter() - begun, 1),
        }
    rows = []
    for name, run in runs.items():
        s = run["summary"][run["method"]]
        rows.append(
            [
                name,
                f"{run['lambda']['chosen']:g}",
                _pct(s["finetuned_mean"]),
                _pct(s["addition_alpha_1_normalized"]),
                _pct(s["addition_alpha_searched_normalized"]),
                _pct(s["negation_alpha_searched_target"]),
                _pct(s["negation_alpha_searched_control"]),
                _pct(s["negation_alpha_1_target"]),
                _pct(s["negation_alpha_1_control"]),
            ]
        )
    plain = next(iter(runs.values()))["summary"]["linear"]
    rows.append(
        [
            "linear (no penalty)",
            "-",
            _pct(plain["finetuned_mean"]),
            _pct(plain["addition_alpha_1_normalized"]),
            _pct(plain["addition_alpha_searched_normalized"]),
            _pct(plain["negation_alpha_searched_target"]),
            _pct(plain["negation_alpha_searched_control"]),
            _pct(plain["negation_alpha_1_target"]),
            _pct(plain["negation_alpha_1_control"]),
        ]
    )
    header = [
        "variant",
        "lambda",
        "fine-tuned",
        "add norm a=1",
        "add norm a*",
        "neg target a*",
        "neg control a*",
        "neg target a=1",
        "neg control a=1",
    ]
    table = markdown_table(header, rows)
    result = {
        "suite": args.suite,
        "profile": base.tasks,
        "control": base.control,
        "grid": GRID,
        "runs": runs,
        "table": table,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": machine(),
    }
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), f"# tau-Jp ablation ({args.suite} suite, quick profile)\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
