"""Tasks: labelled classification data with a fixed, deterministic train/val/test split.

A :class:`Task` is immutable and carries everything a zero-shot head needs (class names and prompt
templates) plus its three splits; :func:`split_examples` makes the splits. This module is the core the
sources build on and imports nothing else from :mod:`taskarith.data`; built-in tasks and
:func:`~taskarith.data.registry.load_task` live in :mod:`taskarith.data.registry`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskarith.errors import TaskArithError

__all__ = [
    "SPLITS",
    "Examples",
    "Task",
    "split_examples",
    "stable_hash",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")

# Defaults keep CPU evaluation fast; every task, built-in or from a file, uses the same ones.
DEFAULT_VAL_FRACTION = 0.10
DEFAULT_TEST_FRACTION = 0.15
DEFAULT_MAX_TRAIN = 4000
DEFAULT_MAX_VAL = 300
DEFAULT_MAX_TEST = 500


def input_bytes(item: Any) -> bytes:
    """Bytes that identify one input: a text's UTF-8, an array's shape, type and pixels, a file's path."""
    if isinstance(item, str):
        return b"s" + item.encode("utf-8", "surrogatepass") + b"\0"
    if isinstance(item, Path):
        return b"p" + str(item).encode("utf-8", "surrogatepass") + b"\0"
    shape, dtype = getattr(item, "shape", None), getattr(item, "dtype", None)
    if shape is not None and dtype is not None and hasattr(item, "tobytes"):
        return b"a" + repr((tuple(shape), str(dtype))).encode() + item.tobytes()
    raise TaskArithError(f"unsupported input type {type(item).__name__}: use text, a pixel array or an image path")


@dataclass(frozen=True)
class Examples:
    """Parallel tuples of inputs and integer labels (indices into ``Task.classes``).

    Inputs are whatever the model's preprocessing takes: strings for text encoders; for image encoders,
    uint8 pixel arrays (height x width x channels) or paths of image files read when batched.
    """

    inputs: tuple[Any, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples, so the object is really immutable and hashable.
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "labels", tuple(int(label) for label in self.labels))
        if len(self.inputs) != len(self.labels):
            raise TaskArithError(
                f"Examples: {len(self.inputs)} inputs but {len(self.labels)} labels; pass one label per input."
            )

    def __len__(self) -> int:
        return len(self.inputs)

    def __repr__(self) -> str:
        return f"Examples(n={len(self)})"


@dataclass(frozen=True)
class Task:
    """A classification task: class names, prompt templates and a train/val/test split."""

    name: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    train: Examples
    val: Examples
    test: Examples
    domain: str
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.name:
            raise TaskArithError("Task: name is empty; give the task a name.")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise TaskArithError(
                f"Task {self.name!r}: classes must be at least 2 distinct names, got {self.classes!r}."
            )
        if not self.templates:
            raise TaskArithError(f"Task {self.name!r}: no prompt templates; give at least one, e.g. 'a {{}}.'")
        for template in self.templates:
            if "{}" not in template:
                raise TaskArithError(
                    f"Task {self.name!r}: template {template!r} has no '{{}}' placeholder for the class name."
                )
        for split in SPLITS:
            bad = sorted({y for y in self.split(split).labels if not 0 <= y < len(self.classes)})
            if bad:
                raise TaskArithError(
                    f"Task {self.name!r}: {split} labels {bad[:5]} are outside 0..{len(self.classes) - 1} "
                    f"for classes {self.classes!r}."
                )

    @functools.cached_property
    def fingerprint(self) -> str:
        """Content hash of classes, templates and the three splits: which data a run really saw."""
        digest = hashlib.blake2b(digest_size=8, person=b"taskarith")
        for part in (self.classes, self.templates):
            digest.update(repr(part).encode("utf-8", "surrogatepass"))
        for split in SPLITS:
            examples = self.split(split)
            digest.update(repr((split, len(examples), examples.labels)).encode())
            for item in examples.inputs:
                digest.update(input_bytes(item))
        return digest.hexdigest()

    @property
    def modality(self) -> str:
        """'text' or 'image': what kind of model can take this task's inputs."""
        first = next((x for s in SPLITS for x in self.split(s).inputs), "")
        return "text" if isinstance(first, str) else "image"

    def split(self, name: str) -> Examples:
        """Return the ``"train"``, ``"val"`` or ``"test"`` examples."""
        if name not in SPLITS:
            raise TaskArithError(f"Unknown split {name!r} for task {self.name!r}; use one of {', '.join(SPLITS)}.")
        return getattr(self, name)

    def __repr__(self) -> str:
        sizes = "/".join(str(len(self.split(s))) for s in SPLITS)
        return f"Task({self.name!r}, classes={self.classes!r}, train/val/test={sizes}, domain={self.domain!r})"


# ---------------------------------------------------------------------------------------------
# Splitting


def stable_hash(text: str, salt: str = "") -> bytes:
    """A process-independent hash (Python's ``hash()`` is salted per process)."""
    return hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"taskarith", salt=salt.encode("utf-8")[:16]
    ).digest()


def _hash_order(items: Sequence[str], salt: str = "") -> list[int]:
    """Indices of ``items`` sorted by stable hash (ties broken by the item, then position)."""
    return sorted(range(len(items)), key=lambda i: (stable_hash(items[i], salt), items[i], i))


