"""`merge --out` never touches its inputs, and `--overwrite` replaces only a previous taskarith output.

Each refused case runs the command line and checks that it exits with status 2, prints one `error:` line,
and leaves every file under the test's folder (inputs, notes.txt, links, earlier outputs) as it was, byte
for byte, with nothing added.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from taskarith.errors import TaskArithError
from taskarith.outputs import MARKER, MERGED_MODEL_FORMAT
from taskarith.vectors import TaskVector


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: file bytes, link targets, folders (links are not followed)."""
    state: dict[str, object] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            state[key] = (
                ("link", os.readlink(path)) if path.is_symlink() else "folder" if path.is_dir() else path.read_bytes()
            )
    return state


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
    message = refused(
        cli, tmp_path, "merge", "--base", work / "base", "--model", work / "ftA", "--out", work, "--overwrite"
    )
    assert f"{work} contains the base model {work / 'base'}" in message


@pytest.mark.parametrize(
    "out,relation",
    [
        ("base/model.safetensors", "is inside the base model"),
        ("base", "is the base model"),
        ("ftA", "is the model"),
        ("ftA/merged", "is inside the model"),
        ("ftA/sub/deeper", "is inside the model"),
        ("./ftA/../base", "is the base model"),
    ],
)
def test_out_on_or_inside_an_input_is_refused(cli, tmp_path, work, out, relation):
    message = refused(cli, tmp_path, *MERGE, "--out", out, "--overwrite")
    assert f") {relation} " in message and (work / out).resolve().as_posix() in message


def test_inputs_are_recognised_through_linked_folders(cli, tmp_path, work):
    (tmp_path / "elsewhere").symlink_to(work)
    message = refused(cli, tmp_path, *MERGE, "--out", tmp_path / "elsewhere" / "base", "--overwrite")
    assert "is the base model base" in message
    message = refused(
        cli, tmp_path, "merge", "--base", tmp_path / "elsewhere" / "base", "--model", "ftA", "--out", "base/merged"
    )
    assert "is inside the base model" in message


def test_out_that_is_or_contains_the_current_folder_is_refused(cli, tmp_path, work, monkeypatch):
    (tmp_path / "empty" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "empty" / "here")
    for out in (".", ".."):
        message = refused(
            cli, tmp_path, "merge", "--base", work / "base", "--model", work / "ftA", "--out", out, "--overwrite"
        )
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


@pytest.mark.parametrize(
    "field,text",
    [
        ("base_model", "base_model: {}\nmodels: [ftA]\nout: merged\n"),
        ("merge_method", "merge_method: [ties]\nbase_model: base\nmodels: [ftA]\nout: merged\n"),
        ("models[0]", "base_model: base\nmodels: ['']\nout: merged\n"),
    ],
)
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
    assert json.loads((work / "again" / MARKER).read_text())["files"] == sorted(
        p.name for p in (work / "again").iterdir()
    )


@pytest.fixture
def vectors(work) -> list[Path]:
    paths = []
    for i in range(2):
        TaskVector(deltas={"w": torch.full((3,), float(i + 1))}, base_hash="0123456789abcdef").save(
            work / f"tau{i}.safetensors"
        )
        paths.append(work / f"tau{i}.safetensors")
    return paths


def test_vector_merge_never_writes_over_its_inputs_or_foreign_files(cli, tmp_path, work, vectors):
    merge = ("merge", "--vector", "tau0.safetensors", "--vector", "tau1.safetensors")
    assert "is the task vector tau0" in refused(cli, tmp_path, *merge, "--out", "tau0.safetensors", "--overwrite")
    assert "contains the task vector" in refused(cli, tmp_path, *merge, "--out", work, "--overwrite")
    assert "not a safetensors file written by taskarith" in refused(
        cli, tmp_path, *merge, "--out", "notes.txt", "--overwrite"
    )
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(work / "foreign.safetensors"), metadata={"format": "pt"})
    assert "metadata 'format' is 'pt'" in refused(cli, tmp_path, *merge, "--out", "foreign.safetensors", "--overwrite")
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


# ---- every writer: one rule, decided at the rename ---------------------------------------------


def no_model_loading(monkeypatch) -> None:
    """A refusal must come before the expensive step: loading the model (and so computing or training)."""
    import taskarith.cli

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was refused")

    monkeypatch.setattr(taskarith.cli, "_load_model", fail)


