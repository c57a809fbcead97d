"""Merging methods as pure per-tensor functions behind one registry.

Every method maps the task vectors' deltas for ONE parameter to the merged delta for it::

    merged = MERGE_METHODS["ties"]([tau_a.deltas[k], tau_b.deltas[k]], generator=g, density=0.2)
    theta[k] = theta0[k] + merged

Working one tensor at a time is what lets the same function serve an in-memory merge
(:func:`merge_task_vectors`) and a streaming, out-of-core merge that never holds more than one
tensor per model. Where a paper decides something over the whole flattened model (TIES's top-k),
the decision is made per tensor here, and the method's docstring says so.

Conventions shared by every method:

* ``deltas`` hold the same parameter of each task vector (same shape, same dtype); the result has
  that shape and dtype. Half-precision inputs are computed in float32 (float64 stays float64),
  because sums, means and SVDs of many small fp16 deltas lose the very entries being merged.
* ``generator`` is accepted by all methods and used only by those that draw random numbers (DARE).
  Random numbers are drawn on the generator's device, so a CPU generator gives the same masks
  whether the deltas live on the CPU or a GPU. :func:`parameter_generator` derives one per
  parameter from ``(seed, name)``; use it in any merge loop so results do not depend on the order
  in which tensors are visited.
* Hyper-parameters are keyword-only; :data:`DEFAULTS` lists them per method and
  :func:`check_hyperparameters` validates a user's choice and fills in the rest. The per-tensor
  functions trust their caller, so validate once before a merge, not once per tensor.
* ``scaling`` (lambda/alpha in the papers) defaults to 1.0 everywhere. The papers choose it on
  validation data; do the same with the library's alpha search rather than trusting a default.

A new method is one function, one entry in :data:`MERGE_METHODS` and one in
:data:`HYPERPARAMETERS`.

Three kinds of method, one home each (:data:`taskarith.merging.hyperparameters.METHOD_KINDS` says which is
which):

* per-tensor, data-free: ``method(deltas, *, generator, **hyper)`` in :data:`MERGE_METHODS`;
* statistics-dependent: ``method(name, deltas, statistics, **hyper)`` in :data:`STATISTICS_METHODS`, where
  ``statistics`` holds one :class:`~taskarith.merging.statistics.TensorStatistics` per model for the tensor
  ``name`` (RegMean, Fisher merging). Still one tensor at a time, so they stream too;
* learned: they need the vectors, the model and unlabeled inputs at once, so they are not per-tensor
  functions; each lives in its own module of :mod:`taskarith.merging` (AdaMerging: ``adamerging.py``),
  registered with the kind "learned".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from taskarith.data.tasks import stable_hash
from taskarith.errors import TaskArithError
from taskarith.merging import kernels
from taskarith.merging.hyperparameters import (
    DEFAULTS,
    HYPERPARAMETERS,
    Hyperparameter,
    check_hyperparameters,
    check_method,
)
from taskarith.merging.statistics import (
    MergeStatistics,
    TensorStatistics,
    check_base_hash,
    check_statistics,
    load_statistics,
    tensor_names,
)
from taskarith.vectors import TaskVector

__all__ = [
    "DEFAULTS",
    "HYPERPARAMETERS",
    "MERGE_METHODS",
    "STATISTICS_METHODS",
    "Hyperparameter",
    "MergeMethod",
    "breadcrumbs",
    "check_hyperparameters",
    "consensus",
    "dare",
    "dare_ties",
    "fisher",
    "get_merge_method",
    "merge_task_vectors",
    "merged_delta",
    "parameter_generator",
    "regmean",
    "task_arithmetic",
    "task_singular_components",
    "ties",
    "tsv",
]

# Called as ``method(deltas, *, generator=None, **hyperparameters) -> Tensor``. A Callable alias
# rather than a Protocol: a Protocol with **kwargs would reject every concrete method, whose
# hyper-parameters are named keyword arguments.
MergeMethod = Callable[..., torch.Tensor]


# shared machinery -----------------------------------------------------------------------------


def _working(deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The deltas in working precision; refuses what cannot be merged.

    Already-float32/64 deltas come back as the caller's own tensors: never modify them in place.
    """
    if len(deltas) == 0:
        raise TaskArithError("no task-vector tensors to merge")
    first = deltas[0]
    if not first.is_floating_point():
        raise TaskArithError(f"cannot merge {first.dtype} tensors: task vectors hold floating-point deltas")
    for i, delta in enumerate(deltas[1:], start=1):
        if delta.shape != first.shape:
            raise TaskArithError(
                f"cannot merge tensors of different shapes: delta 0 is {tuple(first.shape)}, "
                f"delta {i} is {tuple(delta.shape)}"
            )
        if delta.dtype != first.dtype:
            raise TaskArithError(
                f"cannot merge tensors of different dtypes: delta 0 is {first.dtype}, delta {i} is {delta.dtype}"
            )
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    return [delta.to(device=first.device, dtype=work) for delta in deltas]


