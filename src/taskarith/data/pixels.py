"""Pixels and the pieces every image source shares.

:func:`load_image` turns any image input (a uint8 array, an image file's path, a PIL image) into RGB
pixels; :func:`read_idx` reads the MNIST family's IDX files. A source hands its images to
:func:`_build_task` as pools (:class:`_Pool`, :func:`_array_pool`): exact duplicate images are dropped
(an image given two labels entirely), an image of a later split that also occurs in an earlier one is
dropped from the later split, and the splits are capped, stratified and deterministic.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    split_examples,
)
from taskarith.errors import TaskArithError

__all__ = ["IMAGE_SUFFIXES", "load_image", "read_idx"]

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


def _read_image_file(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - pillow is a dependency
        raise TaskArithError(f"Reading image {path} needs Pillow: pip install pillow") from err
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as err:
        raise TaskArithError(f"Image file {path} does not exist.") from err
    # Pillow reports truncated or foreign files with several exception types; all mean "not an image".
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
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
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
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
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
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
    by_key: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.by_key = {k: i for i, k in enumerate(self.keys)}


def _digest(image: np.ndarray) -> str:
    return hashlib.blake2b(image.tobytes(), digest_size=12, person=b"taskarith-img").hexdigest()


def _array_pool(images: np.ndarray, labels: np.ndarray, exclude: set[str] | frozenset[str] = frozenset()
                ) -> tuple[_Pool, set[str]]:
    """Pool of distinct images: an image given two labels is dropped, as is any whose digest is in ``exclude``.

    Returns the pool and the digests of every image seen (for excluding them from a later split).
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
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
) -> Task:
    """Capped, stratified, deterministic splits from the given pools; missing val/test are carved from train.

    Order and choice come from :func:`split_examples` on the pools' keys (content digests or relative
    paths), so they depend on the data only, never on a seed or the process.
    """
    train = pools["train"]
    counts = Counter(train.labels)
    smallest = min(counts.values(), default=1)

    def carve(default: float, cap: int) -> float:
        # A carved split takes about its cap (every class its share, the smallest included) rather than a
        # fixed fraction, so a mid-sized set such as MNIST's 5,000 keeps the rest for training.
        return min(default, math.ceil(cap / max(len(counts), 1)) / smallest)

    val_fraction = carve(DEFAULT_VAL_FRACTION, DEFAULT_MAX_VAL) if "val" not in pools else 0.0
    test_fraction = carve(DEFAULT_TEST_FRACTION, DEFAULT_MAX_TEST) if "test" not in pools else 0.0
    tr, va, te = split_examples(train.keys, train.labels, val_fraction=val_fraction,
                                test_fraction=test_fraction, max_train=DEFAULT_MAX_TRAIN,
                                max_val=DEFAULT_MAX_VAL, max_test=DEFAULT_MAX_TEST, balance=balance)
    chosen = {"train": (train, tr), "val": (train, va), "test": (train, te)}
    for split, cap in (("val", DEFAULT_MAX_VAL), ("test", DEFAULT_MAX_TEST)):
        if split in pools:
            pool = pools[split]
            given, _, _ = split_examples(pool.keys, pool.labels, val_fraction=0.0, test_fraction=0.0,
                                         max_train=cap, balance=balance)
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
    return Task(name=name, classes=tuple(classes), templates=tuple(templates), train=out["train"],
                val=out["val"], test=out["test"], domain=domain, source=source)


def _check_labels(labels: np.ndarray, n_classes: int, where: str, *, offset: int = 0) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise TaskArithError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
    low, high = offset, offset + n_classes - 1
    if labels.size and (labels.min() < low or labels.max() > high):
        raise TaskArithError(
            f"{where}: labels span {labels.min()}..{labels.max()}, expected {low}..{high} "
            f"for {n_classes} classes."
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


def _idx_pair(folder: Path, prefix: str, n_classes: int, install: str, *, offset: int = 0
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
