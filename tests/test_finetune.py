import copy
import math
from types import SimpleNamespace

import pytest
import torch

from taskarith.errors import TaskArithError
from taskarith.evaluate import accuracy, edited_encoder
from taskarith.finetune import (
    CHECKPOINT_FILE,
    RECORD_FILE,
    TASK_VECTOR_FILE,
    FinetuneConfig,
    batch_indices,
    finetune,
    finetune_cached,
    warmup_cosine,
)
from taskarith.io import load_tensors, read_json
from taskarith.models import Pretrained
from taskarith.vectors import TaskVector


def config(task, **overrides) -> FinetuneConfig:
    settings = dict(
        task=task.name, model="tiny", steps=12, batch_size=8, lr=3e-3, seed=0, max_length=16, checkpoint_every=5
    )
    return FinetuneConfig(**{**settings, **overrides})


def test_batches_cover_each_example_once_per_epoch():
    seen = [i for step in range(5) for i in batch_indices(20, 4, seed=3, step=step)]
    assert sorted(seen) == list(range(20))
    crossing = batch_indices(10, 4, seed=3, step=2)  # examples 8, 9 of epoch 0 then 0, 1 of epoch 1
    assert len(crossing) == 4
    assert batch_indices(20, 4, seed=3, step=7) == batch_indices(20, 4, seed=3, step=7)
    assert batch_indices(20, 4, seed=3, step=0) != batch_indices(20, 4, seed=4, step=0)


def test_warmup_cosine_hand_checked():
    factor = warmup_cosine(total_steps=12, warmup_steps=2)
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0)
    assert factor(7) == pytest.approx(0.5)
    assert factor(12) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("lr", -1.0),
        ("lr", float("nan")),
        ("batch_size", 0),
        ("mode", "magic"),
        ("warmup_fraction", 1.5),
        ("regularizer", "magic"),
        ("max_length", 10**6),
    ],
)
def test_absurd_options_are_refused(task, field, value):
    with pytest.raises(TaskArithError, match=field):
        config(task, **{field: value})


def test_finetune_learns_and_writes_vector_and_record(tmp_path, pretrained, task):
    result = finetune(config(task, steps=30), pretrained, task, tmp_path, progress=False)
    before, after = (
        accuracy(pretrained, task, "test"),
        accuracy(pretrained, task, "test", edited_encoder(pretrained, [result.task_vector])),
    )
    assert after > before and after >= 0.9
    saved = TaskVector.load(tmp_path / TASK_VECTOR_FILE)
    assert saved.allclose(result.task_vector, atol=0, rtol=0)
    assert saved.base_hash == pretrained.base_hash and saved.task == task.name and saved.config["steps"] == 30
    record = read_json(tmp_path / RECORD_FILE)
    assert record["history"][0]["loss"] > record["history"][-1]["loss"]
    assert record["base_model"]["hash"] == pretrained.base_hash
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_same_seed_gives_identical_vectors_and_other_seed_does_not(pretrained, task):
    a = finetune(config(task), pretrained, task, progress=False).task_vector
    b = finetune(config(task), pretrained, task, progress=False).task_vector
    c = finetune(config(task, seed=1), pretrained, task, progress=False).task_vector
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    assert not a.allclose(c)


def test_interrupted_run_resumes_to_the_same_vector(tmp_path, pretrained, task, monkeypatch):
    reference = finetune(config(task), pretrained, task, progress=False).task_vector

    import taskarith.finetune as ft

    original = ft.batch_indices

    def crash_at_step_8(n, batch_size, seed, step):
        if step == 8:
            raise KeyboardInterrupt
        return original(n, batch_size, seed, step)

    monkeypatch.setattr(ft, "batch_indices", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(task), pretrained, task, tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).exists()  # saved after step 5
    monkeypatch.setattr(ft, "batch_indices", original)
    resumed = finetune(config(task), pretrained, task, tmp_path, progress=False)
    assert resumed.record["resumed_from_step"] == 5
    assert all(torch.equal(reference.deltas[k], resumed.task_vector.deltas[k]) for k in reference.deltas)


