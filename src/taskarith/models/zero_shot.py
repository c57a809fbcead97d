"""Encoder + mean pooling + a frozen zero-shot head: the text analogue of CLIP's zero-shot classifier.

The head holds one unit vector per class: the normalised mean of the pre-trained encoder's embeddings
of the class name inserted into each prompt template. Logits are ``scale * cos(embed(x), head_c)``.
Fine-tuning moves only the encoder, so every task keeps its own head and task vectors can be added
across tasks without retraining heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

Batch = Mapping[str, torch.Tensor]

DEFAULT_LOGIT_SCALE = 20.0


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token states that are not padding (the pooling all-MiniLM-L6-v2 was trained with)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def embed(encoder: nn.Module, batch: Batch) -> torch.Tensor:
    """Unit-norm sentence embeddings."""
    hidden = encoder(**batch).last_hidden_state
    return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def zero_shot_head(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    classes: Sequence[str],
    templates: Sequence[str],
    max_length: int = 64,
) -> torch.Tensor:
    """One unit vector per class from the pre-trained encoder's embeddings of the filled-in templates."""
    rows = []
    for name in classes:
        prompts = [template.format(name) for template in templates]
        device = next(encoder.parameters()).device
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, prompts, max_length).items()}
        rows.append(F.normalize(embed(encoder, batch).mean(dim=0), dim=-1))
    return torch.stack(rows)


class ZeroShotClassifier(nn.Module):
    """Logits = scale * cos(embed(x), class vectors); the class vectors are a buffer, never trained."""

    def __init__(self, encoder: nn.Module, head: torch.Tensor, scale: float = DEFAULT_LOGIT_SCALE) -> None:
        super().__init__()
        self.encoder = encoder
        self.head: torch.Tensor
        self.register_buffer("head", head.detach().clone(), persistent=False)
        self.scale = scale

    def logits_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(pooled, dim=-1) @ self.head.T

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(**batch).last_hidden_state
        return self.logits_from_pooled(mean_pool(hidden, batch["attention_mask"]))
