"""One FusionBench RegMean or Fisher merge from given statistics, run by benchmarks/merge_stats_vs_fusionbench.py
inside FusionBench's own virtualenv (imports nothing from taskarith).

FusionBench computes its statistics inside its algorithms, from a dataset and a model pool; to compare the
merges themselves on the same statistics, this calls the library's merge functions directly
(``merging_with_regmean_weights``, ``merging_with_fisher_weights``) with statistics read from taskarith's files:
Gram matrices divided by their token counts (FusionBench keeps a running mean over tokens), Fishers as they
are. Models are loaded with transformers' AutoModel, the merged parameters loaded into the pre-trained model
(as FusionBench's own ``run`` does) and saved as safetensors.

Prints one line ``PHASES {json}`` with the seconds spent importing, loading, merging and saving.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

_START = time.perf_counter()

import torch  # noqa: E402 (after _START: the import is timed)
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights  # noqa: E402 (timed)
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights  # noqa: E402 (timed)
from safetensors import safe_open  # noqa: E402 (timed)
from transformers import AutoModel  # noqa: E402 (timed)


def read_statistics(path: str, table: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as fh:
        metadata = fh.metadata()
        tokens = json.loads(metadata.get("tokens", "{}"))
        out = {}
        for key in fh.keys():
            kind, _, name = key.partition("/")
            if kind != table:
                continue
            value = fh.get_tensor(key)
            if table == "gram":  # FusionBench's statistic: the mean over tokens, keyed by module name
                out[name[: -len(".weight")]] = value / tokens[name]
            else:
                out[name] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, choices=["regmean", "fisher"])
    parser.add_argument("--base", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--statistics", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--alpha", type=float, default=0.95)
    parser.add_argument("--epsilon", type=float, default=1e-6)
    parser.add_argument("--normalize", type=int, default=0)
    args = parser.parse_args()
    imported = time.perf_counter()
    models = [AutoModel.from_pretrained(path) for path in args.model]
    params: dict[str, list[torch.Tensor]] = defaultdict(list)
    for model in models:
        for name, value in model.named_parameters():
            params[name].append(value.detach())
    table = "gram" if args.method == "regmean" else "fisher"
    stats = [read_statistics(path, table) for path in args.statistics]
    loaded = time.perf_counter()
    with torch.no_grad():
        if args.method == "regmean":
            merged = merging_with_regmean_weights(params, stats, reduce_non_diagonal_ratio=args.alpha)
        else:
            merged = merging_with_fisher_weights(
                params,
                stats,
                fisher_scaling_coefficients=torch.ones(len(models)) / len(models),
                normalize_fisher_weight=bool(args.normalize),
                minimal_fisher_weight=args.epsilon,
            )
    done = time.perf_counter()
    base = AutoModel.from_pretrained(args.base)
    base.load_state_dict(merged, strict=False)
    base.save_pretrained(args.out, safe_serialization=True)
    saved = time.perf_counter()
    phases = {"import_s": imported - _START, "load_s": loaded - imported, "merge_s": done - loaded}
    print("PHASES " + json.dumps({**phases, "save_s": saved - done}))


if __name__ == "__main__":
    main()
