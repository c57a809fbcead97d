"""Fine-tuning the encoder under a frozen zero-shot head; the result is a task vector and a run record.

The loop reads top to bottom: batch, forward, loss, backward, clip, step, schedule, log, checkpoint.
Two choices keep runs reproducible and resumable. Dropout is off (the encoder stays in eval mode, as
the CLIP encoders of the task-arithmetic papers have no dropout), so the loss is a deterministic
function of the weights. The data order is a pure function of (seed, step), so a checkpoint needs only
weights, optimizer moments and the step number to continue exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

from taskarith import __version__
from taskarith.data import Task
from taskarith.errors import TaskArithError
from taskarith.evaluate import accuracy
from taskarith.io import load_tensors, read_json, save_tensors, write_json
from taskarith.models import DEFAULT_MODEL, Pretrained, ZeroShotClassifier
from taskarith.vectors import TaskVector

TASK_VECTOR_FILE = "task_vector.safetensors"
RECORD_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "taskarith.checkpoint/1"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines the task vector; stored in the run record and the vector's metadata."""

    task: str
    model: str = DEFAULT_MODEL
    mode: str = "standard"
    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    max_length: int = 64
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        checks = [
            ("mode", self.mode in ("standard",), "must be 'standard'"),
            ("steps", 1 <= self.steps <= 10_000_000, "must be between 1 and 10,000,000"),
            ("batch_size", 1 <= self.batch_size <= 65_536, "must be between 1 and 65,536"),
            ("lr", 0 < self.lr < 1, "must be in (0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < 10, "must be in [0, 10)"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "must be in [0, 1)"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be positive"),
            ("max_length", 2 <= self.max_length <= 8192, "must be between 2 and 8192"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0: only at the end)"),
        ]
        for name, ok, rule in checks:
            value = getattr(self, name)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise TaskArithError(f"fine-tuning option {name}={value!r} {rule}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskArithError(f"{source}: unknown fine-tuning options {unknown} (known: {sorted(known)})")
        return cls(**data)


@dataclass(frozen=True)
class FinetuneResult:
    task_vector: TaskVector
    record: dict[str, Any]


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples in batch ``step``: epochs of seeded permutations laid end to end."""
    start, end = step * batch_size, (step + 1) * batch_size
    indices: list[int] = []
    epoch = start // num_examples
    while len(indices) < batch_size:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        lo = max(start - epoch * num_examples, 0)
        hi = min(end - epoch * num_examples, num_examples)
        indices.extend(order[lo:hi].tolist())
        epoch += 1
    return indices


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _save_checkpoint(path: Path, step: int, config: FinetuneConfig, base_hash: str,
                     encoder: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # Raw weights, not deltas: pre + (theta - pre) is not always theta in floating point, and resuming
    # must continue from exactly the same numbers.
    tensors: dict[str, torch.Tensor] = {}
    for name, param in encoder.named_parameters():
        tensors[f"param/{name}"] = param.detach()
        state = optimizer.state.get(param, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                tensors[f"{moment}/{name}"] = state[moment]
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(step), "base_hash": base_hash,
                "config": json.dumps(asdict(config), sort_keys=True)}
    save_tensors(path, tensors, metadata)


def _load_checkpoint(path: Path, config: FinetuneConfig, base_hash: str,
                     encoder: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors, metadata = load_tensors(path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise TaskArithError(f"{path}: not a taskarith fine-tuning checkpoint")
    if metadata.get("base_hash") != base_hash:
        raise TaskArithError(f"{path}: checkpoint of base model {metadata.get('base_hash')}, not {base_hash}")
    if json.loads(metadata.get("config", "{}")) != asdict(config):
        raise TaskArithError(f"{path}: checkpoint was made with another configuration; delete it or use another --out")
    step = int(metadata["step"])
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            param.copy_(tensors[f"param/{name}"])
            if f"exp_avg/{name}" in tensors:
                optimizer.state[param] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"exp_avg/{name}"].to(param.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(param.device),
                }
    return step


def environment() -> dict[str, str]:
    return {
        "taskarith": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": str(torch.get_num_threads()),
    }


def finetune(
    config: FinetuneConfig,
    pretrained: Pretrained,
    task: Task,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    resume: bool = True,
) -> FinetuneResult:
    """Fine-tune a copy of the encoder on ``task``; write the task vector and run record to ``out_dir``."""
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(config.seed)
    base_hash = pretrained.base_hash
    encoder = pretrained.trainable_copy()
    classifier = ZeroShotClassifier(encoder, pretrained.head(task), pretrained.logit_scale).eval()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup_steps = int(config.warmup_fraction * config.steps)
    schedule = warmup_cosine(config.steps, warmup_steps)

    start_step = 0
    checkpoint = out / CHECKPOINT_FILE if out is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        start_step = _load_checkpoint(checkpoint, config, base_hash, encoder, optimizer)

    train = task.train
    labels = torch.tensor(train.labels, device=pretrained.device)
    history: list[dict[str, float]] = []
    step_seconds: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(start_step, config.steps), desc=f"fine-tune {task.name}", disable=not progress,
               initial=start_step, total=config.steps, leave=False)
    for step in bar:
        step_started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = config.lr * schedule(step)
        indices = batch_indices(len(train), config.batch_size, config.seed, step)
        batch = pretrained.tokenize([train.texts[i] for i in indices])
        loss = F.cross_entropy(classifier(**batch), labels[indices])
        if not torch.isfinite(loss):
            raise TaskArithError(
                f"loss became {loss.item()} at step {step} of fine-tuning '{task.name}' (lr={config.lr}); "
                f"the last good checkpoint is kept in {checkpoint or 'memory only'}; try a lower learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        step_seconds.append(time.perf_counter() - step_started)

        if step % 10 == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 5), "lr": group["lr"], "grad_norm": round(float(grad_norm), 5)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if checkpoint is not None and config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            _save_checkpoint(checkpoint, done, config, base_hash, encoder, optimizer)
    bar.close()
    train_seconds = time.perf_counter() - started

    tau = TaskVector.from_models(pretrained.encoder, encoder, task=task.name, mode=config.mode, config=asdict(config))
    record = {
        "config": asdict(config),
        "task": {"name": task.name, "classes": list(task.classes), "train": len(task.train), "val": len(task.val),
                 "test": len(task.test), "source": task.source},
        "base_model": {"name": pretrained.name, "hash": base_hash},
        "resumed_from_step": start_step,
        "train_seconds": round(train_seconds, 3),
        "step_seconds_median": round(statistics.median(step_seconds), 4) if step_seconds else None,
        "history": history,
        "val_accuracy": accuracy(pretrained, task, "val", encoder),
        "task_vector_norm": tau.norm(),
        "environment": environment(),
    }
    if out is not None:
        tau.save(out / TASK_VECTOR_FILE)
        write_json(out / RECORD_FILE, record)
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)
    return FinetuneResult(task_vector=tau, record=record)


def run_key(config: FinetuneConfig, base_hash: str) -> str:
    """Content hash of what determines a task vector: base model, task, mode, hyper-parameters, seed."""
    payload = json.dumps({"base": base_hash, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finetune_cached(config: FinetuneConfig, pretrained: Pretrained, task: Task, cache_dir: str | Path,
                    *, progress: bool = True) -> FinetuneResult:
    """Fine-tune once per content hash: a second call with the same inputs loads the saved vector."""
    out = Path(cache_dir) / f"{task.name}-{config.mode}-{run_key(config, pretrained.base_hash)}"
    vector_file, record_file = out / TASK_VECTOR_FILE, out / RECORD_FILE
    if vector_file.is_file() and record_file.is_file():
        return FinetuneResult(task_vector=TaskVector.load(vector_file), record=read_json(record_file))
    return finetune(config, pretrained, task, out, progress=progress)
