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
* ``orthoreg`` (Liu et al., CVPR 2026, as their released code computes it): no data at all; the sum over
  the trained matrices (every 2-D delta) of ||M - I||_F with M = dW^T dW, or dW dW^T where dW is wide
  (fewer rows than columns), so that the identity is the smaller one. ``orthoreg_sq`` squares each norm,
  as the paper's equation writes it.

Each is also an object that any training loop can call on the current delta (:class:`TauJp`,
:class:`KFACPenalty`, :class:`OrthoReg`): the other tasks' inputs or the factors are given once, at
construction, and ``penalty(delta, step)`` returns a differentiable scalar.

The fine-tuning loop computes the products J_theta0 f(x) . delta on the other tasks' inputs (in linear
mode in the same JVP as the task's own inputs) and hands them over one tensor per other task, with the
global batch size of each, so that under data parallelism every process's share sums to the exact
penalty. A new regularizer is one function and one line in ``REGULARIZERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from taskarith.errors import TaskArithError
from taskarith.models.zero_shot import mean_pool

# Bumped whenever a penalty's mathematical form changes, so that cached runs and saved vectors made
# with another form are never mistaken for this one (the fine-tuning configuration records it).
PENALTY_FORMS: dict[str, str] = {
    "taujp": "taujp/2:mean_tasks(mean_batch(||J delta||_2))",
    "taujp_sq": "taujp_sq/1:mean_tasks(mean_batch(||J delta||_2^2))",
    "kfac": "kfac/2",
    "orthoreg": "orthoreg/1:sum_matrices(||gram_small(dW) - I||_F)",
    "orthoreg_sq": "orthoreg_sq/1:sum_matrices(||gram_small(dW) - I||_F^2)",
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


def orthogonality_gap(delta_w: torch.Tensor) -> torch.Tensor:
    """||M - I||_F for one matrix update, M its smaller Gram: dW dW^T if dW is wide, else dW^T dW.

    The smaller side is the one that can be orthonormal at all: a wide matrix has orthonormal rows at
    best, a tall one orthonormal columns (OrthoReg's released code makes the same choice).
    """
    rows, cols = delta_w.shape
    gram = delta_w @ delta_w.T if rows < cols else delta_w.T @ delta_w
    identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return torch.linalg.matrix_norm(gram - identity)


def _orthoreg_terms(inputs: PenaltyInputs) -> list[torch.Tensor]:
    matrices = [value for value in inputs.delta.values() if value.dim() == 2]
    if not matrices:
        raise TaskArithError("OrthoReg found no trained matrix (2-D parameter) in the task vector to regularize")
    return [orthogonality_gap(value) for value in matrices]


def orthoreg_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    """OrthoReg as released: sum over the trained matrices of ||gram_small(dW) - I||_F (no data needed)."""
    return torch.stack(_orthoreg_terms(inputs)).sum()


def orthoreg_sq_penalty(inputs: PenaltyInputs) -> torch.Tensor:
    """OrthoReg as the paper's equation writes it: the same sum of squared Frobenius norms."""
    return torch.stack(_orthoreg_terms(inputs)).pow(2).sum()


REGULARIZERS: dict[str, Regularizer] = {
    "taujp": Regularizer(penalty=taujp_penalty, needs_inputs=True),
    "taujp_sq": Regularizer(penalty=taujp_sq_penalty, needs_inputs=True),
    "kfac": Regularizer(penalty=_kfac_penalty, needs_inputs=False),
    "orthoreg": Regularizer(penalty=orthoreg_penalty, needs_inputs=False),
    "orthoreg_sq": Regularizer(penalty=orthoreg_sq_penalty, needs_inputs=False),
}


def get_regularizer(name: str) -> Regularizer:
    if name not in REGULARIZERS:
        raise TaskArithError(f"unknown regularizer '{name}' (known: {', '.join(REGULARIZERS)})")
    return REGULARIZERS[name]


# ---------------------------------------------------------------------------------------------------------
# Penalties as objects for any training loop: ``loss = task_loss + lam * penalty(delta, step)``.


class Penalty(Protocol):
    """A differentiable interference penalty of the current delta = theta - theta0."""

    name: str
    needs_inputs: bool

    def __call__(self, delta: Mapping[str, torch.Tensor], step: int = 0) -> torch.Tensor: ...


def default_features(output: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """The representation a penalty measures, (examples, dim), from a module's output on ``batch``.

    An encoder's token states are mean-pooled over ``attention_mask`` (the embedding taskarith classifies);
    a tensor output is flattened per example; a ``ModelOutput`` with ``logits`` gives its logits.
    """
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor) and "attention_mask" in batch:
        return mean_pool(hidden, batch["attention_mask"])
    if isinstance(output, torch.Tensor):
        return output.reshape(output.shape[0], -1)
    for key in ("logits", "last_hidden_state", "image_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value.reshape(value.shape[0], -1)
    raise TaskArithError(
        f"cannot tell which part of a {type(output).__name__} output the penalty measures; pass features="
    )


class TauJp:
    """tau-Jp on a module: the other tasks' inputs are given once, the penalty is taken of the current delta.

    ``model`` is the *pre-trained* module (its current weights are theta0); ``inputs`` holds one sequence of
    raw inputs per other task, and ``collate`` turns a list of them into the module's keyword arguments
    (e.g. ``Pretrained.tokenize``). Each call draws the step's inputs exactly as ``taskarith finetune`` does
    (:func:`taskarith.sampling.regularization_draw`: ``sampling``, ``batch_size`` per task, ``every``,
    ``seed``), takes J_theta0 f(x) . delta for all of them in one JVP, and reduces them with the published
    penalty (``form="taujp"``) or its squared variant (``form="taujp_sq"``). On a step that ``every`` skips
    it returns 0. ``features`` picks the representation from the module's output (:func:`default_features`).
    ``theta0`` fixes the pre-trained weights when ``model`` itself is the one being trained in place.
    """

    needs_inputs = True

    def __init__(
        self,
        model: nn.Module,
        inputs: Sequence[Sequence[Any]],
        *,
        collate: Callable[[list[Any]], Mapping[str, Any]],
        features: Callable[[Any, Mapping[str, Any]], torch.Tensor] = default_features,
        form: str = "taujp",
        sampling: str = "strict",
        batch_size: int = 16,
        every: int = 1,
        seed: int = 0,
        theta0: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        from taskarith.sampling import SAMPLINGS

        if form not in ("taujp", "taujp_sq"):
            raise TaskArithError(f"tau-Jp form {form!r} is not one of taujp, taujp_sq")
        if sampling not in SAMPLINGS:
            raise TaskArithError(f"tau-Jp sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not inputs or any(len(pool) == 0 for pool in inputs):
            raise TaskArithError("tau-Jp needs at least one other task, each with at least one input")
        if batch_size < 1 or every < 1:
            raise TaskArithError(f"tau-Jp batch_size={batch_size} and every={every} must be >= 1")
        self.name = form
        self.model = model
        # theta0: the model's own weights at each call (a frozen pre-trained module), or a snapshot of them
        # when the module itself is being trained (standard fine-tuning in place, e.g. under a Trainer).
        self.theta0 = dict(theta0) if theta0 is not None else None
        self.pools = [list(pool) for pool in inputs]
        self.collate, self.features = collate, features
        self.sampling, self.batch_size, self.every, self.seed = sampling, batch_size, every, seed
        # Looked up now, so the penalty is the registry's (a test may swap it in before building the object).
        self.regularizer = get_regularizer(form)

    def batches(self, step: int) -> list[list[Any]]:
        """The other tasks' inputs penalized at ``step`` (empty on a step ``every`` skips)."""
        from taskarith.sampling import regularization_draw

        if step % self.every:
            return []
        return regularization_draw(
            self.pools, step, sampling=self.sampling, batch_size=self.batch_size, every=self.every, seed=self.seed
        )

    def from_tangents(
        self, delta: Mapping[str, torch.Tensor], tangents: Sequence[torch.Tensor], counts: Sequence[int] = ()
    ) -> torch.Tensor:
        """The penalty of J f(x) . delta already computed (one (examples, dim) tensor per group)."""
        return self.regularizer.penalty(PenaltyInputs(delta, tangents, counts))

    def __call__(self, delta: Mapping[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        from taskarith.linearize import linearized_call

        groups = self.batches(step)
        reference = next(iter(delta.values()))
        if not groups:
            return reference.new_zeros(())
        collated = self.collate([item for group in groups for item in group])
        # On delta's device: a collate function of CPU tensors must serve a model trained on a GPU.
        batch = {k: v.to(reference.device) if isinstance(v, torch.Tensor) else v for k, v in collated.items()}
        if self.theta0 is not None and next(iter(self.theta0.values())).device != reference.device:
            self.theta0 = {k: v.to(reference.device) for k, v in self.theta0.items()}  # moved once
        theta0 = self.theta0 if self.theta0 is not None else dict(self.model.named_parameters())
        _, tangent = linearized_call(self.model, theta0, delta, kwargs=batch)
        tangents = list(torch.split(self.features(tangent, batch), [len(group) for group in groups], dim=0))
        return self.from_tangents(delta, tangents)


class KFACPenalty:
    """TAK's dataless penalty delta^T G delta from K-FAC factors of the other tasks (:mod:`taskarith.kfac`)."""

    name = "kfac"
    needs_inputs = False

    def __init__(self, factors: Any, *, norm_scale: float = 10.0, projection_scale: float = 0.1) -> None:
        self.factors = factors
        self.options = {"norm_scale": norm_scale, "projection_scale": projection_scale}
        self.regularizer = get_regularizer("kfac")

    def __call__(self, delta: Mapping[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        return self.regularizer.penalty(PenaltyInputs(delta, factors=self.factors, options=self.options))


class OrthoReg:
    """OrthoReg on the trained matrices of delta (``form="orthoreg"`` as released, ``"orthoreg_sq"`` squared).

    ``params`` restricts it to some parameter names (default: every 2-D entry of delta, which in a
    subset fine-tuning holds only the trained ones).
    """

    needs_inputs = False

    def __init__(self, *, form: str = "orthoreg", params: Sequence[str] | None = None) -> None:
        if form not in ("orthoreg", "orthoreg_sq"):
            raise TaskArithError(f"OrthoReg form {form!r} is not one of orthoreg, orthoreg_sq")
        self.name = form
        self.params = None if params is None else set(params)
        self.regularizer = get_regularizer(form)

    def __call__(self, delta: Mapping[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        chosen = delta if self.params is None else {k: v for k, v in delta.items() if k in self.params}
        return self.regularizer.penalty(PenaltyInputs(chosen))
