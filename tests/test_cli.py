import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from taskarith.cli import main
from taskarith.data import BUILTIN_TASKS
from taskarith.vectors import TaskVector


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory, tiny_model_dir, tiny_csv):
    folder = tmp_path_factory.mktemp("run")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "taskarith",
            "finetune",
            str(tiny_csv),
            "--model",
            str(tiny_model_dir),
            "--out",
            str(folder),
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--max-length",
            "16",
        ],
    )
    with pytest.raises(SystemExit) as info:
        main()
    monkeypatch.undo()
    assert info.value.code in (0, None)
    return folder


def test_tasks_json_lists_the_registry(cli):
    code, out, _ = cli("tasks", "--json", "--no-zero-shot")
    rows = json.loads(out)
    assert code == 0 and [row["name"] for row in rows] == list(BUILTIN_TASKS)
    for row in rows:
        assert "error" in row or (row["sizes"]["train"] > 0 and len(row["classes"]) >= 2)


def test_finetune_writes_vector_and_record(finetuned_dir):
    tau = TaskVector.load(finetuned_dir / "task_vector.safetensors")
    record = json.loads((finetuned_dir / "run.json").read_text())
    assert tau.task == "colours" and record["config"]["steps"] == 6 and tau.norm() > 0


def test_eval_and_compose(cli, tmp_path, finetuned_dir, tiny_model_dir, tiny_csv):
    vector = finetuned_dir / "task_vector.safetensors"
    code, out, _ = cli("eval", "--task", tiny_csv, "--vector", f"{vector}:0.5", "--model", tiny_model_dir, "--json")
    report = json.loads(out)
    assert code == 0 and 0.0 <= report["accuracy"]["colours"] <= 1.0 and report["vectors"][0].endswith(":0.5")

    code, out, _ = cli(
        "compose",
        "--add",
        f"{vector}:2",
        "--negate",
        vector,
        "--out",
        tmp_path / "c.safetensors",
        "--model-out",
        tmp_path / "edited",
        "--model",
        tiny_model_dir,
    )
    assert code == 0
    composed, tau = TaskVector.load(tmp_path / "c.safetensors"), TaskVector.load(vector)
    assert composed.allclose(tau, atol=1e-6)
    edited = TaskVector.from_checkpoints(tiny_model_dir, tmp_path / "edited")
    assert edited.allclose(tau, atol=1e-6)

    # The edited model folder follows the rule of every output: a folder taskarith did not write is kept,
    # and the refusal comes before the vector is written; its own previous output is replaced on --overwrite.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = cli(
        "compose",
        "--add",
        vector,
        "--out",
        tmp_path / "d.safetensors",
        "--model-out",
        mine,
        "--model",
        tiny_model_dir,
        "--overwrite",
    )
    assert code == 2 and err.count("error:") == 1 and (mine / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "d.safetensors").exists()
    code, _, _ = cli(
        "compose",
        "--add",
        vector,
        "--out",
        tmp_path / "c.safetensors",
        "--model-out",
        tmp_path / "edited",
        "--model",
        tiny_model_dir,
        "--overwrite",
    )
    assert code == 0 and TaskVector.from_checkpoints(tiny_model_dir, tmp_path / "edited").allclose(tau, atol=1e-6)


