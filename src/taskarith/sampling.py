"""The data order of fine-tuning: which examples each step sees, as pure functions of (seed, step).

A step's batch, its augmentation seeds and the other tasks' inputs a penalty looks at are all functions of
the run's seed and the step number, never of a generator's hidden state: a checkpoint then needs only the
weights, the optimizer moments and the step to continue exactly, any number of processes draw the same
global batch, and a user's own loop that calls these functions sees the same data as ``taskarith finetune``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Item = TypeVar("Item")
SAMPLINGS = ("strict", "cyclical", "pooled")


def derived_seed(*parts: int | str, bits: int = 40) -> int:
    """A seed for one random stream, named by ``parts`` (e.g. the run's seed, a role, a step, a task, a position).

    Hashing the whole name gives unrelated seeds to distinct names, where sums of offsets collide once a
    count outgrows its spacing; 40 bits leave room for ``batch_indices`` to multiply the seed by its epoch
    stride below torch's 64-bit seed limit."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - bits)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples in batch ``step``: epochs of seeded permutations laid end to end."""
    start, end = step * batch_size, (step + 1) * batch_size
    indices: list[int] = []
    epoch = start // num_examples
    while len(indices) < batch_size:
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        lo = max(start - epoch * num_examples, 0)
        hi = min(end - epoch * num_examples, num_examples)
        indices.extend(order[lo:hi].tolist())
        epoch += 1
    return indices


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def regularization_draw(
    pools: Sequence[Sequence[Item]],
    step: int,
    *,
    sampling: str = "strict",
    batch_size: int = 16,
    every: int = 1,
    seed: int = 0,
) -> list[list[Item]]:
    """The other tasks' inputs penalized at ``step``, one list per group the penalty averages over.

    With r = step // every the count of regularized steps (= step by default), strict: the r-th batch
    of every task, each walking through its own seeded epochs; cyclical: a batch from task r mod T only
    (its (r // T)-th); pooled: one group drawn i.i.d. from the union.
    """
    if not pools:
        return []
    if sampling == "pooled":
        union = [item for pool in pools for item in pool]
        # The draw of taskarith before 0.2, kept so that taujp_sq + pooled retrains the vectors made then.
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
        return [[union[i] for i in torch.randint(len(union), (batch_size,), generator=generator).tolist()]]

    def batch(task: int, position: int) -> list[Item]:
        # Each task walks through seeded epochs of its own; the stream's seed is named apart from the task's.
        stream = derived_seed(seed, "regularization", task)
        return [pools[task][i] for i in batch_indices(len(pools[task]), batch_size, stream, position)]

    if sampling == "cyclical":
        # Count the regularized steps, not the steps: with every > 1, step mod T could skip tasks for good.
        turn = step // every
        return [batch(turn % len(pools), turn // len(pools))]
    return [batch(task, step // every) for task in range(len(pools))]
