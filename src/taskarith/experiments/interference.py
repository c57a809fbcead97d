"""tau-Jp interference: how much one task vector moves the pre-trained model's outputs on another task.

Yoshida et al. (ICLR 2025) call the product of a task vector tau_i with the Jacobian of the pre-trained
model, taken on inputs of task j, "tau-Jp". It is the first-order change that adding tau_i makes to
the outputs task j relies on, f(x; theta0 + tau_i) - f(x; theta0) ~ J_theta0 f(x) . tau_i, and it
is exactly the cross term that breaks weight disentanglement of the linearized model. The authors'
released code averages the (unsquared) L2 norm of that product over the evaluated task's inputs, with
no normalisation; that is the primary matrix here, the quantity the ``taujp`` regularizer
(:func:`taskarith.regularizers.taujp_penalty`) minimises. The mean *squared* norm (what ``taujp_sq``
and K-FAC's curvature penalize) is reported next to it.

f(x) is the mean-pooled token states of the encoder before normalisation. The measure is defined at
theta0 for any tau, so standard- and linear-mode vectors are measured the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from taskarith.data import SPLITS, Task
from taskarith.errors import TaskArithError
from taskarith.linearize import hidden_and_tangent
from taskarith.models import Pretrained
from taskarith.models.zero_shot import mean_pool
from taskarith.regularizers import pooled_tangents
from taskarith.vectors import TaskVector

DEFINITION = (
    "taujp[i][j] = mean over the first n examples x of task j's {split} split of ||J_theta0 f(x) . tau_i|| "
    "(unsquared, as the tau-Jp paper's released code computes it), where f(x) is the encoder's mean-pooled token "
    "states (before normalisation) and J_theta0 f(x) . tau_i is computed exactly by one forward-mode JVP at the "
    "pre-trained weights theta0 (the first-order change adding tau_i makes to task j's embeddings; tau-Jp, "
    "Yoshida et al., ICLR 2025). normalized[i][j] = taujp[i][j] / mean_x ||f(x; theta0)|| over the same "
    "examples: the change relative to the size of task j's pre-trained embeddings (0.1 means changes about 10% "
    "of the embedding's length). taujp_sq[i][j] = mean_x ||J_theta0 f(x) . tau_i||^2 (the squared form, "
    "TAK's representation drift). Scaling tau by c scales taujp and normalized by |c| and taujp_sq by c^2."
)


def _vector_names(vectors: Sequence[TaskVector]) -> list[str]:
    """Row names: the task, then the mode where two vectors share a task, then the position if still ambiguous."""
    names = [vector.task or f"vector {i}" for i, vector in enumerate(vectors)]
    if len(set(names)) < len(names):
        names = [f"{name} ({vector.mode})" for name, vector in zip(names, vectors, strict=True)]
    if len(set(names)) < len(names):
        names = [f"{name} #{i}" for i, name in enumerate(names)]
    return names


def _checked_deltas(
    pretrained: Pretrained, vector: TaskVector, name: str, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The vector's deltas on the model's device and dtype, after refusing vectors of another model."""
    unknown = sorted(set(vector.deltas) - set(state))
    if unknown:
        raise TaskArithError(
            f"task vector {name} changes parameters the encoder of {pretrained.name} does not have: {unknown[:5]}"
        )
    try:
        vector.check_base(state)
    except TaskArithError as exc:
        raise TaskArithError(
            f"cannot measure tau-Jp of task vector {name} on {pretrained.name} (base hash {pretrained.base_hash}): "
            f"{exc}"
        ) from None
    return {key: delta.to(state[key].device, state[key].dtype) for key, delta in vector.deltas.items()}


