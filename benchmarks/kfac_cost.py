"""What dataless K-FAC costs on the embedded encoder: time to compute a task's factors, their size per
layer, the merged size for several tasks, and the time of one penalty evaluation (with its gradient).

    python benchmarks/kfac_cost.py          # -> benchmarks/results/kfac_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from environment import environment

from taskarith.data import load_task
from taskarith.io import write_json
from taskarith.kfac import compute_kfac_factors, kfac_penalty, merge_factors
from taskarith.models import load_pretrained

RESULTS = Path(__file__).parent / "results"
TASKS = ("wordnet_topic", "fortune_language", "rt_subjectivity")


def _layer_kind(name: str) -> str:
    """Groups per-layer sizes: 'encoder.layer.3.attention.self.query' -> 'attention.self.query'."""
    parts = name.split(".")
    if parts[:2] == ["encoder", "layer"] and len(parts) > 3:
        return ".".join(parts[3:])
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "kfac_cost.json")
    args = parser.parse_args()

    pretrained = load_pretrained(args.model, device=args.device)
    factors, seconds = [], {}
    for name in TASKS:
        started = time.perf_counter()
        factors.append(compute_kfac_factors(pretrained, load_task(name), num_examples=args.num_examples, progress=False))
        seconds[name] = round(time.perf_counter() - started, 3)
        print(name, seconds[name], "s", flush=True)
    merged = merge_factors(factors)

    per_kind: dict[str, list[int]] = defaultdict(list)
    for layer, size in factors[0].memory_bytes().items():
        per_kind[_layer_kind(layer)].append(size)
    delta = {name: (torch.randn_like(p) * 1e-4).requires_grad_(True) for name, p in pretrained.encoder.named_parameters()}
    timings = []
    for _ in range(6):
        started = time.perf_counter()
        kfac_penalty(delta, merged).backward()
        timings.append(time.perf_counter() - started)
    result = {
        "model": pretrained.name,
        "examples_per_task": args.num_examples,
        "factor_seconds": seconds,
        "mib_per_layer": {kind: round(max(sizes) / 2**20, 3) for kind, sizes in sorted(per_kind.items())},
        "mib_one_task": {name: round(sum(f.memory_bytes().values()) / 2**20, 1) for name, f in zip(TASKS, factors)},
        "mib_merged": round(sum(merged.memory_bytes().values()) / 2**20, 1),
        "merged_tasks": list(merged.tasks),
        "penalty_with_gradient_s": round(statistics.median(timings[1:]), 4),
        **environment(pretrained.device),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
