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
TASK, OTHERS = "rt_sentiment", ("wordnet_topic", "fortune_topic")
_TAUJP = {"regularizer": "taujp", "reg_tasks": OTHERS}

VARIANTS: dict[str, dict] = {
    "standard": {"mode": "standard"},
    "linear": {"mode": "linear"},
    # The published tau-Jp: 16 inputs of every protected task each step (here 2 x 16), one shared JVP.
    "linear_taujp": {"mode": "linear", **_TAUJP},
    "linear_taujp_cyclical": {"mode": "linear", **_TAUJP, "reg_sampling": "cyclical"},
    # taskarith before 0.2: the squared norm on 8 inputs drawn from the union.
    "linear_taujp_sq_pooled8": {
        "mode": "linear",
        "regularizer": "taujp_sq",
        "reg_strength": 1.0,
        "reg_tasks": OTHERS,
        "reg_sampling": "pooled",
        "reg_batch_size": 8,
    },
    "standard_taujp": {"mode": "standard", **_TAUJP},
    "linear_kfac": {"mode": "linear", "regularizer": "kfac"},
    # Parameter-efficient variants, all on the attention projections' weights: full-rank deltas (standard
    # mode), LoRA factors (rank 8, alpha 16) and LoRA linearized at its init (one JVP, only B trains).
    "standard_attention": {"mode": "standard", "trainable": "attention"},
    "lora": {"mode": "lora"},
    "linear_lora": {"mode": "linear_lora"},
    # The tangent model on the attention projections only (a cheaper JVP), and OrthoReg's dataless penalty.
    "linear_attention": {"mode": "linear", "trainable": "attention"},
    "standard_orthoreg": {"mode": "standard", "regularizer": "orthoreg", "reg_strength": 0.1},
}


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets the kernel's peak-RSS counter (VmHWM)


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reg_inputs(name: str) -> str:
    settings = VARIANTS[name]
    size = settings.get("reg_batch_size", FinetuneConfig.reg_batch_size)
    sampling = settings.get("reg_sampling", "strict")
    if sampling == "strict":
        return f"{size} inputs of each of {', '.join(OTHERS)} per step"
    if sampling == "cyclical":
        return f"{size} inputs of one of {', '.join(OTHERS)} per step, in turn"
    return f"{size} inputs drawn from the union of {', '.join(OTHERS)} per step"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--model", default="all-MiniLM-L6-v2", help="Encoder; a folder of the same architecture times the same."
    )
    parser.add_argument("--note", default="", help="Recorded as is, e.g. how the model differs from the embedded one.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cost.json")
    args = parser.parse_args()

    pretrained = load_pretrained(args.model, device=args.device)
    task = load_task(TASK)
    on_gpu = pretrained.device.type == "cuda"
    result: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        factor_files = [Path(scratch) / f"{other}.safetensors" for other in OTHERS]
        if "linear_kfac" in args.variants:
            from taskarith.kfac import compute_kfac_factors

            for other, path in zip(OTHERS, factor_files, strict=True):
                compute_kfac_factors(pretrained, load_task(other), progress=False).save(path)
        for name in args.variants:
            settings = dict(VARIANTS[name])
            if settings.get("regularizer") == "kfac":
                settings["reg_factors"] = tuple(str(f) for f in factor_files)
            config = FinetuneConfig(
                task=task.name,
                model=args.model,
                steps=args.steps,
                batch_size=args.batch_size,
                checkpoint_every=0,
                **settings,
            )
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            else:
                _reset_peak_rss()
            record = finetune(config, pretrained, task, progress=False).record
            peak_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else _peak_rss_mb()
            result[name] = {"step_s": record["step_seconds_median"], "peak_mb": round(peak_mb, 1)}
            print(name, result[name], flush=True)
    for name, reference in (
        ("linear", "standard"),
        ("linear_taujp", "linear"),
        ("linear_taujp_cyclical", "linear"),
        ("linear_taujp_sq_pooled8", "linear"),
        ("standard_taujp", "standard"),
        ("linear_kfac", "linear"),
        ("standard_attention", "standard"),
        ("lora", "standard"),
        ("linear_lora", "linear"),
        ("linear_lora", "lora"),
        ("linear_attention", "linear"),
        ("standard_orthoreg", "standard"),
    ):
        if name in result and reference in result:
            result.setdefault("ratios", {})[f"{name}/{reference}"] = round(
                result[name]["step_s"] / result[reference]["step_s"], 3
            )
    result.update(
        {
            "model": pretrained.name,
            "note": args.note,
            "task": task.name,
            "regularization_inputs": {
                name: _reg_inputs(name)
                for name in args.variants
                if VARIANTS[name].get("regularizer") in ("taujp", "taujp_sq")
            },
            "kfac_factors": f"{', '.join(OTHERS)}: TAK's published recipe (128 examples, MC-1), merged by Eq. 8",
            "batch_size": args.batch_size,
            "max_length": pretrained.max_length,
            "steps_timed": args.steps,
            "peak_measure": "CUDA allocator peak" if on_gpu else "process peak RSS during the variant (CPU)",
            "machine": machine(),
        }
    )
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