@pytest.mark.parametrize(
    "args,expected",
    [
        (("finetune", "no_such_task"), "no_such_task"),
        (("eval", "--task", "missing.csv"), "missing.csv"),
        (("compose", "--add", "nothing.safetensors", "--out", "x.safetensors"), "nothing.safetensors"),
        (("compose", "--out", "x.safetensors"), "nothing to compose"),
        (("finetune", "rt_sentiment", "--steps", "0"), "steps=0"),
        (("finetune", "rt_sentiment", "--lr", "nan"), "lr=nan"),
        (("eval", "--task", "empty.csv"), "empty.csv"),
        (("eval", "--task", "latin1.csv"), "not valid UTF-8"),
        (("eval", "--task", "rt_sentiment", "--vector", "truncated.safetensors"), "truncated.safetensors"),
        (("compose", "--add", "nan.safetensors", "--out", "x.safetensors"), "contains NaN or Inf"),
    ],
)
def test_user_errors_are_one_line_without_traceback(cli, monkeypatch, tmp_path, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\u00e9,a\n".encode("latin-1"))
    TaskVector(deltas={"w": torch.ones(100)}, base_hash="0123456789abcdef").save(tmp_path / "truncated.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "truncated.safetensors").read_bytes()[:200])
    save_file(
        {"w": torch.tensor([1.0, float("nan")])},
        tmp_path / "nan.safetensors",
        metadata={"format": "taskarith.task_vector/1"},
    )
    code, _, err = cli(*args)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert err.strip().startswith("error:")


def test_vector_of_another_base_is_refused(cli, finetuned_dir, other_model_dir, tiny_csv):
    code, _, err = cli(
        "eval", "--task", tiny_csv, "--vector", finetuned_dir / "task_vector.safetensors", "--model", other_model_dir
    )
    tau = TaskVector.load(finetuned_dir / "task_vector.safetensors")
    assert code == 2 and tau.base_hash in err and "Traceback" not in err


def test_regularized_finetuning_kfac_files_and_interference_matrix(
    cli, tmp_path, finetuned_dir, tiny_model_dir, tiny_csv
):
    from taskarith.kfac import KFACFactors

    other = tmp_path / "sizes.csv"
    other.write_text(
        "text,label\n"
        + "".join(
            f"{f} {w} is quite {s},{s}\n"
            for f in ("the", "a", "my", "this")
            for w in ("cow", "bird", "sheep")
            for s in ("big", "small")
        )
    )
    model = ("--model", tiny_model_dir)
    for source, name in ((other, "sizes"), (tiny_csv, "colours")):
        code, out, _ = cli("kfac", source, "--out", tmp_path / f"{name}.safetensors", "--num-examples", "16", *model)
        assert code == 0 and "K-FAC factors of" in out
    code, _, _ = cli(
        "kfac-merge",
        tmp_path / "sizes.safetensors",
        tmp_path / "colours.safetensors",
        "--out",
        tmp_path / "merged.safetensors",
    )
    merged = KFACFactors.load(tmp_path / "merged.safetensors")
    assert code == 0 and merged.tasks == ("sizes", "colours") and merged.num_examples == 32

    linear = tmp_path / "linear"
    code, _, _ = cli(
        "finetune",
        tiny_csv,
        "--mode",
        "linear",
        "--regularizer",
        "kfac",
        "--reg-strength",
        "1",
        "--reg-factors",
        tmp_path / "sizes.safetensors",
        "--out",
        linear,
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        *model,
    )
    record = json.loads((linear / "run.json").read_text())
    assert code == 0 and TaskVector.load(linear / "task_vector.safetensors").mode == "linear"
    assert record["config"]["regularizer"] == "kfac" and "penalty" in record["history"][0]

    code, out, _ = cli(
        "interference",
        finetuned_dir / "task_vector.safetensors",
        linear / "task_vector.safetensors",
        "--task",
        tiny_csv,
        "--task",
        other,
        "--out",
        tmp_path / "taujp",
        "--max-examples",
        "8",
        *model,
    )
    result = json.loads((tmp_path / "taujp" / "taujp.json").read_text())
    assert code == 0 and result["tasks"] == ["colours", "sizes"]
    # Two vectors of the same task get distinct row names.
    assert result["vectors"] == ["colours (standard)", "colours (linear)"]
    assert len(result["taujp"]) == 2 and all(len(row) == 2 and min(row) > 0 for row in result["taujp"])
    assert (tmp_path / "taujp" / "taujp.png").stat().st_size > 0 and "tau-Jp" in out


def test_taujp_without_other_tasks_is_a_clear_error(cli, tmp_path, tiny_model_dir, tiny_csv):
    code, _, err = cli(
        "finetune",
        tiny_csv,
        "--regularizer",
        "taujp",
        "--reg-strength",
        "1",
        "--out",
        tmp_path / "run",
        "--model",
        tiny_model_dir,
    )
    assert code == 2 and "reg_tasks" in err and "Traceback" not in err
