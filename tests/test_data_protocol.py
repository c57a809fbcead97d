"""The papers' 8-task CLIP data protocol: the "paper" split rule, ImageNet, OpenAI CLIP templates, class names.

Datasets are tiny fakes written on disk in each dataset's real layout; torchvision is never needed.
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import random_split

from taskarith.data import SPLITS, load_task, task_from_image_folder, task_from_torchvision
from taskarith.data.clip_prompts import CLIP_TEMPLATES, IMAGENET_CLASSES, IMAGENET_WNIDS
from taskarith.data.pixels import _hash_partition, _Pool, paper_split
from taskarith.data.torchvision_datasets import TORCHVISION_DATASETS
from taskarith.errors import TaskArithError


def write_png(path: Path, seed: int, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def make_classes(root: Path, counts: dict[str, int], seed: int = 0, suffix: str = ".png") -> Path:
    for name, n in counts.items():
        for i in range(n):
            write_png(root / name / f"img{i:03d}{suffix}", seed)
            seed += 1
    return root


def rel(task, split: str, base: Path) -> list[str]:
    return [p.relative_to(base).as_posix() for p in task.split(split).inputs]


@pytest.fixture
def no_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)


# --------------------------------------------------------------------------------------------
# The split rule


@pytest.mark.parametrize("n", [10, 11, 999, 60000, 73257])
def test_paper_split_is_torch_random_split_with_seed_0(n):
    n_val = min(int(0.1 * n), 5000)
    train, val = random_split(range(n), [n - n_val, n_val], generator=torch.Generator().manual_seed(0))
    assert paper_split(n) == (list(train.indices), list(val.indices))


def test_paper_split_matches_task_vectors_mnist_check():
    # task_vectors asserts trainset.indices[0] == 36044 for MNISTVal (60,000 training images).
    train, val = paper_split(60000)
    assert train[0] == 36044 and len(val) == 5000 and len(train) == 55000
    assert sorted(train + val) == list(range(60000))
    assert len(paper_split(5)[1]) == 1 and len(paper_split(1)[1]) == 0  # below 10: one val (the papers stop)


def test_hash_partition_shares_per_class_and_is_order_free():
    keys = [f"c{c}/img{i}" for c in range(2) for i in range(20)]
    pool = _Pool(keys, [c for c in range(2) for _ in range(20)], list(keys))
    parts = _hash_partition(pool, {"test": 0.2, "val": 3}, rest="train")
    assert {k: Counter(p.labels) for k, p in parts.items()} == {
        "test": {0: 4, 1: 4},
        "val": {0: 3, 1: 3},
        "train": {0: 13, 1: 13},
    }
    assert sorted(k for p in parts.values() for k in p.keys) == sorted(keys)
    shuffled = _Pool(keys[::-1], pool.labels[::-1], keys[::-1])
    assert {k: set(p.keys) for k, p in _hash_partition(shuffled, {"test": 0.2, "val": 3}, "train").items()} == {
        k: set(p.keys) for k, p in parts.items()
    }


def test_image_folder_with_train_and_test_draws_val_as_the_papers(tmp_path):
    base = tmp_path / "ds"
    make_classes(base / "train", {"a_b": 30, "c": 25})
    make_classes(base / "test", {"a_b": 4, "c": 3}, seed=100)
    task = task_from_image_folder(base)
    assert task.classes == ("a b", "c") and task.source == str(base)
    assert len(task.test) == 7 and sorted(rel(task, "test", base)) == sorted(
        p.relative_to(base).as_posix() for p in (base / "test").rglob("*.png")
    )
    # ImageFolder order (class folder, then file name), then torch's random_split with seed 0.
    ordered = sorted(p.relative_to(base).as_posix() for p in (base / "train").rglob("*.png"))
    train_idx, val_idx = random_split(range(55), [50, 5], generator=torch.Generator().manual_seed(0))
    assert rel(task, "train", base) == [ordered[i] for i in train_idx.indices]
    assert rel(task, "val", base) == [ordered[i] for i in val_idx.indices]
    assert task.fingerprint == task_from_image_folder(base).fingerprint


def test_image_folder_keeps_a_shipped_val_and_carves_a_missing_test(tmp_path):
    base = tmp_path / "three"
    for split, n in (("train", 10), ("val", 3), ("test", 2)):
        make_classes(base / split, {"x": n, "y": n}, seed=1000 * len(split))
    task = task_from_image_folder(base)
    assert [len(task.split(s)) for s in SPLITS] == [20, 6, 4]
    assert all(p.parts[-3] == s for s in SPLITS for p in task.split(s).inputs)
    flat = make_classes(tmp_path / "flat", {"x": 40, "y": 20})
    task = task_from_image_folder(flat)
    # 15 % of every class is test (6 + 3); val is 10 % of the other 51, drawn by the papers' rule.
    assert Counter(task.test.labels) == {0: 6, 1: 3} and len(task.val) == 5 and len(task.train) == 46
    assert len({p for s in SPLITS for p in task.split(s).inputs}) == 60
    capped = task_from_image_folder(flat, splits="taskarith")
    assert capped.source == f"{flat.resolve()}?splits=taskarith" and [len(capped.split(s)) for s in SPLITS] == [
        45,
        6,
        9,
    ]


def test_spec_syntax_selects_the_split_rule(tmp_path):
    flat = make_classes(tmp_path / "flat", {"x": 12, "y": 12})
    assert load_task(str(flat)).fingerprint == task_from_image_folder(flat).fingerprint
    assert (
        load_task(f"{flat}?splits=taskarith").fingerprint
        == task_from_image_folder(flat, splits="taskarith").fingerprint
    )
    with pytest.raises(TaskArithError, match="Unknown split rule 'tiny'.*paper, taskarith"):
        load_task(f"{flat}?splits=tiny")
    with pytest.raises(TaskArithError, match="Unknown split rule"):
        task_from_image_folder(flat, splits="capped")
    (tmp_path / "t.csv").write_text("text,label\na,x\nb,y\nc,x\nd,y\n")
    with pytest.raises(TaskArithError, match=r"\?splits= applies to image folders and torchvision"):
        load_task(f"{tmp_path / 't.csv'}?splits=taskarith")
    odd = make_classes(tmp_path / "odd?splits=taskarith", {"x": 3, "y": 3})  # a folder really named so
    assert load_task(str(odd)).source == str(odd.resolve())


# --------------------------------------------------------------------------------------------
# torchvision datasets under the paper rule


def write_idx(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.mark.usefixtures("no_torchvision")
def test_mnist_paper_split_keeps_the_full_sets_and_the_papers_templates(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (130, 5, 5), dtype=np.uint8)
    images[100] = images[7]  # a test image that is also a training image stays, as in the papers' data
    labels = (np.arange(130) % 10).astype(np.uint8)
    raw = tmp_path / "MNIST" / "raw"
    for prefix, part in (("train", slice(0, 100)), ("t10k", slice(100, 130))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[part])
    task = load_task(f"torchvision:MNIST@{tmp_path}")
    assert [len(task.split(s)) for s in SPLITS] == [90, 10, 30] and task.source == f"torchvision:MNIST@{tmp_path}"
    train_idx, val_idx = paper_split(100)
    assert all(np.array_equal(a, images[i]) for a, i in zip(task.train.inputs, train_idx, strict=True))
    assert all(np.array_equal(a, images[i]) for a, i in zip(task.val.inputs, val_idx, strict=True))
    assert task.templates == ('a photo of the number: "{}".',) and task.classes == tuple("0123456789")
    capped = load_task(f"torchvision:MNIST@{tmp_path}?splits=taskarith")
    assert len(capped.test) == 29 and capped.source.endswith("?splits=taskarith")


def fake_torchvision(monkeypatch, tmp_path: Path) -> None:
    """torchvision.datasets stand-ins for DTD (partition 1 train/val/test) and EuroSAT (one ImageFolder)."""
    dtd_images = tmp_path / "dtd" / "dtd" / "images"
    listing = {split: [] for split in ("train", "val", "test")}
    seed = 0
    for c, name in enumerate(("banded", "zigzagged")):
        for i in range(12):
            split = ("train", "val", "test")[i % 3]
            path = dtd_images / name / f"{name}_{i:04d}.jpg"
            write_png(path, seed)
            seed += 1
            listing[split].append((path, c))

    class DTD:
        classes = ["banded", "zigzagged"]

        def __init__(self, root, split="train", partition=1, download=False):
            assert partition == 1 and not download
            self._image_files = [p for p, _ in listing[split]][::-1]  # any order: the rule sorts them
            self._labels = [c for _, c in listing[split]][::-1]

    eurosat = tmp_path / "eurosat" / "2750"
    samples = []
    for c, name in enumerate(("AnnualCrop", "SeaLake")):
        for i in range(20):
            write_png(eurosat / name / f"{name}_{i}.jpg", 500 + 20 * c + i)
            samples.append((str(eurosat / name / f"{name}_{i}.jpg"), c))

    class EuroSAT:
        classes = ["AnnualCrop", "SeaLake"]

        def __init__(self, root, download=False):
            self.samples = samples

    module = types.ModuleType("torchvision.datasets")
    module.DTD, module.EuroSAT = DTD, EuroSAT
    package = types.ModuleType("torchvision")
    package.datasets = module
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", module)


def test_dtd_merges_train_and_val_and_eurosat_is_split_like_its_files(monkeypatch, tmp_path):
    fake_torchvision(monkeypatch, tmp_path)
    dtd = task_from_torchvision("DTD", tmp_path)
    # task_vectors: train = DTD's train + val (16 images), drawn from in folder order; test = DTD's test.
    merged = sorted(
        f"dtd/dtd/images/{n}/{n}_{i:04d}.jpg" for n in ("banded", "zigzagged") for i in range(12) if i % 3 < 2
    )
    train_idx, val_idx = paper_split(16)
    assert rel(dtd, "train", tmp_path) == [merged[i] for i in train_idx]
    assert rel(dtd, "val", tmp_path) == [merged[i] for i in val_idx] and len(dtd.test) == 8
    assert dtd.templates == CLIP_TEMPLATES["DTD"] and len(dtd.templates) == 8
    assert [len(task_from_torchvision("DTD", tmp_path, splits="taskarith").split(s)) for s in SPLITS] == [8, 8, 8]
    eurosat = task_from_torchvision("EuroSAT", tmp_path)
    # 80 / 10 / 10 of every class, the proportions of task_vectors' EuroSAT_splits (21,600 / 2,700 / 2,700).
    assert [dict(Counter(eurosat.split(s).labels)) for s in SPLITS] == [{0: 16, 1: 16}, {0: 2, 1: 2}, {0: 2, 1: 2}]
    assert eurosat.classes == ("annual crop land", "lake or sea") and len(eurosat.templates) == 3
    assert eurosat.fingerprint == task_from_torchvision("EuroSAT", tmp_path).fingerprint


@pytest.mark.usefixtures("no_torchvision")
def test_task_vectors_prepared_folders(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_classes(tmp_path / "EuroSAT_splits" / split, {"AnnualCrop": n, "HerbaceousVegetation": n})
    eurosat = task_from_torchvision("EuroSAT", tmp_path)
    assert [len(eurosat.split(s)) for s in SPLITS] == [12, 4, 6]  # EuroSATVal: the val folder is val
    assert eurosat.classes == ("annual crop land", "brushland or shrubland")
    make_classes(tmp_path / "sun397" / "train", {"a_abbey": 10, "b_bakery_shop": 10})
    make_classes(tmp_path / "sun397" / "val", {"a_abbey": 2, "b_bakery_shop": 2}, seed=50)
    sun = task_from_torchvision("SUN397", tmp_path)
    assert sun.classes == ("abbey", "bakery shop") and [len(sun.split(s)) for s in SPLITS] == [18, 2, 4]
    assert all(p.parts[-3] == "val" for p in sun.test.inputs)  # the papers test on sun397/val
    make_classes(tmp_path / "dtd" / "train", {"banded": 10})
    make_classes(tmp_path / "dtd" / "val", {"banded": 3}, seed=70)
    with pytest.raises(TaskArithError, match="at least 2 distinct"):
        task_from_torchvision("DTD", tmp_path)  # read from the folders (one class here), not through torchvision


@pytest.mark.usefixtures("no_torchvision")
def test_sun397_partition_files_and_their_fallback(tmp_path):
    data = tmp_path / "SUN397"
    (data).mkdir()
    (data / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    lines = {"Training_01.txt": [], "Testing_01.txt": []}
    for cls in ("a/abbey", "b/bakery/shop"):
        for i in range(110):
            write_png(data / cls / f"sun_{i:04d}.jpg", i)
            if i < 60:
                lines["Training_01.txt" if i % 2 else "Testing_01.txt"].append(f"/{cls}/sun_{i:04d}.jpg")
    fallback = task_from_torchvision("SUN397", tmp_path)
    assert [dict(Counter(fallback.split(s).labels)) for s in ("test",)] == [{0: 50, 1: 50}]
    assert len(fallback.train) + len(fallback.val) == 100 and len(fallback.val) == 10
    (data / "Partitions").mkdir()
    for name, listed in lines.items():
        (data / "Partitions" / name).write_text("\n".join(listed[::-1]) + "\n")
    task = task_from_torchvision("SUN397", tmp_path)
    assert task.classes == ("abbey", "bakery shop") and task.templates == CLIP_TEMPLATES["SUN397"]
    assert sorted(rel(task, "test", tmp_path)) == sorted(f"SUN397{line}" for line in lines["Testing_01.txt"])
    ordered = sorted(lines["Training_01.txt"])  # 'a_abbey' < 'b_bakery_shop', then file names
    train_idx, val_idx = paper_split(60)
    assert rel(task, "train", tmp_path) == [f"SUN397{ordered[i]}" for i in train_idx]
    assert rel(task, "val", tmp_path) == [f"SUN397{ordered[i]}" for i in val_idx]


@pytest.mark.usefixtures("no_torchvision")
def test_resisc45_split_files(tmp_path):
    images = make_classes(tmp_path / "resisc45" / "NWPU-RESISC45", {"airplane": 10, "sea_ice": 10})
    names = {split: [] for split in ("train", "val", "test")}
    for i, path in enumerate(sorted(images.rglob("*.png"))):
        path.rename(path.with_name(f"{path.parent.name}_{i:03d}.jpg"))
        names[("train", "train", "train", "val", "test")[i % 5]].append(f"{path.parent.name}_{i:03d}.jpg")
    fallback = task_from_torchvision("RESISC45", tmp_path)
    assert [len(fallback.split(s)) for s in SPLITS] == [11, 1, 4]  # 60 % train (val drawn from it), 20 % test
    for split, listed in names.items():
        (tmp_path / "resisc45" / f"resisc45-{split}.txt").write_text("\n".join(listed) + "\n")
    task = task_from_torchvision("RESISC45", tmp_path)
    assert task.classes == ("airplane", "sea ice") and len(task.templates) == 18
    assert sorted(p.name for p in task.test.inputs) == sorted(names["test"])
    assert sorted(p.name for p in task.train.inputs + task.val.inputs) == sorted(names["train"])
    assert len(task.val) == 1
    capped = task_from_torchvision("RESISC45", tmp_path, splits="taskarith")
    assert sum(len(capped.split(s)) for s in SPLITS) == 20  # the old behaviour: one folder, split by us


# --------------------------------------------------------------------------------------------
# ImageNet


WNIDS = ("n01440764", "n01443537", "n15075141")


def make_imagenet(root: Path, test_folder: str = "val", per_class: int = 12) -> Path:
    make_classes(root / "train", {w: per_class for w in WNIDS}, suffix=".JPEG")
    make_classes(root / test_folder, {w: 2 for w in WNIDS}, seed=900, suffix=".JPEG")
    return root


@pytest.mark.usefixtures("no_torchvision")
def test_imagenet_from_its_folders_with_clip_names(tmp_path):
    make_imagenet(tmp_path)
    task = load_task(f"torchvision:ImageNet@{tmp_path}")
    assert task.classes == ("tench", "goldfish", "toilet paper") and task.name == "tv_imagenet"
    assert task.templates == CLIP_TEMPLATES["ImageNet"] and len(task.templates) == 80
    assert [len(task.split(s)) for s in SPLITS] == [33, 3, 6]
    assert all(p.parts[-3] == "val" for p in task.test.inputs)
    ordered = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "train").rglob("*.JPEG"))
    assert rel(task, "val", tmp_path) == [ordered[i] for i in paper_split(36)[1]]
    capped = load_task(f"torchvision:imagenet@{tmp_path}?splits=taskarith")
    assert capped.classes == task.classes and capped.source.endswith("?splits=taskarith")


@pytest.mark.usefixtures("no_torchvision")
def test_imagenet_layouts_and_errors(tmp_path):
    nested = make_imagenet(tmp_path / "data" / "imagenet", test_folder="val_in_folder")
    (nested / "val").mkdir()  # task_vectors prefers val_in_folder over a flat val/
    (nested / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    task = task_from_torchvision("ImageNet", tmp_path / "data")
    assert all(p.parts[-3] == "val_in_folder" for p in task.test.inputs)
    make_classes(tmp_path / "odd" / "train", {"n01440764": 3, "cats": 3})
    make_classes(tmp_path / "odd" / "val", {"n01440764": 1, "cats": 1})
    with pytest.raises(TaskArithError, match=r"\['cats'\] are not ILSVRC-2012 wnids"):
        task_from_torchvision("ImageNet", tmp_path / "odd")
    (tmp_path / "flat" / "train").mkdir(parents=True)
    with pytest.raises(TaskArithError, match="ImageNet not found.*sorted into wnid folders"):
        task_from_torchvision("ImageNet", tmp_path / "flat")


def test_imagenet_class_names_are_clip_names_in_wnid_order():
    assert len(IMAGENET_WNIDS) == len(IMAGENET_CLASSES) == 1000 and list(IMAGENET_WNIDS) == sorted(set(IMAGENET_WNIDS))
    assert IMAGENET_CLASSES[:3] == ("tench", "goldfish", "great white shark") and IMAGENET_CLASSES[-1] == "toilet paper"
    # CLIP names two pairs alike; the task renames one of each so that its classes are distinct.
    assert [n for n, k in Counter(IMAGENET_CLASSES).items() if k > 1] == ["missile", "sunglasses"]


# --------------------------------------------------------------------------------------------
# Templates and class names


def test_the_papers_datasets_use_openai_clip_templates():
    expected = {
        "StanfordCars": "Cars",
        "DTD": "DTD",
        "EuroSAT": "EuroSAT",
        "GTSRB": "GTSRB",
        "MNIST": "MNIST",
        "RESISC45": "RESISC45",
        "SUN397": "SUN397",
        "SVHN": "SVHN",
        "ImageNet": "ImageNet",
    }
    for dataset, clip_key in expected.items():
        assert TORCHVISION_DATASETS[dataset].templates == CLIP_TEMPLATES[clip_key], dataset
    sizes = {k: len(v) for k, v in CLIP_TEMPLATES.items() if k in expected.values()}
    assert sizes == {
        "Cars": 8,
        "DTD": 8,
        "EuroSAT": 3,
        "GTSRB": 3,
        "ImageNet": 80,
        "MNIST": 1,
        "RESISC45": 18,
        "SUN397": 2,
        "SVHN": 1,
    }
    assert CLIP_TEMPLATES["SVHN"] == CLIP_TEMPLATES["MNIST"] == ('a photo of the number: "{}".',)
    assert (
        CLIP_TEMPLATES["ImageNet"][0] == "a bad photo of a {}."
        and CLIP_TEMPLATES["ImageNet"][-1] == "a tattoo of the {}."
    )
    assert CLIP_TEMPLATES["Cars"][3] == "i love my {}!" and CLIP_TEMPLATES["RESISC45"][-1] == "aerial view of the {}."
    assert all("{}" in t for v in CLIP_TEMPLATES.values() for t in v)
