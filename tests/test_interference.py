"""tau-Jp interference matrix and heatmaps, on the tiny random BERT."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch.func import functional_call

from taskarith.data import Examples, task_from_file
from taskarith.errors import TaskArithError
from taskarith.experiments.interference import taujp_markdown, taujp_matrix
from taskarith.models import load_pretrained
from taskarith.models.zero_shot import mean_pool
from taskarith.plots import heatmap
from taskarith.vectors import TaskVector

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tasks(tiny_csv):
    task = task_from_file(tiny_csv, templates=("this is about {}.",))
    # A second column with other inputs (the train texts), so the matrix has two different tasks.
    other = dataclasses.replace(
        task, name="colours-train", val=Examples(task.train.inputs[:10], task.train.labels[:10])
    )
    return [task, other]


def random_vector(state: dict[str, torch.Tensor], seed: int, task: str, scale: float = 0.02) -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    finetuned = {
        k: v + scale * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state.items()
    }
    return TaskVector.from_state_dicts(state, finetuned, task=task)


def zero_vector(state: dict[str, torch.Tensor]) -> TaskVector:
    return TaskVector.from_state_dicts(state, state, task="zero")


def test_shape_names_and_zero_vector_row(pretrained, tasks):
    state = pretrained.encoder.state_dict()
    vectors = [random_vector(state, 1, "noise"), zero_vector(state)]
    result = taujp_matrix(pretrained, vectors, tasks, max_examples=5)
    assert result["vectors"] == ["noise", "zero"]
    assert result["tasks"] == [t.name for t in tasks]
    for key in ("taujp", "normalized", "taujp_sq"):
        assert len(result[key]) == 2 and all(len(row) == 2 for row in result[key])
    assert result["taujp"][1] == [0.0, 0.0] and result["normalized"][1] == [0.0, 0.0]
    assert all(v > 0 for v in result["taujp"][0]) and all(v > 0 for v in result["normalized"][0])
    assert result["examples_per_task"] == {t.name: 5 for t in tasks}
    assert "||J_theta0 f(x) . tau_i|| (unsquared" in result["definition"]


def _pooled_f(encoder, params, text_batch) -> torch.Tensor:
    hidden = functional_call(encoder, params, args=(), kwargs=text_batch).last_hidden_state
    return mean_pool(hidden, text_batch["attention_mask"])


def test_matches_float64_finite_differences(pretrained, tasks):
    """Brute force, independent of the JVP: central differences of the pooled output along tau, in float64."""
    state = pretrained.encoder.state_dict()
    vector = random_vector(state, 2, "noise")
    n = 3
    result = taujp_matrix(pretrained, [vector], tasks[:1], max_examples=n, batch_size=2)  # batches padded

    encoder64 = copy.deepcopy(pretrained.encoder).double()
    theta = {k: v for k, v in encoder64.named_parameters()}
    eps = 1e-4
    plus = {k: v + eps * vector.deltas[k].double() for k, v in theta.items()}
    minus = {k: v - eps * vector.deltas[k].double() for k, v in theta.items()}
    squared, energy = [], []
    with torch.no_grad():
        for text in tasks[0].val.inputs[:n]:
            batch = pretrained.tokenize([text])  # one text at a time: no padding at all
            change = (_pooled_f(encoder64, plus, batch) - _pooled_f(encoder64, minus, batch)) / (2 * eps)
            squared.append(float(change.pow(2).sum()))
            energy.append(float(_pooled_f(encoder64, theta, batch).pow(2).sum()))
    expected = sum(math.sqrt(s) for s in squared) / n  # tau-Jp as published: the mean unsquared norm
    assert result["taujp"][0][0] == pytest.approx(expected, rel=1e-4)
    assert result["normalized"][0][0] == pytest.approx(expected / (sum(math.sqrt(e) for e in energy) / n), rel=1e-4)
    assert result["taujp_sq"][0][0] == pytest.approx(sum(squared) / n, rel=1e-4)


def test_scaling_tau_scales_rows_linearly_and_quadratically_and_mode_is_irrelevant(pretrained, tasks):
    state = pretrained.encoder.state_dict()
    tau = random_vector(state, 3, "noise")
    c = -3.0
    result = taujp_matrix(pretrained, [tau, c * tau, tau.with_mode("linear")], tasks, max_examples=6)
    base, scaled, linear = result["taujp"]
    assert scaled == pytest.approx([abs(c) * v for v in base], rel=1e-5)
    assert result["normalized"][1] == pytest.approx([abs(c) * v for v in result["normalized"][0]], rel=1e-5)
    assert result["taujp_sq"][1] == pytest.approx([c * c * v for v in result["taujp_sq"][0]], rel=1e-5)
    assert linear == pytest.approx(base, rel=1e-6)


def test_vector_from_another_base_is_refused(pretrained, tasks, other_model_dir):
    other = load_pretrained(other_model_dir, max_length=16, device="cpu")
    foreign = random_vector(other.encoder.state_dict(), 4, "foreign")
    with pytest.raises(TaskArithError) as info:
        taujp_matrix(pretrained, [foreign], tasks, max_examples=2)
    message = str(info.value)
    assert foreign.base_hash in message and pretrained.base_hash in message and "foreign" in message


def test_bad_inputs_are_refused(pretrained, tasks):
    state = pretrained.encoder.state_dict()
    stray = TaskVector(deltas={"no.such.weight": torch.zeros(2)}, task="stray")
    with pytest.raises(TaskArithError, match="no.such.weight"):
        taujp_matrix(pretrained, [stray], tasks)
    with pytest.raises(TaskArithError, match="split"):
        taujp_matrix(pretrained, [zero_vector(state)], tasks, split="holdout")
    with pytest.raises(TaskArithError):
        taujp_matrix(pretrained, [], tasks)


def test_markdown_has_both_tables(pretrained, tasks):
    state = pretrained.encoder.state_dict()
    result = taujp_matrix(pretrained, [random_vector(state, 5, "a|b"), zero_vector(state)], tasks, max_examples=2)
    text = taujp_markdown(result)
    assert text.count("| vector \\ task |") == 2
    assert "a\\|b" in text and "| zero |" in text
    assert all(t.name in text for t in tasks)


def test_heatmap_writes_png_atomically(tmp_path):
    target = tmp_path / "figures" / "taujp.png"
    written = heatmap(
        [[0.1, 2.0], [float("nan"), 3e-5]],
        ["tau_a", "tau_b"],
        ["task a", "task b"],
        target,
        title="tau-Jp",
        colorbar_label="mean ||J f(x) . tau||^2",
    )
    assert written == target
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["taujp.png"]

    # Numeric ticks, as a xi(alpha1, alpha2) disentanglement grid would have.
    alphas = [-1.0, 0.0, 0.5, 1.0]
    grid = torch.rand(4, 4).numpy()
    xi = heatmap(
        grid,
        alphas,
        alphas,
        tmp_path / "xi.png",
        title="xi",
        xlabel="alpha 2",
        ylabel="alpha 1",
        cmap="magma",
        value_format=".1f",
    )
    assert xi.read_bytes().startswith(PNG_SIGNATURE)

    with pytest.raises(TaskArithError, match="labels"):
        heatmap([[1.0, 2.0]], ["a"], ["x"], tmp_path / "bad.png", title="bad")
    assert not (tmp_path / "bad.png").exists()
