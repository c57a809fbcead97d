"""Accuracy of any model or composition on any task, normalized accuracy, and the choice of alpha.

Every task is scored with its own frozen zero-shot head on whatever encoder is given, so the same
merged encoder ``pre + sum_t alpha_t * tau_t`` is evaluated on each task with that task's head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from taskarith.data import Examples, Task
from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.io import state_hash
from taskarith.models import Pretrained
from taskarith.models.zero_shot import mean_pool
from taskarith.vectors import TaskVector, combine

# The papers' grid for both addition and negation: np.linspace(0, 1, 21) = {0, 0.05, ..., 1}.
PUBLISHED_ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
DEFAULT_ALPHA_GRID = PUBLISHED_ALPHA_GRID
CONTROL_KEEP = 0.95


@torch.no_grad()
def predict(
    model: Pretrained, task: Task, examples: Examples, encoder: nn.Module | None = None, batch_size: int = 128
) -> torch.Tensor:
    """Predicted class indices for ``examples`` with the task's zero-shot head on ``encoder``."""
    classifier = model.classifier(task, encoder)
    predictions = torch.empty(len(examples), dtype=torch.long)
    for indices, batch in model.batches(examples.inputs, batch_size):
        predictions[indices] = classifier(**batch).argmax(dim=-1).cpu()
    return predictions


def accuracy(
    model: Pretrained, task: Task, split: str = "test", encoder: nn.Module | None = None, batch_size: int = 128
) -> float:
    examples = task.split(split)
    if len(examples) == 0:
        raise TaskArithError(f"task '{task.name}' has no {split} examples")
    predicted = predict(model, task, examples, encoder, batch_size)
    return float((predicted == torch.tensor(examples.labels)).float().mean())


def accuracies(
    model: Pretrained, tasks: Iterable[Task], split: str = "test", encoder: nn.Module | None = None
) -> dict[str, float]:
    return {task.name: accuracy(model, task, split, encoder) for task in tasks}


def edited_encoder(
    model: Pretrained, vectors: Sequence[TaskVector], alphas: Sequence[float] | float = 1.0
) -> nn.Module:
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


def best_normalized_alpha(grid: Sequence[float], normalized: Callable[[float], float]) -> float:
    """The alpha of ``grid`` with the highest mean normalized validation accuracy; ties to the smallest alpha.

    The published rule (tangent_task_arithmetic's find_optimal_coef: a strict improvement is needed to move on).
    """
    if not grid:
        raise TaskArithError("the alpha grid is empty")
    scores = {alpha: normalized(alpha) for alpha in grid}
    if all(math.isnan(score) for score in scores.values()):
        raise TaskArithError(f"no alpha of {sorted(grid)} has a defined normalized accuracy")
    # NaN compares false with everything, which would make min() depend on the grid's order: rank it last.
    return min(grid, key=lambda alpha: (math.inf if math.isnan(scores[alpha]) else -scores[alpha], alpha))


def check_reference(reference: Mapping[str, float], what: str) -> None:
    """Refuse a normalizer of 0: the normalized accuracy of that task would be undefined for every alpha."""
    zero = sorted(name for name, value in reference.items() if not value > 0)
    if zero:
        raise TaskArithError(f"{', '.join(zero)}: {what} is 0 on validation, so its normalized accuracy is undefined")


def choose_addition_alpha(
    model: Pretrained, vectors: Sequence[TaskVector], tasks: Sequence[Task], grid: Sequence[float] = DEFAULT_ALPHA_GRID
) -> AlphaChoice:
    """One alpha for the sum of all vectors, as the papers choose it: the best mean *normalized* validation
    accuracy, each task's accuracy divided by the validation accuracy of its own vector alone (``vectors[i]``
    is the one fine-tuned on ``tasks[i]``); ties to the smallest alpha."""
    if len(vectors) != len(tasks):
        raise TaskArithError(
            f"choose_addition_alpha pairs each vector with its task: got {len(vectors)} vectors for {len(tasks)} tasks"
        )
    single = {
        task.name: accuracy(model, task, "val", edited_encoder(model, [tau]))
        for task, tau in zip(tasks, vectors, strict=True)
    }
    check_reference(single, "the accuracy of its own vector")
    curve = {alpha: accuracies(model, tasks, "val", edited_encoder(model, vectors, alpha)) for alpha in grid}
    best = best_normalized_alpha(grid, lambda a: mean(normalized_accuracy(curve[a], single).values()))
    return AlphaChoice(alpha=best, curve=curve)


def choose_negation_alpha(
    model: Pretrained,
    vector: TaskVector,
    target: Task,
    control: Task,
    grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    keep: float = CONTROL_KEEP,
) -> AlphaChoice:
    """The alpha that lowers target accuracy most while control accuracy stays >= keep * pre-trained control
    accuracy (validation splits). alpha = 0, the pre-trained model, always qualifies."""
    floor = keep * accuracy(model, control, "val")
    candidates = sorted({0.0, *grid})
    curve = {
        alpha: accuracies(model, (target, control), "val", edited_encoder(model, [-vector], alpha))
        for alpha in candidates
    }
    best = control_constrained_alpha(
        candidates, lambda a: curve[a][target.name], lambda a: curve[a][control.name], floor
    )
    return AlphaChoice(alpha=best, curve=curve)