def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """The deltas as one ``(T, *shape)`` tensor in working precision."""
    return torch.stack(_working(deltas))


def _finish(merged: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return merged.to(dtype=like.dtype)


def _drop_and_rescale(stacked: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (independently per task), rescale survivors by 1/density."""
    if density >= 1.0:
        return stacked
    # Draw in float32 on the generator's device: the masks then depend on the seed only, not on the
    # deltas' dtype or device, so an fp16 streaming merge on a GPU drops what an fp32 CPU merge drops.
    device = generator.device if generator is not None else stacked.device
    draws = torch.rand(stacked.shape, generator=generator, device=device, dtype=torch.float32)
    keep = (draws < density).to(stacked.device)
    return torch.where(keep, stacked / density, torch.zeros_like(stacked))


def _nearest_orthonormal(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal Procrustes / polar factor P Q^T of M = P S Q^T: the closest matrix with orthonormal columns."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def _tsv_components(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tasks, rows, cols = stacked.shape
    # Each task gets an equal 1/T share of the rank, as in the paper; at least one direction per task
    # so that a layer narrower than the number of tasks is not silently zeroed.
    rank = max(1, min(rows, cols) // tasks)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    u, s, vh = u[:, :, :rank], s[:, :rank], vh[:, :rank, :]
    # Concatenate task by task: column t*rank + j is task t's j-th singular direction.
    u_cat = u.permute(1, 0, 2).reshape(rows, tasks * rank)
    v_cat = vh.permute(2, 0, 1).reshape(cols, tasks * rank)
    return _nearest_orthonormal(u_cat), s.reshape(-1), _nearest_orthonormal(v_cat)


def parameter_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one parameter, seeded from ``(seed, name)`` only.

    Deriving the stream from the parameter's name (with a process-independent hash) instead of
    sharing one generator across the loop makes a merge independent of the order in which tensors
    are visited, which a streaming merge reading shards in file order needs in order to reproduce an
    in-memory one exactly.
    """
    digest = stable_hash(f"{seed}\x00{name}")
    return torch.Generator().manual_seed(int.from_bytes(digest, "big"))


# the methods ----------------------------------------------------------------------------------


def task_arithmetic(
    deltas: Sequence[torch.Tensor], *, generator: torch.Generator | None = None, scaling: float = 1.0
) -> torch.Tensor:
    """scaling * sum_t tau_t.

    Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi, "Editing Models with Task
    Arithmetic", ICLR 2023, arXiv:2212.04089. The paper picks the scaling coefficient on held-out
    validation data (typically 0.3-0.5 when adding several tasks); 1.0 is the plain sum.
    """
    return _finish(kernels.task_arithmetic(_working(deltas), scaling), deltas[0])


def ties(
    deltas: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    density: float = 0.2,
    scaling: float = 1.0,
) -> torch.Tensor:
    """TIES-Merging: trim, elect sign, disjoint mean, then scale.

    Yadav, Tam, Choshen, Raffel, Bansal, "TIES-Merging: Resolving Interference When Merging
    Models", NeurIPS 2023, arXiv:2306.01708.

    1. Trim: keep each task's top-``density`` fraction of entries by magnitude (the paper's top-k%,
       k = 20 by default, so density 0.2), zero the rest. The paper ranks over the whole flattened
       task vector; here each tensor is trimmed on its own, which is what mergekit does and what a
       streaming merge allows (a global threshold would need a pass over every tensor first). Ties
       at the threshold go to the lowest flat index, so the result is deterministic.
    2. Elect: per entry, the sign of the sum of the trimmed values (the paper's "mass" rule, not a
       majority vote of signs).
    3. Disjoint merge: the mean over the tasks whose trimmed value is non-zero and agrees with the
       elected sign.
    4. Scale by ``scaling`` (lambda; the paper's recommended default without validation data is 1).

    All-zero input merges to zero; an entry whose mass cancels exactly takes the tensor's majority
    elected sign (see :func:`kernels.disjoint_mean`).
    """
    return _finish(kernels.ties(_working(deltas), density, scaling), deltas[0])


def dare(
    deltas: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    density: float = 0.5,
    scaling: float = 1.0,
) -> torch.Tensor:
    """DARE (drop and rescale) on each delta, then task arithmetic.

    Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", ICML 2024, arXiv:2311.03099.

    Each entry of each delta is dropped with probability p = 1 - ``density`` (an independent
    Bernoulli mask per task) and the survivors are divided by 1 - p, which keeps the expected delta
    unchanged; the sparsified deltas are then summed and multiplied by ``scaling``. The paper drops
    up to 90-99% of the deltas of LLMs fine-tuned with small updates (values within ~0.005) and
    searches p over 0.1..0.9 when merging; 0.5 is the middle of that grid, because large
    drop rates break models whose deltas are large. ``density=1`` is exactly task arithmetic.
    Pass a ``generator`` for reproducible masks; without one the global torch RNG is used.
    """
    stacked = _drop_and_rescale(_stack(deltas), density, generator)
    return _finish(scaling * stacked.sum(dim=0), deltas[0])


def dare_ties(
    deltas: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    density: float = 0.5,
    scaling: float = 1.0,
) -> torch.Tensor:
    """DARE's drop-and-rescale in place of TIES's trim, then TIES's sign election and disjoint mean.

    DARE paper as in :func:`dare` (it pairs DARE with TIES-Merging as a pre-processing step); the
    merge steps are those of :func:`ties`. As in mergekit's ``dare_ties``, the random drop is the
    only sparsification (no magnitude trim on top). One difference from mergekit: mergekit's
    ``dare_ties`` sums the agreeing entries by default (``normalize: false``), whereas this takes
    their mean, as TIES-Merging does; with equal weights mergekit's result is this one times the
    number of agreeing tasks.
    """
    stacked = _drop_and_rescale(_stack(deltas), density, generator)
    merged: torch.Tensor = kernels.disjoint_mean(stacked)  # type: ignore[arg-type]  # a stack iterates as a sequence
    return _finish(scaling * merged, deltas[0])


def breadcrumbs(
    deltas: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    density: float = 0.15,
    gamma: float = 0.01,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Model Breadcrumbs: per tensor, drop the largest outliers and the smallest entries, then add.

    Davari, Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    ECCV 2024, arXiv:2312.06795.

    Each task's tensor (the paper masks layer by layer) loses its top-``gamma`` fraction of entries
    by magnitude (outliers that would dominate the merge) and everything below the next
    ``density`` fraction (negligible perturbations), so ``density`` is the fraction kept and
    1 - density - gamma the fraction removed from the bottom. The masked deltas are summed and
    multiplied by ``scaling``. The names follow mergekit (its ``gamma`` is the paper's outlier
    percentile); the defaults follow the authors' released search (keep 15%, i.e. 85% sparsity;
    their outlier range 0.1-1%, mergekit's default 1%). Counts round so that tiny tensors keep
    their entries: the outlier count rounds down, the kept count up; ties go to lower indices.
    """
    stacked = _stack(deltas)
    masked = torch.stack([_magnitude_band(delta, density, gamma) for delta in stacked])
    return _finish(scaling * masked.sum(dim=0), deltas[0])


def _magnitude_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    flat = delta.reshape(-1)
    n = flat.numel()
    magnitude = flat.abs()
    outliers = kernels.count_down(gamma, n)
    kept = kernels.count_up(density, n)
    # Both masks break ties the same way, so the top-`outliers` set is inside the larger one.
    band = kernels.top_k_mask(magnitude, min(n, outliers + kept)) & ~kernels.top_k_mask(magnitude, outliers)
    return (flat * band).reshape(delta.shape)


def consensus(
    deltas: Sequence[torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    tall_lambda: float = 0.4,
    k: int = 2,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Consensus Task Arithmetic: keep only the multi-task entries that at least k tasks rely on.

    Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, "Localizing Task Information for Improved
    Model Merging and Compression", ICML 2024, arXiv:2405.07813.

    With tau_MTL = sum_t tau_t, task t's TALL mask is m_t = |tau_t| >= tall_lambda * |tau_MTL - tau_t|
    (the entries where task t's own change outweighs what the other tasks add there). The consensus
    mask keeps the entries set in at least ``k`` TALL masks: k = 2 removes both "catastrophic"
    weights (no task needs them) and "selfish" ones (one task only); k = 1 removes only the former,
    k = 0 is plain task arithmetic and k > T gives zero. The result is scaling * mask * tau_MTL.
    The paper picks lambda per task from {0.2, ..., 0.6} on validation data; 0.4 is the middle.
    The authors' code uses a strict ``>`` where the paper writes ``>=``; they differ only on exact
    equality.
    """
    stacked = _stack(deltas)
    multi_task = stacked.sum(dim=0)
    tall_masks = stacked.abs() >= tall_lambda * (multi_task - stacked).abs()
    keep = tall_masks.sum(dim=0) >= k
    return _finish(scaling * multi_task * keep, deltas[0])


def task_singular_components(deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TSV-M's decorrelated factors of 2-D deltas: (U_perp, sigma, V_perp), merged = U_perp diag(sigma) V_perp^T.

    Each task keeps its top floor(min(rows, cols) / T) singular triplets; the left and right singular
    vectors of all tasks are concatenated and replaced by their nearest matrices with orthonormal
    columns (the polar factor P Q^T of the concatenation's SVD P S Q^T), which removes the overlap
    between tasks' subspaces while keeping each task's singular values. When the concatenation
    has more columns than rows (more tasks than the layer is wide) only its rows can be orthonormal.
    Returned in working precision (float32, or float64 for float64 input).
    """
    stacked = _stack(deltas)
    if stacked.dim() != 3:
        raise TaskArithError(f"task singular vectors need 2-D tensors, got shape {tuple(stacked.shape[1:])}")
    return _tsv_components(stacked)


def tsv(
    deltas: Sequence[torch.Tensor], *, generator: torch.Generator | None = None, scaling: float = 1.0
) -> torch.Tensor:
    """TSV-Merge (TSV-M): low-rank per task, decorrelated across tasks, for 2-D tensors.

    Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodola, "Task Singular Vectors: Reducing
    Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081.

    2-D tensors: see :func:`task_singular_components`; the merged delta is U_perp diag(sigma) V_perp^T
    times ``scaling`` (the paper uses alpha = 1 without tuning). With one task the full rank is kept
    and the input comes back; tasks whose singular subspaces are already orthogonal come back summed.
    Other tensors (biases, LayerNorm, anything not 2-D) are averaged, as the authors' code does.
    """
    stacked = _stack(deltas)
    if stacked.dim() == 3 and stacked.numel() > 0:
        u, s, v = _tsv_components(stacked)
        merged = (u * s) @ v.T
    else:
        merged = stacked.mean(dim=0)
    return _finish(scaling * merged, deltas[0])


# statistics-dependent methods -----------------------------------------------------------------


def _solve_psd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix⁻¹ rhs for a symmetric positive semi-definite matrix, in float64; on its range only when it is
    singular (the minimum-norm least-squares solution), so a singular Gram never yields Inf or NaN.

    Cholesky when the matrix is positive definite; otherwise an eigendecomposition whose eigenvalues below
    n · eps · the largest count as zero (the pseudo-inverse's cut-off, numpy.linalg.pinv's rcond).
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = values.abs().max().clamp_min(0) * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    keep = values > cutoff
    if not bool(keep.any()):
        return torch.zeros_like(rhs)
    basis = vectors[:, keep]
    return basis @ ((basis.T @ rhs) / values[keep].unsqueeze(1))


def regmean(
    name: str,
    deltas: Sequence[torch.Tensor],
    statistics: Sequence[TensorStatistics],
    *,
    alpha: float = 0.95,
    gram_mean: int = 1,
) -> torch.Tensor:
    """RegMean: per linear layer, the weights whose outputs on every task's inputs are closest to that task's.

    Jin, Ren, Preotiuc-Pietro, Cheng, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    ICLR 2023, arXiv:2212.09849. For a weight W of a layer y = x Wᵀ with input Grams G_t = Σ x xᵀ,
    W* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t (acting on Wᵀ), the minimiser of Σ_t ‖X_t W*ᵀ − X_t W_tᵀ‖² when
    ``alpha`` = 1. G̃_t = alpha · G_t + (1 − alpha) · diag(G_t) shrinks the off-diagonal entries (the
    paper's alpha, ``reduce_non_diagonal_ratio`` in its code and in FusionBench, whose CLIP default 0.95
    is this default). ``gram_mean`` = 1 divides each G_t by its number of input rows first, as the
    official code and FusionBench do (every task then counts equally, whatever its number of tokens);
    0 keeps the sums (the objective above, where a task with more tokens weighs more).

    Computed on the deltas, which is the same merge: W* = θ0 + τ̄ + (Σ G̃)⁻¹ Σ G̃_t (τ_t − τ̄), τ̄ the
    mean delta, solved in float64. Written around the mean so that where Σ G̃ is singular (an input
    direction no task's data reached, fewer rows than inputs) the solution on its range is kept and the
    plain average is taken in the directions nothing reached: finite, never NaN. Tensors without a Gram
    (biases, LayerNorm, embeddings, convolutions) are averaged, as in the paper.
    """
    stacked = _stack(deltas)
    grams = [s.gram for s in statistics]
    if all(g is None for g in grams):
        return _finish(stacked.mean(dim=0), deltas[0])
    if any(g is None for g in grams) or stacked.dim() != 3:
        raise TaskArithError(
            f"RegMean needs the Gram of '{name}' for every model or for none, and a 2-D weight "
            f"(got {sum(g is not None for g in grams)} of {len(grams)} Grams, shape {tuple(stacked.shape[1:])})"
        )
    # Column-major views: D_t is (inputs, outputs), so that y = x D_t.
    columns = stacked if statistics[0].transposed else stacked.transpose(1, 2)
    columns = columns.double()
    mean = columns.mean(dim=0)
    total = torch.zeros(columns.shape[1], columns.shape[1], dtype=torch.float64, device=columns.device)
    rhs = torch.zeros_like(mean)
    for stats, delta in zip(statistics, columns, strict=True):
        gram = stats.gram.to(device=columns.device, dtype=torch.float64)  # type: ignore[union-attr]  # checked above
        if tuple(gram.shape) != (columns.shape[1], columns.shape[1]):
            raise TaskArithError(
                f"the Gram of '{name}' is {tuple(gram.shape)}; the weight takes {columns.shape[1]} inputs"
            )
        if gram_mean:
            gram = gram / max(stats.tokens, 1)
        if alpha != 1.0:
            gram = alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))
        total += gram
        rhs += gram @ (delta - mean)
    merged = mean + _solve_psd(total, rhs)
    merged = merged if statistics[0].transposed else merged.T
    return _finish(merged.to(stacked.dtype), deltas[0])


def fisher(
    name: str,
    deltas: Sequence[torch.Tensor],
    statistics: Sequence[TensorStatistics],
    *,
    epsilon: float = 1e-6,
    normalize: int = 0,
) -> torch.Tensor:
    """Fisher merging: the average of the models weighted, entry by entry, by their diagonal Fisher.

    Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, arXiv:2111.09832.
    θ* = Σ_t F̂_t θ_t / Σ_t F̂_t with F̂_t = F_t + ``epsilon`` (FusionBench's ``minimal_fisher_weight``,
    1e-6; the official code's fisher_floor / fisher_smooth): an entry no model's Fisher weighs gets the
    plain average rather than 0/0, and with ``epsilon`` = 0 such entries (Σ_t F_t = 0) fall back to the
    average explicitly. ``normalize`` = 1 first scales each model's F̂_t by c_t ∝ 1 / (‖F_t‖ + epsilon),
    ‖F_t‖ the L2 norm of the model's whole Fisher, Σ c_t = 1 (FusionBench's ``normalize_fisher_weight``,
    on in its CLIP configuration; off in the paper). Computed on the deltas, the same merge.
    """
    stacked = _stack(deltas)
    fishers = [s.fisher for s in statistics]
    if any(f is None for f in fishers):
        raise TaskArithError(f"Fisher merging needs the Fisher of '{name}' for every model")
    weights = torch.stack([f.to(device=stacked.device, dtype=stacked.dtype) for f in fishers])  # type: ignore[union-attr]  # checked above
    if tuple(weights.shape) != tuple(stacked.shape):
        raise TaskArithError(
            f"the Fisher of '{name}' is {tuple(weights.shape[1:])}, the tensor {tuple(stacked.shape[1:])}"
        )
    weights = weights + epsilon
    if normalize:
        inverse = torch.tensor([1.0 / (s.fisher_norm + epsilon) for s in statistics], dtype=stacked.dtype)
        coefficients = (inverse / inverse.sum()).to(stacked.device)
        weights = weights * coefficients.reshape(-1, *([1] * (stacked.dim() - 1)))
    denominator = weights.sum(dim=0)
    weighted = (weights * stacked).sum(dim=0) / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    merged = torch.where(denominator > 0, weighted, stacked.mean(dim=0))
    return _finish(merged, deltas[0])


# registry -------------------------------------------------------------------------------------


StatisticsMethod = Callable[..., torch.Tensor]

STATISTICS_METHODS: dict[str, StatisticsMethod] = {"regmean": regmean, "fisher": fisher}

MERGE_METHODS: dict[str, MergeMethod] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "consensus": consensus,
    "tsv": tsv,
}


def get_merge_method(name: str) -> MergeMethod:
    """The per-tensor function of a data-free method (statistics methods: :data:`STATISTICS_METHODS`)."""
    if check_method(name) in STATISTICS_METHODS:
        raise TaskArithError(f"merging method '{name}' needs statistics: call merged_delta with statistics=")
    return MERGE_METHODS[name]


def _shared_meta(vectors: Sequence[TaskVector]) -> tuple[TaskVector, dict[str, Any]]:
    """The vector every other is checked against, and the merged vector's base hash and mode.

    TaskVector's own pairwise check refuses different bases, modes, keys, shapes and dtypes; comparing
    everything with a vector that has a base hash (when any has one) makes that check transitive,
    so [no hash, base A, base B] is refused too.
    """
    anchor = next((v for v in vectors if v.base_hash), vectors[0])
    meta: dict[str, Any] = {"base_hash": anchor.base_hash, "mode": anchor.mode}
    for vector in vectors:
        if vector is not anchor:
            meta = anchor._combine_meta(vector)
    return anchor, meta


def merged_delta(
    name: str,
    deltas: Sequence[torch.Tensor],
    method: str,
    params: Mapping[str, Any],
    seed: int,
    statistics: Sequence[TensorStatistics] | None = None,
) -> torch.Tensor:
    """One parameter's merged delta, exactly as :func:`merge_task_vectors` computes it.

    The single place where a parameter's name and the seed become its generator, and where a statistics
    method gets the tensor's statistics, so an in-memory merge and a streaming one give identical tensors.
    ``params`` should come from :func:`check_hyperparameters` (checked once per merge, not per tensor).
    """
    if method in STATISTICS_METHODS:
        if statistics is None:
            raise TaskArithError(f"merging method '{method}' needs statistics for tensor '{name}'")
        return STATISTICS_METHODS[method](name, deltas, statistics, **params)
    return get_merge_method(method)(deltas, generator=parameter_generator(seed, name), **params)


def merge_task_vectors(
    vectors: Sequence[TaskVector],
    method: str = "task_arithmetic",
    *,
    seed: int = 0,
    statistics: Sequence[str | os.PathLike | MergeStatistics] | None = None,
    **hyperparameters: object,
) -> TaskVector:
    """Merge task vectors parameter by parameter with a registered method.

    The vectors must share base model, mode and parameters. Randomized methods draw from
    :func:`parameter_generator` (seed, parameter name), so the result depends on ``seed`` but not
    on dict order. Statistics methods (``regmean``, ``fisher``) need ``statistics``: one file (or
    :class:`~taskarith.merging.statistics.MergeStatistics`) per vector, in the same order, computed on
    the vectors' base model. The returned vector's task reads like ``ties(a+b)`` and its config records
    the method, the full hyper-parameters and the seed.
    """
    if not vectors:
        raise TaskArithError("no task vectors to merge")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskArithError(f"the merge seed must be an integer, got {seed!r}")
    params = check_hyperparameters(method, hyperparameters, models=len(vectors), statistics=statistics is not None)
    anchor, meta = _shared_meta(vectors)
    per_tensor: dict[str, list[TensorStatistics]] = {}
    if statistics is not None:
        stats = load_statistics(statistics)
        check_statistics(method, stats, len(vectors), mode=meta["mode"])
        layout = {key: tuple(delta.shape) for key, delta in anchor.deltas.items()}
        names = tensor_names(stats[0], layout, layout, f"task vector {anchor.task or '?'}", subset=True)
        # A vector keyed by the encoder's names, over all of them, hashes the base as statistics do; one read
        # from prefixed checkpoints hashed other names, and one over a subset (attention-only, LoRA) the subset
        # only: their shapes are checked, and merge_checkpoints (which rehashes the base) checks the rest.
        if all(key == name for key, name in names.items()) and set(names) == set(stats[0].parameters):
            check_base_hash(stats, meta["base_hash"], f"of task vector {anchor.task or '?'}")
        per_tensor = {key: [s.for_tensor(names[key]) for s in stats] for key in anchor.deltas}
    deltas = {}
    for key in anchor.deltas:
        inputs = [v.deltas[key] for v in vectors]
        # A vector scaled past its dtype's range holds Inf, which TIES's sign election turns into a finite 0.
        for vector, delta in zip(vectors, inputs, strict=True):
            if delta.is_floating_point() and not torch.isfinite(delta).all():
                raise TaskArithError(
                    f"task vector {vector.task or '?'}: tensor '{key}' is NaN or Inf (a weight "
                    "too large for its dtype?); nothing was merged"
                )
        deltas[key] = merged_delta(key, inputs, method, params, seed, per_tensor.get(key))
        if deltas[key].is_floating_point() and not torch.isfinite(deltas[key]).all():
            settings = ", ".join(f"{name}={value:g}" for name, value in params.items())
            raise TaskArithError(
                f"merged tensor '{key}' ({method}, {settings}) is NaN or Inf in "
                f"{deltas[key].dtype}; nothing was written: lower the weights or the scaling"
            )
    tasks = [v.task for v in vectors]
    config = {"merge_method": method, "hyperparameters": params, "seed": seed, "merged_tasks": tasks}
    label = f"{method}({'+'.join(t or '?' for t in tasks)})"
    return TaskVector(deltas=deltas, task=label, config=config, **meta)