def factor_file(path: Path, task: str = "t") -> Path:
    from taskarith.kfac import KFACFactors

    KFACFactors(A={"l": torch.eye(3)}, S={"l": torch.eye(2)}, examples={task: 2}, base_hash="h").save(path)
    return path


def test_compose_and_kfac_writers_refuse_an_existing_output(cli, tmp_path, work, vectors, monkeypatch):
    no_model_loading(monkeypatch)
    factor_file(work / "f.safetensors")
    writers = {
        "compose": ("compose", "--add", "tau0.safetensors"),
        "kfac-merge": ("kfac-merge", "f.safetensors"),
        "kfac-compress": ("kfac-compress", "f.safetensors", "--rank", "1"),
        "kfac": ("kfac", "rt_sentiment", "--model", "base"),
    }
    for name, args in writers.items():
        assert "notes.txt" in refused(cli, tmp_path, *args, "--out", "notes.txt"), name
        assert "is not a safetensors file written by taskarith" in refused(
            cli, tmp_path, *args, "--out", "notes.txt", "--overwrite"
        ), name
    assert "is the task vector" in refused(
        cli, tmp_path, "compose", "--add", "tau0.safetensors", "--out", "tau0.safetensors", "--overwrite"
    )
    assert "is the factor file" in refused(
        cli, tmp_path, "kfac-merge", "f.safetensors", "--out", "f.safetensors", "--overwrite"
    )


def test_compose_replaces_only_with_overwrite_and_only_a_task_vector(cli, tmp_path, work, vectors):
    assert cli("compose", "--add", "tau0.safetensors", "--out", "sum.safetensors")[0] == 0
    assert "already exists" in refused(
        cli, tmp_path, "compose", "--add", "tau1.safetensors", "--out", "sum.safetensors"
    )
    code, _, err = cli("compose", "--add", "tau1.safetensors", "--out", "sum.safetensors", "--overwrite")
    assert code == 0, err
    assert TaskVector.load(work / "sum.safetensors").deltas["w"].tolist() == [2.0, 2.0, 2.0]
    factor_file(work / "f.safetensors")
    assert "is not a taskarith taskarith.task_vector/1 file" in refused(
        cli, tmp_path, "compose", "--add", "tau0.safetensors", "--out", "f.safetensors", "--overwrite"
    )


FINETUNE = ("finetune", "rt_sentiment", "--out", "run")


def test_finetune_refuses_a_finished_run_folder_before_training(cli, tmp_path, work, monkeypatch):
    no_model_loading(monkeypatch)
    (work / "run").mkdir()
    TaskVector(deltas={"w": torch.ones(2)}).save(work / "run" / "task_vector.safetensors")
    assert "run/task_vector.safetensors) already exists" in refused(cli, tmp_path, *FINETUNE)
    (work / "run" / "task_vector.safetensors").write_text("my own file\n")
    assert "not a safetensors file written by taskarith" in refused(cli, tmp_path, *FINETUNE, "--overwrite")


def test_finetune_keeps_an_unfinished_runs_checkpoint_unless_told(cli, tmp_path, work, monkeypatch):
    no_model_loading(monkeypatch)
    (work / "run").mkdir()
    save_file(
        {"w": np.zeros(2, dtype=np.float32)},
        str(work / "run" / "checkpoint.safetensors"),
        metadata={"format": "taskarith.checkpoint/1"},
    )
    message = refused(cli, tmp_path, *FINETUNE, "--no-resume")
    assert "holds an unfinished run; resume it (--resume) or discard it (--overwrite)" in message