def control_constrained_alpha(
    grid: Sequence[float], target: Callable[[float], float], control: Callable[[float], float], floor: float
) -> float:
    """The negation coefficient: lowest target accuracy among alphas whose control accuracy stays >= floor.

    alpha = 0 (no edit) is always a candidate and keeps the control by definition (floor <= its accuracy),
    so there is always an answer, as in the papers, whose grid starts at 0. Ties go to the smaller alpha.
    """
    negative = sorted(alpha for alpha in grid if alpha < 0)
    if negative:
        raise TaskArithError(
            f"negation alpha grid: {negative} are negative; the grid holds the magnitudes "
            "subtracted (pre - alpha * tau), from 0 up"
        )
    # The answer is the first alpha, in order of (target, alpha), that keeps the control: so the control is
    # evaluated only down that order until one passes, not on the whole grid (on standard vectors each
    # evaluation is a forward pass; the chosen alpha is the same as scoring every candidate).
    candidates = sorted({0.0, *grid})
    for alpha in sorted(candidates, key=lambda alpha: (target(alpha), alpha)):
        if alpha == 0.0 or control(alpha) >= floor:
            return alpha
    raise AssertionError("unreachable: alpha = 0 always qualifies")


# -------------------------------------------------------------------------------------------------
# Many edits of one encoder, evaluated on the same inputs


Edit = tuple[tuple[str, float], ...]  # (vector name, alpha) pairs: the model pre + sum alpha * tau


class TangentStore:
    """JVPs J(x) tau at theta0 and base outputs f(x; theta0), kept across :class:`EditedOutputs` objects.

    A protocol scores the same vector in several studies (the lambda search and the evaluation of the chosen
    lambda; the last vector of an incremental run and the full method's): given one store, each (vector,
    input set) JVP runs once. Keyed by content (the base's hash and the vector's deltas' hash), not by name,
    and independent of the vector's mode, since J(x) tau at theta0 is the same for both.
    """

    def __init__(self) -> None:
        self.base: dict[tuple, torch.Tensor] = {}
        self.tangents: dict[tuple, torch.Tensor] = {}


