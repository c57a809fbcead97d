"""A TaskArithTrainer run on a tiny random BERT classifier, used by tests/test_hf_trainer.py.

Run as a script (under torchrun too): ``python tests/trainer_run.py OUT_DIR VECTOR [--accum N] [--batch B]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from taskarith.hf_trainer import TaskArithTrainer
from taskarith.regularizers import OrthoReg, TauJp


def tiny_classifier(seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,  # no dropout: the loss is a function of the weights, as in taskarith finetune
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).eval()


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (count, 8), generator=generator)
    labels = ids[:, 0] % 3
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
        for i in range(count)
    ]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.stack([item["input_ids"] for item in items]),
        "attention_mask": torch.stack([item["attention_mask"] for item in items]),
    }


def make_trainer(
    out: Path,
    *,
    accum: int = 1,
    batch: int = 4,
    steps: int = 4,
    save_steps: int = 0,
    linearize: bool = True,
    penalty: str = "taujp",
    trainable: str | None = None,
    weight_decay: float = 0.0,
    weight_decay_on: str = "theta",
    warmup: int = 1,
) -> TaskArithTrainer:
    model = tiny_classifier()
    term = None
    if penalty == "taujp":
        other = [example for example in examples(12, seed=1)]
        term = TauJp(model, [other], collate=collate, batch_size=4)
    elif penalty == "orthoreg":
        term = OrthoReg()
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=1e-2,
        warmup_steps=warmup,
        weight_decay=weight_decay,
        seed=0,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        logging_steps=1,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TaskArithTrainer(
        model,
        args,
        train_dataset=examples(32, seed=0),
        linearize=linearize,
        trainable=trainable,
        penalty=term,
        reg_strength=0.1 if term is not None else 0.0,
        task="toy",
        weight_decay_on=weight_decay_on,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("vector", type=Path)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    trainer = make_trainer(args.out, accum=args.accum, batch=args.batch)
    trainer.train()
    trainer.save_task_vector(args.vector)


if __name__ == "__main__":
    main()