def _split_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    # With 3+ examples every split gets at least one, so every class can appear in every split.
    if n >= 3:
        n_test = max(n_test, 1) if test_fraction > 0 else 0
        n_val = max(n_val, 1) if val_fraction > 0 else 0
    while n_test + n_val >= n and (n_test or n_val):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def _water_fill(counts: list[int], total: int | None) -> list[int]:
    """Share ``total`` over classes as evenly as their counts allow."""
    if total is None or sum(counts) <= total:
        return list(counts)
    alloc = [0] * len(counts)
    left = total
    # Smallest classes first: each takes all it has or an equal share of what is left.
    order = sorted(range(len(counts)), key=lambda c: (counts[c], c))
    for k, c in enumerate(order):
        share = left // (len(order) - k)
        alloc[c] = min(counts[c], share)
        left -= alloc[c]
    # Integer division can leave a remainder; hand it out one by one in class order.
    for c in range(len(counts)):
        if left <= 0:
            break
        if alloc[c] < counts[c]:
            alloc[c] += 1
            left -= 1
    return alloc


def split_examples(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_train: int | None = DEFAULT_MAX_TRAIN,
    max_val: int | None = DEFAULT_MAX_VAL,
    max_test: int | None = DEFAULT_MAX_TEST,
    groups: Sequence[str] | None = None,
    balance: bool = False,
) -> tuple[Examples, Examples, Examples]:
    """Split deterministically and stratified by class into (train, val, test).

    Within each class, examples are ordered by a stable hash of their text; the first
    ``test_fraction`` go to test, the next ``val_fraction`` to val, the rest to train. The result
    depends only on the inputs (not on any seed or process). ``groups`` (e.g. a speech id) keeps
    every group whole in one split, so related texts cannot leak across splits. ``balance``
    subsamples each split to equal class counts. Caps (``max_*``, ``None`` = no cap) are shared
    across classes as evenly as possible.
    """
    if len(texts) != len(labels):
        raise TaskArithError(f"split_examples: {len(texts)} texts but {len(labels)} labels.")
    if groups is not None and len(groups) != len(texts):
        raise TaskArithError(f"split_examples: {len(texts)} texts but {len(groups)} groups.")
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise TaskArithError(f"split_examples: {key}={value!r} must be in [0, 1).")
    if val_fraction + test_fraction >= 1:
        raise TaskArithError(
            f"split_examples: val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data."
        )
    for key, cap in (("max_train", max_train), ("max_val", max_val), ("max_test", max_test)):
        if cap is not None and cap < 0:
            raise TaskArithError(f"split_examples: {key}={cap!r} must be >= 0 or None.")

    texts = [str(t) for t in texts]
    labels = [int(y) for y in labels]
    classes = sorted(set(labels))
    # per split -> per class -> indices in hash order
    parts: dict[str, dict[int, list[int]]] = {s: {c: [] for c in classes} for s in SPLITS}
    for c in classes:
        members = [i for i, y in enumerate(labels) if y == c]
        n_val, n_test = _split_counts(len(members), val_fraction, test_fraction)
        if groups is None:
            ordered = [members[k] for k in _hash_order([texts[i] for i in members])]
            parts["test"][c] = ordered[:n_test]
            parts["val"][c] = ordered[n_test : n_test + n_val]
            parts["train"][c] = ordered[n_test + n_val :]
        else:
            _assign_groups(members, texts, groups, n_val, n_test, parts, c)

    caps = {"train": max_train, "val": max_val, "test": max_test}
    out = []
    for split in SPLITS:
        per_class = [parts[split][c] for c in classes]
        if balance and per_class:
            smallest = min(len(p) for p in per_class)
            per_class = [p[:smallest] for p in per_class]
        alloc = _water_fill([len(p) for p in per_class], caps[split])
        chosen = [i for p, k in zip(per_class, alloc, strict=True) for i in p[:k]]
        # Mix classes in a stable order so a split never arrives sorted by label.
        chosen.sort(key=lambda i: (stable_hash(texts[i], "mix"), texts[i], i))
        out.append(Examples(tuple(texts[i] for i in chosen), tuple(labels[i] for i in chosen)))
    return out[0], out[1], out[2]


def _assign_groups(
    members: list[int],
    texts: list[str],
    groups: Sequence[str],
    n_val: int,
    n_test: int,
    parts: dict[str, dict[int, list[int]]],
    c: int,
) -> None:
    """Fill test, then val, with whole groups (in stable hash order) until each reaches its target."""
    by_group: dict[str, list[int]] = {}
    for i in members:
        by_group.setdefault(str(groups[i]), []).append(i)
    names = sorted(by_group, key=lambda g: (stable_hash(g, "group"), g))
    for g in names:
        by_group[g] = [by_group[g][k] for k in _hash_order([texts[i] for i in by_group[g]])]
    counts = {"test": 0, "val": 0}
    targets = {"test": n_test, "val": n_val}
    for k, g in enumerate(names):
        remaining = len(names) - k
        dest = "train"
        for split in ("test", "val"):
            # Keep at least one group for each later split (val, train) while groups last.
            later = 2 if split == "test" else 1
            if counts[split] < targets[split] and remaining > later:
                dest = split
                break
        if dest != "train":
            counts[dest] += len(by_group[g])
        parts[dest][c].extend(by_group[g])
    for split in SPLITS:
        parts[split][c] = sorted(parts[split][c], key=lambda i: (stable_hash(texts[i]), texts[i], i))