class EditedOutputs:
    """Pooled embeddings of fixed evaluation inputs under many edits ``pre + sum_t alpha_t * tau_t``.

    Linear-mode vectors edit f_lin, whose pooled output is f(x; theta0) + sum_t alpha_t J(x) tau_t: affine
    in the alphas. So one JVP per (vector, input set) gives every alpha on every grid at the cost of a
    weighted sum, where the direct way runs one JVP per grid point per input set. Standard-mode edits
    have no such shortcut and run one forward per distinct edit (memoised). ``store`` shares the JVPs and
    base outputs with other EditedOutputs of the same model.
    """

    def __init__(
        self,
        model: Pretrained,
        vectors: Mapping[str, TaskVector],
        *,
        shortcut: bool = True,
        batch_size: int = 128,
        store: TangentStore | None = None,
    ) -> None:
        modes = {vector.mode for vector in vectors.values()}
        if len(modes) > 1:
            raise TaskArithError(f"vectors of one EditedOutputs must share a mode, got {sorted(modes)}")
        for vector in vectors.values():
            vector.check_base(model.encoder.state_dict())
        self.model = model
        self.vectors = dict(vectors)
        self.linear = modes == {"linear"}
        self.shortcut = shortcut and self.linear
        self.batch_size = batch_size
        shared = store or TangentStore()
        self._base, self._tangents = shared.base, shared.tangents
        self._edited: dict[tuple, torch.Tensor] = {}
        self._content: dict[str, str] = {}
        self.passes = 0  # encoder passes (forwards or JVPs) run so far, for the benchmarks

    def _key(self, task: Task, split: str, limit: int | None) -> tuple:
        # Task names are not unique across models (a random-init control reuses them): key on the base too.
        return (self.model.base_hash, task.name, task.fingerprint, split, limit)

    def _vector_key(self, name: str) -> str:
        if name not in self._content:
            self._content[name] = state_hash(self.vectors[name].deltas)
        return self._content[name]

    @staticmethod
    def _examples(task: Task, split: str, limit: int | None) -> Examples:
        examples = task.split(split)
        if len(examples) == 0:
            raise TaskArithError(f"task '{task.name}' has no {split} examples")
        return examples if limit is None else Examples(examples.inputs[:limit], examples.labels[:limit])

    @torch.no_grad()
    def _run(self, encoder: nn.Module, inputs: Sequence[Any]) -> torch.Tensor:
        pooled = None
        for indices, batch in self.model.batches(inputs, self.batch_size):
            out = mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]).float()
            pooled = pooled if pooled is not None else out.new_zeros(len(inputs), out.shape[1])
            pooled[indices.to(out.device)] = out
        self.passes += 1
        assert pooled is not None
        return pooled

    @torch.no_grad()
    def _tangent(self, name: str, task: Task, split: str, limit: int | None) -> torch.Tensor:
        key = (self._vector_key(name), *self._key(task, split, limit))
        if key not in self._tangents:
            from taskarith.linearize import hidden_and_tangent

            inputs = self._examples(task, split, limit).inputs
            theta0 = dict(self.model.encoder.named_parameters())
            delta = {k: v.to(self.model.device) for k, v in self.vectors[name].deltas.items()}
            base: torch.Tensor | None = None
            tangents: torch.Tensor | None = None
            for indices, batch in self.model.batches(inputs, self.batch_size):
                primal, tangent = hidden_and_tangent(self.model.encoder, theta0, delta, batch)
                mask = batch["attention_mask"]
                p, t = mean_pool(primal, mask).float(), mean_pool(tangent, mask).float()
                if base is None or tangents is None:
                    base, tangents = p.new_zeros(len(inputs), p.shape[1]), p.new_zeros(len(inputs), p.shape[1])
                base[indices.to(p.device)], tangents[indices.to(p.device)] = p, t
            self.passes += 1
            if base is None or tangents is None:
                raise TaskArithError(f"task {shown(task.name)} has no {split} inputs to take the JVP of")
            self._base.setdefault(self._key(task, split, limit), base)
            self._tangents[key] = tangents
        return self._tangents[key]

    def pooled(self, task: Task, split: str, edit: Edit = (), limit: int | None = None) -> torch.Tensor:
        """(examples, dim) pooled embeddings of the task's split (first ``limit`` examples) under ``edit``."""
        edit = tuple((name, float(alpha)) for name, alpha in edit if alpha != 0)
        unknown = [name for name, _ in edit if name not in self.vectors]
        if unknown:
            raise TaskArithError(f"no task vector named {unknown} (known: {sorted(self.vectors)})")
        key = self._key(task, split, limit)
        if not edit:
            if key not in self._base:
                # The JVPs' kernels (their primal fills the same slot), so a base output is the same numbers
                # whichever computed it first: for the shortcut, f(x; theta0) + sum alpha J tau stays exact.
                from taskarith.linearize import jvp_safe_kernels

                with jvp_safe_kernels():
                    self._base[key] = self._run(self.model.encoder, self._examples(task, split, limit).inputs)
            return self._base[key]
        if self.shortcut:
            parts = [alpha * self._tangent(name, task, split, limit) for name, alpha in edit]
            return self._base[key] + sum(parts)
        memo = (edit, *key)
        if memo not in self._edited:
            encoder = combine([self.vectors[n] for n, _ in edit], [a for _, a in edit]).apply_to(self.model.encoder)
            self._edited[memo] = self._run(encoder, self._examples(task, split, limit).inputs)
        return self._edited[memo]

    def taujp(self, name: str, task: Task, split: str, limit: int | None = None) -> float:
        """Mean ||J(x) tau|| of the named vector over the task's inputs: tau-Jp as published (unsquared).

        Defined at theta0 for a vector of either mode; for linear-mode vectors it reuses the shortcut's JVPs.
        """
        return float(torch.linalg.vector_norm(self._tangent(name, task, split, limit).double(), dim=-1).mean())

    def taujp_sq(self, name: str, task: Task, split: str, limit: int | None = None) -> float:
        """Mean ||J(x) tau||^2: the squared form (TAK's representation drift at alpha = 1)."""
        return float(self._tangent(name, task, split, limit).double().pow(2).sum(dim=-1).mean())

    def predictions(self, task: Task, split: str, edit: Edit = (), limit: int | None = None) -> torch.Tensor:
        logits = self.model.classifier(task).logits_from_pooled(self.pooled(task, split, edit, limit))
        return logits.argmax(dim=-1).cpu()

    def accuracy(self, task: Task, split: str, edit: Edit = (), limit: int | None = None) -> float:
        labels = torch.tensor(self._examples(task, split, limit).labels)
        return float((self.predictions(task, split, edit, limit) == labels).float().mean())


def disentanglement_error(
    outputs: EditedOutputs,
    pair: tuple[Task, Task],
    names: tuple[str, str],
    grid: Sequence[float],
    split: str = "test",
    limit: int | None = None,
) -> list[list[float]]:
    """Weight disentanglement error xi(alpha_1, alpha_2) over ``grid`` x ``grid`` (Ortiz-Jimenez et al., 2023).

    xi = sum over t in the pair of E_{x ~ task t} 1[prediction of pre + alpha_t tau_t != prediction of
    pre + alpha_1 tau_1 + alpha_2 tau_2], each task scored with its own head. Zero where the two edits do
    not disturb each other's task; zero at alpha_1 = alpha_2 = 0 by definition.
    """
    errors = []
    for a1 in grid:
        row = []
        for a2 in grid:
            both = ((names[0], a1), (names[1], a2))
            total = 0.0
            for task, name, alpha in ((pair[0], names[0], a1), (pair[1], names[1], a2)):
                alone = outputs.predictions(task, split, ((name, alpha),), limit)
                joint = outputs.predictions(task, split, both, limit)
                total += float((alone != joint).float().mean())
            row.append(total)
        errors.append(row)
    return errors
