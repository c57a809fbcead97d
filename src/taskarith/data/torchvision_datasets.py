"""Image tasks from torchvision datasets already on disk (never downloaded).

torchvision's dataset classes are used with ``download=False``; the MNIST family is also read without
torchvision, from the raw IDX files in torchvision's folder layout; RESISC45 and ImageNet, and the folders
the papers' code prepares (task_vectors' ``EuroSAT_splits``, ``dtd``, ``sun397``), from their folders.
Prompt templates are OpenAI CLIP's where CLIP has them (:mod:`taskarith.data.clip_prompts`), class names
task_vectors' (checked against its ``src/datasets``). The default split rule is the papers' ("paper");
"taskarith" caps every split as the built-in tasks are capped (:data:`~taskarith.data.pixels.SPLIT_RULES`).
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

from taskarith.data.clip_prompts import CLIP_TEMPLATES, IMAGENET_CLASSES, IMAGENET_WNIDS
from taskarith.data.image_corpora import DIGIT_CLASSES, DIGIT_TEMPLATES, FASHION_CLASSES, FASHION_TEMPLATES
from taskarith.data.image_folder import _folder_pools, _folder_task, _visible_dirs, task_from_image_folder
from taskarith.data.pixels import (
    _array_pool,
    _build_task,
    _check_labels,
    _hash_partition,
    _idx_pair,
    _Pool,
    check_split_rule,
    load_image,
)
from taskarith.data.tasks import Task
from taskarith.errors import TaskArithError

__all__ = ["EMNIST_CLASSES", "EUROSAT_CLASSES", "GTSRB_CLASSES", "TORCHVISION_DATASETS", "task_from_torchvision"]

TORCHVISION_HINT = "pip install torchvision (the build matching your torch)"

GTSRB_CLASSES: tuple[str, ...] = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)
# torchvision's EuroSAT classes are folder names (AnnualCrop, ...); these read better in a prompt.
EUROSAT_CLASSES: dict[str, str] = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
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
_CLIP = CLIP_TEMPLATES  # OpenAI CLIP's templates (see taskarith.data.clip_prompts), as the papers use them

TORCHVISION_DATASETS: dict[str, _TV] = {
    "MNIST": _TV("MNIST", _FLAG, _CLIP["MNIST"], "digits", DIGIT_CLASSES, "MNIST"),
    "FashionMNIST": _TV("FashionMNIST", _FLAG, FASHION_TEMPLATES, "objects", FASHION_CLASSES, "FashionMNIST"),
    "KMNIST": _TV(
        "KMNIST",
        _FLAG,
        ("a photo of the character {}.", "a handwritten character {}."),
        "characters",
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        "KMNIST",
    ),
    "EMNIST": _TV("EMNIST", _FLAG, DIGIT_TEMPLATES, "digits", None, "EMNIST"),
    "SVHN": _TV("SVHN", _TRAIN_TEST, _CLIP["SVHN"], "digits", DIGIT_CLASSES),
    "GTSRB": _TV("GTSRB", _TRAIN_TEST, _CLIP["GTSRB"], "traffic signs", GTSRB_CLASSES),
    "DTD": _TV("DTD", _THREE, _CLIP["DTD"], "textures"),
    "EuroSAT": _TV("EuroSAT", {}, _CLIP["EuroSAT"], "satellite"),
    "RESISC45": _TV("RESISC45", {}, _CLIP["RESISC45"], "satellite"),
    "SUN397": _TV("SUN397", {}, _CLIP["SUN397"], "scenes"),
    "StanfordCars": _TV("StanfordCars", _TRAIN_TEST, _CLIP["Cars"], "cars"),
    "ImageNet": _TV("ImageNet", {}, _CLIP["ImageNet"], "objects"),
    "CIFAR10": _TV("CIFAR10", _FLAG, _CLIP["CIFAR10"], "objects"),
    "CIFAR100": _TV("CIFAR100", _FLAG, _CLIP["CIFAR100"], "objects"),
    "STL10": _TV("STL10", _TRAIN_TEST, _CLIP["STL10"], "objects"),
    "OxfordIIITPet": _TV(
        "OxfordIIITPet",
        {"train": {"split": "trainval"}, "test": {"split": "test"}},
        ("a photo of a {}, a type of pet.",),
        "pets",
    ),
    "Flowers102": _TV("Flowers102", _THREE, ("a photo of a {}, a type of flower.",), "flowers"),
    "Food101": _TV("Food101", _TRAIN_TEST, _CLIP["Food101"], "food"),
    "FER2013": _TV(
        "FER2013",
        _TRAIN_TEST,
        ("a photo of a {} looking face.", "a photo of a face looking {}."),
        "faces",
        ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"),
    ),
    "PCAM": _TV(
        "PCAM",
        _THREE,
        ("this is a photo of {}.",),
        "medical",
        ("lymph node", "lymph node containing metastatic tumor tissue"),
    ),
    "RenderedSST2": _TV("RenderedSST2", _THREE, ("a {} review of a movie.",), "rendered text"),
}
_TV_ALIASES = {re.sub(r"[^a-z0-9]", "", key.lower()): key for key in TORCHVISION_DATASETS}
_TV_ALIASES.update(
    {
        "cars": "StanfordCars",
        "pets": "OxfordIIITPet",
        "nwpuresisc45": "RESISC45",
        "imagenet1k": "ImageNet",
        "ilsvrc2012": "ImageNet",
    }
)

# Under the "paper" rule, datasets whose official splits are files this package cannot ship or find are split
# like those files, by a stable hash (see pixels._hash_partition); the sizes follow the official files.
# EuroSAT: task_vectors' EuroSAT_splits are a random 21,600 / 2,700 / 2,700 split of the 27,000 images.
EUROSAT_SHARES: dict[str, float] = {"test": 0.1, "val": 0.1}
# RESISC45: the split files task_vectors reads (train 60 %, val 20 %, test 20 %; its val file goes unused).
RESISC45_SHARES: dict[str, float] = {"test": 0.2, "unused": 0.2}
# SUN397: task_vectors trains on Training_01 and tests on Testing_01 of the official partitions, 50 + 50 a class.
SUN397_SHARES: dict[str, int] = {"test": 50, "train": 50}


def task_from_torchvision(
    name: str,
    root: str | os.PathLike[str],
    *,
    task_name: str | None = None,
    templates: Sequence[str] | None = None,
    splits: str = "paper",
) -> Task:
    """A Task from a torchvision dataset already on disk; its ``source`` is the spec ``load_task`` reloads it from
    (``torchvision:NAME@ROOT``, with ``?splits=RULE`` when the rule is not the default)."""
    task = _task_from_torchvision(name, root, task_name=task_name, templates=templates, splits=splits)
    suffix = "" if splits == "paper" else f"?splits={splits}"
    return dataclasses.replace(task, source=f"torchvision:{name}@{Path(root).expanduser()}{suffix}")


def _task_from_torchvision(
    name: str,
    root: str | os.PathLike[str],
    *,
    task_name: str | None = None,
    templates: Sequence[str] | None = None,
    splits: str = "paper",
) -> Task:
    """A Task from a torchvision dataset already on disk under ``root`` (never downloads).

    ``name`` is a torchvision dataset class (case and punctuation ignored; see :data:`TORCHVISION_DATASETS`);
    ``EMNIST`` reads the ``digits`` split, ``EMNIST:letters`` (or ``byclass``, ``balanced``...) another.
    With torchvision installed its dataset class is used with ``download=False``; without it, the
    MNIST family (MNIST, FashionMNIST, KMNIST, EMNIST) is read from the raw IDX files in torchvision's
    layout (``root/MNIST/raw/train-images-idx3-ubyte[.gz]``...). Read from folders, never through
    torchvision: RESISC45 (``root/NWPU-RESISC45/<class>/``, with task_vectors' split files
    ``resisc45-{train,test}.txt`` beside it when present), ImageNet (``root/train/<wnid>/`` and
    ``root/val/<wnid>/``, as torchvision's ImageNet prepares them, or under ``root/imagenet/``), and the
    folders task_vectors prepares (``root/EuroSAT_splits/{train,val,test}``, ``root/dtd/{train,val}``,
    ``root/sun397/{train,val}``, whose ``val`` is the test split).

    ``splits`` is the split rule (:data:`~taskarith.data.pixels.SPLIT_RULES`): "paper" (default), the
    papers' protocol, or "taskarith", capped splits as the built-in tasks have; docs/protocol-data.md
    says, dataset by dataset, what each gives.
    """
    check_split_rule(splits)
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
        chosen_templates = (
            tuple(templates) if templates is not None else ("a photo of the letter {}.", "a handwritten letter {}.")
        )
    common: dict[str, Any] = dict(name=task_name, templates=chosen_templates, domain=spec.domain, splits=splits)

    prepared = _prepared_layout(key, folder)
    if prepared is not None:
        base_folder, layout, class_names = prepared
        return _folder_task(
            base_folder, layout, source=f"{key} folders in {base_folder}", class_names=class_names, **common
        )
    if key == "RESISC45":
        return _resisc45(folder, splits, common)
    if key == "ImageNet":
        raise TaskArithError(
            f"ImageNet not found under {folder}: expected {folder}/train/<wnid>/*.JPEG and {folder}/val/<wnid>/*.JPEG "
            "(torchvision.datasets.ImageNet's layout after its first run, or any ImageFolder layout; the raw "
            "validation images must be sorted into wnid folders). It is never downloaded."
        )
    if key == "SUN397" and splits == "paper":
        task = _sun397_partitions(folder, common)
        if task is not None:
            return task
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError:
        if spec.idx_folder is None:
            raise TaskArithError(
                f"Reading {key} needs torchvision (not importable here). Install it with: {TORCHVISION_HINT}. "
                "Without torchvision only MNIST, FashionMNIST, KMNIST, EMNIST (raw IDX files), RESISC45, "
                "ImageNet and task_vectors' prepared folders can be read."
            ) from None
        return _idx_dataset(folder, key, variant, task_name, chosen_templates, spec, splits)
    return _torchvision_dataset(datasets, folder, key, variant, task_name, chosen_templates, spec, splits)


# ---------------------------------------------------------------------------------------------
# Datasets read from folders


def _prepared_layout(key: str, folder: Path) -> tuple[Path, dict[str, Path], dict[str, str] | None] | None:
    """(base, split -> folder, class names) of a folder layout the papers' code reads, when ``folder`` has it.

    task_vectors' own folders (``src/datasets/{eurosat,dtd,sun397,imagenet}.py``): EuroSAT_splits keeps its
    three splits; dtd and sun397 hold train and val, and the papers test on val (DTD's official test split,
    SUN397's Testing_01); ImageNet tests on val (or val_in_folder).
    """

    def has_classes(path: Path) -> bool:
        return path.is_dir() and bool(_visible_dirs(path))

    if key == "EuroSAT":
        base = folder / "EuroSAT_splits"
        layout = {split: base / split for split in ("train", "val", "test")}
        if all(has_classes(p) for p in layout.values()):
            names = {d.name for p in layout.values() for d in _visible_dirs(p)}
            return base, layout, {n: EUROSAT_CLASSES.get(n, " ".join(n.replace("_", " ").split())) for n in names}
    elif key in ("DTD", "SUN397"):
        base = folder / key.lower()
        layout = {"train": base / "train", "test": base / "val"}
        if all(has_classes(p) for p in layout.values()):
            if key == "DTD":
                return base, layout, None
            # task_vectors names a SUN397 class by its folder without the letter prefix: 'b_bakery_shop' -> 'bakery shop'.
            names = {d.name for p in layout.values() for d in _visible_dirs(p)}
            return base, layout, {n: " ".join(n[2:].replace("_", " ").split()) for n in names}
    elif key == "ImageNet":
        for base in (folder, folder / "imagenet"):
            test = base / "val_in_folder" if has_classes(base / "val_in_folder") else base / "val"
            if has_classes(base / "train") and has_classes(test):
                names = {d.name for p in (base / "train", test) for d in _visible_dirs(p)}
                unknown = sorted(names - set(_IMAGENET_NAME))
                if unknown:
                    raise TaskArithError(
                        f"ImageNet folders in {base}: {unknown[:3]} are not ILSVRC-2012 wnids (n01440764 ...); "
                        "for other class folders use task_from_image_folder."
                    )
                return base, {"train": base / "train", "test": test}, {n: _IMAGENET_NAME[n] for n in names}
    return None


# CLIP's list names two pairs of classes alike ('missile' twice, 'sunglasses' twice), which gives them identical
# zero-shot head rows in the papers' code; a Task needs distinct names, so one class of each pair takes its
# ILSVRC synset's own word (projectile, sunglass). This changes 2 of the 1,000 class names.
IMAGENET_RENAMED: dict[str, str] = {"n04008634": "projectile", "n04355933": "sunglass"}
_IMAGENET_NAME: dict[str, str] = {**dict(zip(IMAGENET_WNIDS, IMAGENET_CLASSES, strict=True)), **IMAGENET_RENAMED}


def _resisc45(folder: Path, splits: str, common: dict[str, Any]) -> Task:
    for candidate in (
        folder / "NWPU-RESISC45",
        folder / "resisc45" / "NWPU-RESISC45",
        folder / "resisc45",
        folder / "RESISC45",
        folder,
    ):
        if candidate.is_dir() and any(d.name == "airplane" for d in _visible_dirs(candidate)):
            break
    else:
        raise TaskArithError(
            f"RESISC45 not found under {folder}: expected {folder}/NWPU-RESISC45/<class>/<image>.jpg "
            "(torchvision has no RESISC45 class; any folder per class works with task_from_image_folder)."
        )
    if splits == "taskarith":
        return task_from_image_folder(
            candidate, name=common["name"], templates=common["templates"], domain=common["domain"], splits="taskarith"
        )
    classes, pools = _folder_pools(candidate, {"train": candidate})
    pool = pools["train"]
    # The split files of "In-domain representation learning for remote sensing" (Neumann et al.), as task_vectors
    # reads them: resisc45-{train,val,test}.txt beside the image folder; trains on train, tests on test.
    lists = next((d for d in (candidate.parent, candidate, folder) if (d / "resisc45-train.txt").is_file()), None)
    if lists is not None:
        parts = {}
        for split in ("train", "test"):
            names = set((lists / f"resisc45-{split}.txt").read_text(encoding="utf-8").split())
            parts[split] = pool.subset([i for i, k in enumerate(pool.keys) if k.rsplit("/", 1)[-1] in names])
        source = f"RESISC45 folder {candidate}, split files in {lists}"
    else:
        parts = _hash_partition(pool, RESISC45_SHARES, rest="train")
        source = f"RESISC45 folder {candidate}, split by hash like the official split files (none found)"
    return _build_task(
        common["name"],
        classes,
        common["templates"],
        {"train": parts["train"], "test": parts["test"]},
        domain=common["domain"],
        source=source,
        balance=False,
        splits=splits,
    )


def _sun397_partitions(folder: Path, common: dict[str, Any]) -> Task | None:
    """SUN397 in torchvision's layout (``root/SUN397/<letter>/<class>/sun_*.jpg``, ``ClassName.txt``), split as
    task_vectors does: Training_01 trains, Testing_01 tests (the official partition files, read from
    ``root/SUN397/Partitions/``, ``root/Partitions/``, ``root/SUN397/`` or ``root``; without them, 50 + 50 images
    of every class chosen by a stable hash). None when there is no such layout (then torchvision reads it)."""
    data = folder / "SUN397"
    if not (data / "ClassName.txt").is_file():
        return None
    lines = [c.strip() for c in (data / "ClassName.txt").read_text(encoding="utf-8").splitlines() if c.strip()]
    # '/b/bakery/shop' -> 'bakery shop', as task_vectors' folder 'b_bakery_shop' names it; order as torchvision's.
    classes = [" ".join(c[3:].replace("/", " ").replace("_", " ").split()) for c in lines]
    index = {c: i for i, c in enumerate(lines)}
    lists = next(
        (
            d
            for d in (data / "Partitions", folder / "Partitions", data, folder)
            if (d / "Training_01.txt").is_file() and (d / "Testing_01.txt").is_file()
        ),
        None,
    )
    pools: dict[str, _Pool] = {}
    if lists is not None:
        for split, file in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
            listed = [line.strip() for line in (lists / file).read_text(encoding="utf-8").splitlines() if line.strip()]
            # task_vectors' prepared folders list a class's images under '<letter>_<class path>' in name order.
            listed.sort(key=lambda line: (line.rsplit("/", 1)[0][1:].replace("/", "_"), line.rsplit("/", 1)[1]))
            keys = [f"SUN397{line}" for line in listed]
            pools[split] = _Pool(
                keys, [index[line.rsplit("/", 1)[0]] for line in listed], [folder / key for key in keys]
            )
        source = f"SUN397 at {data}, partitions {lists}/Training_01.txt and Testing_01.txt"
    else:
        found = sorted(
            data.rglob("sun_*.jpg"), key=lambda p: (p.parent.relative_to(data).as_posix().replace("/", "_"), p.name)
        )
        labels = [index["/" + p.parent.relative_to(data).as_posix()] for p in found]
        pool = _Pool([p.relative_to(folder).as_posix() for p in found], labels, found)
        parts = _hash_partition(pool, SUN397_SHARES, rest="unused")
        pools = {"train": parts["train"], "test": parts["test"]}
        source = f"SUN397 at {data}, 50 + 50 images a class by hash (no Training_01.txt / Testing_01.txt found)"
    return _build_task(
        common["name"],
        classes,
        common["templates"],
        pools,
        domain=common["domain"],
        source=source,
        balance=False,
        splits="paper",
    )


# ---------------------------------------------------------------------------------------------
# Datasets read through torchvision or as raw IDX files


def _emnist_classes(variant: str) -> tuple[tuple[str, ...], int]:
    """Class names and the label offset (EMNIST letters count from 1)."""
    return EMNIST_CLASSES[variant], 1 if variant == "letters" else 0


def _idx_dataset(
    folder: Path, key: str, variant: str, task_name: str, templates: tuple[str, ...], spec: _TV, splits: str
) -> Task:
    raw = folder / str(spec.idx_folder) / "raw"
    if key == "EMNIST":
        classes, offset = _emnist_classes(variant)
        prefixes = {"train": f"emnist-{variant}-train", "test": f"emnist-{variant}-test"}
    else:
        classes, offset = tuple(spec.classes or ()), 0
        prefixes = {"train": "train", "test": "t10k"}
    hint = (
        f"torchvision.datasets.{key}(root, download=True) on a machine with internet access, then copy "
        f"root/{spec.idx_folder} to {folder}"
    )
    arrays = {}
    for split, prefix in prefixes.items():
        images, labels = _idx_pair(raw, prefix, len(classes), hint, offset=offset)
        if key == "EMNIST":
            # EMNIST's raw images are stored transposed; show them the way they were written.
            images = images.transpose(0, 2, 1)
        arrays[split] = (images, labels)
    dedupe = splits == "taskarith"
    train, seen = _array_pool(*arrays["train"], dedupe=dedupe)
    test, _ = _array_pool(*arrays["test"], exclude=seen, dedupe=dedupe)
    return _build_task(
        task_name,
        classes,
        templates,
        {"train": train, "test": test},
        domain=spec.domain,
        source=f"{key} IDX files in {raw}",
        balance=False,
        splits=splits,
    )


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
    if key == "SUN397":
        # torchvision's 'bakery/shop' is task_vectors' (and CLIP's) 'bakery shop'.
        return tuple(" ".join(str(n).replace("/", " ").replace("_", " ").split()) for n in names), 0
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


def _tv_source_pool(
    items: Any,
    labels: np.ndarray,
    folder: Path,
    n_classes: int,
    offset: int,
    where: str,
    exclude: set[str] | frozenset[str] = frozenset(),
    *,
    dedupe: bool = True,
) -> tuple[_Pool, set[str]]:
    labels = _check_labels(np.asarray(labels).astype(np.int64), n_classes, where, offset=offset)
    if isinstance(items, np.ndarray):
        if items.dtype != np.uint8:
            raise TaskArithError(f"{where}: pixels have dtype {items.dtype}, expected uint8.")
        return _array_pool(items, labels, exclude, dedupe=dedupe)
    keys = []
    for path in items:
        try:
            keys.append(path.resolve().relative_to(folder.resolve()).as_posix())
        except ValueError:
            keys.append(path.as_posix())
    fresh = [i for i, k in enumerate(keys) if k not in exclude]
    return _Pool([keys[i] for i in fresh], [int(labels[i]) for i in fresh], [items[i] for i in fresh]), set(keys)


def _torchvision_dataset(
    datasets: Any,
    folder: Path,
    key: str,
    variant: str,
    task_name: str,
    templates: tuple[str, ...],
    spec: _TV,
    splits: str,
) -> Task:
    cls = getattr(datasets, spec.cls, None)
    if cls is None:
        raise TaskArithError(f"This torchvision has no datasets.{spec.cls}; upgrade it: {TORCHVISION_HINT}")
    extra: dict[str, Any] = {"split": variant} if key == "EMNIST" else {}
    paper = splits == "paper"
    shipped = spec.splits or {"train": {}}
    pools: dict[str, _Pool] = {}
    seen: set[str] = set()
    classes: tuple[str, ...] = ()
    offset = 0
    for split in ("train", "val", "test"):
        if split not in shipped:
            continue
        kwargs = {**extra, **shipped[split]}
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
        # The "paper" rule keeps every image where the dataset has it; "taskarith" drops repeats across splits.
        pools[split], keys = _tv_source_pool(
            items, labels, folder, len(classes), offset, where, exclude=frozenset() if paper else seen, dedupe=not paper
        )
        seen |= keys
    source = f"torchvision.datasets.{spec.cls} at {folder}"
    if paper and key == "DTD":
        # task_vectors (after PAINT) merges DTD's train and val of partition 1 and draws its own val from them;
        # in its folders' order (class, then file name), so the draw picks the same images.
        merged = _Pool(
            pools["train"].keys + pools["val"].keys,
            pools["train"].labels + pools["val"].labels,
            list(pools["train"].items) + list(pools["val"].items),
        )
        pools = {
            "train": merged.subset(sorted(range(len(merged)), key=lambda i: _dtd_order(merged.keys[i]))),
            "test": pools["test"],
        }
    elif paper and not spec.splits:
        # One pool: split as the official split files are (their sizes; the images are chosen by hash).
        shares, rest = (SUN397_SHARES, "unused") if key == "SUN397" else (EUROSAT_SHARES, "train")
        parts = _hash_partition(pools["train"], shares, rest)
        pools = {split: parts[split] for split in ("train", "val", "test") if split in parts}
        source += ", split by hash like the official split files"
    return _build_task(
        task_name, classes, templates, pools, domain=spec.domain, source=source, balance=False, splits=splits
    )


def _dtd_order(key: str) -> tuple[str, str]:
    """(class folder, file name) of a DTD image: the order of task_vectors' dtd/train ImageFolder."""
    parts = key.split("/")
    return parts[-2], parts[-1]
