"""AdaMerging on a tiny random BERT: the objective, the three paths, the linear shortcut's exactness, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_tiny_csv

from taskarith.data import task_from_file
from taskarith.errors import TaskArithError
from taskarith.evaluate import edited_encoder
from taskarith.linearize import LinearizedEncoder
from taskarith.merging import adamerging as adamerging_module
from taskarith.merging.adamerging import (
    COEFFICIENTS_FORMAT,
    AdaMergingConfig,
    _draws,
    _group_chunks,
    _pooled_cache,
    adamerge_tasks,
    entropy,
    layer_groups,
)
from taskarith.models.zero_shot import mean_pool
from taskarith.vectors import TaskVector, combine


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, tiny_csv):
    other = write_tiny_csv(tmp_path_factory.mktemp("other") / "kinds.csv", n_per_class=30, seed=3)
    return [
        task_from_file(tiny_csv, name="colours", templates=("this is about {}.",)),
        task_from_file(other, name="kinds", templates=("a sentence about {}.", "it is {}.")),
    ]


def random_vector(pretrained, seed: int, mode: str = "standard", scale: float = 0.05) -> TaskVector:
    generator = torch.Generator().manual_seed(seed)
    base = dict(pretrained.encoder.named_parameters())
    finetuned = {n: p.detach() + scale * torch.randn(p.shape, generator=generator) for n, p in base.items()}
    return TaskVector.from_state_dicts(base, finetuned, task=f"t{seed}").with_mode(mode)


def small(**changes) -> AdaMergingConfig:
    settings = dict(steps=6, lr=0.05, batch_size=4, batches_per_step=2, seed=1)
    settings.update(changes)
    return AdaMergingConfig(**settings)


def test_paper_defaults():
    config = AdaMergingConfig()
    assert (config.granularity, config.init, config.clamp, config.lr, config.steps) == (
        "layerwise",
        0.3,
        (0.0, 1.0),
        1e-3,
        500,
    )
    assert (config.batch_size, config.batches_per_step) == (16, 2)


def test_groups():
    names = ["a.weight", "a.bias", "b.weight"]
    assert layer_groups(names, "taskwise") == (tuple(names),)
    assert layer_groups(names, "layerwise") == (("a.weight",), ("a.bias",), ("b.weight",))


def test_entropy_is_shannon_entropy():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    expected = (torch.log(torch.tensor(2.0)) + 0.0) / 2
    assert torch.allclose(entropy(logits), expected, atol=1e-6)


def test_first_objective_is_the_entropy_of_the_merged_model(pretrained, tasks):
    """history[0] is sum over tasks and batches of the mean entropy of pre + 0.3 * (tau_a + tau_b)."""
    vectors = [random_vector(pretrained, 1), random_vector(pretrained, 2)]
    config = small(steps=1, granularity="taskwise")
    result = adamerge_tasks(vectors, pretrained, tasks, "test", config)
    encoder = edited_encoder(pretrained, vectors, 0.3)
    unlabeled = {t.name: t.test.inputs for t in tasks}
    batches = _draws(unlabeled, config)()
    expected = 0.0
    with torch.no_grad():
        for task in tasks:
            classifier = pretrained.classifier(task, encoder)
            for chunk in batches[task.name]:
                batch = pretrained.tokenize([unlabeled[task.name][int(i)] for i in chunk])
                expected += float(entropy(classifier(**batch)))
    assert result.history[0] == pytest.approx(expected, rel=1e-5)
    assert result.path == "network" and result.transductive
    assert result.forward_passes == result.backward_passes == 2 * len(tasks)


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_merged_vector_is_the_coefficient_weighted_sum(pretrained, tasks, granularity):
    vectors = [random_vector(pretrained, 1), random_vector(pretrained, 2)]
    result = adamerge_tasks(vectors, pretrained, tasks, "val", small(granularity=granularity, steps=3))
    groups = layer_groups(list(vectors[0].deltas), granularity)
    assert result.coefficients.shape == (2, len(groups))
    # Six Adam steps of 0.05 from 0.3: every coefficient has moved, none left [0, 1].
    assert not torch.allclose(result.coefficients, torch.full_like(result.coefficients, 0.3))
    assert result.coefficients.min() >= 0 and result.coefficients.max() <= 1
    for g, group in enumerate(groups):
        for name in group:
            expected = sum(result.coefficients[t, g] * vectors[t].deltas[name] for t in range(2))
            assert torch.allclose(result.vector.deltas[name], expected, atol=1e-7)
    assert result.vector.config["merge_method"] == "adamerging"
    assert result.vector.config["unlabeled"] == {
        "split": "val",
        "transductive": False,
        "tasks": {t.name: len(t.val) for t in tasks},
    }
    assert not result.transductive


def test_deterministic_by_seed(pretrained, tasks):
    vectors = [random_vector(pretrained, 1), random_vector(pretrained, 2)]
    first = adamerge_tasks(vectors, pretrained, tasks, "test", small(granularity="taskwise", steps=3))
    again = adamerge_tasks(vectors, pretrained, tasks, "test", small(granularity="taskwise", steps=3))
    other = adamerge_tasks(vectors, pretrained, tasks, "test", small(granularity="taskwise", steps=3, seed=2))
    assert torch.equal(first.coefficients, again.coefficients) and first.history == again.history
    assert first.history != other.history


def test_clamp_holds_the_coefficients_and_can_be_turned_off(pretrained, tasks):
    vectors = [random_vector(pretrained, 1), random_vector(pretrained, 2)]
    clamped = adamerge_tasks(vectors, pretrained, tasks, "test", small(granularity="taskwise", init=0.99, lr=0.5))
    free = adamerge_tasks(
        vectors, pretrained, tasks, "test", small(granularity="taskwise", init=0.99, lr=0.5, clamp=None)
    )
    assert clamped.coefficients.min() >= 0 and clamped.coefficients.max() <= 1
    assert (free.coefficients < 0).any() or (free.coefficients > 1).any()


@pytest.mark.parametrize("budget", [2**25, 1])
def test_shortcut_outputs_equal_f_lin(pretrained, tasks, budget, monkeypatch):
    """p0 + sum_{t,g} lambda[t,g] J tau_t|g, from the cache, is f_lin's pooled output at those coefficients,
    whether the groups' JVPs share a vmapped call (the default budget) or each has its own (budget 1)."""
    monkeypatch.setattr(adamerging_module, "_CHUNK_ELEMENTS", budget)
    vectors = [random_vector(pretrained, 1, "linear"), random_vector(pretrained, 2, "linear")]
    names = list(vectors[0].deltas)
    groups = layer_groups(names, "layerwise")
    theta0 = dict(pretrained.encoder.named_parameters())
    taus = {n: torch.stack([v.deltas[n] for v in vectors]) for n in names}
    inputs = tasks[0].test.inputs[:10]
    base, tangents, calls = _pooled_cache(pretrained, inputs, theta0, taus, groups, batch_size=4)
    chunks = _group_chunks(groups, {n: theta0[n].numel() for n in names}, 2, 4)
    assert [g for chunk in chunks for g in chunk] == list(range(len(groups)))
    most = adamerging_module._CHUNK_TANGENT_INPUTS // (2 * 4)  # groups x tasks x batch within the budget
    if budget == 1:
        assert len(chunks) == len(groups)
    else:
        assert len(chunks) == -(-len(groups) // most) < len(groups)
    assert calls == 3 * len(chunks)  # 10 inputs in batches of 4, one vmapped JVP per chunk of groups
    lam = torch.rand(2, len(groups), generator=torch.Generator().manual_seed(0))
    cached = base + torch.einsum("ntgd,tg->nd", tangents, lam)
    delta = {n: sum(lam[t, g] * vectors[t].deltas[n] for t in range(2)) for g, (n,) in enumerate(groups)}
    linearized = LinearizedEncoder(pretrained.encoder, delta)
    batch = pretrained.tokenize(list(inputs))
    with torch.no_grad():
        direct = mean_pool(linearized(**batch).last_hidden_state, batch["attention_mask"])
    assert torch.allclose(cached, direct, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("granularity", ["taskwise", "layerwise"])
def test_shortcut_learns_what_f_lin_learns(pretrained, tasks, granularity):
    vectors = [random_vector(pretrained, 1, "linear"), random_vector(pretrained, 2, "linear")]
    config = small(granularity=granularity)
    shortcut = adamerge_tasks(vectors, pretrained, tasks, "test", config)
    direct = adamerge_tasks(vectors, pretrained, tasks, "test", small(granularity=granularity, shortcut=False))
    assert (shortcut.path, direct.path) == ("shortcut", "f_lin")
    assert torch.allclose(torch.tensor(shortcut.history), torch.tensor(direct.history), atol=1e-4, rtol=1e-4)
    assert torch.allclose(shortcut.coefficients, direct.coefficients, atol=1e-4)
    assert shortcut.vector.mode == "linear" and shortcut.backward_passes == 0
    assert direct.forward_passes == config.steps * 2 * len(tasks)


def test_linear_result_applies_as_f_lin(pretrained, tasks):
    vectors = [random_vector(pretrained, 1, "linear"), random_vector(pretrained, 2, "linear")]
    result = adamerge_tasks(vectors, pretrained, tasks, "test", small(granularity="taskwise", steps=2))
    expected = combine(vectors, [float(c) for c in result.coefficients[:, 0]])
    assert result.vector.allclose(expected.with_mode("linear"), atol=1e-7)


def test_bad_inputs_are_refused(pretrained, tasks):
    standard, linear = random_vector(pretrained, 1), random_vector(pretrained, 2, "linear")
    with pytest.raises(TaskArithError, match="linear-mode"):
        adamerge_tasks([standard, linear], pretrained, tasks, "test", small())
    with pytest.raises(TaskArithError, match="no task vectors"):
        adamerge_tasks([], pretrained, tasks, "test", small())
    with pytest.raises(TaskArithError, match="given twice"):
        adamerge_tasks([standard], pretrained, [tasks[0], tasks[0]], "test", small())
    with pytest.raises(TaskArithError, match="granularity 'blockwise'"):
        AdaMergingConfig(granularity="blockwise")
    with pytest.raises(TaskArithError, match="'steps' must be an integer"):
        AdaMergingConfig(steps=-1)
    with pytest.raises(TaskArithError, match="'clamp'"):
        AdaMergingConfig(clamp=(1.0, 0.0))
    with pytest.raises(TaskArithError, match="'lr'"):
        AdaMergingConfig(lr=0.0)


def test_cli_adamerge(cli, tmp_path, pretrained, tiny_model_dir, tiny_csv):
    vectors = []
    for seed in (1, 2):
        path = tmp_path / f"t{seed}.safetensors"
        random_vector(pretrained, seed).save(path)
        vectors += ["--vector", path]
    out = tmp_path / "merged.safetensors"
    args = ["adamerge", *vectors, "--task", tiny_csv, "--model", tiny_model_dir, "--out", out]
    args += ["--granularity", "taskwise", "--steps", "2", "--batch-size", "4", "--device", "cpu"]
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    merged = TaskVector.load(out)
    record = json.loads((tmp_path / "merged.adamerging.json").read_text())
    assert record["format"] == COEFFICIENTS_FORMAT and record["transductive"] is True
    assert record["unlabeled_split"] == "test" and len(record["history"]) == 2
    assert merged.config["coefficients"] == record["coefficients"]
    assert "transductive" in stdout
    code, _, stderr = cli(*args)
    assert code == 2 and "already exists" in stderr
    code, _, stderr = cli(*args, "--overwrite", "--split", "val")
    assert code == 0, stderr
    assert json.loads((tmp_path / "merged.adamerging.json").read_text())["transductive"] is False
    code, _, stderr = cli(*args[:-2], "--steps", "0", "--clamp", "2,1", "--overwrite")
    assert code == 2 and "clamp" in stderr


def test_merge_reaches_adamerging(cli, tmp_path, pretrained, tiny_model_dir, tiny_csv):
    vectors = []
    for seed in (1, 2):
        path = tmp_path / f"t{seed}.safetensors"
        random_vector(pretrained, seed).save(path)
        vectors += ["--vector", path]
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--method", "adamerging_taskwise", *vectors, "--task", tiny_csv, "--base", tiny_model_dir]
    code, stdout, stderr = cli(*args, "--set", "steps=2", "--set", "batch_size=4", "--out", out)
    assert code == 0, stderr
    record = json.loads((tmp_path / "merged.adamerging.json").read_text())
    assert record["hyperparameters"]["granularity"] == "taskwise" and len(record["history"]) == 2
    assert TaskVector.load(out).config["coefficients"] == record["coefficients"]
    code, _, stderr = cli(*args, "--set", "density=0.2", "--out", tmp_path / "other.safetensors")
    assert code == 2 and "density" in stderr
    code, _, stderr = cli(*args, "--set", "steps=two", "--out", tmp_path / "other.safetensors")
    assert code == 2 and "expected an integer" in stderr
    code, out_text, _ = cli("merge", "--list")
    assert code == 0 and "adamerging_taskwise: learned" in out_text
