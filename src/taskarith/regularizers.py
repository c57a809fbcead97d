"""Penalties that keep a task vector from interfering with other tasks, behind one registry.

Each regularizer is a function of the current difference delta = theta - theta0 (differentiable) and
whatever it needs:

* ``taujp`` (Yoshida et al., ICLR 2025, as their released code computes it): for each other task j, the
  batch mean of the *unsquared* L2 norm ||J_theta0 f(x) . delta|| over a batch of task j's inputs, then
  the mean over the other tasks. The norm's gradient does not vanish as J delta -> 0, so it drives the
  product to zero rather than merely small.
* ``taujp_sq``: the same with the squared norm, ||J_theta0 f(x) . delta||^2. It is the data-sampled
  estimate of TAK's representation drift delta^T G delta (Porrello et al., ICLR 2026), which ``kfac``
  approximates without data; it was taskarith's ``taujp`` before the published form was adopted.
* ``kfac``: dataless: Kronecker factors of the other tasks' curvature, computed beforehand by whoever
  holds their data (:mod:`taskarith.kfac`).

The fine-tuning loop computes the products J_theta0 f(x) . delta on the other tasks' inputs (in linear
mode in the same JVP as the task's own inputs) and hands them over one tensor per other task, with the
global batch size of each, so that under data parallelism every process's share sums to the exact
penalty. A new regularizer is one function and one line in ``REGULARIZERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from taskarith.errors import TaskArithError
from taskarith.models.zero_shot import mean_pool

# Bumped whenever a penalty's mathematical form changes, so that cached runs and saved vectors made
# with another form are never mistaken for this one (the fine-tuning configuration records it).
PENALTY_FORMS: dict[str, str] = {
    "taujp": "taujp/2:mean_tasks(mean_batch(||J delta||_2))",
    "taujp_sq": "taujp_sq/1:mean_tasks(mean_batch(||J delta||_2^2))",
    "kfac": "kfac/2",
}

# The published strengths, tuned in the papers on CLIP ViT-B/32's 512-d image embedding: lambda = 0.1 for
# tau-Jp (its released args.py), beta = 500 for TAK (mammoth models/tak.py, reg_lambda). They do not
# transfer to other models; the bench chooses lambda on validation for the embedded ones.
PUBLISHED_STRENGTH: dict[str, float] = {"taujp": 0.1, "kfac": 500.0}


@dataclass(frozen=True)
class PenaltyInputs:
    delta: Mapping[str, torch.Tensor]
    # J_theta0 f(x) . delta of the pooled embedding, one (examples, dim) tensor per other task: this
    # process's share of that task's batch.
    tangents: Sequence[torch.Tensor] | None = None
    # Examples per other task in the whole (global) batch: each per-task mean divides by it.
    counts: Sequence[int] = field(default_factory=tuple)
    factors: Any = None  # precomputed curvature (K-FAC factors)
    options: Mapping[str, Any] = field(default_factory=dict)  # regularizer-specific settings


@dataclass(frozen=True)
class Regularizer:
    penalty: Callable[[PenaltyInputs], torch.Tensor]
    needs_inputs: bool  # whether the loop must compute tangents on other tasks' inputs


def _per_task_mean(inputs: PenaltyInputs, per_example: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if inputs.tangents is None or not inputs.tangents:
        raise TaskArithError("the tau-Jp regularizers need inputs of other tasks (reg_tasks)")
    counts = list(inputs.counts) or [t.shape[0] for t in inputs.tangents]
    if len(counts) != len(inputs.tangents):
        raise TaskArithError(f"tau-Jp got {len(inputs.tangents)} tangent batches but {len(counts)} batch sizes")
    terms = [per_example(t).sum() / count for t, count in zip(inputs.tangents, counts, strict=True) if count > 0]
    return torch.stack(terms).mean()


def taujp_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    """tau-Jp as published: mean over the other tasks of mean_x ||J_theta0 f(x) . delta||_2 on their inputs."""
    return _per_task_mean(inputs, lambda t: torch.linalg.vector_norm(t, dim=-1))


def taujp_sq_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    """The squared variant: mean over the other tasks of mean_x ||J_theta0 f(x) . delta||^2 (TAK's drift, sampled)."""
    return _per_task_mean(inputs, lambda t: t.pow(2).sum(dim=-1))


def pooled_tangents(tangent_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """J f(x) . delta for the pooled embedding, from the tangent of the token states (pooling is linear)."""
    return mean_pool(tangent_states, attention_mask)


def _kfac_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    from taskarith.kfac import kfac_penalty

    return kfac_penalty(inputs.delta, inputs.factors, **inputs.options)


REGULARIZERS: dict[str, Regularizer] = {
    "taujp": Regularizer(penalty=taujp_penalty, needs_inputs=True),
    "taujp_sq": Regularizer(penalty=taujp_sq_penalty, needs_inputs=True),
    "kfac": Regularizer(penalty=_kfac_penalty, needs_inputs=False),
}


def get_regularizer(name: str) -> Regularizer:
    if name not in REGULARIZERS:
        raise TaskArithError(f"unknown regularizer '{name}' (known: {', '.join(REGULARIZERS)})")
    return REGULARIZERS[name]
