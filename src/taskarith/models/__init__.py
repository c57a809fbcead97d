"""Pre-trained models and the zero-shot classifiers built on them."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from taskarith.errors import TaskArithError
from taskarith.io import state_hash
from taskarith.models.hf import (
    DEFAULT_MODEL,
    JVP_SAFE_ATTENTION,
    embedded_model_dir,
    is_default_model,
    load_hf_encoder,
    resolve_model,
)
from taskarith.models.zero_shot import DEFAULT_LOGIT_SCALE, ZeroShotClassifier, embed, tokenize, zero_shot_head

if TYPE_CHECKING:
    from taskarith.data import Task

__all__ = [
    "DEFAULT_MODEL",
    "Pretrained",
    "ZeroShotClassifier",
    "embed",
    "embedded_model_dir",
    "load_pretrained",
    "resolve_model",
    "tokenize",
]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise TaskArithError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TaskArithError(f"device '{device}' requested but CUDA is not available")
    return resolved


@dataclass(eq=False)
class Pretrained:
    """A pre-trained encoder held once, plus what turns it into a classifier for any task.

    ``encoder`` is never modified: edited models are copies. Zero-shot heads depend only on the
    pre-trained weights and the task's class names and templates, so they are built once per task.
    """

    name: str
    encoder: nn.Module
    tokenizer: PreTrainedTokenizerBase
    max_length: int = 64
    logit_scale: float = DEFAULT_LOGIT_SCALE
    _heads: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.encoder.eval().requires_grad_(False)

    @cached_property
    def base_hash(self) -> str:
        """Content hash of the parameters fine-tuning changes (the keys of its task vectors)."""
        return state_hash(dict(self.encoder.named_parameters()))

    def head(self, task: Task) -> torch.Tensor:
        key = (task.name, tuple(task.classes), tuple(task.templates))
        if key not in self._heads:
            self._heads[key] = zero_shot_head(self.encoder, self.tokenizer, task.classes, task.templates, self.max_length)
        return self._heads[key]

    def classifier(self, task: Task, encoder: nn.Module | None = None) -> ZeroShotClassifier:
        """The task's zero-shot classifier on ``encoder`` (default: the pre-trained one, shared, not copied)."""
        return ZeroShotClassifier(encoder if encoder is not None else self.encoder, self.head(task), self.logit_scale).eval()

    def trainable_copy(self) -> nn.Module:
        return copy.deepcopy(self.encoder).requires_grad_(True)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """A padded batch on the model's device."""
        return {k: v.to(self.device) for k, v in tokenize(self.tokenizer, texts, self.max_length).items()}

    def batches(self, texts: Sequence[str], batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Batches of similar length (so little compute goes to padding), with the positions they came from."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield torch.tensor(chunk), self.tokenize([texts[i] for i in chunk])


def load_pretrained(
    spec: str | Path = DEFAULT_MODEL,
    *,
    max_length: int = 64,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    attn_implementation: str = JVP_SAFE_ATTENTION,
    device: str = "auto",
) -> Pretrained:
    """Load an encoder by name or folder (default: the embedded all-MiniLM-L6-v2) onto ``device`` ('auto': CUDA if present)."""
    encoder, tokenizer = load_hf_encoder(spec, attn_implementation=attn_implementation)
    encoder = encoder.to(resolve_device(device))
    name = DEFAULT_MODEL if is_default_model(spec) else str(spec)
    return Pretrained(name=name, encoder=encoder, tokenizer=tokenizer, max_length=max_length, logit_scale=logit_scale)
