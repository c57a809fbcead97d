"""The demo: fine-tune a few tasks, then measure zero-shot, fine-tuned, task addition and task negation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskarith.data import Task
from taskarith.evaluate import (
    accuracies,
    accuracy,
    choose_addition_alpha,
    choose_negation_alpha,
    edited_encoder,
    mean,
    normalized_accuracy,
)
from taskarith.finetune import FinetuneConfig, finetune_cached
from taskarith.models import Pretrained

# Three input domains that do not overlap (movie reviews, dictionary glosses, fortune cookies), so
# one merged model has a fair chance to keep all three gains.
DEMO_TASKS = ("rt_sentiment", "wordnet_topic", "fortune_language")
# Scored but never fine-tuned, from yet another domain: forgetting sentiment should leave it as it was.
DEMO_CONTROL = "fortune_topic"


@dataclass(frozen=True)
class DemoConfig:
    # Sized for a few minutes on 2 CPU cores (about 1.2 s per step); `taskarith bench` runs longer.
    steps: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    alpha_grid: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    negate: tuple[str, ...] = ("rt_sentiment",)


def _addition(
    pretrained: Pretrained, tasks: Sequence[Task], vectors, alpha: float, finetuned: dict[str, float]
) -> dict[str, Any]:
    merged = accuracies(pretrained, tasks, "test", edited_encoder(pretrained, vectors, alpha))
    normalized = normalized_accuracy(merged, finetuned)
    return {
        "alpha": alpha,
        "accuracy": merged,
        "normalized": normalized,
        "mean_accuracy": mean(merged.values()),
        "mean_normalized": mean(normalized.values()),
    }


def run_demo(
    pretrained: Pretrained,
    tasks: Sequence[Task],
    control: Task,
    cache_dir: str | Path,
    config: DemoConfig = DemoConfig(),
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """Fine-tune each task (cached), then evaluate every model of the task-arithmetic protocol on test."""
    vectors, records = [], {}
    for task in tasks:
        on_stage(f"fine-tuning {task.name}")
        ft_config = FinetuneConfig(
            task=task.name,
            model=pretrained.name,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
        )
        result = finetune_cached(ft_config, pretrained, task, cache_dir)
        vectors.append(result.task_vector)
        records[task.name] = result.record

    on_stage("evaluating zero-shot and fine-tuned models")
    zero_shot = accuracies(pretrained, [*tasks, control], "test")
    finetuned = {
        task.name: accuracy(pretrained, task, "test", edited_encoder(pretrained, [tau]))
        for task, tau in zip(tasks, vectors, strict=True)
    }

    on_stage("task addition: choosing alpha on validation")
    choice = choose_addition_alpha(pretrained, vectors, tasks, config.alpha_grid)
    addition = {
        "alpha_1": _addition(pretrained, tasks, vectors, 1.0, finetuned),
        "alpha_searched": _addition(pretrained, tasks, vectors, choice.alpha, finetuned),
    }

    negation = {}
    for task, tau in zip(tasks, vectors, strict=True):
        if task.name not in config.negate:
            continue
        on_stage(f"task negation: forgetting {task.name}")
        neg = choose_negation_alpha(pretrained, tau, task, control, config.alpha_grid)
        rows = {}
        for label, alpha in (("alpha_1", 1.0), ("alpha_searched", neg.alpha)):
            acc = accuracies(pretrained, (task, control), "test", edited_encoder(pretrained, [-tau], alpha))
            rows[label] = {"alpha": alpha, "target": acc[task.name], "control": acc[control.name]}
        negation[task.name] = rows

    return {
        "model": {"name": pretrained.name, "hash": pretrained.base_hash},
        "config": asdict(config),
        "tasks": [task.name for task in tasks],
        "control_task": control.name,
        "zero_shot": zero_shot,
        "finetuned": finetuned,
        "addition": addition,
        "addition_alpha_curve": {str(a): v for a, v in choice.curve.items()},
        "negation": negation,
        "finetune_seconds": {name: rec["train_seconds"] for name, rec in records.items()},
    }
