"""The README's API example, on a tiny model: the public names exist and compose as documented."""

import torch

import taskarith
from taskarith import FinetuneConfig, TaskVector, accuracy, load_pretrained, task_from_file
from taskarith.finetune import finetune


def test_readme_example_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_csv):
    pre = load_pretrained(tiny_model_dir, max_length=16)
    task = task_from_file(tiny_csv, templates=("this is about {}.",))
    config = FinetuneConfig(task=task.name, steps=20, batch_size=8, lr=3e-3, max_length=16)
    tau_a = finetune(config, pre, task, tmp_path / "a", progress=False).task_vector
    tau_b = TaskVector.load(tmp_path / "a" / "task_vector.safetensors")

    multi = pre.encoder + 0.5 * (tau_a + tau_b)
    assert TaskVector.from_models(pre.encoder, multi).allclose(tau_a, atol=1e-6)
    forget = pre.encoder + (-tau_a)
    assert TaskVector.from_models(pre.encoder, forget).allclose(-tau_a, atol=1e-6)
    assert accuracy(pre, task, "test", encoder=multi) > accuracy(pre, task, "test")
    assert all(
        torch.equal(p, q)
        for p, q in zip(pre.encoder.parameters(), load_pretrained(tiny_model_dir).encoder.parameters(), strict=True)
    )
    assert set(taskarith.__all__) <= set(dir(taskarith))
