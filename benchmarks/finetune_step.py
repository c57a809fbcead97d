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
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="Encoder; a folder of the same architecture times the same.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "finetune_step.json")
    args = parser.parse_args()

    pretrained = load_pretrained(args.model, device=args.device)
    task = load_task(args.task)
    config = FinetuneConfig(task=task.name, model=args.model, steps=args.steps, batch_size=args.batch_size, checkpoint_every=0)
    on_gpu = pretrained.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    record = finetune(config, pretrained, task, progress=False).record
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else _peak_rss_mb()
    result = {
        "standard": {"step_s": record["step_seconds_median"], "peak_mb": round(peak_mb, 1)},
        "model": pretrained.name,
        "task": task.name,
        "batch_size": args.batch_size,
        "max_length": config.max_length,
        "steps_timed": args.steps,
        "peak_measure": "CUDA allocator peak" if on_gpu else "process peak RSS during fine-tuning (CPU)",
        "machine": machine(),
    }
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
