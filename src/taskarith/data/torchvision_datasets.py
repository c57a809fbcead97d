"""Image tasks from torchvision datasets already on disk (never downloaded).

torchvision's dataset classes are used with ``download=False``; the MNIST family is also read without
torchvision, from the raw IDX files in torchvision's folder layout, and RESISC45 (which torchvision does
not ship) from its image folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskarith.data.image_corpora import DIGIT_CLASSES, DIGIT_TEMPLATES, FASHION_CLASSES, FASHION_TEMPLATES
from taskarith.data.image_folder import _visible_dirs, task_from_image_folder
from taskarith.data.pixels import _array_pool, _build_task, _check_labels, _idx_pair, _Pool, load_image
from taskarith.data.tasks import Task
from taskarith.errors import TaskArithError

__all__ = ["EMNIST_CLASSES", "EUROSAT_CLASSES", "GTSRB_CLASSES", "TORCHVISION_DATASETS", "task_from_torchvision"]

TORCHVISION_HINT = "pip install torchvision (the build matching your torch)"

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
