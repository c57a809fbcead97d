"""End-to-end on the embedded all-MiniLM-L6-v2 encoder and real built-in tasks (slow: about a minute)."""

import pytest

from taskarith import FinetuneConfig, accuracy, edited_encoder, finetune, load_pretrained, load_task

pytestmark = pytest.mark.slow


def test_finetuning_the_embedded_encoder_beats_zero_shot():
    pre = load_pretrained()
    task = load_task("wordnet_topic")
    result = finetune(FinetuneConfig(task=task.name, steps=25, lr=1e-4), pre, task, progress=False)
    zero_shot = accuracy(pre, task, "val")
    assert result.record["val_accuracy"] > zero_shot + 0.03
    assert result.record["val_accuracy"] == accuracy(pre, task, "val", edited_encoder(pre, [result.task_vector]))
    assert result.task_vector.base_hash == pre.base_hash
