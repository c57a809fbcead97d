"""Accuracy of any model or composition on any task, normalized accuracy, and the choice of alpha.

Every task is scored with its own frozen zero-shot head on whatever encoder is given, so the same
merged encoder ``pre + sum_t alpha_t * tau_t`` is evaluated on each task with that task's head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from taskarith.data import Examples, Task
from taskarith.errors import TaskArithError
from taskarith.models import Pretrained
from taskarith.vectors import TaskVector, combine

DEFAULT_ALPHA_GRID = tuple(round(0.1 * i, 2) for i in range(1, 11))
CONTROL_KEEP = 0.95


@torch.no_grad()
def predict(model: Pretrained, task: Task, examples: Examples, encoder: nn.Module | None = None, batch_size: int = 128) -> torch.Tensor:
    """Predicted class indices for ``examples`` with the task's zero-shot head on ``encoder``."""
    classifier = model.classifier(task, encoder)
    predictions = torch.empty(len(examples), dtype=torch.long)
    for indices, batch in model.batches(examples.texts, batch_size):
        predictions[indices] = classifier(**batch).argmax(dim=-1).cpu()
    return predictions


def accuracy(model: Pretrained, task: Task, split: str = "test", encoder: nn.Module | None = None, batch_size: int = 128) -> float:
    examples = task.split(split)
    if len(examples) == 0:
        raise TaskArithError(f"task '{task.name}' has no {split} examples")
    predicted = predict(model, task, examples, encoder, batch_size)
    return float((predicted == torch.tensor(examples.labels)).float().mean())


def accuracies(model: Pretrained, tasks: Iterable[Task], split: str = "test", encoder: nn.Module | None = None) -> dict[str, float]:
    return {task.name: accuracy(model, task, split, encoder) for task in tasks}


def edited_encoder(model: Pretrained, vectors: Sequence[TaskVector], alphas: Sequence[float] | float = 1.0) -> nn.Module:
    """A copy of the pre-trained encoder moved by sum_t alpha_t * tau_t; refuses vectors of another base."""
    return combine(vectors, alphas).apply_to(model.encoder)


def normalized_accuracy(merged: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, float]:
    """Each task's accuracy under the merged model divided by its own fine-tuned model's accuracy."""
    missing = sorted(set(merged) - set(finetuned))
    if missing:
        raise TaskArithError(f"no fine-tuned accuracy for tasks {missing}")
    return {name: merged[name] / finetuned[name] if finetuned[name] > 0 else float("nan") for name in merged}


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class AlphaChoice:
    """The chosen coefficient and the validation curve it was chosen from."""

    alpha: float
    curve: dict[float, dict[str, float]]


def choose_addition_alpha(
    model: Pretrained, vectors: Sequence[TaskVector], tasks: Sequence[Task], grid: Sequence[float] = DEFAULT_ALPHA_GRID
) -> AlphaChoice:
    """One alpha for the sum of all vectors, maximising mean validation accuracy (the task-arithmetic protocol)."""
    curve = {alpha: accuracies(model, tasks, "val", edited_encoder(model, vectors, alpha)) for alpha in grid}
    best = max(grid, key=lambda alpha: (mean(curve[alpha].values()), -alpha))
    return AlphaChoice(alpha=best, curve=curve)


def choose_negation_alpha(
    model: Pretrained,
    vector: TaskVector,
    target: Task,
    control: Task,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    keep: float = CONTROL_KEEP,
) -> AlphaChoice:
    """The alpha that lowers target accuracy most while control accuracy stays >= keep * pre-trained control accuracy.

    Falls back to the smallest alpha on the grid when none keeps the control task (reported in the curve).
    """
    floor = keep * accuracy(model, control, "val")
    curve = {alpha: accuracies(model, (target, control), "val", edited_encoder(model, [-vector], alpha)) for alpha in grid}
    allowed = [alpha for alpha in grid if curve[alpha][control.name] >= floor]
    if not allowed:
        return AlphaChoice(alpha=min(grid), curve=curve)
    best = min(allowed, key=lambda alpha: (curve[alpha][target.name], alpha))
    return AlphaChoice(alpha=best, curve=curve)
