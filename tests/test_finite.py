"""Merges never write NaN or Inf: non-finite weights and hyper-parameters are refused before any tensor is
read, and every merged tensor is checked before its bytes are written (overflow of the weights, of the
scaling, or of the rounding to half precision).

Each attack runs the command line and checks exit status 2, one `error:` line naming the value or tensor,
and nothing new on disk (no output, no hidden `.partial` folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_outputs import refused

from taskarith.errors import TaskArithError
from taskarith.merging import merge_checkpoints
from taskarith.merging.methods import merge_task_vectors
from taskarith.vectors import TaskVector


def no_read(monkeypatch) -> None:
    """Make reading any tensor's bytes fail the test: a refusal must come before the expensive step."""
    from taskarith.merging import streaming

    def fail(*args, **kwargs):
        raise AssertionError("tensor bytes were read before the bad value was refused")

    monkeypatch.setattr(streaming, "read_bytes", fail)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "NaN", "-Infinity"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_non_finite_model_weights_are_refused_before_reading(cli, tmp_path, work, monkeypatch, weight, method):
    no_read(monkeypatch)
    message = refused(
        cli, tmp_path, "merge", "--method", method, "--base", "base", "--model", f"ftA:{weight}", "--out", "merged"
    )
    assert f"'ftA:{weight}': the weight {weight} is not a finite number" in message


@pytest.mark.parametrize("assignment", ["scaling=nan", "scaling=.nan", "scaling=.inf", "scaling=-.inf", "density=nan"])
def test_non_finite_hyperparameters_are_refused_before_reading(cli, tmp_path, work, monkeypatch, assignment):
    no_read(monkeypatch)
    key, value = assignment.split("=")
    message = refused(
        cli,
        tmp_path,
        "merge",
        "--method",
        "ties",
        "--base",
        "base",
        "--model",
        "ftA",
        "--set",
        assignment,
        "--out",
        "merged",
    )
    assert f"hyper-parameter '{key}'" in message and "out of range" in message and value.lstrip("-.") in message


@pytest.mark.parametrize("weight", [".nan", ".inf", "-.inf"])
def test_recipe_weight_nan_is_refused_naming_the_entry(cli, tmp_path, work, monkeypatch, weight):
    no_read(monkeypatch)
    (work / "recipe.yaml").write_text(
        "merge_method: ties\nbase_model: base\n"
        f"models:\n  - model: ftA\n    parameters: {{weight: {weight}}}\nout: merged\n"
    )
    message = refused(cli, tmp_path, "merge", "recipe.yaml")
    assert "recipe.yaml: models[0] weight must be a finite number, got" in message


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_weights_that_overflow_are_refused_at_the_tensor(cli, tmp_path, work, method):
    # 1e308 is a finite double but Inf in float32; TIES would elect a NaN sign there and write a finite 0.
    message = refused(
        cli,
        tmp_path,
        "merge",
        "--method",
        method,
        "--base",
        "base",
        "--model",
        "ftA:1e308",
        "--model",
        "ftA:1e308",
        "--out",
        "merged",
    )
    assert "times its weight 1e+308 overflows float32" in message and "ftA/model.safetensors" in message


def test_a_scaling_that_overflows_is_refused_at_the_tensor(cli, tmp_path, work):
    message = refused(
        cli, tmp_path, "merge", "--base", "base", "--model", "ftA", "--set", "scaling=1e308", "--out", "merged"
    )
    assert "merged tensor 'a.weight' (task_arithmetic, scaling=1e+308) is NaN or Inf in F32" in message


def half_models(root: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1024, 512)).astype(np.float16)
    for name, values in (("base", base), ("ftA", base + np.float16(1.0))):
        (root / name).mkdir()
        save_file({"w": values}, str(root / name / "model.safetensors"))


def test_dare_on_half_precision_overflowing_when_rounded_is_refused(cli, tmp_path, monkeypatch):
    # Density 1e-5 rescales the surviving deltas by 1e5: finite in float32, Inf once rounded to float16.
    monkeypatch.chdir(tmp_path)
    half_models(tmp_path)
    message = refused(
        cli,
        tmp_path,
        "merge",
        "--method",
        "dare",
        "--set",
        "density=1e-5",
        "--seed",
        "3",
        "--base",
        "base",
        "--model",
        "ftA",
        "--out",
        "merged",
    )
    assert "merged tensor 'w' (dare, density=1e-05, scaling=1) is NaN or Inf in F16" in message


def test_half_precision_overflow_of_task_arithmetic_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    half_models(tmp_path)
    message = refused(
        cli, tmp_path, "merge", "--base", "base", "--model", "ftA", "--set", "scaling=1e6", "--out", "merged"
    )
    assert "merged tensor 'w'" in message and "in F16" in message


def test_a_finite_merge_near_the_half_precision_limit_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    half_models(tmp_path)
    summary = merge_checkpoints("base", ["ftA"], "merged", scaling=1000.0)  # |w| + 1000 stays below 65504
    assert summary["tensors"] == 1 and (tmp_path / "merged" / "model.safetensors").is_file()


def test_library_merge_refuses_non_finite_weights(tmp_path, work):
    for weight in (float("nan"), float("inf")):
        with pytest.raises(TaskArithError, match=r"the weight of ftA is (nan|inf); weights must be finite"):
            merge_checkpoints("base", ["ftA"], "merged", weights=[weight])
    assert not (work / "merged").exists()


def vectors() -> list[TaskVector]:
    return [
        TaskVector(deltas={"w": torch.tensor([1.0, -2.0, 3.0])}, task="a"),
        TaskVector(deltas={"w": torch.tensor([-1.0, 2.0, 0.5])}, task="b"),
    ]


def test_in_memory_ties_refuses_an_overflowed_vector_instead_of_writing_zeros():
    a, b = vectors()
    with pytest.raises(TaskArithError, match="tensor 'w' is NaN or Inf"):
        merge_task_vectors([a * 1e308, b], "ties", density=1.0)


def test_in_memory_merge_refuses_a_result_that_overflows():
    with pytest.raises(TaskArithError, match=r"merged tensor 'w' \(task_arithmetic, scaling=1e\+38\)"):
        merge_task_vectors([v * 1e2 for v in vectors()], "task_arithmetic", scaling=1e38)


def test_compose_of_weights_that_overflow_writes_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, _ = vectors()
    a.save(tmp_path / "a.safetensors")
    message = refused(
        cli,
        tmp_path,
        "compose",
        "--add",
        "a.safetensors:1e308",
        "--add",
        "a.safetensors:1e308",
        "--out",
        "sum.safetensors",
    )
    assert "refusing to write sum.safetensors: tensor 'w'" in message and "NaN or Inf" in message
    assert "'a.safetensors:nan': the weight nan is not a finite number" in refused(
        cli, tmp_path, "compose", "--add", "a.safetensors:nan", "--out", "sum.safetensors"
    )
