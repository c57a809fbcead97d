"""What AdaMerging costs through the network and on the linear shortcut, and what it gains over other merges.

On the embedded all-MiniLM-L6-v2 (max length 32) with three built-in tasks, each fine-tuned briefly in
standard and in linear mode (``--ft-steps``, cached under benchmarks/.peers/adamerging-cost), AdaMerging
runs task-wise and layer-wise on the first ``--unlabeled`` test inputs of each task (transductive, as the
paper) for ``--steps`` steps with the paper's other hyper-parameters:

* standard vectors: through the network (``functional_call`` on the merged weights, backpropagated);
* linear vectors: through f_lin (one JVP per batch, backpropagated) and on the shortcut (the pooled
  f(x; theta0) and every restricted tangent J tau_t|g cached once, then no network pass at all).

Per run: wall seconds (the shortcut's caching apart), encoder passes (forwards or JVPs of one batch), the
backward passes, the peak resident memory above the run's start (sampled every 10 ms), and the
coefficients. The 500-step figures are extrapolated from the measured per-step time (marked so). Then the
test accuracy (first ``--eval-limit`` examples), normalized by each vector's own, of AdaMerging's merge
beside task arithmetic (lambda 0.3, the value AdaMerging's paper uses for it), TIES and TSV-M (their
defaults) for both modes.

    python benchmarks/adamerging_cost.py     # -> benchmarks/results/adamerging_cost.json (~15 min on 2 shared cores)
"""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from environment import write_results

from taskarith.data import Examples, load_task
from taskarith.evaluate import accuracy, mean, normalized_accuracy
from taskarith.finetune import FinetuneConfig, finetune_cached
from taskarith.merging.adamerging import AdaMergingConfig, adamerge_tasks
from taskarith.merging.methods import merge_task_vectors
from taskarith.models import load_pretrained

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "adamerging_cost.json"
CACHE = HERE / ".peers" / "adamerging-cost"
TASKS = ("rt_sentiment", "wordnet_topic", "fortune_language")
FORMAT = "taskarith.benchmark.adamerging_cost/1"


class PeakRSS:
    """The largest resident set size of this process while the block runs, above its value at the start."""

    def __init__(self) -> None:
        self.peak = self.start = self._rss()
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="AdaMerging steps measured (the paper: 500)")
    parser.add_argument("--unlabeled", type=int, default=32, help="test inputs per task learned on")
    parser.add_argument("--ft-steps", type=int, default=30)
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--granularities", default="taskwise,layerwise", help="comma-separated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    pretrained = load_pretrained(max_length=32, device="cpu")
    tasks = [load_task(name) for name in TASKS]
    vectors: dict[str, list] = {}
    for mode in ("standard", "linear"):
        vectors[mode] = []
        for task in tasks:
            config = FinetuneConfig(task=task.name, mode=mode, steps=args.ft_steps, batch_size=16, max_length=32)
            vectors[mode].append(finetune_cached(config, pretrained, task, CACHE, progress=False).task_vector)

    # Evaluated on the first --eval-limit test examples; learned on the first --unlabeled of them.
    limited = [
        replace(task, test=Examples(task.test.inputs[: args.eval_limit], task.test.labels[: args.eval_limit]))
        for task in tasks
    ]
    runs: dict[str, Any] = {}
    merged: dict[str, dict[str, Any]] = {"standard": {}, "linear": {}}
    granularities = args.granularities.split(",")
    for granularity in granularities:
        for mode, shortcut in (("standard", False), ("linear", False), ("linear", True)):
            config = AdaMergingConfig(granularity=granularity, steps=args.steps, shortcut=shortcut)
            with PeakRSS() as memory:
                result = adamerge_tasks(vectors[mode], pretrained, limited, "test", config, limit=args.unlabeled)
            per_step = result.optimize_seconds / max(1, args.steps)
            runs[f"{granularity}/{result.path}"] = {
                "mode": mode,
                "granularity": granularity,
                "path": result.path,
                "groups": len(result.groups),
                "seconds": result.seconds,
                "cache_seconds": result.cache_seconds,
                "seconds_per_step": per_step,
                "optimize_seconds": result.optimize_seconds,
                "seconds_500_steps_extrapolated": result.seconds - result.optimize_seconds + 500 * per_step,
                "forward_passes": result.forward_passes,
                "backward_passes": result.backward_passes,
                "examples_through_network": result.examples_through_network,
                "peak_rss_above_start_mib": memory.mib,
                "final_entropy": result.history[-1],
                "coefficients": result.record()["coefficients"],
            }
            print(
                f"{granularity:9s} {result.path:8s} {result.seconds:7.1f} s  {result.forward_passes} passes", flush=True
            )
            if result.path != "f_lin":
                merged[mode][f"adamerging_{granularity}"] = result.vector
        fl, sc = runs[f"{granularity}/f_lin"], runs[f"{granularity}/shortcut"]
        runs[f"{granularity}/agreement"] = {
            "max_coefficient_difference_shortcut_vs_f_lin": max(
                abs(a - b)
                for name in fl["coefficients"]
                for a, b in zip(fl["coefficients"][name], sc["coefficients"][name], strict=True)
            ),
            "speedup_measured": fl["seconds"] / sc["seconds"],
            "speedup_500_steps_extrapolated": fl["seconds_500_steps_extrapolated"]
            / sc["seconds_500_steps_extrapolated"],
        }

    accuracy_rows: dict[str, Any] = {}
    for mode in ("standard", "linear"):
        own = {
            t.name: accuracy(pretrained, t, "test", tau.apply_to(pretrained.encoder))
            for t, tau in zip(limited, vectors[mode], strict=True)
        }
        candidates = {
            "task_arithmetic_0.3": merge_task_vectors(vectors[mode], "task_arithmetic", scaling=0.3),
            "ties": merge_task_vectors(vectors[mode], "ties"),
            "tsv": merge_task_vectors(vectors[mode], "tsv"),
            **merged[mode],
        }
        accuracy_rows[mode] = {"finetuned": own}
        for name, vector in candidates.items():
            encoder = vector.apply_to(pretrained.encoder)
            scores = {t.name: accuracy(pretrained, t, "test", encoder) for t in limited}
            accuracy_rows[mode][name] = {
                "accuracy": scores,
                "mean_normalized": mean(normalized_accuracy(scores, own).values()),
            }
            print(f"{mode:8s} {name:22s} {accuracy_rows[mode][name]['mean_normalized']:.3f}")

    settings = {
        "model": pretrained.name,
        "max_length": 32,
        "tasks": list(TASKS),
        "unlabeled_test_inputs_per_task": args.unlabeled,
        "steps_measured": args.steps,
        "granularities": granularities,
        "finetune_steps": args.ft_steps,
        "transductive": True,
        "eval_test_examples_per_task": args.eval_limit,
    }
    write_results(args.out, FORMAT, __doc__.split("\n\n")[0], settings, runs=runs, accuracy=accuracy_rows)


if __name__ == "__main__":
    main()
