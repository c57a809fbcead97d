"""What TAK's dataless K-FAC costs on the embedded encoder, and what compressing its factors changes.

Cost: the time to compute a task's factors with TAK's defaults (128 examples, one Monte-Carlo direction),
their size (per layer kind; per file, full and compressed: block-8 and a rank-64 eigendecomposition), and
the time of one penalty evaluation with its gradient on the merged factors the fine-tuning loop builds.
Scale: the penalty of a typical task vector (rt_sentiment's, plain linear fine-tuning) under the published
form and under taskarith's form before it (unnormalized embedding, KFAC-reduce, diagonal LayerNorm
blocks, both factors averaged when merging, no scalers), with the steps in between.
Accuracy: rt_sentiment fine-tuned in linear mode with the kfac regularizer against wordnet_topic's and
rt_subjectivity's factor files, full and compressed, next to no regularizer: normalized accuracy at
alpha = 1 of the sum with those tasks' own (plain linear) vectors, and the protected tasks' accuracy
change when rt_sentiment's vector alone is added.

    python benchmarks/kfac_cost.py          # -> benchmarks/results/kfac_cost.json (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from environment import environment

from taskarith.data import load_task
from taskarith.evaluate import accuracy, edited_encoder, mean, normalized_accuracy
from taskarith.finetune import FinetuneConfig, finetune
from taskarith.io import write_json
from taskarith.kfac import KFACFactors, compress_factors, compute_kfac_factors, kfac_penalty, merge_factors
from taskarith.models import load_pretrained

RESULTS = Path(__file__).parent / "results"
TASK = "rt_sentiment"
PROTECTED = ("wordnet_topic", "rt_subjectivity")
COMPRESSIONS = {"full": None, "block-8": ("block", {"blocks": 8}), "eigen-64": ("eigen", {"rank": 64})}
LEGACY = dict(function="unnormalized", tokens="reduce", norm_blocks="diagonal")
PLAIN = dict(norm_scale=1.0, projection_scale=1.0)


def _layer_kind(name: str) -> str:
    """Groups per-layer sizes: 'encoder.layer.3.attention.self.query' -> 'attention.self.query'."""
    parts = name.split(".")
    if parts[:2] == ["encoder", "layer"] and len(parts) > 3:
        return ".".join(parts[3:])
    return name


def _mib(factors: KFACFactors) -> float:
    return round(sum(factors.memory_bytes().values()) / 2**20, 2)


def _penalty_seconds(delta: dict[str, torch.Tensor], factors: KFACFactors, repeats: int = 6) -> float:
    timings = []
    for _ in range(repeats):
        leaves = {name: value.detach().clone().requires_grad_(True) for name, value in delta.items()}
        started = time.perf_counter()
        kfac_penalty(leaves, factors).backward()
        timings.append(time.perf_counter() - started)
    return round(statistics.median(timings[1:]), 4)


def _on(vector, pretrained) -> dict[str, torch.Tensor]:
    return {name: value.to(pretrained.device) for name, value in vector.deltas.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--reg-strength", type=float, default=500.0, help="beta (TAK's published 500 by default)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "kfac_cost.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    started_all = time.perf_counter()

    pretrained = load_pretrained(args.model, device=args.device)
    tasks = {name: load_task(name) for name in (TASK, *PROTECTED)}
    scratch = Path(tempfile.mkdtemp(prefix="kfac_cost-"))

    # -- factors: the data owners' side ------------------------------------------------------------
    seconds, files, legacy = {}, {variant: [] for variant in COMPRESSIONS}, []
    sizes_mib: dict[str, dict[str, float]] = {variant: {} for variant in COMPRESSIONS}
    for name in PROTECTED:
        started = time.perf_counter()
        factors = compute_kfac_factors(pretrained, tasks[name], num_examples=args.num_examples, progress=False)
        seconds[name] = round(time.perf_counter() - started, 3)
        legacy.append(
            compute_kfac_factors(pretrained, tasks[name], num_examples=args.num_examples, progress=False, **LEGACY)
        )
        for variant, compression in COMPRESSIONS.items():
            shipped = factors if compression is None else compress_factors(factors, compression[0], **compression[1])
            path = scratch / f"{name}-{variant}.safetensors"
            shipped.save(path)
            files[variant].append(path)
            sizes_mib[variant][name] = round(path.stat().st_size / 2**20, 2)
        print(name, seconds[name], "s", sizes_mib["full"][name], "MiB", flush=True)
        if name == PROTECTED[0]:
            per_kind: dict[str, list[int]] = defaultdict(list)
            for layer, size in factors.memory_bytes().items():
                per_kind[_layer_kind(layer)].append(size)
    # What the fine-tuning loop holds: the merged factors of the files it is given.
    merged = {variant: merge_factors([KFACFactors.load(path) for path in paths]) for variant, paths in files.items()}

    # -- plain linear vectors: the sum's other members, the normalizers and a typical delta ---------------
    def tune(task: str, **settings) -> object:
        config = FinetuneConfig(
            task=task,
            model=pretrained.name,
            mode="linear",
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            **settings,
        )
        started = time.perf_counter()
        result = finetune(config, pretrained, tasks[task], progress=False)
        print(
            "fine-tuned",
            task,
            settings.get("reg_factors", ["plain"])[0],
            round(time.perf_counter() - started, 1),
            "s",
            flush=True,
        )
        return result.task_vector

    plain = {name: tune(name) for name in tasks}
    delta = _on(plain[TASK], pretrained)
    full, old = merged["full"], merge_factors(legacy, rule="average")
    penalty = {
        "published": kfac_penalty(delta, full).item(),
        "published_without_scalers": kfac_penalty(delta, full, **PLAIN).item(),
        "published_factors_average_merge": kfac_penalty(
            delta, merge_factors([KFACFactors.load(p) for p in files["full"]], rule="average"), **PLAIN
        ).item(),
        "before_tak": kfac_penalty(delta, old, **PLAIN).item(),
    }
    penalty = {key: float(f"{value:.4g}") for key, value in penalty.items()}
    penalty["published_over_before"] = round(penalty["published"] / penalty["before_tak"], 3)
    print("penalty of the plain", TASK, "vector:", penalty, flush=True)

    # -- accuracy: the regularized vector, full vs compressed factors --------------------------------
    vectors = {"none": plain[TASK]}
    for variant, paths in files.items():
        vectors[variant] = tune(
            TASK, regularizer="kfac", reg_strength=args.reg_strength, reg_factors=tuple(str(p) for p in paths)
        )
    zero_shot = {name: accuracy(pretrained, task) for name, task in tasks.items()}
    single = {
        name: accuracy(pretrained, tasks[name], encoder=edited_encoder(pretrained, [plain[name]])) for name in tasks
    }
    accuracy_rows = {}
    for variant, vector in vectors.items():
        alone = edited_encoder(pretrained, [vector])
        summed = edited_encoder(pretrained, [vector, *(plain[name] for name in PROTECTED)])
        sum_acc = {name: accuracy(pretrained, task, encoder=summed) for name, task in tasks.items()}
        alone_acc = {name: accuracy(pretrained, tasks[name], encoder=alone) for name in PROTECTED}
        accuracy_rows[variant] = {
            "normalized_accuracy_of_sum_alpha1": round(mean(normalized_accuracy(sum_acc, single).values()), 4),
            "sum_accuracy": {k: round(v, 4) for k, v in sum_acc.items()},
            "protected_accuracy_change_alone": {
                name: round(alone_acc[name] - zero_shot[name], 4) for name in PROTECTED
            },
            # The published penalty (full factors) of the vector trained: what the regularizer held down.
            "penalty_full_factors": float(f"{kfac_penalty(_on(vector, pretrained), full).item():.4g}"),
        }
        print(variant, accuracy_rows[variant], flush=True)

    result = {
        "model": pretrained.name,
        "examples_per_task": args.num_examples,
        "recipe": {
            "function": full.function,
            "tokens": full.tokens,
            "norm_blocks": full.norm_blocks,
            "merge": full.merge,
            "directions": full.directions,
        },
        "factor_seconds": seconds,
        "mib_per_layer_full": {kind: round(max(sizes) / 2**20, 3) for kind, sizes in sorted(per_kind.items())},
        "file_mib": sizes_mib,
        "merged_mib": {variant: _mib(factors) for variant, factors in merged.items()},
        "merged_tasks": list(full.tasks),
        "penalty_with_gradient_s": {variant: _penalty_seconds(delta, factors) for variant, factors in merged.items()},
        "penalty_of_plain_vector": penalty,
        "finetune": {
            "task": TASK,
            "mode": "linear",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "reg_strength": args.reg_strength,
            "protected": list(PROTECTED),
        },
        "zero_shot_accuracy": {k: round(v, 4) for k, v in zero_shot.items()},
        "single_task_accuracy": {k: round(v, 4) for k, v in single.items()},
        "by_factors": accuracy_rows,
        "total_seconds": round(time.perf_counter() - started_all, 1),
        **environment(pretrained.device),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
