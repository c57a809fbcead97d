"""Hostile image inputs: decompression bombs refused from the header, and image folders whose links
leave the folder or loop back into it.

The memory tests run the attack in a subprocess under an address-space limit (RLIMIT_AS), which decoding
the bomb would exceed many times over; they assert on the outcome, never on time.
"""

from __future__ import annotations

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
    return subprocess.run([sys.executable, "-c", _UNDER_LIMIT.format(limit=limit, body=body)], capture_output=True,
                          text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                       "PYTHONPATH": ":".join(sys.path)})


def test_reading_the_bomb_stays_within_a_memory_limit(bomb):
    # Decoding it would take 144 MB as bits, then 432 MB in RGB and again as an array: over 1 GiB.
    done = run_limited(f"""
from taskarith.data.pixels import load_image
from taskarith.errors import TaskArithError
try:
    load_image({str(bomb)!r})
except TaskArithError as exc:
    print("refused:", exc)
""", 1 << 30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "bomb.png" in done.stdout and "MemoryError" not in done.stderr


def test_a_batch_of_four_bombs_is_refused_within_a_memory_limit(bomb):
    # The crash: four in one batch, each converted full-size to float (1.7 GB apiece) before resizing.
    done = run_limited(f"""
from taskarith.models.vision import image_preprocess
from taskarith.errors import TaskArithError
try:
    image_preprocess(32)([{str(bomb)!r}] * 4)
except TaskArithError as exc:
    print("refused:", exc)
""", 2 << 30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("refused:") and "bomb.png is 12000 x 12000" in done.stdout
