"""One FusionBench merge, run by benchmarks/merge_vs_peers.py inside FusionBench's own virtualenv.

FusionBench has no "merge these folders" command line for arbitrary Hugging Face checkpoints, so this is
the shortest faithful use of its Python API: a BaseModelPool whose entries are instantiation configs
(FusionBench loads each model when its algorithm asks for it, as with its own YAML model pools), the
library's TaskArithmeticAlgorithm or TiesMergingAlgorithm, then save_pretrained of the merged model as
safetensors. Runs with the interpreter of FusionBench's venv only; imports nothing from taskarith.

Prints one line ``PHASES {json}`` with the seconds spent importing, merging (which includes loading the
models: FusionBench interleaves the two) and saving, so the benchmark can tell them apart.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

_START = time.perf_counter()

import torch  # noqa: E402 (after _START: the import is timed)
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm  # noqa: E402 (after _START: the import is timed)
from fusion_bench.modelpool import BaseModelPool  # noqa: E402 (after _START: the import is timed)

# Which transformers auto-class rebuilds each checkpoint set's models (a BertModel has no LM head).
AUTO_CLASSES = {
    "causal-lm": "transformers.AutoModelForCausalLM.from_pretrained",
    "base": "transformers.AutoModel.from_pretrained",
}


def _model_config(path: str, kind: str) -> dict[str, Any]:
    return {"_target_": AUTO_CLASSES[kind], "pretrained_model_name_or_path": path}


def _algorithm(method: str, scaling: float, density: float) -> Any:
    if method == "task_arithmetic":
        return TaskArithmeticAlgorithm(scaling_factor=scaling)
    if method == "ties":
        # threshold is the fraction of entries KEPT (values > 1 are read as percentages); "mean" is the
        # TIES paper's disjoint mean (FusionBench's shipped config defaults to "sum").
        return TiesMergingAlgorithm(scaling_factor=scaling, threshold=density, remove_keys=[], merge_func="mean")
    raise SystemExit(f"unknown method {method!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=["task_arithmetic", "ties"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--model", action="append", required=True, help="fine-tuned model folder (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--kind", default="causal-lm", choices=sorted(AUTO_CLASSES))
    parser.add_argument("--scaling", type=float, default=1.0)
    parser.add_argument("--density", type=float, default=0.2)
    args = parser.parse_args()
    imported = time.perf_counter()

    models = {"_pretrained_": _model_config(args.base, args.kind)}
    models.update({f"ft{i}": _model_config(path, args.kind) for i, path in enumerate(args.model)})
    with torch.no_grad():
        merged = _algorithm(args.method, args.scaling, args.density).run(BaseModelPool(models))
    done = time.perf_counter()
    merged.save_pretrained(args.out, safe_serialization=True)
    saved = time.perf_counter()
    print("PHASES " + json.dumps({"import_s": imported - _START, "merge_s": done - imported, "save_s": saved - done}))


if __name__ == "__main__":
    main()
