"""`merge --out` never touches its inputs, and `--overwrite` replaces only a previous taskarith output.

Each refused case runs the command line and checks that it exits with status 2, prints one `error:` line,
and leaves every file under the test's folder (inputs, notes.txt, links, earlier outputs) as it was, byte
for byte, with nothing added.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from taskarith.outputs import MARKER, MERGED_MODEL_FORMAT
from taskarith.vectors import TaskVector


def write_model(folder: Path, seed: int) -> Path:
    """A two-tensor 'model' folder with a config, like a Hugging Face one (no torch needed)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file({"a.weight": rng.standard_normal((4, 3)).astype(np.float32),
               "b.bias": rng.standard_normal(5).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "tiny"}\n')
    return folder


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: file bytes, link targets, folders (links are not followed)."""
    state: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            state[key] = (("link", os.readlink(path)) if path.is_symlink() else
                          "folder" if path.is_dir() else path.read_bytes())
    return state


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """The reported layout: base/, ftA/ and notes.txt in the current folder."""
    root = tmp_path / "work"
    write_model(root / "base", seed=0)
    write_model(root / "ftA", seed=1)
    (root / "notes.txt").write_text("weeks of notes\n")
    monkeypatch.chdir(root)
    return root


def refused(cli, tmp_path: Path, *args: object) -> str:
    """Run ``taskarith *args``; it must fail cleanly and change nothing under ``tmp_path``."""
    before = snapshot(tmp_path)
    code, _, err = cli(*args)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
    return errors[0]


MERGE = ("merge", "--base", "base", "--model", "ftA")


@pytest.mark.parametrize("out", ["$PWD", ".", "", "../work", "base/.."])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_at_the_folder_holding_the_inputs_is_refused(cli, tmp_path, work, out, overwrite):
    out = str(work) if out == "$PWD" else out
    message = refused(cli, tmp_path, *MERGE, "--out", out, *(["--overwrite"] if overwrite else []))
    assert "contains the base model base" in message


def test_out_containing_an_input_is_refused(cli, tmp_path, work, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(cli, tmp_path, "merge", "--base", work / "base", "--model", work / "ftA", "--out", work,
                      "--overwrite")
    assert f"{work} contains the base model {work / 'base'}" in message


@pytest.mark.parametrize("out,relation", [
    ("base/model.safetensors", "is inside the base model"),
    ("base", "is the base model"),
    ("ftA", "is the model"),
    ("ftA/merged", "is inside the model"),
    ("ftA/sub/deeper", "is inside the model"),
    ("./ftA/../base", "is the base model"),
])
def test_out_on_or_inside_an_input_is_refused(cli, tmp_path, work, out, relation):
    message = refused(cli, tmp_path, *MERGE, "--out", out, "--overwrite")
    assert f") {relation} " in message and (work / out).resolve().as_posix() in message


def test_inputs_are_recognised_through_linked_folders(cli, tmp_path, work):
    (tmp_path / "elsewhere").symlink_to(work)
    message = refused(cli, tmp_path, *MERGE, "--out", tmp_path / "elsewhere" / "base", "--overwrite")
    assert "is the base model base" in message
    message = refused(cli, tmp_path, "merge", "--base", tmp_path / "elsewhere" / "base", "--model", "ftA",
                      "--out", "base/merged")
    assert "is inside the base model" in message


def test_out_that_is_or_contains_the_current_folder_is_refused(cli, tmp_path, work, monkeypatch):
    (tmp_path / "empty" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "empty" / "here")
    for out in (".", ".."):
        message = refused(cli, tmp_path, "merge", "--base", work / "base", "--model", work / "ftA", "--out", out,
                          "--overwrite")
        assert "the current folder" in message


def recipe_text(out: str, root: Path | None = None) -> str:
    prefix = f"{root}/" if root else ""
    return f"merge_method: task_arithmetic\nbase_model: {prefix}base\nmodels: [{prefix}ftA]\nout: {out}\n"


@pytest.mark.parametrize("overwrite", [True, False])
def test_recipe_out_dot_is_the_recipes_folder_and_is_refused(cli, tmp_path, work, overwrite):
    (work / "recipe.yaml").write_text(recipe_text("."))
    message = refused(cli, tmp_path, "merge", "recipe.yaml", *(["--overwrite"] if overwrite else []))
    assert f". ({work}) contains the base model" in message


def test_recipe_out_dot_protects_the_recipe_itself(cli, tmp_path, work):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "recipe.yaml").write_text(recipe_text(".", root=work))
    message = refused(cli, tmp_path, "merge", tmp_path / "recipes" / "recipe.yaml", "--overwrite")
    assert f"{tmp_path / 'recipes'} contains the recipe {tmp_path / 'recipes' / 'recipe.yaml'}" in message


@pytest.mark.parametrize("value", ["''", "'  '", "{}", "[]", "5", "true"])
def test_wrong_typed_recipe_out_is_refused_naming_the_field(cli, tmp_path, work, value):
    (work / "recipe.yaml").write_text(recipe_text(value))
    message = refused(cli, tmp_path, "merge", "recipe.yaml", "--overwrite")
    assert "recipe.yaml: 'out' must be a path" in message


@pytest.mark.parametrize("field,text", [
    ("base_model", "base_model: {}\nmodels: [ftA]\nout: merged\n"),
    ("merge_method", "merge_method: [ties]\nbase_model: base\nmodels: [ftA]\nout: merged\n"),
    ("models[0]", "base_model: base\nmodels: ['']\nout: merged\n"),
])
def test_other_wrong_typed_recipe_fields_are_refused(cli, tmp_path, work, field, text):
    (work / "recipe.yaml").write_text(text)
    assert field in refused(cli, tmp_path, "merge", "recipe.yaml")


def previous_merge(cli, work: Path, out: str = "merged") -> Path:
    code, _, err = cli(*MERGE, "--out", out)
    assert code == 0, err
    return work / out


def test_a_symlink_at_out_is_refused_and_left_alone(cli, tmp_path, work):
    target = previous_merge(cli, work, "v1")
    (work / "current").symlink_to(target)
    (work / "dangling").symlink_to(work / "gone")
    for out in ("current", "dangling"):
        for flags in ((), ("--overwrite",)):
            message = refused(cli, tmp_path, *MERGE, "--out", out, *flags)
            assert f"{work / out}) is a symbolic link" in message and "give the link's target" in message


def test_overwrite_refuses_what_taskarith_did_not_write(cli, tmp_path, work):
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("chapter 1\n")
    assert f"no {MARKER}" in refused(cli, tmp_path, *MERGE, "--out", "mine", "--overwrite")
    assert "is a file" in refused(cli, tmp_path, *MERGE, "--out", "notes.txt", "--overwrite")
    (work / "empty").mkdir()
    assert "did not write" in refused(cli, tmp_path, *MERGE, "--out", "empty", "--overwrite")

    merged = previous_merge(cli, work)
    (merged / "eval-results.csv").write_text("acc\n0.9\n")
    (merged / "plots").mkdir()
    message = refused(cli, tmp_path, *MERGE, "--out", "merged", "--overwrite")
    assert "holds eval-results.csv, plots/, which the previous taskarith output did not write" in message


def test_overwrite_replaces_a_previous_merge_output(cli, tmp_path, work):
    inputs = {k: v for k, v in snapshot(work).items() if k.split("/")[0] in ("base", "ftA", "notes.txt")}
    merged = previous_merge(cli, work)
    marker = json.loads((merged / MARKER).read_text())
    assert marker["format"] == MERGED_MODEL_FORMAT and marker["written_by"] == "taskarith"
    assert marker["files"] == sorted(p.name for p in merged.iterdir())
    first = load_file(str(merged / "model.safetensors"))

    code, _, err = cli("merge", "--base", "base", "--model", "ftA:0.5", "--out", "merged", "--overwrite")
    assert code == 0, err
    second = load_file(str(merged / "model.safetensors"))
    base, ft = load_file("base/model.safetensors"), load_file("ftA/model.safetensors")
    assert all(np.array_equal(second[k], base[k] + 0.5 * (ft[k] - base[k])) for k in base)
    assert not all(np.array_equal(first[k], second[k]) for k in first)
    assert json.loads((merged / MARKER).read_text())["weights"] == [0.5]
    assert sorted(p.name for p in work.iterdir()) == ["base", "ftA", "merged", "notes.txt"]  # no .old, .partial
    assert {k: v for k, v in snapshot(work).items() if k in inputs} == inputs


def test_merging_on_top_of_a_merge_keeps_one_marker_of_its_own(cli, tmp_path, work):
    previous_merge(cli, work)
    code, _, err = cli("merge", "--base", "merged", "--model", "ftA", "--out", "again")
    assert code == 0, err
    assert json.loads((work / "again" / MARKER).read_text())["files"] == sorted(p.name for p in (work / "again").iterdir())


@pytest.fixture
def vectors(work) -> list[Path]:
    paths = []
    for i in range(2):
        TaskVector(deltas={"w": torch.full((3,), float(i + 1))}, base_hash="0123456789abcdef").save(
            work / f"tau{i}.safetensors")
        paths.append(work / f"tau{i}.safetensors")
    return paths


def test_vector_merge_never_writes_over_its_inputs_or_foreign_files(cli, tmp_path, work, vectors):
    merge = ("merge", "--vector", "tau0.safetensors", "--vector", "tau1.safetensors")
    assert "is the task vector tau0" in refused(cli, tmp_path, *merge, "--out", "tau0.safetensors", "--overwrite")
    assert "contains the task vector" in refused(cli, tmp_path, *merge, "--out", work, "--overwrite")
    assert "not a safetensors file written by taskarith" in refused(cli, tmp_path, *merge, "--out", "notes.txt",
                                                                    "--overwrite")
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(work / "foreign.safetensors"), metadata={"format": "pt"})
    assert "metadata 'format' is 'pt'" in refused(cli, tmp_path, *merge, "--out", "foreign.safetensors",
                                                  "--overwrite")
    (work / "folder.safetensors").mkdir()
    assert "is a folder" in refused(cli, tmp_path, *merge, "--out", "folder.safetensors", "--overwrite")

    assert cli(*merge, "--out", "sum.safetensors")[0] == 0
    code, _, err = cli(*merge[:3], "--out", "sum.safetensors", "--overwrite")
    assert code == 0, err
    assert TaskVector.load(work / "sum.safetensors").deltas["w"].tolist() == [1.0, 1.0, 1.0]


def test_something_put_at_the_output_during_the_merge_is_not_replaced(tmp_path, work):
    from taskarith.errors import TaskArithError
    from taskarith.merging import merge_checkpoints

    def meanwhile(name: str) -> None:
        if not (work / "merged").exists():
            (work / "merged").mkdir()
            (work / "merged" / "results.csv").write_text("acc\n0.9\n")

    with pytest.raises(TaskArithError, match=r"work/merged\) already exists"):
        merge_checkpoints("base", ["ftA"], "merged", on_tensor=meanwhile)
    with pytest.raises(TaskArithError, match="did not write"):
        merge_checkpoints("base", ["ftA"], "merged", overwrite=True, on_tensor=meanwhile)
    assert (work / "merged" / "results.csv").read_text() == "acc\n0.9\n"
    assert sorted(p.name for p in work.iterdir()) == ["base", "ftA", "merged", "notes.txt"]  # no .partial left
