"""TaskArithTrainer: linearization and penalties in a Hugging Face Trainer run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_run import collate, examples, make_trainer, tiny_classifier

from taskarith.errors import TaskArithError
from taskarith.hf_trainer import TaskArithTrainer
from taskarith.linearize import Linearized
from taskarith.regularizers import TauJp
from taskarith.vectors import TaskVector

HERE = Path(__file__).resolve().parent


def trained(tmp_path: Path, name: str, **options) -> TaskVector:
    trainer = make_trainer(tmp_path / name, **options)
    trainer.train()
    return trainer.task_vector()


def test_linearized_trainer_trains_only_delta_and_saves_a_linear_vector(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    assert isinstance(trainer.model, Linearized)
    trainer.train()
    vector = trainer.save_task_vector(tmp_path / "tau.safetensors")
    assert vector is not None and vector.mode == "linear" and vector.norm() > 0
    loaded = TaskVector.load(tmp_path / "tau.safetensors")
    assert loaded.allclose(vector) and loaded.config["penalty"] == "taujp" and loaded.task == "toy"
    with pytest.raises(TaskArithError, match="exists"):
        trainer.save_task_vector(tmp_path / "tau.safetensors")


def test_linearized_weight_decay_pulls_theta_as_the_papers_or_delta_as_tak(tmp_path):
    # One step from delta = 0 at the full learning rate (no warmup): AdamW's own decay of delta = 0 is 0,
    # and the papers' decay of theta = theta0 + delta moves delta by -lr * wd * theta0 on every tensor.
    plain = trained(tmp_path, "plain", steps=1, warmup=0)
    theta = trained(tmp_path, "theta", steps=1, warmup=0, weight_decay=0.1)
    delta = trained(tmp_path, "delta", steps=1, warmup=0, weight_decay=0.1, weight_decay_on="delta")
    theta0 = dict(tiny_classifier().named_parameters())
    for name, value in plain.deltas.items():
        torch.testing.assert_close(theta.deltas[name] - value, -1e-2 * 0.1 * theta0[name].detach(), atol=1e-7, rtol=0)
        torch.testing.assert_close(delta.deltas[name], value, atol=1e-7, rtol=0)
    assert (theta.config["weight_decay_on"], delta.config["weight_decay_on"]) == ("theta", "delta")
    with pytest.raises(TaskArithError, match="weight_decay_on='both' is not one of theta, delta"):
        make_trainer(tmp_path / "bad", weight_decay_on="both")


def test_theta_decay_refuses_an_optimizer_of_ones_own(tmp_path):
    from transformers import TrainingArguments

    model = tiny_classifier()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], weight_decay=0.1)
    with pytest.raises(TaskArithError, match="pass weight_decay_on='delta'"):
        TaskArithTrainer(model, args, linearize=True, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_gradient_accumulation_of_two_half_batches_equals_one_batch(tmp_path):
    whole = trained(tmp_path, "whole", batch=8)
    halves = trained(tmp_path, "halves", batch=4, accum=2)
    assert whole.norm() > 0 and whole.allclose(halves, atol=1e-6, rtol=1e-4)


def test_resumed_trainer_run_gives_the_uninterrupted_vector(tmp_path):
    straight = trained(tmp_path, "straight", steps=4)
    first = make_trainer(tmp_path / "interrupted", steps=4, save_steps=2)
    first.train()
    resumed = make_trainer(tmp_path / "interrupted", steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert resumed.task_vector().allclose(straight, atol=1e-6, rtol=1e-5)


def test_standard_trainer_on_attention_with_orthoreg(tmp_path):
    vector = trained(tmp_path, "attention", linearize=False, penalty="orthoreg", trainable="attention")
    assert vector.mode == "standard" and vector.norm() > 0
    assert vector.deltas and all("attention" in name and name.endswith(".weight") for name in vector.deltas)


def test_penalty_built_on_another_model_is_refused(tmp_path):
    other = tiny_classifier(seed=1)
    penalty = TauJp(other, [examples(4, seed=1)], collate=collate)
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TaskArithError, match="another model"):
        TaskArithTrainer(tiny_classifier(), args, train_dataset=examples(4, 0), penalty=penalty, reg_strength=0.1)
    with pytest.raises(TaskArithError, match="reg_strength"):
        TaskArithTrainer(tiny_classifier(), args, train_dataset=examples(4, 0), penalty=penalty)


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun_match_one_process(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    script = str(HERE / "trainer_run.py")
    one = subprocess.run(
        [sys.executable, script, str(tmp_path / "one"), str(tmp_path / "one.safetensors"), "--batch", "8"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, script, str(tmp_path / "two"), str(tmp_path / "two.safetensors"), "--batch", "4"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = TaskVector.load(tmp_path / "one.safetensors"), TaskVector.load(tmp_path / "two.safetensors")
    assert single.norm() > 0 and single.allclose(double, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(single.norm(), double.norm(), rtol=1e-4, atol=0)


def test_linearized_trainer_evaluates_with_its_labels(tmp_path):
    trainer = make_trainer(tmp_path / "run", steps=2)
    trainer.train()
    metrics = trainer.evaluate(eval_dataset=examples(8, seed=5))
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0
    prediction = trainer.predict(examples(8, seed=5))
    assert prediction.label_ids is not None and prediction.predictions.shape == (8, 3)
    assert trainer.task_vector().config["penalty_form"].startswith("taujp/")
