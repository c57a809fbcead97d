"""docs/training-loops.md runs as written, each setup block replaced by a tiny random model and tasks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_csv

PAGE = Path(__file__).resolve().parent.parent / "docs" / "training-loops.md"
BLOCK = re.compile(r"(<!-- setup -->\n)?```python\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[bool, str]]:
    return [(bool(setup), code) for setup, code in BLOCK.findall(PAGE.read_text())]


def tiny_setups(model_dir: Path, folder: Path) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from taskarith import load_pretrained, task_from_file

    torch.manual_seed(0)
    first = {
        "pre": load_pretrained(model_dir, max_length=16, device="cpu"),
        "task": task_from_file(write_tiny_csv(folder / "colours.csv"), templates=("this is about {}.",)),
        "others": [task_from_file(write_tiny_csv(folder / "other.csv", n_per_class=10, seed=3)).train.inputs],
    }
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    second = {
        "model": AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=2, attn_implementation="eager"
        ),
        "tokenizer": tokenizer,
        "texts": ["the red cat", "a blue dog"] * 16,
        "labels": [1, 0] * 16,
        "other_texts": ["my green fish", "that horse"] * 8,
        "out_dir": str(folder / "trainer"),
    }
    base = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    adapters = []
    for name, seed in (("sst2", 1), ("imdb", 2)):
        peft_model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # stands in for training: peft starts lora_B at zero
            for key, param in peft_model.named_parameters():
                if "lora_B" in key:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(folder / "adapters" / name)
        adapters.append(str(folder / "adapters" / name))
    third = {"base": base, "adapter_a": adapters[0], "adapter_b": adapters[1], "out_dir": str(folder / "lora")}
    return [first, second, third]


def test_the_page_has_three_examples_each_with_one_setup():
    kinds = [setup for setup, _ in blocks()]
    assert kinds == [True, False, True, False, True, False]


def test_training_loops_page_runs(tmp_path, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.chdir(tmp_path)
    setups = iter(tiny_setups(tiny_model_dir, tmp_path))
    namespace: dict = {}
    for setup, code in blocks():
        if setup:
            namespace.update(next(setups))
        else:
            exec(compile(code, str(PAGE), "exec"), namespace)
    # The page's own prints, in order (the Trainer prints its summary between them).
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("{")]
    assert printed[0].startswith("linear norm ") and float(printed[0].split()[-1]) > 0
    assert printed[1].startswith("linear [") and "attention" in printed[1]
    assert printed[2].startswith("rank 4: relative error")
    from taskarith.vectors import TaskVector

    saved = TaskVector.load(tmp_path / "rt_sentiment-linear-taujp.safetensors")
    assert saved.mode == "linear" and saved.config["penalty"] == "taujp"
    assert (tmp_path / "trainer" / "task_vector.safetensors").is_file()
    edited, merged, base, report = (namespace[k] for k in ("edited", "merged", "base", "report"))
    # The adapter peft loads is the rank-4 cut of the TIES merge whose error the export reported.
    weights, before = edited.state_dict(), base.state_dict()
    residual = sum(float((weights[k] - before[k] - merged.deltas[k]).pow(2).sum()) for k in merged.deltas)
    total = sum(float(merged.deltas[k].pow(2).sum()) for k in merged.deltas)
    assert report.error == pytest.approx((residual / total) ** 0.5, rel=1e-3, abs=1e-6)
    assert 0 < report.error < 1
