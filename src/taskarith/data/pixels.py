"""Pixels and the pieces every image source shares.

:func:`load_image` turns any image input (a uint8 array, an image file's path, a PIL image) into RGB
pixels; :func:`read_idx` reads the MNIST family's IDX files. A source hands its images to
:func:`_build_task` as pools (:class:`_Pool`, :func:`_array_pool`), one per split the data ships, and
names one of two split rules (:data:`SPLIT_RULES`):

* ``"paper"`` (the default of the generic image loaders), the papers' protocol (task_vectors'
  ``split_train_into_train_val``): every shipped split is kept whole; a missing validation split is
  10 % of the training split, at most 5,000, drawn exactly as ``torch.utils.data.random_split`` with
  seed 0 draws it (:func:`paper_split`), the rest trains. Images are kept as the dataset has them
  (duplicates included), so with the same files the split is the papers' own.
* ``"taskarith"`` (the built-in tasks; an option elsewhere): exact duplicate images are dropped (an
  image given two labels entirely), an image of a later split that also occurs in an earlier one is
  dropped from the later split, and the splits are capped at 4,000 / 300 / 500, stratified and
  deterministic.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskarith.data.tasks import (
    DEFAULT_MAX_TEST,
    DEFAULT_MAX_TRAIN,
    DEFAULT_MAX_VAL,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    Examples,
    Task,
    _hash_order,
    _split_counts,
    split_examples,
    stable_hash,
)
from taskarith.display import shown
from taskarith.errors import TaskArithError

__all__ = ["IMAGE_SUFFIXES", "SPLIT_RULES", "load_image", "paper_split", "read_idx"]

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


# ---------------------------------------------------------------------------------------------
# Pixels


def load_image(item: Any) -> np.ndarray:
    """RGB pixels of one task input: a uint8 array ``(H, W, 3)``.

    Arrays pass through (grayscale ``(H, W)`` or ``(H, W, 1)`` is repeated to three channels, an alpha
    channel is dropped); a path (``Path`` or ``str``) or a PIL image is converted with Pillow.
    """
    if isinstance(item, (str, os.PathLike)):
        return _read_image_file(Path(item))
    if hasattr(item, "convert") and hasattr(item, "mode"):  # a PIL image, e.g. from a torchvision dataset
        width, height = item.size
        _check_image_size(width, height, getattr(item, "filename", "") or "(an image in memory)")
        return np.asarray(item.convert("RGB"), dtype=np.uint8)
    if not isinstance(item, np.ndarray):
        raise TaskArithError(
            f"load_image: cannot read pixels from a {type(item).__name__}; pass a uint8 array (H, W[, C]) "
            "or the path of an image file."
        )
    if item.dtype != np.uint8:
        raise TaskArithError(f"load_image: pixel array has dtype {item.dtype}, expected uint8 (0..255).")
    if item.ndim == 2:
        return np.repeat(item[:, :, None], 3, axis=2)
    if item.ndim == 3 and item.shape[2] in (1, 3, 4):
        if item.shape[2] == 1:
            return np.repeat(item, 3, axis=2)
        return item if item.shape[2] == 3 else item[:, :, :3]
    raise TaskArithError(
        f"load_image: pixel array has shape {item.shape}; expected (H, W), or (H, W, C) with C = 1, 3 or 4."
    )


# The most pixels an image file may have. Every model here sees at most a few hundred pixels a side, and
# a file's size says nothing about its decoded size: a 17 KB PNG can announce 12000 x 12000 pixels, 3.6 GB
# once converted. The cap is read from the header, before anything is decoded; raise it here for data
# sets of larger images (25 million pixels decode to 75 MB of RGB).
MAX_IMAGE_PIXELS = 25_000_000


def _check_image_size(width: int, height: int, where: object) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise TaskArithError(
            f"Image file {shown(where)} is {width} x {height} pixels, more than the "
            f"{MAX_IMAGE_PIXELS:,} taskarith decodes (taskarith.data.pixels.MAX_IMAGE_PIXELS); "
            "a decompression bomb, or an image to shrink before use"
        )


def _read_image_file(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is a dependency
        raise TaskArithError(f"Reading image {path} needs Pillow: pip install pillow") from err
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning fires above its larger limit; the cap below refuses first.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
                _check_image_size(width, height, path)
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as err:
        raise TaskArithError(f"Image file {path} does not exist.") from err
    except Image.DecompressionBombError as err:  # Pillow's limit, in case a caller set it below ours
        raise TaskArithError(f"Image file {shown(path)} is too large to decode: {shown(err)}") from None
    # Pillow reports truncated or foreign files with several exception types; all mean "not an image".
    except (OSError, ValueError, SyntaxError) as err:
        raise TaskArithError(f"Cannot read image file {path}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Binary formats


def _read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it starts with the gzip magic (the suffix is not trusted)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise TaskArithError(f"Data file {path} does not exist.") from err
    except OSError as err:
        raise TaskArithError(f"Cannot read data file {path}: {err}") from err
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise TaskArithError(f"Data file {path} is a damaged gzip file: {err}") from err


# IDX type byte -> element type; IDX stores multi-byte numbers big-endian.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str], *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a read-only array.

    The magic number, the number of dimensions (``ndim`` when given) and the payload size are checked;
    anything off raises :class:`TaskArithError` naming the file.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise TaskArithError(
            f"{p} is not an IDX file: magic bytes {data[:4].hex() or '(empty)'}, expected 0000 followed by a "
            f"type byte ({', '.join(f'{t:02x}' for t in _IDX_TYPES)}) and the number of dimensions."
        )
    dtype, dims = _IDX_TYPES[data[2]], data[3]
    if ndim is not None and dims != ndim:
        raise TaskArithError(f"{p}: IDX file has {dims} dimensions, expected {ndim}.")
    header = 4 + 4 * dims
    if len(data) < header:
        raise TaskArithError(f"{p}: IDX header is truncated ({len(data)} bytes, needs {header}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise TaskArithError(
            f"{p}: IDX header says shape {shape} ({expected} bytes) but the file has {len(data)} bytes."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
        array.setflags(write=False)
    return array


# ---------------------------------------------------------------------------------------------
# From arrays or files to a Task


@dataclass
class _Pool:
    """One source split: stable keys (content digests or relative paths), labels, and the items."""

    keys: list[str]
    labels: list[int]
    items: Any  # an array (N, ...) indexed by position, or a list of Paths

    def __len__(self) -> int:
        return len(self.keys)

    @functools.cached_property
    def by_key(self) -> dict[str, int]:
        """Position of each key (for pools of distinct keys: those the "taskarith" rule builds)."""
        return {k: i for i, k in enumerate(self.keys)}

    def subset(self, positions: Sequence[int]) -> _Pool:
        """The pool restricted to ``positions``, in that order."""
        if isinstance(self.items, np.ndarray):
            items: Any = self.items[np.asarray(positions, dtype=np.int64)]
        else:
            items = [self.items[i] for i in positions]
        return _Pool([self.keys[i] for i in positions], [self.labels[i] for i in positions], items)


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(image.tobytes(), digest_size=12, person=b"taskarith-img").hexdigest()


def _array_pool(
    images: np.ndarray, labels: np.ndarray, exclude: set[str] | frozenset[str] = frozenset(), *, dedupe: bool = True
) -> tuple[_Pool, set[str]]:
    """Pool of distinct images: an image given two labels is dropped, as is any whose digest is in ``exclude``.

    Returns the pool and the digests of every image seen (for excluding them from a later split).
    ``dedupe=False`` keeps every image in its place, as the "paper" rule needs (``exclude`` is then unused).
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if not dedupe:
        keys = [_digest(image) for image in images]
        return _Pool(keys, [int(y) for y in labels], images), set(keys)
    first: dict[str, tuple[int, int]] = {}
    conflicted: set[str] = set()
    for i, image in enumerate(images):
        key = _digest(image)
        if key in first:
            if first[key][1] != int(labels[i]):
                conflicted.add(key)
            continue
        first[key] = (i, int(labels[i]))
    keep = [k for k in first if k not in conflicted and k not in exclude]
    index = np.asarray([first[k][0] for k in keep], dtype=np.int64)
    return _Pool(keep, [first[k][1] for k in keep], images[index]), set(first)