def _theta0(encoder: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """The pre-trained parameters, plus any floating buffers a vector changes (so their tangent counts too)."""
    theta0: dict[str, torch.Tensor] = dict(encoder.named_parameters())
    buffers = dict(encoder.named_buffers())
    theta0.update({key: buffers[key] for key in keys if key in buffers and key not in theta0})
    return theta0


def _examples(task: Task, split: str, max_examples: int) -> tuple[Any, ...]:
    inputs = task.split(split).inputs[:max_examples]
    if not inputs:
        raise TaskArithError(f"task {task.name!r} has no {split} examples to measure tau-Jp on")
    return inputs


def taujp_matrix(
    pretrained: Pretrained,
    vectors: Sequence[TaskVector],
    tasks: Sequence[Task],
    *,
    split: str = "val",
    max_examples: int = 200,
    batch_size: int = 64,
) -> dict[str, Any]:
    """tau-Jp of every vector (rows) on every task's inputs (columns), as plain data; see ``DEFINITION``."""
    if not vectors:
        raise TaskArithError("no task vectors to measure tau-Jp for")
    if not tasks:
        raise TaskArithError("no tasks to measure tau-Jp on")
    if split not in SPLITS:
        raise TaskArithError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if max_examples < 1 or batch_size < 1:
        raise TaskArithError(f"max_examples and batch_size must be positive, got {max_examples} and {batch_size}")

    encoder = pretrained.encoder
    state = encoder.state_dict()
    names = _vector_names(vectors)
    # Check every vector before any compute, so a bad one fails fast rather than after minutes.
    deltas = [_checked_deltas(pretrained, vector, name, state) for vector, name in zip(vectors, names, strict=True)]
    theta0 = _theta0(encoder, set().union(*(d.keys() for d in deltas)))

    squared = torch.zeros(len(vectors), len(tasks), dtype=torch.float64)
    norms = torch.zeros(len(vectors), len(tasks), dtype=torch.float64)
    energy = torch.zeros(len(tasks), dtype=torch.float64)
    counts: dict[str, int] = {}
    was_training = encoder.training
    encoder.eval()  # dropout would make the Jacobian random
    try:
        with torch.no_grad():
            for j, task in enumerate(tasks):
                inputs = _examples(task, split, max_examples)
                counts[task.name] = len(inputs)
                for _, batch in pretrained.batches(inputs, batch_size):
                    mask = batch["attention_mask"]
                    for i, delta in enumerate(deltas):
                        hidden, tangent = hidden_and_tangent(encoder, theta0, delta, batch)
                        if i == 0:
                            # f(x; theta0) does not depend on tau: every JVP returns it, keep the first.
                            energy[j] += torch.linalg.vector_norm(mean_pool(hidden, mask).double(), dim=-1).sum()
                        change = pooled_tangents(tangent, mask).double().pow(2).sum(dim=-1)
                        squared[i, j] += change.sum()
                        norms[i, j] += change.sqrt().sum()
                squared[:, j] /= len(inputs)
                norms[:, j] /= len(inputs)
                energy[j] /= len(inputs)
    finally:
        encoder.train(was_training)

    normalized = norms / energy.clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "vectors": names,
        "tasks": [task.name for task in tasks],
        "taujp": norms.tolist(),
        "normalized": normalized.tolist(),
        "taujp_sq": squared.tolist(),
        "output_norm": {task.name: float(e) for task, e in zip(tasks, energy, strict=True)},
        "split": split,
        "examples_per_task": counts,
        "modes": {name: vector.mode for name, vector in zip(names, vectors, strict=True)},
        "model": pretrained.name,
        "base_hash": pretrained.base_hash,
        "definition": DEFINITION.format(split=split),
    }


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(matrix: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str]) -> list[str]:
    lines = ["| vector \\ task | " + " | ".join(_cell(c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [
        "| " + _cell(row) + " | " + " | ".join(f"{value:.3g}" for value in values) + " |"
        for row, values in zip(rows, matrix, strict=True)
    ]
    return lines


def taujp_markdown(result: Mapping[str, Any]) -> str:
    """Both tau-Jp matrices of a :func:`taujp_matrix` result as markdown tables (rows: vectors, columns: tasks)."""
    rows, columns = result["vectors"], result["tasks"]
    counts = ", ".join(f"{_cell(name)}: {n}" for name, n in result["examples_per_task"].items())
    lines = [
        f"### tau-Jp: mean ||J f(x) . tau|| on each task's {result['split']} inputs",
        "",
        *_table(result["taujp"], rows, columns),
        "",
        "### tau-Jp relative to the task's pre-trained embeddings: taujp / mean ||f(x; theta0)||",
        "",
        *_table(result["normalized"], rows, columns),
        "",
        f"Examples per task: {counts}.",
        "",
        f"Definition: {result['definition']}",
        "",
    ]
    return "\n".join(lines)
