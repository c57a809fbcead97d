"""The empirical neural tangent kernel of an encoder on two tasks' inputs, and how local its eigenvectors are.

The tangent paper links weight disentanglement to the *spatial localization* of the NTK's eigenfunctions:
on the union of two tasks' inputs, the kernel of a pre-trained model has eigenfunctions whose energy sits
on one task's inputs, while those of a randomly initialized model spread over both. Here:

* f(x) is the pooled encoder output (the function f_lin linearizes; the frozen head stays outside), and
  K(x, x') = sum_k grad_theta f_k(x) . grad_theta f_k(x'), the trace over the D output dimensions,
  with theta every encoder parameter;
* K is exact: per-example Jacobians of a few outputs at a time (``torch.func.jacrev``, vectorized over those
  outputs, and over the inputs for image models), contracted into K one parameter tensor at a time, so memory
  stays at about N x (outputs per chunk) x P floats;
* each unit-norm eigenvector u_i gets the share of its energy on each task, sum_{x in task} u_i(x)^2
  (the paper's exact "local energy" formula was not available; docs/claims.md gives this definition).

Cost: N x D backward passes (vectorized over each chunk of outputs) and about 2 N^2 D P multiply-adds for the
contraction, P the parameter count; :func:`ntk_cost` states it before a run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call, jacrev, vmap
from tqdm.auto import tqdm

from taskarith.data import Task
from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.linearize import jvp_safe_kernels
from taskarith.models import Pretrained
from taskarith.models.zero_shot import mean_pool

NTK_FORMAT = "taskarith.ntk/1"
DEFAULT_MEMORY_GB = 4.0


def ntk_cost(model: Pretrained, inputs: Sequence[Any]) -> dict[str, float]:
    """What an exact NTK of ``inputs`` costs: outputs D, parameters P, backward passes N x D, multiply-adds N^2 D P."""
    parameters = sum(p.numel() for p in model.encoder.parameters())
    outputs = _output_dim(model, inputs)
    count = len(inputs)
    return {
        "examples": count,
        "outputs": outputs,
        "parameters": parameters,
        "backward_passes": count * outputs,
        "contraction_macs": float(count) ** 2 * outputs * parameters,
    }


@torch.no_grad()
def _output_dim(model: Pretrained, inputs: Sequence[Any]) -> int:
    return int(model.encoder(**model.tokenize(list(inputs[:1]))).last_hidden_state.shape[-1])


def empirical_ntk(
    model: Pretrained,
    inputs: Sequence[Any],
    *,
    memory_gb: float = DEFAULT_MEMORY_GB,
    progress: bool = True,
    vectorize: bool | None = None,
) -> torch.Tensor:
    """The (N, N) trace NTK of the pooled encoder output on ``inputs``, in float64, rows in input order.

    ``memory_gb`` bounds the per-example Jacobian block held at once (N x outputs per chunk x P floats).
    ``vectorize`` maps the per-example Jacobians over the inputs with ``vmap`` (default: for image models,
    whose inputs share one shape and whose forward never branches on values); otherwise one input at a time.
    """
    if len(inputs) < 2:
        raise TaskArithError(f"the NTK needs at least two inputs, got {len(inputs)}")
    encoder = model.encoder
    params = {name: p.detach() for name, p in encoder.named_parameters()}
    buffers = {name: b.detach() for name, b in encoder.named_buffers()}
    count = len(inputs)
    outputs = _output_dim(model, inputs)
    per_output = _check_budget(model, count, memory_gb)
    # The block, and about as much again for jacrev's result and its concatenation into the block.
    chunk = max(1, min(outputs, int(memory_gb * 2**30 // (2 * per_output))))
    # Text goes one input at a time, unpadded: each Jacobian is of exactly f(x), and the model's own code runs
    # outside vmap (Hugging Face's mask helpers branch on the mask's values, which vmap cannot trace).
    batches = [model.tokenize([item]) for item in inputs]
    if vectorize is None:
        vectorize = model.modality == "image"
    stacked = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]} if vectorize else {}

    def pooled(theta: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
        hidden = functional_call(encoder, (dict(theta), buffers), args=(), kwargs=dict(batch)).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])[0, lo:hi]

    def pooled_one(
        theta: Mapping[str, torch.Tensor], example: Mapping[str, torch.Tensor], lo: int, hi: int
    ) -> torch.Tensor:
        return pooled(theta, {key: value.unsqueeze(0) for key, value in example.items()}, lo, hi)

    kernel = torch.zeros(count, count, dtype=torch.float64, device=model.device)
    bar = tqdm(
        total=outputs,
        desc=f"NTK of {shown(model.name, 60)} ({count} inputs)",
        unit="output",
        leave=False,
        disable=not progress,
    )
    with jvp_safe_kernels(), bar:
        for lo in range(0, outputs, chunk):
            hi = min(outputs, lo + chunk)
            if vectorize:
                jacobians = vmap(jacrev(pooled_one), in_dims=(None, 0, None, None))(params, stacked, lo, hi)
                blocks = {name: block.reshape(count, -1) for name, block in jacobians.items()}
            else:
                blocks = {
                    name: torch.empty(count, (hi - lo) * p.numel(), device=model.device) for name, p in params.items()
                }
                for i, batch in enumerate(batches):
                    for name, block in jacrev(pooled)(params, batch, lo, hi).items():
                        blocks[name][i] = block.reshape(-1)
            # One parameter tensor at a time, summed over the chunk's outputs: float32 products over one
            # tensor's entries, float64 across tensors and chunks (no N x P concatenation, and the float32
            # sums stay short enough to agree with a float64 reference to ~1e-6).
            for block in blocks.values():
                kernel += (block @ block.T).double()
            del blocks
            bar.update(hi - lo)
    return (kernel + kernel.T) / 2  # exact symmetry; float32 products leave ~1e-7 asymmetry


def localization(kernel: torch.Tensor, task_sizes: Mapping[str, int], top: int = 20) -> dict[str, Any]:
    """Eigendecomposition of ``kernel`` (rows grouped by task, in ``task_sizes`` order) and each top
    eigenvector's share of energy on each task, sum_{x in task} u_i(x)^2 (the shares of a vector sum to 1)."""
    sizes = list(task_sizes.values())
    if sum(sizes) != kernel.shape[0]:
        raise TaskArithError(f"task sizes {dict(task_sizes)} do not add up to the kernel's {kernel.shape[0]} rows")
    values, vectors = torch.linalg.eigh(kernel.double())
    order = torch.argsort(values, descending=True)[: min(top, len(values))]
    values, vectors = values[order], vectors[:, order]
    energy = vectors.pow(2)
    shares, start = {}, 0
    for name, size in task_sizes.items():
        shares[name] = energy[start : start + size].sum(dim=0).tolist()
        start += size
    largest = [max(shares[name][i] for name in shares) for i in range(len(order))]
    trace = float(torch.diagonal(kernel).sum())
    if not trace > 0:
        raise TaskArithError("the NTK is zero on these inputs (the output does not depend on the parameters)")
    return {
        "eigenvalues": values.tolist(),
        "eigenvalue_fraction": [float(v) / trace for v in values],
        "shares": shares,
        "largest_share": largest,
        "mean_top_share": sum(largest) / len(largest),
        # Equal task sizes: an eigenvector spread evenly has largest share 1 / (number of tasks).
        "uniform_share": max(sizes) / sum(sizes),
    }


