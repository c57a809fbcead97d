"""Tiny random-weight encoders and tasks, so the suite exercises the real Hugging Face code paths offline."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import BertConfig, BertModel, BertTokenizer

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "cow", "sheep"]
FILLER = ["the", "a", "is", "very", "quite", "big", "small", "my", "your", "this", "that", "color", "animal"]


def write_tiny_bert(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *COLORS, *ANIMALS, *FILLER, "colour", "about"]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_csv(path: Path, n_per_class: int = 40, seed: int = 0) -> Path:
    """Sentences that mention either a colour or an animal: separable, so fine-tuning must learn it."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for label, words in (("colour", COLORS), ("animal", ANIMALS)):
        for _ in range(n_per_class):

            def pick(pool: list[str]) -> str:
                return pool[int(torch.randint(len(pool), (1,), generator=generator))]

            rows.append((f"{pick(FILLER)} {pick(FILLER)} {pick(words)} {pick(FILLER)} {pick(words)}", label))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("other-bert"), seed=1)


@pytest.fixture(scope="module")
def pretrained(tiny_model_dir: Path):
    """The tiny BERT loaded for one test module (a module may change its flags; the next gets a fresh one)."""
    from taskarith.models import load_pretrained

    return load_pretrained(tiny_model_dir, max_length=16, device="cpu")


@pytest.fixture(scope="module")
def task(tiny_csv: Path):
    """The tiny colours task with one template."""
    from taskarith.data import task_from_file

    return task_from_file(tiny_csv, templates=("this is about {}.",))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_csv(tmp_path_factory.mktemp("data") / "colours.csv")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """Run the command line in-process: ``code, out, err = cli("eval", "--task", ...)``."""
    import sys

    from taskarith.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["taskarith", *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        captured = capsys.readouterr()
        return info.value.code or 0, captured.out, captured.err

    return run


def write_model(folder: Path, seed: int) -> Path:
    """A two-tensor 'model' folder with a config, like a Hugging Face one (no torch needed)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file(
        {
            "a.weight": rng.standard_normal((4, 3)).astype(np.float32),
            "b.bias": rng.standard_normal(5).astype(np.float32),
        },
        str(folder / "model.safetensors"),
    )
    (folder / "config.json").write_text('{"model_type": "tiny"}\n')
    return folder


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The merge-output layout of the hardening tests: base/, ftA/ and notes.txt in the current folder."""
    root = tmp_path / "work"
    write_model(root / "base", seed=0)
    write_model(root / "ftA", seed=1)
    (root / "notes.txt").write_text("weeks of notes\n")
    monkeypatch.chdir(root)
    return root
