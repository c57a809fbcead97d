"""Inputs that change or point elsewhere: a checkpoint replaced while a streamed merge reads it, and model
folders whose shard index or companion files reach outside the folder.

Races are injected through the merge's per-tensor callback (``on_tensor``), never by sleeping.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from taskarith.errors import TaskArithError
from taskarith.merging import merge_checkpoints


def write_model(folder: Path, seed: int, tensors: int = 6) -> Path:
    """A model folder of several tensors, so that a merge has a first, a middle and a last one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({f"layer{i}.weight": rng.standard_normal((8, 4)).astype(np.float32) for i in range(tensors)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "tiny"}\n')
    return folder


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    write_model(tmp_path / "base", seed=0)
    write_model(tmp_path / "ftA", seed=1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def replace_by_rename(path: Path, seed: int) -> None:
    """What a trainer saving a checkpoint does: write a new file beside it, rename it over the old one."""
    write_model(path.parent / ".fresh", seed)
    os.replace(path.parent / ".fresh" / "model.safetensors", path)


def when(names: list[str], at: str, action: Callable[[], None]) -> Callable[[str], None]:
    """A per-tensor callback recording the names it sees and running ``action`` at the tensor ``at``."""
    def on_tensor(name: str) -> None:
        names.append(name)
        if name == at:
            action()
    return on_tensor


# ---- an input replaced during a streamed merge ----------------------------------------------------------


@pytest.mark.parametrize("at", ["layer0.weight", "layer3.weight"])
def test_an_input_renamed_over_mid_merge_is_refused_naming_it(work, at):
    seen: list[str] = []
    with pytest.raises(TaskArithError, match=r"ftA/model.safetensors: the file was replaced or changed during "
                                             r"the merge"):
        merge_checkpoints("base", ["ftA"], "merged",
                          on_tensor=when(seen, at, lambda: replace_by_rename(work / "ftA" / "model.safetensors", 7)))
    # Refused at the first read after the replacement, not after reading every tensor.
    assert seen[-1] == at
    assert sorted(p.name for p in work.iterdir()) == ["base", "ftA"]  # no output, no .partial


def test_an_input_renamed_over_after_its_last_tensor_was_read_is_refused(work, monkeypatch):
    # The callback runs before a tensor is read; to replace the base after its last read, the replacement
    # rides on the read itself. Every read has succeeded by then: only the final check can catch it.
    from taskarith.merging import streaming

    real_read = streaming.read_bytes
    base_file = Path("base") / "model.safetensors"  # as the merge names it: relative to the current folder

    def read_then_replace(entry, buffer=None):
        data = real_read(entry, buffer)
        if entry.file == base_file and entry.start == max(e.start for e in index.entries.values()):
            replace_by_rename(base_file, 9)
        return data

    index = streaming.CheckpointIndex.open("base")
    monkeypatch.setattr(streaming, "read_bytes", read_then_replace)
    with pytest.raises(TaskArithError, match=r"base/model.safetensors: the file was replaced or changed"):
        merge_checkpoints("base", ["ftA"], "merged")
    assert not (work / "merged").exists()


def test_an_input_rewritten_in_place_mid_merge_is_refused(work):
    path = work / "ftA" / "model.safetensors"

    def rewrite() -> None:  # same inode: only the size or modification time tells
        data = bytearray(path.read_bytes())
        data[-4:] = b"\x00\x00\x80\x7f"
        with open(path, "r+b") as fh:
            fh.write(data)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))

    with pytest.raises(TaskArithError, match="ftA/model.safetensors: the file was replaced or changed"):
        merge_checkpoints("base", ["ftA"], "merged", on_tensor=when([], "layer2.weight", rewrite))
    assert not (work / "merged").exists()


def test_the_cli_names_a_replaced_input_in_one_line(cli, work, monkeypatch):
    import taskarith.merging.recipe as recipe

    real = recipe.merge_checkpoints

    def with_replacement(*args, on_tensor, **kwargs):
        def replacing(name: str) -> None:
            on_tensor(name)
            if name == "layer1.weight":
                replace_by_rename(work / "ftA" / "model.safetensors", 3)
        return real(*args, on_tensor=replacing, **kwargs)

    monkeypatch.setattr(recipe, "merge_checkpoints", with_replacement)
    code, _, err = cli("merge", "--base", "base", "--model", "ftA", "--out", "merged")
    lines = [line for line in err.splitlines() if "error:" in line]  # the other line is the progress bar
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert "ftA/model.safetensors: the file was replaced or changed during the merge" in lines[0]
    assert not (work / "merged").exists()


def test_an_unchanged_merge_still_succeeds(work):
    summary = merge_checkpoints("base", ["ftA"], "merged")
    assert summary["tensors"] == 6 and (work / "merged" / "model.safetensors").is_file()
    assert json.loads((work / "merged" / "config.json").read_text()) == {"model_type": "tiny"}
