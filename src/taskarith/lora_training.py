"""LoRA fine-tuning without wrapping the model: trainable factors beside the base, weights edited functionally.

Per target weight W0 of shape (out, in) there are two factors, A (r, in) and B (out, r), initialised as
PEFT does (A: Kaiming-uniform with a = sqrt(5); B = 0, so training starts at the base), and the weight the
model runs with is ``W0 + dW`` with ``dW = (alpha / r) * B @ A`` (transposed for GPT-2's Conv1D, whose
weight is stored (in, out)). The base module is never modified or wrapped: it runs through
``torch.func.functional_call`` with the edited weights, so parameter names stay the base's and a JVP can
be taken with respect to dW directly.

Two models are built on the same factors:

* :class:`LoraModel` (mode ``lora``): f(x; theta0 + dW(A, B)), both factors trained. The task vector is dW
  in the base's parameter space (a standard-mode vector of rank <= r per target).
* :class:`LinearLora` (mode ``linear_lora``, Tang et al., ICLR 2024, "Parameter-efficient multi-task model
  fusion with partial linearization"): the network linearized in the adapter parameters phi = (A, B) at
  their initialisation phi0 = (A0, 0). Since dW = s B A, d dW / dA = s B0 = 0 at B0 = 0: the Jacobian with
  respect to A is zero, so A receives no gradient and stays at A0, and the linearized model is exactly
  f(x; W0) + J_W f(x; W0) . (s B A0). Only B is trained (A is held fixed rather than given an optimizer
  state it could never use); the task vector is the linear-mode vector dW = s B A0 in weight space, which
  :class:`~taskarith.linearize.Linearized` evaluates exactly and which composes with other linear vectors.

``delta()`` of both returns dW keyed by the base's parameter names, which is what every penalty of
:mod:`taskarith.regularizers` takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from taskarith.display import quoted
from taskarith.errors import TaskArithError
from taskarith.linearize import _check_attention, linearized_call, linearized_output
from taskarith.sampling import derived_seed

DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
MAX_RANK = 1 << 16


@dataclass(frozen=True)
class LoraTarget:
    """One adapted weight: its parameter name in the base, its module, and whether it is stored (in, out)."""

    param: str
    module: str
    out_features: int
    in_features: int
    transposed: bool


def lora_targets(base: nn.Module, names: Sequence[str], rank: int) -> list[LoraTarget]:
    """The targets for ``names`` (parameters of ``base``), refusing any that a rank-``rank`` LoRA cannot adapt."""
    from transformers.pytorch_utils import Conv1D

    if not names:
        raise TaskArithError("LoRA fine-tuning has no target weights: name them with the option trainable")
    params = dict(base.named_parameters())
    targets = []
    for name in names:
        weight = params[name]
        if weight.dim() != 2:
            raise TaskArithError(
                f"LoRA target {quoted(name)} has shape {tuple(weight.shape)}: LoRA adapts 2-D weights only; "
                "choose the targets with the option trainable (e.g. 'attention' or a regular expression of weights)"
            )
        module, _, leaf = name.rpartition(".")
        owner = base.get_submodule(module) if module else base
        transposed = isinstance(owner, Conv1D) and leaf == "weight"
        out_features, in_features = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        if not 1 <= rank <= min(out_features, in_features):
            raise TaskArithError(
                f"fine-tuning option lora_rank={rank} is too large for LoRA target {quoted(name)} of shape "
                f"{tuple(weight.shape)}: at most {min(out_features, in_features)}"
            )
        targets.append(LoraTarget(name, module, int(out_features), int(in_features), transposed))
    return targets


def initial_lora_a(target: LoraTarget, rank: int, seed: int, *, dtype: torch.dtype) -> torch.Tensor:
    """A0 for ``target`` as PEFT initialises lora_A (Kaiming-uniform, a = sqrt(5)), from the run's seed.

    Each target draws from a stream named by the seed and its parameter, so A0 does not depend on which
    other weights are adapted, and a resumed run (or a reader of the vector) can rebuild it exactly.
    """
    generator = torch.Generator().manual_seed(derived_seed(seed, "lora_A", target.param, bits=62))
    a = torch.empty(rank, target.in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a.to(dtype)


class LoraModel(nn.Module):
    """f(x; theta0 + dW(A, B)) for a base module held by reference; only the factors are parameters to train.

    The factors of target ``module`` are named ``lora_A/<module>`` and ``lora_B/<module>`` in
    :meth:`named_factors` (the names a fine-tuning checkpoint stores them under).
    """

    train_a = True

    def __init__(
        self,
        base: nn.Module,
        names: Sequence[str],
        *,
        rank: int = DEFAULT_RANK,
        alpha: float = DEFAULT_ALPHA,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.base = base
        self.targets = lora_targets(base, names, rank)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        params = dict(base.named_parameters())
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for target in self.targets:
            weight = params[target.param]
            a = initial_lora_a(target, rank, seed, dtype=weight.dtype).to(weight.device)
            self.lora_A.append(nn.Parameter(a, requires_grad=self.train_a))
            b = torch.zeros(target.out_features, rank, dtype=weight.dtype, device=weight.device)
            self.lora_B.append(nn.Parameter(b))

    def named_factors(self) -> list[tuple[str, nn.Parameter]]:
        """The trained factors under unique names, in target order (A then B per target)."""
        named = []
        for target, a, b in zip(self.targets, self.lora_A, self.lora_B, strict=True):
            if self.train_a:
                named.append((f"lora_A/{target.module}", a))
            named.append((f"lora_B/{target.module}", b))
        return named

    def summary(self) -> dict[str, Any]:
        """Rank, alpha, scaling and target weights, for the run record."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.scaling,
            "targets": [target.param for target in self.targets],
        }

    def deltas(self) -> dict[str, torch.Tensor]:
        """dW = (alpha / r) * B @ A per target, in the layout of the base's weight (differentiable)."""
        deltas = {}
        for target, a, b in zip(self.targets, self.lora_A, self.lora_B, strict=True):
            delta = self.scaling * (b @ a)
            deltas[target.param] = delta.T if target.transposed else delta
        return deltas

    def _frozen(self) -> dict[str, torch.Tensor]:
        # Detached, so backward never writes gradients into the shared pre-trained weights.
        return {name: param.detach() for name, param in self.base.named_parameters()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = self._frozen()
        for name, delta in self.deltas().items():
            params[name] = params[name] + delta
        return functional_call(self.base, params, args=args, kwargs=kwargs)


class LinearLora(LoraModel):
    """f(x; W0) + J_W f(x; W0) . dW with dW = (alpha / r) * B @ A0: LoRA linearized at PEFT's initialisation.

    Linearizing in phi = (A, B) at (A0, B0 = 0) gives J_A = 0 (dW = s B A and B0 = 0), so only B moves the
    model; A stays A0 and is not trained (``lora_A`` factors have ``requires_grad=False``).
    """

    train_a = False

    def __init__(self, base: nn.Module, names: Sequence[str], **options: Any) -> None:
        _check_attention(base)
        super().__init__(base, names, **options)

    def outputs_and_tangents(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """(f(x; theta0), J f(x) . dW) in the structure of the base's output, by one JVP."""
        return linearized_call(self.base, self._frozen(), self.deltas(), args, kwargs)

    def hidden_and_tangent(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        primal, tangent = self.outputs_and_tangents(**batch)
        return primal.last_hidden_state, tangent.last_hidden_state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return linearized_output(self.base, self._frozen(), self.deltas(), args, kwargs)
