"""What the linear AdaMerging shortcut's cache costs with one JVP per layer group and with chunked JVPs.

Layer-wise, the shortcut caches J(x) tau_t|g for every parameter tensor g, task t and unlabeled input.
taskarith vmaps the JVPs of up to 16 consecutive groups (and the T tasks) in one call, so they share the
primal pass; with the chunk budget set to one element every group gets its own call, as before the change.
Both ways are timed on the same inputs (the first ``--inputs`` test inputs of one task, one batch), the
first ``--groups`` parameter tensors of each embedded model and two random linear vectors, in the same
process, alternating ``--repeats`` times, with the peak resident memory above each call's start; the
cached tangents of both ways are compared.

    python benchmarks/adamerging_cache.py     # -> benchmarks/results/adamerging_cache.json (~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from adamerging_cost import PeakRSS
from environment import write_results

from taskarith.data import load_task
from taskarith.merging import adamerging as adamerging_module
from taskarith.merging.adamerging import _group_chunks, _pooled_cache
from taskarith.models import load_pretrained

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "adamerging_cache.json"
FORMAT = "taskarith.benchmark.adamerging_cache/1"
MODELS = (("all-MiniLM-L6-v2", "rt_sentiment"), ("efficientnet-lite0", "fashion_mnist"))


def measure(model: str, task_name: str, groups_wanted: int, inputs_wanted: int, repeats: int) -> dict:
    pretrained = load_pretrained(model, device="cpu", max_length=32)
    inputs = load_task(task_name).test.inputs[:inputs_wanted]
    theta0 = dict(pretrained.encoder.named_parameters())
    names = list(theta0)[:groups_wanted]
    generator = torch.Generator().manual_seed(0)
    taus = {n: 0.01 * torch.randn(2, *theta0[n].shape, generator=generator) for n in names}
    groups = [(n,) for n in names]
    budget = adamerging_module._CHUNK_ELEMENTS
    seconds: dict[str, list[float]] = {"per_group": [], "chunked": []}
    peak_mib: dict[str, float] = {"per_group": 0.0, "chunked": 0.0}
    calls: dict[str, int] = {}
    cached: dict[str, torch.Tensor] = {}
    for _ in range(repeats):
        for way, elements in (("per_group", 1), ("chunked", budget)):
            adamerging_module._CHUNK_ELEMENTS = elements
            try:
                started = time.perf_counter()
                with PeakRSS() as peak:
                    _, tangents, calls[way] = _pooled_cache(pretrained, inputs, theta0, taus, groups, len(inputs))
                seconds[way].append(time.perf_counter() - started)
                peak_mib[way] = max(peak_mib[way], round(peak.mib, 1))
            finally:
                adamerging_module._CHUNK_ELEMENTS = budget
            cached[way] = tangents
    chunks = _group_chunks(groups, {n: theta0[n].numel() for n in names}, 2, len(inputs))
    row = {
        "model": pretrained.name,
        "task": task_name,
        "groups": len(groups),
        "parameters_in_groups": sum(theta0[n].numel() for n in names),
        "inputs": len(inputs),
        "tasks": 2,
        "chunks": len(chunks),
        "calls": calls,
        "seconds": {way: [round(s, 2) for s in values] for way, values in seconds.items()},
        "median_seconds": {way: round(statistics.median(values), 2) for way, values in seconds.items()},
        "peak_rss_above_start_mib": peak_mib,
        "speedup": round(statistics.median(seconds["per_group"]) / statistics.median(seconds["chunked"]), 2),
        "max_abs_difference": float((cached["per_group"] - cached["chunked"]).abs().max()),
        "max_abs_tangent": float(cached["per_group"].abs().max()),
    }
    print(
        f"{pretrained.name}: {len(groups)} groups, per group {row['median_seconds']['per_group']} s, "
        f"chunked {row['median_seconds']['chunked']} s ({row['speedup']}x), difference {row['max_abs_difference']:.2g}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=32, help="first parameter tensors of each model")
    parser.add_argument("--inputs", type=int, default=32, help="test inputs (one batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(model, task, args.groups, args.inputs, args.repeats) for model, task in MODELS]
    settings = {"groups": args.groups, "inputs": args.inputs, "repeats": args.repeats, "max_length": 32}
    write_results(args.out, FORMAT, __doc__.split("\n\n")[0], settings, runs=rows)


if __name__ == "__main__":
    main()