def test_checkpoint_of_another_config_is_refused(tmp_path, pretrained, task, monkeypatch):
    import taskarith.finetune as ft

    original = ft.batch_indices
    monkeypatch.setattr(
        ft,
        "batch_indices",
        lambda n, b, s, step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 6 else original(n, b, s, step),
    )
    with pytest.raises(KeyboardInterrupt):
        finetune(config(task), pretrained, task, tmp_path, progress=False)
    monkeypatch.setattr(ft, "batch_indices", original)
    with pytest.raises(TaskArithError, match="another configuration"):
        finetune(config(task, lr=1e-3), pretrained, task, tmp_path, progress=False)


def test_nan_loss_stops_with_a_clear_message(pretrained, task):
    broken_encoder = copy.deepcopy(pretrained.encoder)
    with torch.no_grad():
        broken_encoder.embeddings.LayerNorm.weight.fill_(math.inf)
    broken = Pretrained(name="broken", encoder=broken_encoder, tokenizer=pretrained.tokenizer, max_length=16)
    with pytest.raises(TaskArithError, match="loss became nan at step 0"):
        finetune(config(task), broken, task, progress=False)


def test_nan_loss_midway_keeps_the_last_good_checkpoint(tmp_path, pretrained, task, monkeypatch):
    reference = finetune(config(task), pretrained, task, progress=False).task_vector
    import taskarith.finetune as ft

    calls = {"n": 0}

    def cross_entropy_poisoned_at_step_7(logits, labels):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(ft, "F", SimpleNamespace(cross_entropy=cross_entropy_poisoned_at_step_7))
    with pytest.raises(TaskArithError, match=f"loss became nan at step 7.*{tmp_path / CHECKPOINT_FILE}"):
        finetune(config(task), pretrained, task, tmp_path, progress=False)
    monkeypatch.undo()
    _, metadata = load_tensors(tmp_path / CHECKPOINT_FILE)
    assert metadata["step"] == "5"
    assert not (tmp_path / TASK_VECTOR_FILE).exists()
    resumed = finetune(config(task), pretrained, task, tmp_path, progress=False)
    assert resumed.record["resumed_from_step"] == 5
    assert resumed.task_vector.allclose(reference, atol=0, rtol=0)


def test_same_seed_gives_byte_identical_files_and_the_record_can_replay_the_run(tmp_path, pretrained, task):
    first = finetune(config(task), pretrained, task, tmp_path / "a", progress=False)
    finetune(config(task), pretrained, task, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / TASK_VECTOR_FILE).read_bytes() == (tmp_path / "b" / TASK_VECTOR_FILE).read_bytes()
    record = read_json(tmp_path / "a" / RECORD_FILE)
    assert FinetuneConfig.from_dict(record["config"]) == config(task)
    assert record["base_model"]["hash"] == first.task_vector.base_hash == pretrained.base_hash
    assert record["task"]["fingerprint"] == task.fingerprint
    assert {"taskarith", "torch", "transformers", "python"} <= set(record["environment"])
    replayed = finetune(FinetuneConfig.from_dict(record["config"]), pretrained, task, progress=False)
    assert replayed.task_vector.allclose(first.task_vector, atol=0, rtol=0)


def test_cache_reuses_a_finished_run(tmp_path, pretrained, task):
    first = finetune_cached(config(task, steps=4), pretrained, task, tmp_path, progress=False)
    folders = list(tmp_path.iterdir())
    second = finetune_cached(config(task, steps=4), pretrained, task, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == folders and len(folders) == 1
    assert second.task_vector.allclose(first.task_vector, atol=0, rtol=0)
    finetune_cached(config(task, steps=4, seed=1), pretrained, task, tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2
