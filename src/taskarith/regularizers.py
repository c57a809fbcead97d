"""Penalties that keep a task vector from interfering with other tasks, behind one registry.

Each regularizer is a function of the current difference delta = theta - theta0 (differentiable) and
whatever it needs: tau-Jp needs the first-order output change J_theta0 f(x) . delta on other tasks'
inputs, which the fine-tuning loop computes (batched with the task's own inputs in linear mode);
dataless K-FAC needs only Kronecker factors computed beforehand by whoever holds the other tasks' data.
A new regularizer is one function and one line in ``REGULARIZERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from taskarith.errors import TaskArithError
from taskarith.models.zero_shot import mean_pool


@dataclass(frozen=True)
class PenaltyInputs:
    delta: Mapping[str, torch.Tensor]
    tangents: torch.Tensor | None = None  # J_theta0 f(x) . delta on other tasks' inputs, pooled: (batch, dim)
    factors: Any = None  # precomputed curvature (K-FAC factors)


@dataclass(frozen=True)
class Regularizer:
    penalty: Callable[[PenaltyInputs], torch.Tensor]
    needs_inputs: bool  # whether the loop must compute tangents on other tasks' inputs


def taujp_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    """tau-Jp (Yoshida et al., ICLR 2025): E_x ||J_theta0 f(x) . delta||^2 over other tasks' inputs x."""
    if inputs.tangents is None:
        raise TaskArithError("the taujp regularizer needs inputs of other tasks (reg_tasks)")
    return inputs.tangents.pow(2).sum(dim=-1).mean()


def pooled_tangents(tangent_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """J f(x) . delta for the pooled embedding, from the tangent of the token states (pooling is linear)."""
    return mean_pool(tangent_states, attention_mask)


def _kfac_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    from taskarith.kfac import kfac_penalty

    return kfac_penalty(inputs.delta, inputs.factors)


REGULARIZERS: dict[str, Regularizer] = {
    "taujp": Regularizer(penalty=taujp_penalty, needs_inputs=True),
    "kfac": Regularizer(penalty=_kfac_penalty, needs_inputs=False),
}


def get_regularizer(name: str) -> Regularizer:
    if name not in REGULARIZERS:
        raise TaskArithError(f"unknown regularizer '{name}' (known: {', '.join(REGULARIZERS)})")
    return REGULARIZERS[name]
