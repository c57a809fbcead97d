"""Hostile image inputs: decompression bombs refused from the header, and image folders whose links
leave the folder or loop back into it.

The memory tests run the attack in a subprocess under an address-space limit (RLIMIT_AS), which decoding
the bomb would exceed many times over; they assert on the outcome, never on time.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taskarith.data.pixels import MAX_IMAGE_PIXELS, load_image
from taskarith.errors import TaskArithError


def png_bomb(path: Path, side: int = 12000) -> Path:
    """A valid one-bit PNG of ``side`` x ``side`` black pixels: a few KB on disk, 432 MB once in RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return png_bomb(tmp_path_factory.mktemp("bomb") / "bomb.png")


# The tests' own Image.open of the bomb draws Pillow's warning; taskarith's reads silence it.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def test_the_bomb_is_a_real_image_of_huge_size(bomb):
    assert bomb.stat().st_size < 100_000
    with Image.open(bomb) as image:
        assert image.size == (12000, 12000) and image.width * image.height > MAX_IMAGE_PIXELS


def test_a_decompression_bomb_is_refused_naming_the_file(bomb):
    with pytest.raises(TaskArithError, match=r"bomb.png is 12000 x 12000 pixels, more than the 25,000,000"):
        load_image(bomb)
    with Image.open(bomb) as lazy:  # a PIL image not yet decoded, as a torchvision dataset may hand over
        with pytest.raises(TaskArithError, match=r"bomb.png is 12000 x 12000 pixels"):
            load_image(lazy)


def test_images_under_the_cap_still_decode(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ok.png")
    assert np.array_equal(load_image(tmp_path / "ok.png"), pixels)


_UNDER_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
{body}
"""


def run_limited(body: str, limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _UNDER_LIMIT.format(limit=limit, body=body)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
    )


def test_reading_the_bomb_stays_within_a_memory_limit(bomb):
    # Decoding it would take 144 MB as bits, then 432 MB in RGB and again as an array: over 1 GiB.
    done = run_limited(
        f"""
from taskarith.data.pixels import load_image
from taskarith.errors import TaskArithError
try:
    load_image({str(bomb)!r})
except TaskArithError as exc:
    print("refused:", exc)
""",
        1 << 30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "bomb.png" in done.stdout and "MemoryError" not in done.stderr


def test_a_batch_of_four_bombs_is_refused_within_a_memory_limit(bomb):
    # The crash: four in one batch, each converted full-size to float (1.7 GB apiece) before resizing.
    done = run_limited(
        f"""
from taskarith.models.vision import image_preprocess
from taskarith.errors import TaskArithError
try:
    image_preprocess(32)([{str(bomb)!r}] * 4)
except TaskArithError as exc:
    print("refused:", exc)
""",
        2 << 30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "bomb.png is 12000 x 12000" in done.stdout


# ---- image folders and links -----------------------------------------------------------------------------


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(path)


def class_folders(root: Path, classes: tuple[str, ...] = ("a", "b"), n: int = 6) -> Path:
    for c, name in enumerate(classes):
        for i in range(n):
            write_png(root / name / f"{i}.png", 100 * c + i)
    return root


def all_inputs(task) -> list[tuple[Path, int]]:
    return [
        (Path(x), y)
        for split in (task.train, task.val, task.test)
        for x, y in zip(split.inputs, split.labels, strict=True)
    ]


def test_a_link_back_to_an_ancestor_adds_nothing(tmp_path):
    from taskarith.data import task_from_image_folder

    root = class_folders(tmp_path / "data")
    plain = all_inputs(task_from_image_folder(root))
    (root / "b" / "loop").symlink_to("..")  # the attack: 12 files became hundreds of examples
    (root / "b" / "self").symlink_to(".")
    looped = all_inputs(task_from_image_folder(root))
    assert looped == plain and len(looped) == 12
    real = [p.resolve() for p, _ in looped]
    assert len(set(real)) == len(real)  # each file once, so no test file is also in train
    assert all((p.parent.name == "a") == (y == 0) for p, y in looped)  # class-a images keep their label


def test_a_link_to_another_class_does_not_relabel_its_images(tmp_path):
    from taskarith.data import task_from_image_folder

    root = class_folders(tmp_path / "data")
    (root / "a" / "more").symlink_to("../b")
    (root / "a" / "x.png").symlink_to("../b/0.png")
    inputs = all_inputs(task_from_image_folder(root))
    assert len(inputs) == 12 and all((p.resolve().parent.name == "a") == (y == 0) for p, y in inputs)


def test_a_link_inside_the_class_folder_is_followed_once(tmp_path):
    from taskarith.data import task_from_image_folder

    root = class_folders(tmp_path / "data")
    write_png(root / "a" / "stash" / "extra.png", 999)
    (root / "a" / "alias").symlink_to("stash")  # a second route to a folder of its own class
    (root / "a" / "again.png").symlink_to("0.png")
    inputs = all_inputs(task_from_image_folder(root))
    assert len(inputs) == 13 and len({p.resolve() for p, _ in inputs}) == 13


@pytest.mark.parametrize("where", ["b/outside", "b/leak.png", "c"])
def test_a_link_out_of_the_folder_is_refused_naming_it(tmp_path, where):
    from taskarith.data import task_from_image_folder

    root = class_folders(tmp_path / "data")
    private = class_folders(tmp_path / "private", classes=("secret",))
    target = private / "secret" / ("0.png" if where.endswith(".png") else "")
    (root / where).symlink_to(target)
    with pytest.raises(
        TaskArithError,
        match=rf"{where}( leads through a link to .*private/secret.*, outside the "
        r"folder)",
    ):
        task_from_image_folder(root)


def test_a_file_reached_from_two_splits_is_kept_where_it_lies(tmp_path):
    from taskarith.data import task_from_image_folder

    root = tmp_path / "data"
    for split in ("train", "test"):
        class_folders(root / split, n=4)
    for i in range(4):  # every test image of class a would also be a training one
        (root / "test" / "a" / f"{i}.png").unlink()
        (root / "test" / "a" / f"{i}.png").symlink_to(f"../../train/a/{i}.png")
    write_png(root / "test" / "a" / "own.png", 77)
    task = task_from_image_folder(root)
    train = {Path(x).resolve() for x in (*task.train.inputs, *task.val.inputs)}
    test = {Path(x).resolve() for x in task.test.inputs}
    assert not train & test and len(train) == 8 and len(test) == 5


def test_a_class_folder_linked_to_one_of_another_split_is_refused(tmp_path):
    from taskarith.data import task_from_image_folder

    root = tmp_path / "data"
    for split in ("train", "test"):
        class_folders(root / split, n=4)
    shutil.rmtree(root / "test" / "a")
    (root / "test" / "a").symlink_to("../train/a")
    with pytest.raises(
        TaskArithError,
        match=r"test/a is the folder .*train/a \(through a link\), whose images are "
        r"listed already",
    ):
        task_from_image_folder(root)
