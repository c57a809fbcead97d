"""LoRA fine-tuning modes: lora (factors trained, vector dW) and linear_lora (linearized at PEFT's init)."""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_csv

import taskarith.finetune as ft
from taskarith.data import task_from_file
from taskarith.errors import TaskArithError
from taskarith.finetune import CHECKPOINT_FILE, FinetuneConfig, finetune, run_key
from taskarith.linearize import Linearized
from taskarith.lora_training import LinearLora, LoraModel, initial_lora_a
from taskarith.training import trainable_parameters
from taskarith.vectors import TaskVector

RANK, ALPHA = 2, 4.0


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-others")
    return [str(write_tiny_csv(folder / f"other{i}.csv", n_per_class=10, seed=i + 1)) for i in range(2)]


def config(task, **overrides) -> FinetuneConfig:
    settings = dict(
        task=task.name,
        mode="lora",
        steps=6,
        batch_size=4,
        lr=1e-2,
        max_length=16,
        checkpoint_every=0,
        augment=False,
        lora_rank=RANK,
        lora_alpha=ALPHA,
    )
    return FinetuneConfig(**{**settings, **overrides})


def captured_run(monkeypatch, cfg, pretrained, task, out=None):
    """The run's vector and the LoRA model it trained (caught from the mode's builder)."""
    seen = {}
    builder = ft.TRAINABLES[cfg.mode]

    def capture(*args, **kwargs):
        seen["trainable"] = builder(*args, **kwargs)
        return seen["trainable"]

    monkeypatch.setitem(ft.TRAINABLES, cfg.mode, capture)
    tau = finetune(cfg, pretrained, task, out, progress=False).task_vector
    return tau, seen["trainable"]


def test_lora_vector_is_scaled_product_of_trained_factors_on_targets_only(monkeypatch, pretrained, task):
    tau, trainable = captured_run(monkeypatch, config(task), pretrained, task)
    model = trainable.encoder
    assert isinstance(model, LoraModel) and tau.mode == "standard"
    assert sorted(tau.deltas) == sorted(trainable_parameters(pretrained.encoder, "attention"))
    names = [name for name, _ in trainable.named_params]
    assert len(names) == len(set(names)) == 2 * len(tau.deltas)
    assert all(n.startswith(("lora_A/", "lora_B/")) for n in names)
    for target, a, b in zip(model.targets, model.lora_A, model.lora_B, strict=True):
        delta = tau.deltas[target.param]
        # float32 round-off leaves tiny singular values beyond r: count those above 1e-4 of the largest.
        assert torch.linalg.matrix_rank(delta, rtol=1e-4) <= RANK
        torch.testing.assert_close(delta, (ALPHA / RANK) * (b.detach() @ a.detach()))
        # Both factors trained: A left its initialisation, B left zero.
        assert not torch.equal(a.detach(), initial_lora_a(target, RANK, 0, dtype=a.dtype))
        assert b.detach().abs().sum() > 0
    # The run's own forward is the base with its weights edited by the vector.
    batch = pretrained.tokenize(list(task.train.inputs[:3]))
    with torch.no_grad():
        edited = tau.apply_to(pretrained.encoder)(**batch).last_hidden_state
        torch.testing.assert_close(model(**batch).last_hidden_state, edited)


