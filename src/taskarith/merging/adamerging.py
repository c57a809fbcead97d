"""AdaMerging: merge coefficients learned by minimizing the prediction entropy on unlabeled inputs.

Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
ICLR 2024, arXiv:2310.02575; official code EnnengYang/AdaMerging (``src/main_task_wise_adamerging.py``,
``src/main_layer_wise_adamerging.py``).

The merged encoder is ``theta0 + sum_t sum_g lambda[t, g] * tau_t|g``, where ``tau_t|g`` is task vector t
restricted to the parameter group g: one group holding every parameter (``taskwise``, one coefficient per
vector) or one group per parameter tensor (``layerwise``, as the paper and FusionBench do: each entry of the
model's parameter list is a "layer"). The coefficients minimize

    sum over tasks k of the mean Shannon entropy of softmax(logits) on a batch of task k's unlabeled inputs,

each task scored with its own frozen head on the merged encoder, with the paper's optimizer: every
coefficient starts at 0.3, is clamped to [0, 1] inside the forward pass (the raw value is what Adam moves),
Adam with lr 1e-3 and betas (0.9, 0.999), 500 steps, each step two batches of 16 freshly shuffled inputs per
task. The paper's unlabeled inputs are the test inputs (results are then *transductive*); any split can
be named instead (:func:`adamerge_tasks`).

Three ways to compute the merged model's output, chosen by the vectors' mode:

* ``network`` (standard vectors): every step runs the encoder by ``functional_call`` on the merged weights
  and backpropagates to the coefficients, as the paper does.
* ``f_lin`` (linear vectors, ``shortcut=False``): every step runs the linearized encoder
  ``f(x; theta0) + J(x) . sum lambda tau`` by one JVP per batch and backpropagates through it.
* ``shortcut`` (linear vectors, the default): f_lin's pooled output is affine in every coefficient,
  ``p0(x) + sum_{t,g} lambda[t, g] * J(x) tau_t|g`` (mean pooling is linear too), so ``p0`` and every
  restricted tangent are computed once per unlabeled input and the coefficients are optimized on those
  cached tensors with no further pass through the network. The head (normalization, cosine) stays outside,
  exactly as in f_lin. Its cost is one JVP per (group, task, input batch), vmapped over consecutive
  groups and the T tasks at once so that they share the primal pass (``torch.func.vmap``; 16 groups for
  two tasks, fewer for more, so that the batched activation tangents stay those of 1,024 inputs):
  cheaper than optimizing through the network when the unlabeled sets are small against
  ``steps * batches * batch_size`` or the groups few (task-wise); benchmarks/adamerging_cost.py measures
  both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.func import functional_call, jvp, vmap

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError
from taskarith.models import Pretrained
from taskarith.models.zero_shot import ZeroShotClassifier, mean_pool
from taskarith.vectors import TaskVector, _target_module

if TYPE_CHECKING:
    from taskarith.data import Task

__all__ = [
    "COEFFICIENTS_FORMAT",
    "GRANULARITIES",
    "AdaMergingConfig",
    "AdaMergingResult",
    "adamerge_tasks",
    "adamerging",
    "entropy",
    "layer_groups",
]

GRANULARITIES = ("taskwise", "layerwise")
COEFFICIENTS_FORMAT = "taskarith.adamerging_coefficients/1"
Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdaMergingConfig:
    """The optimizer of the coefficients; the defaults are the paper's (its official code, both scripts)."""

    granularity: str = "layerwise"
    init: float = 0.3  # `prior = 0.3`
    clamp: tuple[float, float] | None = (0.0, 1.0)  # `torch.clamp(self.lambdas_raw, min=0.0, max=1.0)`
    lr: float = 1e-3  # Adam, betas (0.9, 0.999), no weight decay
    steps: int = 500  # `epochs = 500`, one optimizer step each
    batch_size: int = 16  # `get_dataset(..., batch_size=16)`
    batches_per_step: int = 2  # the loop breaks after batch i = 1: two batches per task per step
    seed: int = 0
    shortcut: bool = True  # linear vectors: optimize on cached JVPs (exact), not through f_lin

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise TaskArithError(
                f"AdaMerging granularity {quoted(self.granularity)} is not one of {', '.join(GRANULARITIES)}"
            )
        for key in ("init", "lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TaskArithError(f"AdaMerging '{key}' must be a finite number, got {quoted(value)}")
        if self.lr <= 0:
            raise TaskArithError(f"AdaMerging 'lr' = {self.lr:g} must be positive")
        for key in ("steps", "batch_size", "batches_per_step"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "steps" else 1):
                low = 0 if key == "steps" else 1
                raise TaskArithError(f"AdaMerging '{key}' must be an integer >= {low}, got {quoted(value)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TaskArithError(f"AdaMerging 'seed' must be a non-negative integer, got {quoted(self.seed)}")
        if self.clamp is not None:
            bottom, top = self.clamp
            if not (math.isfinite(bottom) and math.isfinite(top) and bottom <= top):
                raise TaskArithError(
                    f"AdaMerging 'clamp' = {quoted(self.clamp)} must be finite (low, high), low <= high"
                )

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "init": self.init,
            "clamp": list(self.clamp) if self.clamp is not None else None,
            "optimizer": "adam",
            "betas": [0.9, 0.999],
            "lr": self.lr,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "batches_per_step": self.batches_per_step,
            "seed": self.seed,
        }


@dataclass
class AdaMergingResult:
    """The merged vector, its coefficients and what learning them cost."""

    vector: TaskVector
    coefficients: torch.Tensor  # (vectors, groups), as applied (clamped)
    vector_names: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]  # the parameter names of each group
    history: list[float]  # the objective at each step, before that step's update
    path: str  # "network", "f_lin" or "shortcut"
    seconds: float  # total: caching (shortcut) and optimization
    forward_passes: int  # encoder evaluations of one batch (forwards or JVPs)
    backward_passes: int  # batches backpropagated through the encoder
    examples_through_network: int  # inputs summed over forward_passes
    split: str | None = None
    transductive: bool = False
    config: AdaMergingConfig = field(default_factory=AdaMergingConfig)
    cache_seconds: float = 0.0  # the shortcut's JVPs (part of ``seconds``)
    optimize_seconds: float = 0.0  # the steps themselves (part of ``seconds``)

    def record(self) -> dict[str, Any]:
        """The JSON record written beside the merged vector (:data:`COEFFICIENTS_FORMAT`)."""
        layerwise = self.config.granularity == "layerwise"
        return {
            "format": COEFFICIENTS_FORMAT,
            "method": "adamerging",
            "hyperparameters": self.config.hyperparameters(),
            "unlabeled_split": self.split,
            "transductive": self.transductive,
            "vectors": list(self.vector_names),
            "groups": [group[0] if layerwise else "all" for group in self.groups],
            "coefficients": {
                name: [float(c) for c in row] for name, row in zip(self.vector_names, self.coefficients, strict=True)
            },
            "history": self.history,
            "cost": {
                "path": self.path,
                "seconds": self.seconds,
                "cache_seconds": self.cache_seconds,
                "optimize_seconds": self.optimize_seconds,
                "forward_passes": self.forward_passes,
                "backward_passes": self.backward_passes,
                "examples_through_network": self.examples_through_network,
            },
        }


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch (the paper's ``softmax_entropy(x).mean(0)``)."""
    return -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def layer_groups(names: Sequence[str], granularity: str) -> tuple[tuple[str, ...], ...]:
    """The parameter groups that share a coefficient: all names at once, or one group per tensor."""
    if granularity not in GRANULARITIES:
        raise TaskArithError(f"AdaMerging granularity {quoted(granularity)} is not one of {', '.join(GRANULARITIES)}")
    return (tuple(names),) if granularity == "taskwise" else tuple((name,) for name in names)


# -------------------------------------------------------------------------------------------------


def _checked_vectors(vectors: Sequence[TaskVector], pretrained: Pretrained) -> tuple[str, str]:
    """(mode, prefix of the vectors' names inside the encoder) after the pairwise and base checks."""
    if not vectors:
        raise TaskArithError("AdaMerging: no task vectors to merge")
    anchor = next((v for v in vectors if v.base_hash), vectors[0])
    for vector in vectors:
        if vector is not anchor:
            anchor._combine_meta(vector)  # refuses other bases, modes, keys
    target = _target_module(pretrained.encoder, anchor.deltas)
    anchor.check_base(target.state_dict())
    params = dict(target.named_parameters())
    frozen = sorted(set(anchor.deltas) - set(params))
    if frozen:
        raise TaskArithError(
            f"AdaMerging learns coefficients of the encoder's parameters; task vector "
            f"{shown(anchor.task or '?')} also changes buffers {frozen[:3]}"
        )
    prefix = "" if target is pretrained.encoder else "encoder."
    return anchor.mode, prefix


def _check_unlabeled(unlabeled: Mapping[str, Sequence[Any]], heads: Mapping[str, torch.Tensor]) -> None:
    if not unlabeled:
        raise TaskArithError("AdaMerging: no unlabeled inputs (give at least one task's)")
    for name, inputs in unlabeled.items():
        if len(inputs) == 0:
            raise TaskArithError(f"AdaMerging: task {shown(name)} has no unlabeled inputs")
        if name not in heads:
            raise TaskArithError(f"AdaMerging: no head for task {shown(name)} (heads: {shown(sorted(heads))})")


def _draws(
    unlabeled: Mapping[str, Sequence[Any]], config: AdaMergingConfig
) -> Callable[[], dict[str, list[torch.Tensor]]]:
    """Each step's batches: per task a fresh shuffle of its inputs, the first ``batches_per_step`` batches
    of it (the paper builds a new shuffled loader every step and stops after two batches). One CPU generator
    in task order, so every path of a run sees the same inputs."""
    generator = torch.Generator().manual_seed(config.seed)
    per_step = config.batch_size * config.batches_per_step

    def draw() -> dict[str, list[torch.Tensor]]:
        batches = {}
        for name, inputs in unlabeled.items():
            order = torch.randperm(len(inputs), generator=generator)[:per_step]
            batches[name] = list(order.split(config.batch_size))
        return batches

    return draw


# The shortcut vmaps the JVPs of several groups at once, so that they share the primal pass. Its activation
# tangents are those of (groups x tasks x batch) inputs: at most _CHUNK_TANGENT_INPUTS (16 groups for two
# tasks and the cache's batches of 32), or T x batch when one group alone is more; the stacked parameter
# tangents (groups x tasks x the groups' parameters) stay within _CHUNK_ELEMENTS floats.
_CHUNK_TANGENT_INPUTS = 1024
_CHUNK_ELEMENTS = 2**25


def _group_chunks(
    groups: Sequence[Sequence[str]], sizes: Mapping[str, int], tasks: int, batch_size: int
) -> list[list[int]]:
    """Consecutive groups (model order, so one chunk's groups sit close in depth) in chunks within
    ``_CHUNK_TANGENT_INPUTS`` and ``_CHUNK_ELEMENTS`` (a group over either alone)."""
    most = max(1, _CHUNK_TANGENT_INPUTS // (tasks * batch_size))
    chunks: list[list[int]] = []
    elements = 0
    for g, names in enumerate(groups):
        size = sum(sizes[name] for name in names)
        if chunks and len(chunks[-1]) < most:
            grown = (len(chunks[-1]) + 1) * tasks * (elements + size)
            if grown <= _CHUNK_ELEMENTS:
                chunks[-1].append(g)
                elements += size
                continue
        chunks.append([g])
        elements = size
    return chunks


def _chunk_tangent(
    name: str, chunk: Sequence[int], groups: Sequence[Sequence[str]], taus: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """(chunk x T, *shape): tau_t of parameter ``name`` for the group holding it, zero for the chunk's others.
    A chunk of one group (task-wise: the whole model) takes the stacked vectors as they are, uncopied."""
    if len(chunk) == 1:
        return taus[name]
    tangent = taus[name].new_zeros(len(chunk), *taus[name].shape)
    for j, g in enumerate(chunk):
        if name in groups[g]:
            tangent[j] = taus[name]
    return tangent.flatten(0, 1)


def _pooled_cache(
    pretrained: Pretrained,
    inputs: Sequence[Any],
    theta0: Mapping[str, torch.Tensor],
    taus: Mapping[str, torch.Tensor],
    groups: Sequence[Sequence[str]],
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(p0 (N, D), tangents (N, T, G, D), JVP calls): f(x; theta0) and J(x) tau_t|g, pooled, for every input.

    Per chunk of consecutive groups (:func:`_group_chunks`) one JVP whose function takes only that chunk's
    parameters (the others enter as constants, so forward-mode work starts at the chunk's first use),
    vmapped over every (group, task) tangent: tau_t on the group's parameters, zero on the chunk's others.
    vmap leaves the unbatched primal computation unbatched, so the chunk's groups share one primal pass.
    """
    from taskarith.linearize import jvp_safe_kernels

    tasks = next(iter(taus.values())).shape[0]
    sizes = {name: theta0[name].numel() for group in groups for name in group}
    chunks = _group_chunks(groups, sizes, tasks, batch_size)
    calls = 0
    base: torch.Tensor | None = None
    tangents: torch.Tensor | None = None
    batches = list(pretrained.batches(inputs, batch_size))  # tokenized once, read once per chunk
    with torch.no_grad(), jvp_safe_kernels():
        for chunk in chunks:
            names = [name for g in chunk for name in groups[g]]
            sub = {name: theta0[name] for name in names}
            stacked = {name: _chunk_tangent(name, chunk, groups, taus) for name in names}
            for indices, batch in batches:
                mask = batch["attention_mask"]

                def states(group: Params, batch: Mapping[str, torch.Tensor] = batch) -> torch.Tensor:
                    return functional_call(pretrained.encoder, {**theta0, **group}, args=(), kwargs=dict(batch))[
                        "last_hidden_state"
                    ]

                def one(tangent: Params, sub: Params = sub, states: Callable = states) -> tuple[torch.Tensor, ...]:
                    primal, out = jvp(states, (sub,), (tangent,))[:2]
                    return primal, out

                primal, tangent = vmap(one)(stacked)
                calls += 1
                p = mean_pool(primal[0], mask).float()
                t = mean_pool(tangent.flatten(0, 1), mask.repeat(len(tangent), 1)).float()
                t = t.unflatten(0, (len(chunk), tasks, -1)).permute(2, 1, 0, 3)  # (batch, T, chunk, D)
                if base is None or tangents is None:
                    base = p.new_zeros(len(inputs), p.shape[1])
                    tangents = p.new_zeros(len(inputs), tasks, len(groups), p.shape[1])
                where = indices.to(p.device)
                if chunk[0] == 0:
                    base[where] = p
                tangents[where, :, chunk[0] : chunk[-1] + 1] = t
    assert base is not None and tangents is not None
    return base, tangents, calls


def adamerging(
    vectors: Sequence[TaskVector],
    pretrained: Pretrained,
    unlabeled: Mapping[str, Sequence[Any]],
    heads: Mapping[str, torch.Tensor],
    config: AdaMergingConfig | None = None,
    *,
    split: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> AdaMergingResult:
    """Learn AdaMerging's coefficients of ``vectors`` on ``unlabeled[task]`` inputs, scored with ``heads[task]``.

    ``unlabeled`` maps each task's name to its unlabeled inputs (what ``pretrained.tokenize`` takes) and
    ``heads`` the same names to the class vectors of its zero-shot head (``pretrained.head(task)``); the
    vectors and the tasks need not pair up. ``split`` only labels the result: ``"test"`` marks it
    transductive. Deterministic given ``config.seed`` on the CPU. The merged vector's config records the
    method, hyper-parameters, split and coefficients; :meth:`AdaMergingResult.record` is the JSON to save.
    """
    config = config or AdaMergingConfig()
    mode, prefix = _checked_vectors(vectors, pretrained)
    _check_unlabeled(unlabeled, heads)
    started = time.perf_counter()
    device = pretrained.device
    names = list(vectors[0].deltas)
    groups = layer_groups(names, config.granularity)
    theta0 = dict(pretrained.encoder.named_parameters())
    # (T, *shape) per parameter, on the model's device: what the merged weights are built from each step.
    stacked = {
        name: torch.stack([v.deltas[name].to(device, theta0[prefix + name].dtype) for v in vectors]) for name in names
    }
    group_of = {name: g for g, group in enumerate(groups) for name in group}
    classifiers = {
        task: ZeroShotClassifier(pretrained.encoder, heads[task].to(device), pretrained.logit_scale)
        for task in unlabeled
    }
    raw = torch.nn.Parameter(torch.full((len(vectors), len(groups)), float(config.init), device=device))
    optimizer = torch.optim.Adam([raw], lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
    draw = _draws(unlabeled, config)
    path = "network" if mode == "standard" else ("shortcut" if config.shortcut else "f_lin")
    forward = backward = examples = 0
    cache_seconds = 0.0

    def coefficients() -> torch.Tensor:
        return raw.clamp(*config.clamp) if config.clamp is not None else raw

    def merged_delta(lam: torch.Tensor) -> Params:
        return {prefix + n: torch.tensordot(lam[:, group_of[n]].to(t.dtype), t, dims=1) for n, t in stacked.items()}

    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if path == "shortcut":
        taus = {prefix + n: t for n, t in stacked.items()}
        prefixed = [tuple(prefix + n for n in group) for group in groups]
        for task, inputs in unlabeled.items():
            base, tangents, calls = _pooled_cache(
                pretrained, inputs, theta0, taus, prefixed, config.batch_size * config.batches_per_step
            )
            cache[task] = (base, tangents)
            forward += calls
            examples += len(inputs) * len(groups)  # each input through one JVP per group
        cache_seconds = time.perf_counter() - started

    def objective() -> torch.Tensor:
        nonlocal forward, backward, examples
        lam = coefficients()
        batches = draw()
        loss = raw.new_zeros(())
        if path == "shortcut":
            for task, chunks in batches.items():
                base, tangents = cache[task]
                for chunk in chunks:
                    rows = chunk.to(base.device)
                    pooled = base[rows] + torch.einsum("ntgd,tg->nd", tangents[rows], lam)
                    loss = loss + entropy(classifiers[task].logits_from_pooled(pooled))
            return loss
        from taskarith.linearize import hidden_and_tangent

        delta = merged_delta(lam)
        weights = {name: theta0[name] + d for name, d in delta.items()} if path == "network" else {}
        for task, chunks in batches.items():
            inputs = unlabeled[task]
            for chunk in chunks:
                batch = pretrained.tokenize([inputs[int(i)] for i in chunk])
                if path == "network":
                    hidden = functional_call(pretrained.encoder, {**theta0, **weights}, args=(), kwargs=batch)[
                        "last_hidden_state"
                    ]
                else:
                    primal, tangent = hidden_and_tangent(pretrained.encoder, theta0, delta, batch)
                    hidden = primal + tangent
                pooled = mean_pool(hidden, batch["attention_mask"])
                loss = loss + entropy(classifiers[task].logits_from_pooled(pooled))
                forward += 1
                backward += 1
                examples += len(chunk)
        return loss

    history: list[float] = []
    looping = time.perf_counter()
    for step in range(config.steps):
        loss = objective()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, history[-1])

    optimize_seconds = time.perf_counter() - looping
    with torch.no_grad():
        final = coefficients().detach().cpu()
    tasks = [v.task for v in vectors]
    vector_names = tuple(v.task or f"vector{i}" for i, v in enumerate(vectors))
    deltas = {
        name: torch.tensordot(
            final[:, group_of[name]].to(torch.float64), torch.stack([v.deltas[name].double() for v in vectors]), dims=1
        ).to(vectors[0].deltas[name].dtype)
        for name in names
    }
    result_config = {
        "merge_method": "adamerging",
        "hyperparameters": config.hyperparameters(),
        "seed": config.seed,
        "merged_tasks": tasks,
        "unlabeled": {
            "split": split,
            "transductive": split == "test",
            "tasks": {t: len(x) for t, x in unlabeled.items()},
        },
        "coefficients": {name: [float(c) for c in row] for name, row in zip(vector_names, final, strict=True)},
    }
    anchor = next((v for v in vectors if v.base_hash), vectors[0])
    vector = TaskVector(
        deltas=deltas,
        base_hash=anchor.base_hash,
        task=f"adamerging({'+'.join(t or '?' for t in tasks)})",
        mode=mode,
        config=result_config,
    )
    return AdaMergingResult(
        vector=vector,
        coefficients=final,
        vector_names=vector_names,
        groups=groups,
        history=history,
        path=path,
        seconds=time.perf_counter() - started,
        forward_passes=forward,
        backward_passes=backward,
        examples_through_network=examples,
        split=split,
        transductive=split == "test",
        config=config,
        cache_seconds=cache_seconds,
        optimize_seconds=optimize_seconds,
    )


def adamerge_tasks(
    vectors: Sequence[TaskVector],
    pretrained: Pretrained,
    tasks: Sequence[Task],
    split: str = "test",
    config: AdaMergingConfig | None = None,
    *,
    limit: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> AdaMergingResult:
    """:func:`adamerging` on each task's ``split`` inputs (labels unused; the first ``limit`` of them), with
    each task's head. ``split="test"`` is the paper's setting and marks the result transductive."""
    names = [task.name for task in tasks]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise TaskArithError(f"AdaMerging: task {shown(repeated[0])} is given twice")
    unlabeled: dict[str, Sequence[Any]] = {}
    for task in tasks:
        inputs = task.split(split).inputs[:limit]
        if not inputs:
            raise TaskArithError(f"AdaMerging: task {shown(task.name)} has no {split} inputs")
        unlabeled[task.name] = inputs
    heads = {task.name: pretrained.head(task) for task in tasks}
    return adamerging(vectors, pretrained, unlabeled, heads, config, split=split, on_step=on_step)