def _build_task(
    name: str,
    classes: Sequence[str],
    templates: Sequence[str],
    pools: dict[str, _Pool],
    *,
    domain: str,
    source: str,
    balance: bool,
    splits: str = "taskarith",
) -> Task:
    """The task's splits from the given pools, by the split rule ``splits`` (see the module docstring).

    "taskarith": capped, stratified, deterministic splits; missing val/test are carved from train. Order
    and choice come from :func:`split_examples` on the pools' keys (content digests or relative paths), so
    they depend on the data only, never on a seed or the process. "paper": see :func:`_paper_splits`.
    """
    if check_split_rule(splits) == "paper":
        paper = {split: _examples(pool) for split, pool in _paper_splits(pools).items()}
        return Task(
            name=name,
            classes=tuple(classes),
            templates=tuple(templates),
            train=paper["train"],
            val=paper["val"],
            test=paper["test"],
            domain=domain,
            source=source,
        )
    train = pools["train"]
    counts = Counter(train.labels)
    smallest = min(counts.values(), default=1)

    def carve(default: float, cap: int) -> float:
        # A carved split takes about its cap (every class its share, the smallest included) rather than a
        # fixed fraction, so a mid-sized set such as MNIST's 5,000 keeps the rest for training.
        return min(default, math.ceil(cap / max(len(counts), 1)) / smallest)

    val_fraction = carve(DEFAULT_VAL_FRACTION, DEFAULT_MAX_VAL) if "val" not in pools else 0.0
    test_fraction = carve(DEFAULT_TEST_FRACTION, DEFAULT_MAX_TEST) if "test" not in pools else 0.0
    tr, va, te = split_examples(
        train.keys,
        train.labels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        max_train=DEFAULT_MAX_TRAIN,
        max_val=DEFAULT_MAX_VAL,
        max_test=DEFAULT_MAX_TEST,
        balance=balance,
    )
    chosen = {"train": (train, tr), "val": (train, va), "test": (train, te)}
    for split, cap in (("val", DEFAULT_MAX_VAL), ("test", DEFAULT_MAX_TEST)):
        if split in pools:
            pool = pools[split]
            given, _, _ = split_examples(
                pool.keys, pool.labels, val_fraction=0.0, test_fraction=0.0, max_train=cap, balance=balance
            )
            chosen[split] = (pool, given)
    out: dict[str, Examples] = {}
    for split, (pool, keyed) in chosen.items():
        positions = [pool.by_key[k] for k in keyed.inputs]
        if isinstance(pool.items, np.ndarray):
            picked = pool.items[np.asarray(positions, dtype=np.int64)]
            picked.setflags(write=False)  # a Task is immutable; so are its pixels
            inputs: tuple[Any, ...] = tuple(picked)
        else:
            inputs = tuple(pool.items[i] for i in positions)
        out[split] = Examples(inputs, keyed.labels)
    return Task(
        name=name,
        classes=tuple(classes),
        templates=tuple(templates),
        train=out["train"],
        val=out["val"],
        test=out["test"],
        domain=domain,
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# The papers' split rule

SPLIT_RULES: tuple[str, ...] = ("paper", "taskarith")
PAPER_VAL_FRACTION = 0.1
PAPER_MAX_VAL = 5000
PAPER_SPLIT_SEED = 0
# A split no dataset ships and the papers never needed (an image folder with one pool): its share of the pool.
CARVED_TEST_FRACTION = DEFAULT_TEST_FRACTION


def check_split_rule(splits: str) -> str:
    if splits not in SPLIT_RULES:
        raise TaskArithError(
            f"Unknown split rule {splits!r}; use one of {', '.join(SPLIT_RULES)} "
            "(paper: the papers' splits, full sets; taskarith: capped at 4000/300/500)."
        )
    return splits


def paper_split(n: int) -> tuple[list[int], list[int]]:
    """(train, val) positions of a training split of ``n`` examples, as the papers draw them.

    task_vectors' ``split_train_into_train_val`` (``src/datasets/registry.py``, reused unchanged by
    tangent_task_arithmetic and tau-Jp): ``val = min(int(0.1 * n), 5000)``, then
    ``torch.utils.data.random_split(train, [n - val, val], generator=torch.Generator().manual_seed(0))``,
    i.e. one ``torch.randperm(n)`` whose first ``n - val`` entries train. The same call here gives the
    same positions (MNIST's first training position is 36044, as task_vectors asserts). Below 10
    examples, where the official code stops, val keeps one.
    """
    import torch  # local: only the "paper" rule needs it, and it is a dependency of every model anyway

    n_val = min(int(n * PAPER_VAL_FRACTION), PAPER_MAX_VAL)
    if n_val == 0 and n >= 2:
        n_val = 1  # the official code refuses fewer than 10 examples; a tiny set still gets one to validate on
    order = torch.randperm(n, generator=torch.Generator().manual_seed(PAPER_SPLIT_SEED)).tolist()
    return order[: n - n_val], order[n - n_val :]


def _carve(pool: _Pool, fraction: float) -> tuple[list[int], list[int]]:
    """(rest, carved) positions: ``fraction`` of every class, first in stable hash order of the keys."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(pool.labels):
        by_class.setdefault(y, []).append(i)
    carved: set[int] = set()
    for members in by_class.values():
        _, n_carved = _split_counts(len(members), 0.0, fraction)
        ordered = [members[k] for k in _hash_order([pool.keys[i] for i in members])]
        carved.update(ordered[:n_carved])
    rest = [i for i in range(len(pool)) if i not in carved]
    return rest, sorted(carved)


def _hash_partition(pool: _Pool, shares: Mapping[str, float], rest: str) -> dict[str, _Pool]:
    """Split one pool the way fixed split files would: per class, in stable hash order of the keys, each
    named part takes its share in turn (a float: that fraction of the class, rounded; an int: that many),
    and what is left goes to ``rest``. Parts keep the pool's order. For datasets whose official splits are
    files this package cannot have; the same data always gives the same parts."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(pool.labels):
        by_class.setdefault(y, []).append(i)
    part_of: dict[int, str] = {}
    for members in by_class.values():
        ordered = [members[k] for k in _hash_order([pool.keys[i] for i in members])]
        start = 0
        for part, share in shares.items():
            count = share if isinstance(share, int) else round(len(members) * share)
            for i in ordered[start : start + count]:
                part_of[i] = part
            start += count
        for i in ordered[start:]:
            part_of[i] = rest
    return {part: pool.subset([i for i in range(len(pool)) if part_of[i] == part]) for part in (*shares, rest)}


def _mixed(pool: _Pool) -> _Pool:
    """The pool in a stable order that mixes classes (evaluation may read a prefix of a split)."""
    order = sorted(range(len(pool)), key=lambda i: (stable_hash(pool.keys[i], "mix"), pool.keys[i], i))
    return pool.subset(order)


def _paper_splits(pools: dict[str, _Pool]) -> dict[str, _Pool]:
    """The papers' splits: shipped splits whole; a missing val drawn by :func:`paper_split` from train.

    A missing test split (an image folder of one pool; the datasets the papers use all ship one) is
    carved first, :data:`CARVED_TEST_FRACTION` of every class in stable hash order. A drawn train and val
    keep the order of the random permutation; shipped splits are put in a stable order that mixes
    classes (evaluation and linear probes may read a prefix of a split).
    """
    train = pools["train"]
    out: dict[str, _Pool] = {}
    if "test" in pools:
        out["test"] = _mixed(pools["test"])
    else:
        rest, carved = _carve(train, CARVED_TEST_FRACTION)
        out["test"] = _mixed(train.subset(carved))
        train = train.subset(rest)
    if "val" in pools:
        out["train"], out["val"] = _mixed(train), _mixed(pools["val"])
    else:
        kept, held = paper_split(len(train))
        out["train"], out["val"] = train.subset(kept), train.subset(held)
    return out


def _examples(pool: _Pool) -> Examples:
    if isinstance(pool.items, np.ndarray):
        pool.items.setflags(write=False)  # a Task is immutable; so are its pixels
    return Examples(tuple(pool.items), tuple(pool.labels))


def _check_labels(labels: np.ndarray, n_classes: int, where: str, *, offset: int = 0) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise TaskArithError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
    low, high = offset, offset + n_classes - 1
    if labels.size and (labels.min() < low or labels.max() > high):
        raise TaskArithError(
            f"{where}: labels span {labels.min()}..{labels.max()}, expected {low}..{high} for {n_classes} classes."
        )
    return labels.astype(np.int64) - offset


def _check_images(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise TaskArithError(f"{where}: expected uint8 images (N, H, W[, C]), got {images.dtype} {images.shape}.")
    if len(images) != len(labels):
        raise TaskArithError(f"{where}: {len(images)} images but {len(labels)} labels.")


def _require(path: Path, install: str) -> Path:
    if not path.exists():
        raise TaskArithError(f"Missing data file {path}. Install it with: {install}")
    return path


def _idx_pair(
    folder: Path, prefix: str, n_classes: int, install: str, *, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``<prefix>-images-idx3-ubyte[.gz]`` / ``<prefix>-labels-idx1-ubyte[.gz]``."""
    paths = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found = [folder / (stem + ext) for ext in ("", ".gz") if (folder / (stem + ext)).is_file()]
        paths.append(_require(found[0] if found else folder / (stem + ".gz"), install))
    images, labels = read_idx(paths[0], ndim=3), read_idx(paths[1], ndim=1)
    labels = _check_labels(labels, n_classes, str(paths[1]), offset=offset)
    _check_images(images, labels, f"{paths[0]} / {paths[1]}")
    return images, labels