def test_a_locked_run_folder_is_refused_before_loading(cli, tmp_path, work, monkeypatch):
    import subprocess
    import sys

    from taskarith.outputs import RunLock

    no_model_loading(monkeypatch)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from taskarith.outputs import RunLock; "
            "lock = RunLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()",
            str(work / "run"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"  # waits for the other run, no sleeping
        message = refused(cli, tmp_path, *FINETUNE)
        assert f"error: run is in use by another taskarith run (pid {holder.pid} on" in message
    finally:
        holder.stdin.close()
        holder.wait()
    with RunLock(work / "run"):  # released when its process ended
        pass


def test_only_rank_0_takes_the_run_lock(work, monkeypatch):
    import fcntl

    from taskarith import finetune as finetune_module
    from taskarith.distributed import Cluster
    from taskarith.outputs import LOCK

    def locked() -> bool:
        with open(work / "run" / LOCK, "a") as other:  # a second open file: flock conflicts with the holder
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
            return False

    ran = []
    monkeypatch.setattr(
        finetune_module,
        "_finetune",
        lambda *args, **kwargs: ran.append((kwargs["cluster"].rank, (work / "run").exists() and locked())),
    )
    monkeypatch.setattr(Cluster, "sum_", lambda self, tensor: tensor)  # no process group in a test
    pretrained = type("Pretrained", (), {"device": "cpu"})()
    finetune_module.finetune(None, pretrained, None, work / "run", cluster=Cluster(rank=1, world=2))
    finetune_module.finetune(None, pretrained, None, work / "run", cluster=Cluster(rank=0, world=2))
    assert ran == [(1, False), (0, True)] and not locked()


def test_a_second_merge_to_the_same_output_is_refused_at_the_rename(work):
    from taskarith.errors import TaskArithError
    from taskarith.merging import merge_checkpoints

    others: list[dict] = []

    def concurrent(name: str) -> None:  # a whole second merge runs while the first is at its first tensor
        if not others:
            others.append(merge_checkpoints("base", ["ftA"], "merged", weights=[0.5], overwrite=bool(others_overwrite)))

    others_overwrite: list[bool] = []

    with pytest.raises(TaskArithError, match="already exists"):
        merge_checkpoints("base", ["ftA"], "merged", on_tensor=concurrent)
    assert json.loads((work / "merged" / MARKER).read_text())["weights"] == [0.5]  # the other's, whole
    assert sorted(p.name for p in work.iterdir()) == ["base", "ftA", "merged", "notes.txt"]

    # With --overwrite both replace a taskarith output: the last to finish wins, whole.
    others.clear()
    others_overwrite.append(True)
    merge_checkpoints("base", ["ftA"], "merged", overwrite=True, weights=[2.0], on_tensor=concurrent)
    assert json.loads((work / "merged" / MARKER).read_text())["weights"] == [2.0]
    assert sorted(p.name for p in work.iterdir()) == ["base", "ftA", "merged", "notes.txt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_something_put_at_the_output_after_the_last_check_is_not_replaced(work, monkeypatch, overwrite):
    """The narrowest window: between the final check and the rename; only the rename itself can decide."""
    from taskarith import outputs
    from taskarith.errors import TaskArithError
    from taskarith.merging import merge_checkpoints

    if overwrite:
        merge_checkpoints("base", ["ftA"], "merged")
    checks = []
    real_check = outputs.check_output

    def check_then_race(out, inputs, **kwargs):
        result = real_check(out, inputs, **kwargs)
        checks.append(out)
        if len(checks) == 2:  # output_folder's check, then commit's own has passed: now a user's folder appears
            if overwrite:
                shutil.rmtree(work / "merged")
            (work / "merged").mkdir()
            (work / "merged" / "results.csv").write_text("acc\n0.9\n")
        return result

    monkeypatch.setattr(outputs, "check_output", check_then_race)
    with pytest.raises(TaskArithError, match="appeared while this command ran"):
        merge_checkpoints("base", ["ftA"], "merged", overwrite=overwrite)
    assert sorted(p.name for p in (work / "merged").iterdir()) == ["results.csv"]
    assert sorted(p.name for p in work.iterdir()) == ["base", "ftA", "merged", "notes.txt"]


def test_an_over_long_output_name_is_written(cli, tmp_path, work, vectors):
    name = "v" * 240 + ".safetensors"  # legal (252 bytes); the temporary name must not pass 255
    code, _, err = cli("compose", "--add", "tau0.safetensors", "--out", name)
    assert code == 0, err
    assert TaskVector.load(work / name).deltas["w"].tolist() == [1.0, 1.0, 1.0]


# ---- durability: every rename is followed by a sync of its folder -------------------------------


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """Record renames (by their destination folder) and fsyncs of folders, in order."""
    import stat

    from taskarith import io, outputs

    log: list[tuple[str, str]] = []
    real_fsync, real_replace, real_no_replace = os.fsync, os.replace, io.rename_no_replace

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            log.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(source, target, **kwargs):
        log.append(("rename", os.path.dirname(os.path.abspath(target))))
        return real_replace(source, target, **kwargs)

    def no_replace(source, target):
        real_no_replace(source, target)
        log.append(("rename", os.path.dirname(os.path.abspath(target))))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(outputs, "rename_no_replace", no_replace)
    return log


def assert_each_rename_synced(log: list[tuple[str, str]]) -> None:
    renames = [i for i, (kind, _) in enumerate(log) if kind == "rename"]
    assert renames
    for i in renames:
        folder = log[i][1]
        following = log[i + 1 :]
        upto = next((j for j, (kind, _) in enumerate(following) if kind == "rename"), len(following))
        assert ("sync", folder) in following[:upto], (log[i], log)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names a synced folder through /proc")
def test_every_rename_is_followed_by_a_sync_of_its_folder(cli, work, vectors, events):
    assert cli(*MERGE, "--out", "merged")[0] == 0
    assert cli(*MERGE, "--out", "merged", "--overwrite")[0] == 0  # moved aside, replaced: three renames
    assert cli("compose", "--add", "tau0.safetensors", "--out", "sum.safetensors")[0] == 0
    assert cli("compose", "--add", "tau1.safetensors", "--out", "sum.safetensors", "--overwrite")[0] == 0
    from taskarith.io import write_json

    write_json(work / "record.json", {"a": 1})  # the writer of checkpoints and records
    assert sum(kind == "rename" for kind, _ in events) >= 10
    assert_each_rename_synced(events)


def test_report_commands_never_write_over_files_they_did_not_write(cli, tmp_path, tiny_model_dir, tiny_csv):
    # A folder holding the user's own results.json: bench, demo and interference refuse it before any work.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.json").write_text('{"mine": true}')
    other, control = tmp_path / "other.csv", tmp_path / "control.csv"
    shutil.copy(tiny_csv, other)
    shutil.copy(tiny_csv, control)
    for args in (
        (
            "bench",
            "--out",
            folder,
            "--model",
            tiny_model_dir,
            "--task",
            tiny_csv,
            "--task",
            other,
            "--control",
            control,
            "--method",
            "linear",
        ),
        ("demo", "--out", folder, "--model", tiny_model_dir),
    ):
        code, _, err = cli(*args)
        assert code == 2 and err.count("error:") == 1 and "results.json" in err
    (folder / "taujp.png").write_text("a picture of mine")
    code, _, err = cli("interference", "v.safetensors", "--task", tiny_csv, "--out", folder)
    assert code == 2 and "taujp.png" in err
    assert (folder / "results.json").read_text() == '{"mine": true}'
    assert (folder / "taujp.png").read_text() == "a picture of mine"


def test_a_results_folder_is_claimed_once_and_written_again_by_its_own_command(tmp_path):
    from taskarith.outputs import MARKER, claim_results_folder

    folder = claim_results_folder(tmp_path / "bench", "taskarith.bench/1", ("results.json", "*.png"))
    (folder / "results.json").write_text("{}")
    (folder / "xi.png").write_text("")
    assert claim_results_folder(tmp_path / "bench", "taskarith.bench/1", ("results.json", "*.png")) == folder
    # Another report kind does not take it over, nor does a bench take a demo's folder.
    with pytest.raises(TaskArithError, match="not written by this command"):
        claim_results_folder(folder, "taskarith.demo/1", ("results.json",))
    # A folder of the user's with none of the names is used, and marked.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    claim_results_folder(other, "taskarith.demo/1", ("results.json",))
    assert (other / MARKER).is_file() and (other / "notes.txt").read_text() == "keep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(TaskArithError):
        claim_results_folder(tmp_path / "file", "taskarith.demo/1", ("results.json",))


def test_overwrite_replaces_a_json_record_of_its_format_only(tmp_path):
    """A JSON record is recognised by its "format" field also where commit examines it, moved aside."""
    from taskarith.io import write_json
    from taskarith.outputs import output_file

    record = tmp_path / "coefficients.json"
    for value in (1, 2):
        with output_file(record, (), overwrite=True, format="taskarith.test_record/1") as tmp:
            write_json(tmp, {"format": "taskarith.test_record/1", "value": value})
    assert json.loads(record.read_text())["value"] == 2
    with pytest.raises(TaskArithError, match="'format' is 'taskarith.test_record/1'"):
        with output_file(record, (), overwrite=True, format="taskarith.other/1") as tmp:
            write_json(tmp, {"format": "taskarith.other/1"})
    assert json.loads(record.read_text())["value"] == 2