def test_linear_lora_is_the_first_order_model_in_b_and_a_stays_put(monkeypatch, pretrained, task):
    tau, trainable = captured_run(monkeypatch, config(task, mode="linear_lora"), pretrained, task)
    model = trainable.encoder
    assert isinstance(model, LinearLora) and tau.mode == "linear"
    assert all(name.startswith("lora_B/") for name, _ in trainable.named_params)
    for target, a, b in zip(model.targets, model.lora_A, model.lora_B, strict=True):
        assert not a.requires_grad
        assert torch.equal(a.detach(), initial_lora_a(target, RANK, 0, dtype=a.dtype))
        torch.testing.assert_close(tau.deltas[target.param], (ALPHA / RANK) * (b.detach() @ a.detach()))
    assert tau.norm() > 0
    batch = pretrained.tokenize(list(task.train.inputs[:3]))
    with torch.no_grad():
        got = model(**batch).last_hidden_state
        # f(x; theta0) + J f . dW, by taskarith's own linearization of the base with the vector's deltas ...
        reference = Linearized(pretrained.encoder, tau.deltas)(**batch).last_hidden_state
        torch.testing.assert_close(got, reference)
        assert torch.allclose(tau.apply_to(pretrained.encoder)(**batch).last_hidden_state, got, atol=1e-6)
        # ... and by a central finite difference of the base along dW.
        eps = 1e-2
        plus = TaskVector(tau.deltas).apply_to(pretrained.encoder, eps, check_base=False)(**batch).last_hidden_state
        minus = TaskVector(tau.deltas).apply_to(pretrained.encoder, -eps, check_base=False)(**batch).last_hidden_state
        f0 = pretrained.encoder(**batch).last_hidden_state
        torch.testing.assert_close(got - f0, (plus - minus) / (2 * eps), rtol=2e-2, atol=2e-3)


def test_linear_lora_jacobian_in_a_is_zero_at_initialisation(pretrained, task):
    names = trainable_parameters(pretrained.encoder, "attention")
    model = LinearLora(pretrained.encoder, names, rank=RANK, alpha=ALPHA, seed=3)
    for a in model.lora_A:
        a.requires_grad_(True)
    batch = pretrained.tokenize(list(task.train.inputs[:3]))
    model(**batch).last_hidden_state.square().sum().backward()
    assert all(a.grad is not None and torch.count_nonzero(a.grad) == 0 for a in model.lora_A)
    assert any(torch.count_nonzero(b.grad) > 0 for b in model.lora_B)


@pytest.mark.parametrize("mode", ["lora", "linear_lora"])
@pytest.mark.parametrize("regularizer", ["taujp", "orthoreg"])
def test_regularized_lora_runs_give_finite_vectors(pretrained, task, others, mode, regularizer):
    options = {"regularizer": regularizer, "steps": 3}
    if regularizer == "taujp":
        options.update(reg_tasks=tuple(others), reg_batch_size=3)
    else:
        options["reg_strength"] = 0.01
    result = finetune(config(task, mode=mode, **options), pretrained, task, progress=False)
    tau = result.task_vector
    assert result.record["lora"]["trained"].startswith("lora_B only" if mode == "linear_lora" else "lora_A and")
    assert tau.norm() > 0 and all(torch.isfinite(v).all() for v in tau.deltas.values())
    penalties = [entry["penalty"] for entry in result.record["history"] if "penalty" in entry]
    assert penalties and all(p == p and p >= 0 for p in penalties)


def test_lora_vector_writes_back_as_an_adapter_of_its_rank(tmp_path, pretrained, task):
    tau = finetune(config(task), pretrained, task, progress=False).task_vector
    export = tau.save_peft(tmp_path / "adapter", pretrained.encoder, rank=RANK)
    assert export.error < 1e-5
    back = TaskVector.from_peft(tmp_path / "adapter", pretrained.encoder)
    assert sorted(back.deltas) == sorted(tau.deltas)
    for name, delta in tau.deltas.items():
        torch.testing.assert_close(back.deltas[name], delta, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["lora", "linear_lora"])
def test_interrupted_lora_run_resumes_to_the_same_vector(tmp_path, pretrained, task, monkeypatch, mode):
    cfg = config(task, mode=mode, steps=8, checkpoint_every=3)
    reference = finetune(cfg, pretrained, task, progress=False).task_vector
    original = ft.batch_indices

    def crash_at_step_5(n, batch_size, seed, step):
        if step == 5:
            raise KeyboardInterrupt
        return original(n, batch_size, seed, step)

    monkeypatch.setattr(ft, "batch_indices", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, pretrained, task, tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).exists()
    monkeypatch.setattr(ft, "batch_indices", original)
    resumed = finetune(cfg, pretrained, task, tmp_path, progress=False)
    assert resumed.record["resumed_from_step"] == 3
    assert resumed.task_vector.allclose(reference, atol=0, rtol=0)