def _inputs_of(tasks: Sequence[Task], examples: int, split: str) -> dict[str, list[Any]]:
    if len(tasks) < 2:
        raise TaskArithError("the NTK localization study needs at least two tasks")
    if examples < 1:
        raise TaskArithError(f"examples={examples}: at least one input per task is needed")
    chosen = {}
    for task in tasks:
        items = task.split(split).inputs[:examples]
        if len(items) < examples:
            raise TaskArithError(f"task '{task.name}' has {len(items)} {split} examples; {examples} were asked for")
        chosen[task.name] = list(items)
    return chosen


def check_ntk_study(
    models: Mapping[str, Pretrained],
    tasks: Sequence[Task],
    *,
    examples: int = 32,
    split: str = "test",
    memory_gb: float = DEFAULT_MEMORY_GB,
) -> None:
    """Refuse, before any expensive work, a study whose inputs are missing or whose Jacobian block exceeds the budget."""
    count = len(tasks) * examples
    _inputs_of(tasks, examples, split)
    for model in models.values():
        _check_budget(model, count, memory_gb)


def _check_budget(model: Pretrained, count: int, memory_gb: float) -> int:
    """Bytes of one output dimension's per-example Jacobians (N x P float32), refused above ``memory_gb``."""
    total = sum(p.numel() for p in model.encoder.parameters())
    per_output = count * total * 4
    if per_output > memory_gb * 2**30:
        raise TaskArithError(
            f"an exact NTK of {count} inputs of '{model.name}' needs {per_output / 2**30:.1f} GiB "
            f"per output dimension ({total:,} parameters); allowed {memory_gb:g} GiB: use fewer "
            "examples or a larger memory budget"
        )
    return per_output


def ntk_study(
    models: Mapping[str, Pretrained],
    tasks: Sequence[Task],
    *,
    examples: int = 32,
    split: str = "test",
    top: int = 20,
    memory_gb: float = DEFAULT_MEMORY_GB,
    progress: bool = True,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """The NTK of each model (e.g. ``{"pretrained": ..., "random_init": ...}``) on the first ``examples``
    inputs of each task's ``split``, its localization, and what it cost."""
    chosen = _inputs_of(tasks, examples, split)
    for model in models.values():
        _check_budget(model, len(tasks) * examples, memory_gb)
    inputs = [item for items in chosen.values() for item in items]
    sizes = {name: len(items) for name, items in chosen.items()}
    result: dict[str, Any] = {
        "format": NTK_FORMAT,
        "tasks": list(sizes),
        "examples_per_task": examples,
        "split": split,
        "top": min(top, len(inputs)),
        "definition": "K(x, x') = sum_k grad f_k(x) . grad f_k(x'), f the pooled encoder output; "
        "share of task t in eigenvector u (unit norm) = sum over t's inputs of u(x)^2",
    }
    for label, model in models.items():
        cost = ntk_cost(model, inputs)
        on_stage(
            f"NTK of the {label} model: {len(inputs)} inputs x {cost['outputs']} outputs, "
            f"{cost['parameters']:,} parameters ({cost['contraction_macs']:.2g} multiply-adds)"
        )
        started = time.perf_counter()
        kernel = empirical_ntk(model, inputs, memory_gb=memory_gb, progress=progress)
        seconds = time.perf_counter() - started
        result[label] = {
            "model": model.name,
            "hash": model.base_hash,
            "seconds": round(seconds, 1),
            "cost": cost,
            **localization(kernel, sizes, top),
        }
        if not all(math.isfinite(v) for v in result[label]["eigenvalues"]):
            raise TaskArithError(f"the NTK of the {label} model has non-finite eigenvalues")
    return result
