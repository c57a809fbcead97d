"""The empirical NTK against a brute-force Gram of per-example gradients, its localization measure on
hand-made kernels, and `taskarith ntk` feeding the claims ledger."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_bench import write_task

from taskarith.errors import TaskArithError
from taskarith.models.zero_shot import mean_pool
from taskarith.ntk import empirical_ntk, localization, ntk_cost

TEXTS = ["the cow is big", "a bird is very small", "my sheep", "this mouse is quite small and red"]


def brute_force_ntk(model, inputs):
    # One backward pass per (input, output dimension), unbatched and unpadded: the definition itself.
    params = [p for p in model.encoder.parameters()]
    gradients = []
    for text in inputs:
        batch = model.tokenize([text])
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            pooled = mean_pool(model.encoder(**batch).last_hidden_state, batch["attention_mask"])[0]
            rows = []
            for k in range(pooled.shape[0]):  # the pooler's parameters are unused: a zero gradient
                grads = torch.autograd.grad(pooled[k], params, retain_graph=True, allow_unused=True)
                rows.append(
                    torch.cat(
                        [
                            (torch.zeros_like(p) if g is None else g).reshape(-1)
                            for p, g in zip(params, grads, strict=True)
                        ]
                    )
                )
            for p in params:
                p.requires_grad_(False)
        gradients.append(torch.stack(rows).double())
    return torch.tensor([[float((a * b).sum()) for b in gradients] for a in gradients], dtype=torch.float64)


def test_the_kernel_is_the_gram_of_per_example_gradients(pretrained):
    expected = brute_force_ntk(pretrained, TEXTS)
    kernel = empirical_ntk(pretrained, TEXTS, progress=False)
    torch.testing.assert_close(kernel, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # A budget of one output dimension at a time: more chunks, the same kernel.
    parameters = ntk_cost(pretrained, TEXTS)["parameters"]
    tight = empirical_ntk(pretrained, TEXTS, memory_gb=1.5 * len(TEXTS) * parameters * 4 / 2**30, progress=False)
    torch.testing.assert_close(tight, kernel, rtol=1e-4, atol=1e-6 * float(kernel.abs().max()))
    # Chunks of three outputs, which do not divide the 32 dimensions: the last chunk is shorter, same kernel.
    threes = empirical_ntk(pretrained, TEXTS, memory_gb=6.5 * len(TEXTS) * parameters * 4 / 2**30, progress=False)
    torch.testing.assert_close(threes, kernel, rtol=1e-4, atol=1e-6 * float(kernel.abs().max()))
    assert torch.linalg.eigvalsh(kernel).min() > -1e-6 * float(kernel.diagonal().max())  # a Gram matrix


def test_image_models_map_over_inputs_to_the_same_kernel():
    from taskarith.models import Pretrained
    from taskarith.models.vision import PooledImageEncoder, image_preprocess, linear_probe_head

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 5),
    )
    with torch.no_grad():  # running statistics that are not the identity, so eval-mode BatchNorm matters
        backbone[1].running_mean.uniform_(-0.5, 0.5)
        backbone[1].running_var.uniform_(0.5, 2.0)
    model = Pretrained(
        name="conv",
        encoder=PooledImageEncoder(backbone, lambda module, pixels: module(pixels)),
        preprocess=image_preprocess(8),
        build_head=linear_probe_head,
        modality="image",
    )
    import numpy as np

    images = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(5)]
    mapped = empirical_ntk(model, images, progress=False)
    looped = empirical_ntk(model, images, progress=False, vectorize=False)
    torch.testing.assert_close(mapped, looped, rtol=1e-5, atol=1e-7 * float(looped.abs().max()))
    torch.testing.assert_close(looped, brute_force_ntk(model, images), rtol=1e-4, atol=1e-6 * float(looped.abs().max()))


def test_the_cost_and_a_budget_too_small_are_stated(pretrained):
    cost = ntk_cost(pretrained, TEXTS)
    assert cost["backward_passes"] == len(TEXTS) * cost["outputs"]
    assert cost["contraction_macs"] == len(TEXTS) ** 2 * cost["outputs"] * cost["parameters"]
    with pytest.raises(TaskArithError, match="GiB per output dimension"):
        empirical_ntk(pretrained, TEXTS, memory_gb=1e-6, progress=False)


def test_localization_of_hand_made_kernels():
    # Two tasks that share nothing: every eigenvector lies on one task.
    block = torch.block_diag(torch.tensor([[3.0, 1.0], [1.0, 3.0]]), torch.tensor([[2.0, 0.5], [0.5, 2.0]])).double()
    local = localization(block, {"a": 2, "b": 2}, top=4)
    assert local["largest_share"] == pytest.approx([1.0] * 4) and local["mean_top_share"] == pytest.approx(1.0)
    assert local["eigenvalues"] == pytest.approx([4.0, 2.5, 2.0, 1.5])
    assert local["shares"]["a"][0] == pytest.approx(1.0) and local["shares"]["b"][1] == pytest.approx(1.0)
    # A kernel that cannot tell the tasks apart: its top eigenvector is spread evenly.
    flat = torch.ones(4, 4, dtype=torch.float64) + torch.eye(4, dtype=torch.float64)
    spread = localization(flat, {"a": 2, "b": 2}, top=1)
    assert spread["shares"]["a"][0] == pytest.approx(0.5) and spread["uniform_share"] == 0.5
    # Shares of each eigenvector sum to one; fractions of the trace add up to at most one.
    assert all(math.isclose(sum(local["shares"][t][i] for t in "ab"), 1.0) for i in range(4))
    assert sum(local["eigenvalue_fraction"]) == pytest.approx(1.0)
    with pytest.raises(TaskArithError, match="do not add up"):
        localization(block, {"a": 2, "b": 1})


def test_ntk_command_and_its_ledger_row(tmp_path, cli, tiny_model_dir, tiny_csv):
    sizes = write_task(tmp_path / "sizes.csv", "{f} {w} is quite {s}", ("big", "small"))
    code, stdout, stderr = cli(
        "ntk",
        "--model",
        str(tiny_model_dir),
        "--task",
        str(tiny_csv),
        "--task",
        str(sizes),
        "--examples",
        "2",
        "--top",
        "4",
        "--out",
        str(tmp_path / "ntk"),
    )
    assert code == 0, stderr
    study = json.loads((tmp_path / "ntk" / "ntk.json").read_text())
    assert (tmp_path / "ntk" / "ntk.png").stat().st_size > 0
    assert set(study) >= {"pretrained", "random_init"} and study["examples_per_task"] == 2
    for label in ("pretrained", "random_init"):
        entry = study[label]
        assert len(entry["largest_share"]) == 4 and 0.5 - 1e-9 <= entry["mean_top_share"] <= 1.0 + 1e-9
    # The same kernel again: deterministic.
    code, _, _ = cli(
        "ntk",
        "--model",
        str(tiny_model_dir),
        "--task",
        str(tiny_csv),
        "--task",
        str(sizes),
        "--examples",
        "2",
        "--top",
        "4",
        "--no-random-init",
        "--out",
        str(tmp_path / "again"),
    )
    again = json.loads((tmp_path / "again" / "ntk.json").read_text())
    assert again["pretrained"]["eigenvalues"] == pytest.approx(study["pretrained"]["eigenvalues"], rel=1e-6)
    assert "random_init" not in again

    # The ledger's NTK row reads the study of the bench's model; a file of another kind is refused by name.
    from taskarith.experiments.claims import ledger

    bench = {
        "model": {"name": study["pretrained"]["model"]},
        "tasks": [],
        "per_seed": {"0": {"methods": {}}},
        "profile": {"methods": []},
    }
    (tmp_path / "results.json").write_text(json.dumps(bench))
    code, stdout, _ = cli(
        "claims",
        str(tmp_path / "results.json"),
        "--ntk",
        str(tmp_path / "ntk" / "ntk.json"),
        "--out",
        str(tmp_path / "claims"),
    )
    assert code == 0, stdout
    rows = json.loads((tmp_path / "claims" / "claims.json").read_text())[str(tmp_path / "results.json")]
    row = next(r for r in rows if r["key"] == "tangent.ntk_localization")
    assert row["left"]["mean"] == pytest.approx(study["pretrained"]["mean_top_share"])
    assert row["right"]["mean"] == pytest.approx(study["random_init"]["mean_top_share"])
    assert row["indicative"] and row["verdict"] in ("holds", "does not hold", "within noise")
    assert next(r for r in ledger(bench) if r["key"] == "tangent.ntk_localization")["verdict"] == "not measured"
    code, _, stderr = cli("claims", str(tmp_path / "results.json"), "--ntk", str(tmp_path / "results.json"))
    assert code != 0 and "not the ntk.json" in stderr
    # More examples than a task has: refused, naming the task, before any kernel is computed.
    code, _, stderr = cli(
        "ntk",
        "--model",
        str(tiny_model_dir),
        "--task",
        str(tiny_csv),
        "--task",
        str(sizes),
        "--examples",
        "500",
        "--out",
        str(tmp_path / "refused"),
    )
    assert code != 0 and "task 'colours' has 12 test examples; 500 were asked for" in stderr
