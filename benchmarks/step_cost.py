"""Step time and peak memory of each fine-tuning variant on the embedded encoder, in one run.

Each variant runs the library's own fine-tuning loop (nothing re-implemented here) for a few steps
on a real built-in task; the figure is the median step time. Peak memory is the process's peak
resident set size during that variant (reset before it via /proc/self/clear_refs) on CPU, and the
CUDA allocator's peak on a GPU.

    python benchmarks/step_cost.py                      # all variants -> results/step_cost.json
    python benchmarks/step_cost.py --variants standard --out benchmarks/results/finetune_step.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from environment import machine

from taskarith.data import load_task
from taskarith.finetune import FinetuneConfig, finetune
from taskarith.io import write_json
from taskarith.models import load_pretrained

RESULTS = Path(__file__).parent / "results"
TASK, OTHER = "rt_sentiment", "wordnet_topic"

VARIANTS: dict[str, dict] = {
    "standard": {"mode": "standard"},
    "linear": {"mode": "linear"},
    "standard_taujp": {"mode": "standard", "regularizer": "taujp", "reg_strength": 1.0, "reg_tasks": (OTHER,)},
    "linear_taujp": {"mode": "linear", "regularizer": "taujp", "reg_strength": 1.0, "reg_tasks": (OTHER,)},
    "linear_kfac": {"mode": "linear", "regularizer": "kfac", "reg_strength": 1.0},
    # The penalty's cost grows with its batch; the default above is a quarter of the task batch.
    "linear_taujp_full_batch": {"mode": "linear", "regularizer": "taujp", "reg_strength": 1.0, "reg_tasks": (OTHER,),
                                "reg_batch_size": "batch"},
}


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets the kernel's peak-RSS counter (VmHWM)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reg_batch(name: str, batch_size: int) -> int:
    size = VARIANTS[name].get("reg_batch_size", FinetuneConfig.reg_batch_size)
    return batch_size if size == "batch" else size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="Encoder; a folder of the same architecture times the same.")
    parser.add_argument("--note", default="", help="Recorded as is, e.g. how the model differs from the embedded one.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cost.json")
    args = parser.parse_args()

    pretrained = load_pretrained(args.model, device=args.device)
    task = load_task(TASK)
    on_gpu = pretrained.device.type == "cuda"
    result: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        factors_file = Path(scratch) / "kfac.safetensors"
        if "linear_kfac" in args.variants:
            from taskarith.kfac import compute_kfac_factors

            compute_kfac_factors(pretrained, load_task(OTHER), num_examples=256).save(factors_file)
        for name in args.variants:
            settings = dict(VARIANTS[name])
            if settings.get("reg_batch_size") == "batch":
                settings["reg_batch_size"] = args.batch_size
            if settings.get("regularizer") == "kfac":
                settings["reg_factors"] = (str(factors_file),)
            config = FinetuneConfig(task=task.name, model=args.model, steps=args.steps, batch_size=args.batch_size,
                                    checkpoint_every=0, **settings)
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()
            record = finetune(config, pretrained, task, progress=False).record
            peak_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else _peak_rss_mb()
            result[name] = {"step_s": record["step_seconds_median"], "peak_mb": round(peak_mb, 1)}
            print(name, result[name], flush=True)
    for name, reference in (("linear", "standard"), ("linear_taujp", "linear"), ("standard_taujp", "standard"), ("linear_kfac", "linear"),
                            ("linear_taujp_full_batch", "linear")):
        if name in result and reference in result:
            result.setdefault("ratios", {})[f"{name}/{reference}"] = round(result[name]["step_s"] / result[reference]["step_s"], 3)
    result.update({
        "model": pretrained.name,
        "note": args.note,
        "task": task.name,
        "regularization_inputs": {name: f"{_reg_batch(name, args.batch_size)} inputs of {OTHER} per step"
                                  for name in args.variants if VARIANTS[name].get("regularizer") == "taujp"},
        "batch_size": args.batch_size,
        "max_length": pretrained.max_length,
        "steps_timed": args.steps,
        "peak_measure": "CUDA allocator peak" if on_gpu else "process peak RSS during the variant (CPU)",
        "machine": machine(),
    })
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
