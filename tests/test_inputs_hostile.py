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
    save_file(
        {f"layer{i}.weight": rng.standard_normal((8, 4)).astype(np.float32) for i in range(tensors)},
        str(folder / "model.safetensors"),
    )
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
    with pytest.raises(
        TaskArithError,
        match=r"ftA/model.safetensors: the file was replaced or changed during "
        r"the merge",
    ):
        merge_checkpoints(
            "base",
            ["ftA"],
            "merged",
            on_tensor=when(seen, at, lambda: replace_by_rename(work / "ftA" / "model.safetensors", 7)),
        )
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
    from taskarith.merging import recipe

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


# ---- model folders that reach outside themselves --------------------------------------------------------


def shard(folder: Path, weight_map: dict) -> Path:
    """``folder`` made a sharded model whose index maps its tensors to ``weight_map``'s values."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    "name", ["../secret.safetensors", "/etc/passwd", "sub/model.safetensors", "..", ".", "", "a\\..\\b.safetensors"]
)
def test_a_shard_index_naming_a_path_outside_the_folder_is_refused(work, name):
    from taskarith.io import read_state_dict

    save_file({"layer0.weight": np.ones((8, 4), np.float32)}, str(work / "secret.safetensors"))
    tensors = [f"layer{i}.weight" for i in range(6)]
    shard(work / "ftA", {**{t: "model-00001-of-00001.safetensors" for t in tensors}, "layer0.weight": name})
    pattern = (
        r"ftA/model.safetensors.index.json: weight_map\['layer0.weight'\] is .*; a shard must be a plain file name"
    )
    with pytest.raises(TaskArithError, match=pattern):
        merge_checkpoints("base", ["ftA"], "merged")
    with pytest.raises(TaskArithError, match=pattern):
        read_state_dict(work / "ftA")
    assert not (work / "merged").exists()


@pytest.mark.parametrize("value", [5, None, ["model.safetensors"], {"a": 1}])
def test_a_shard_index_with_values_that_are_not_strings_is_refused(work, value):
    from taskarith.io import read_state_dict

    shard(work / "ftA", {"layer0.weight": value})
    with pytest.raises(TaskArithError, match=r"weight_map\['layer0.weight'\] is .*, not a file name"):
        read_state_dict(work / "ftA")
    with pytest.raises(TaskArithError, match=r"weight_map\['layer0.weight'\] is .*, not a file name"):
        merge_checkpoints("base", ["ftA"], "merged")


def test_the_cli_refuses_a_bad_shard_index_in_one_line(cli, work):
    shard(work / "ftA", {f"layer{i}.weight": "../base/model.safetensors" for i in range(6)})
    code, _, err = cli("merge", "--base", "base", "--model", "ftA", "--out", "merged")
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "a shard must be a plain file name" in lines[0], err
    assert not (work / "merged").exists()


@pytest.mark.parametrize("target", ["outside", "absolute"])
def test_a_companion_file_linked_outside_the_folder_is_refused_before_merging(work, target):
    (work / "private.txt").write_text("hf_token=secret\n")
    link = work / "base" / "tokenizer_config.json"
    link.symlink_to("../private.txt" if target == "outside" else work / "private.txt")
    seen: list[str] = []
    with pytest.raises(
        TaskArithError,
        match=r"base/tokenizer_config.json is a link to .*private.txt, outside the "
        "model folder",
    ):
        merge_checkpoints("base", ["ftA"], "merged", on_tensor=seen.append)
    assert seen == [] and not (work / "merged").exists()


def test_companion_links_inside_the_folder_and_into_the_hub_cache_are_copied(tmp_path):
    # The Hugging Face cache stores every file of a snapshot as a link to ../../blobs/<hash>.
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    write_model(snapshot, seed=0)
    (repo / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).rename(repo / "blobs" / f"hash-{name}")
        (snapshot / name).symlink_to(f"../../blobs/hash-{name}")
    (snapshot / "notes").mkdir()
    (snapshot / "notes" / "README.md").write_text("# tiny\n")
    (snapshot / "README.md").symlink_to("notes/README.md")
    write_model(tmp_path / "ftA", seed=1)
    merge_checkpoints(snapshot, [tmp_path / "ftA"], tmp_path / "merged")
    merged = tmp_path / "merged"
    assert (merged / "README.md").read_text() == "# tiny\n" and not (merged / "README.md").is_symlink()
    assert json.loads((merged / "config.json").read_text()) == {"model_type": "tiny"}
