"""The linear-alpha shortcut: an alpha grid for linear-mode task vectors, searched directly and by the shortcut.

For linear-mode vectors the pooled output under pre + sum_t alpha tau_t is f(x; theta0) + alpha sum_t J(x) tau_t,
so one JVP per (vector, task) serves every grid point; the direct way runs one JVP per grid point per task.
Both search the same grid on the same validation inputs; the script records wall time, encoder passes and
the largest difference between the two accuracy curves.

    python benchmarks/alpha_search.py        # -> benchmarks/results/alpha_search.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from environment import environment

from taskarith.data import load_task
from taskarith.evaluate import EditedOutputs, mean
from taskarith.finetune import FinetuneConfig, finetune_cached
from taskarith.io import write_json
from taskarith.models import load_pretrained

RESULTS = Path(__file__).parent / "results"
TASKS = ("rt_sentiment", "wordnet_topic", "fortune_language")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid-points", type=int, default=10)
    parser.add_argument("--examples", type=int, default=300, help="Validation inputs per task.")
    parser.add_argument("--steps", type=int, default=10, help="Fine-tuning steps per task vector.")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--out", type=Path, default=RESULTS / "alpha_search.json")
    args = parser.parse_args()

    pretrained = load_pretrained(args.model, device="auto")
    tasks = [load_task(name) for name in TASKS]
    with tempfile.TemporaryDirectory() as scratch:
        vectors = {
            t.name: finetune_cached(
                FinetuneConfig(task=t.name, mode="linear", steps=args.steps, checkpoint_every=0),
                pretrained,
                t,
                scratch,
                progress=False,
            ).task_vector
            for t in tasks
        }
    grid = [round(0.2 * (i + 1), 2) for i in range(args.grid_points)]
    result: dict = {}
    curves = {}
    for label, shortcut in (("direct", False), ("shortcut", True)):
        outputs = EditedOutputs(pretrained, vectors, shortcut=shortcut)
        outputs.pooled(tasks[0], "val", (), args.examples)  # both start from f(x; theta0) of one task, warm caches
        started = time.perf_counter()
        curves[label] = {
            a: mean(outputs.accuracy(t, "val", tuple((n, a) for n in vectors), args.examples) for t in tasks)
            for a in grid
        }
        seconds = time.perf_counter() - started
        result[label] = {
            "seconds": round(seconds, 2),
            "encoder_passes": outputs.passes,
            "chosen_alpha": max(grid, key=lambda a: curves[label][a]),
        }
        print(label, result[label], flush=True)
    result.update(
        {
            "speedup": round(result["direct"]["seconds"] / result["shortcut"]["seconds"], 2),
            "max_abs_accuracy_difference": max(abs(curves["direct"][a] - curves["shortcut"][a]) for a in grid),
            "grid": grid,
            "tasks": list(TASKS),
            "examples_per_task": args.examples,
            "model": pretrained.name,
            **environment(pretrained.device),
        }
    )
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
