"""Training logs people can look at: train_log.jsonl always, TensorBoard events when installed, plot-run."""

from __future__ import annotations

import json

import pytest
import torch

from taskarith.data import task_from_file
from taskarith.errors import TaskArithError
from taskarith.finetune import FinetuneConfig, check_run_folder, finetune
from taskarith.plots import TRAINING_CURVES_FORMAT, png_format
from taskarith.training_log import LOG_FILE, LOG_FORMAT, TENSORBOARD_DIR, TrainingLog, read_log


@pytest.fixture(scope="module")
def task(tiny_csv):
    return task_from_file(tiny_csv)


def config(task, **overrides) -> FinetuneConfig:
    settings = {"task": task.name, "model": "tiny", "steps": 12, "batch_size": 8, "lr": 3e-3, "max_length": 16}
    return FinetuneConfig(**{**settings, **overrides})


def test_the_log_holds_every_logged_step_and_validation_and_leaves_the_vector_unchanged(tmp_path, pretrained, task):
    logged = finetune(
        config(task, mode="linear"), pretrained, task, tmp_path / "run", progress=False, log_every=5, val_every=5
    )
    plain = finetune(config(task, mode="linear"), pretrained, task, progress=False)
    assert all(torch.equal(logged.task_vector.deltas[k], plain.task_vector.deltas[k]) for k in plain.task_vector.deltas)
    header, lines = read_log(tmp_path / "run" / LOG_FILE)
    assert header == {"format": LOG_FORMAT, "task": task.name, "mode": "linear", "steps": 12, "regularizer": None}
    train = [line for line in lines if "loss" in line]
    val = [line for line in lines if "val_accuracy" in line]
    assert [line["step"] for line in train] == [0, 5, 10, 11]
    assert train == logged.record["history"]  # the same entries as the run record, written as they came
    assert [line["step"] for line in val] == [5, 10, 12]
    assert val[-1]["val_accuracy"] == logged.record["val_accuracy"]
    assert all({"lr", "grad_norm"} <= set(line) for line in train)


def test_tensorboard_events_hold_the_same_scalars(tmp_path, pretrained, task):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    finetune(config(task), pretrained, task, tmp_path / "run", progress=False, log_every=4, val_every=6)
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR))
    events.Reload()
    _, lines = read_log(tmp_path / "run" / LOG_FILE)
    logged = [line for line in lines if "loss" in line]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [line["step"] for line in logged]
    assert [e.value for e in loss] == pytest.approx([line["loss"] for line in logged], rel=1e-6)
    assert [e.step for e in events.Scalars("val/accuracy")] == [6, 12]
    assert {"train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])


def test_a_resumed_log_keeps_the_steps_its_checkpoint_covers(tmp_path):
    header = {"format": LOG_FORMAT, "task": "t", "mode": "standard", "steps": 30}
    log = TrainingLog(tmp_path, header, tensorboard=False)
    for step in range(0, 30, 5):
        log.write({"step": step, "loss": 1.0 / (step + 1), "lr": 0.1, "grad_norm": 1.0})
        log.write({"step": step + 5, "val_accuracy": 0.5})
    log.close()
    resumed = TrainingLog(tmp_path, header, start=12, tensorboard=False)
    resumed.close()
    _, lines = read_log(tmp_path / LOG_FILE)
    assert [(line["step"], "loss" in line) for line in lines] == [
        (0, True),
        (5, False),
        (5, True),
        (10, False),
        (10, True),
    ]


def test_logs_taskarith_did_not_write_are_refused_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOG_FILE).write_text("my own notes\n")
    with pytest.raises(TaskArithError, match=r"train_log.jsonl is not a taskarith training log"):
        check_run_folder(run)
    (run / LOG_FILE).unlink()
    (run / TENSORBOARD_DIR).mkdir()
    (run / TENSORBOARD_DIR / "experiment.txt").write_text("keep me\n")
    with pytest.raises(TaskArithError, match=r"tensorboard holds experiment.txt, not TensorBoard event files"):
        check_run_folder(run)
    assert (run / TENSORBOARD_DIR / "experiment.txt").read_text() == "keep me\n"


def test_a_damaged_log_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / LOG_FILE
    path.write_text(json.dumps({"format": LOG_FORMAT}) + "\n" + '{"step": 0, "loss": 1}\n{"step": "x"}\n')
    with pytest.raises(TaskArithError, match=r"train_log.jsonl, line 3: 'step' must be a non-negative integer"):
        read_log(path)
    path.write_text(json.dumps({"format": LOG_FORMAT}) + "\n{not json\n")
    with pytest.raises(TaskArithError, match=r"line 2: not valid JSON"):
        read_log(path)


def test_plot_run_draws_the_log_and_replaces_only_its_own_figure(cli, tmp_path, pretrained, task):
    finetune(
        config(task), pretrained, task, tmp_path / "run", progress=False, log_every=3, val_every=4, tensorboard=False
    )
    code, printed, err = cli("plot-run", tmp_path / "run")
    assert code == 0, err
    figure = tmp_path / "run" / "train_log.png"
    assert png_format(figure) == TRAINING_CURVES_FORMAT and "steps 0-12" in printed
    code, _, err = cli("plot-run", tmp_path / "run")
    assert code == 2 and "already exists" in err
    assert cli("plot-run", tmp_path / "run", "--overwrite")[0] == 0
    (tmp_path / "mine.png").write_bytes(figure.read_bytes()[:100] + b"not ours")
    code, _, err = cli("plot-run", tmp_path / "run", "--out", tmp_path / "mine.png", "--overwrite")
    assert code == 2 and "not a figure taskarith plot-run wrote" in err
    assert (tmp_path / "mine.png").read_bytes().endswith(b"not ours")