def test_lora_options_are_recorded_in_lora_modes_only(task):
    assert "lora_rank" not in FinetuneConfig(task="t").to_json()
    assert "lora_alpha" not in FinetuneConfig(task="t", mode="linear").to_json()
    recorded = FinetuneConfig(task="t", mode="lora").to_json()
    assert recorded["lora_rank"] == 8 and recorded["lora_alpha"] == 16.0
    assert FinetuneConfig.from_dict(recorded) == FinetuneConfig(task="t", mode="lora")
    assert run_key(FinetuneConfig(task="t", mode="lora", lora_alpha=16), "h") == run_key(
        FinetuneConfig(task="t", mode="lora"), "h"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"lora_rank": True}, "lora_rank=True"),
        ({"lora_alpha": 0.0}, "lora_alpha=0.0"),
        ({"lora_alpha": float("inf")}, "lora_alpha=inf"),
        ({"mode": "standard", "lora_rank": 4}, "applies only to the LoRA modes"),
    ],
)
def test_bad_lora_options_are_refused(task, options, message):
    with pytest.raises(TaskArithError, match=message):
        config(task, **options)


@pytest.mark.parametrize("mode", ["lora", "linear_lora"])
def test_rank_above_a_target_and_non_matrix_targets_are_refused_by_name(pretrained, task, mode):
    # The tiny BERT's projections are 32 x 32.
    with pytest.raises(TaskArithError, match=r"lora_rank=33 .*encoder\.layer\.0\.attention\.self\.query\.weight"):
        finetune(config(task, mode=mode, lora_rank=33), pretrained, task, progress=False)
    with pytest.raises(TaskArithError, match=r"query\.bias.* 2-D weights only"):
        finetune(config(task, mode=mode, trainable=r"layer\.0\.attention\.self\.query\."), pretrained, task)


def test_bench_runs_the_lora_methods(tmp_path, pretrained, tiny_csv):
    from test_bench import write_task

    from taskarith.experiments.bench import BenchProfile, run_bench

    folder = tmp_path / "tasks"
    folder.mkdir()
    colours = task_from_file(tiny_csv)
    sizes = task_from_file(write_task(folder / "sizes.csv", "{f} {w} is quite {s}", ("big", "small")))
    moods = task_from_file(write_task(folder / "moods.csv", "{f} {w} is very {s}", ("red", "blue")))
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("lora", "linear_lora"),
        incremental_methods=(),
        steps=2,
        batch_size=8,
        lr=3e-3,
        eval_limit=None,
        xi_seeds=0,
        alpha_grid=(1.0,),
        negation_grid=(1.0,),
    )
    result = run_bench(pretrained, [colours, sizes], moods, profile, tmp_path / "cache", on_stage=lambda s: None)
    for method in ("lora", "linear_lora"):
        spread = result["summary"][method]["addition_alpha_1_accuracy"]
        assert spread["n"] == 1 and 0.0 <= spread["mean"] <= 1.0
    cached = sorted(p.name.split("-")[1] for p in (tmp_path / "cache" / "vectors").iterdir())
    assert cached == ["linear_lora", "linear_lora", "lora", "lora"]


def test_cli_finetune_lora(cli, tmp_path, tiny_model_dir, tiny_csv):
    common = ("--model", tiny_model_dir, "--steps", 2, "--batch-size", 4, "--max-length", 16, "--no-tensorboard")
    code, _, _ = cli(
        "finetune", tiny_csv, "--out", tmp_path / "run", "--mode", "linear_lora", "--lora-rank", 3, *common
    )
    assert code == 0
    tau = TaskVector.load(tmp_path / "run" / "task_vector.safetensors")
    assert tau.mode == "linear" and tau.config["lora_rank"] == 3 and tau.config["lora_alpha"] == 16.0
    code, _, err = cli("finetune", tiny_csv, "--out", tmp_path / "bad", "--mode", "lora", "--lora-rank", 0, *common)
    assert code != 0 and "lora_rank=0" in err
