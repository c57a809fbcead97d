"""Pre-trained models and the zero-shot classifiers built on them."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from taskarith.errors import TaskArithError
from taskarith.io import state_hash
from taskarith.models.clip import is_clip_folder
from taskarith.models.hf import (
    DEFAULT_MODEL,
    JVP_SAFE_ATTENTION,
    check_local_model,
    check_max_length,
    embedded_model_dir,
    hub_model_type,
    is_default_model,
    load_hf_encoder,
    resolve_model,
)
from taskarith.models.vision import EMBEDDED_VISION_MODEL, linear_probe_head, load_efficientnet_lite0
from taskarith.models.zero_shot import DEFAULT_LOGIT_SCALE, ZeroShotClassifier, embed, tokenize, zero_shot_head

if TYPE_CHECKING:
    from taskarith.data import Task

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_VISION_MODEL",
    "Pretrained",
    "ZeroShotClassifier",
    "check_max_length",
    "embed",
    "embedded_model_dir",
    "load_pretrained",
    "reinitialized",
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


MODALITIES = ("text", "image")
Preprocess = Callable[[Sequence[Any]], dict[str, torch.Tensor]]
# A training preprocess is called like Preprocess; the built-in ones also take ``seeds=`` (one int per input).
TrainPreprocess = Callable[..., dict[str, torch.Tensor]]
HeadBuilder = Callable[["Pretrained", "Task"], torch.Tensor]


@dataclass(eq=False)
class Pretrained:
    """A pre-trained encoder held once, plus what turns it into a classifier for any task.

    ``encoder`` is never modified: edited models are copies. It maps a batch to token states
    (``last_hidden_state``) that are mean-pooled over ``attention_mask``; image encoders return one
    token, their pooled embedding, so one interface serves text and images. ``preprocess`` turns raw
    inputs into a batch (default: the tokenizer); ``train_preprocess``, when set, does so for training
    batches (data augmentation: the CLIP loaders give the papers' random resized crop; None trains on the
    eval preprocessing, as the text models and the embedded EfficientNet do). Heads depend only on the
    pre-trained weights and the task, so each is built once per task: a zero-shot head from class names
    and templates (text models, CLIP), or a linear probe on frozen pre-trained features (image backbones
    without a text tower).
    """

    name: str
    encoder: nn.Module
    tokenizer: PreTrainedTokenizerBase | None = None
    max_length: int = 64
    logit_scale: float = DEFAULT_LOGIT_SCALE
    preprocess: Preprocess | None = None
    build_head: HeadBuilder | None = None
    modality: str = "text"
    train_preprocess: TrainPreprocess | None = None
    _heads: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.encoder.eval().requires_grad_(False)
        if self.tokenizer is None and (self.preprocess is None or self.build_head is None):
            raise TaskArithError(f"model '{self.name}': give a tokenizer, or a preprocess function and a head builder")
        if self.modality not in MODALITIES:
            raise TaskArithError(f"model '{self.name}': modality {self.modality!r} is not one of {MODALITIES}")

    @cached_property
    def base_hash(self) -> str:
        """Content hash of the parameters fine-tuning changes (the keys of its task vectors)."""
        return state_hash(dict(self.encoder.named_parameters()))

    def head(self, task: Task) -> torch.Tensor:
        key = (task.name, task.fingerprint)
        if key not in self._heads:
            if self.build_head is not None:
                self._heads[key] = self.build_head(self, task)
            else:
                assert self.tokenizer is not None
                self._heads[key] = zero_shot_head(
                    self.encoder, self.tokenizer, task.classes, task.templates, self.max_length
                )
        return self._heads[key]

    def classifier(self, task: Task, encoder: nn.Module | None = None) -> ZeroShotClassifier:
        """The task's classifier on ``encoder`` (default: the pre-trained one, shared, not copied)."""
        return ZeroShotClassifier(
            encoder if encoder is not None else self.encoder, self.head(task), self.logit_scale
        ).eval()

    def trainable_copy(self) -> nn.Module:
        return copy.deepcopy(self.encoder).requires_grad_(True)

    def to(self, device: torch.device | str) -> Pretrained:
        """Move the encoder (and heads already built) to ``device``; returns self."""
        self.encoder.to(device)
        self._heads = {key: head.to(device) for key, head in self._heads.items()}
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def _check_inputs(self, inputs: Sequence[Any]) -> None:
        text = self.modality == "text"
        wrong = next((item for item in inputs if isinstance(item, str) != text), None)
        if wrong is not None:
            hint = " (image files are given as pathlib.Path, not str)" if not text else ""
            raise TaskArithError(
                f"model '{self.name}' takes {self.modality} inputs, got {type(wrong).__name__}: "
                f"use a {self.modality} task with it{hint}"
            )

    def tokenize(
        self, inputs: Sequence[Any], train: bool = False, *, seeds: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """A batch on the model's device (padded token ids, or preprocessed pixels).

        ``train=True`` uses ``train_preprocess`` when the model has one (else the eval preprocessing).
        Its randomness: with ``seeds`` (one int per input) each input is augmented by
        ``torch.Generator().manual_seed(seed)``, so the same seeds give the same batch on any device and
        in any process; without, torch's global generator is used (``torch.manual_seed`` fixes it).
        """
        self._check_inputs(inputs)
        if train and self.train_preprocess is not None:
            batch = (
                self.train_preprocess(list(inputs))
                if seeds is None
                else self.train_preprocess(list(inputs), seeds=list(seeds))
            )
        elif self.preprocess is not None:
            batch = self.preprocess(list(inputs))
        else:
            assert self.tokenizer is not None
            batch = tokenize(self.tokenizer, inputs, self.max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def batches(self, inputs: Sequence[Any], batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Batches with the positions they came from; texts grouped by length so little compute goes to padding."""
        self._check_inputs(inputs)
        order = list(range(len(inputs)))
        if self.tokenizer is not None and self.preprocess is None:
            ids = self.tokenizer(list(inputs), truncation=True, max_length=self.max_length)["input_ids"]
            order.sort(key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield torch.tensor(chunk), self.tokenize([inputs[i] for i in chunk])


def reinitialized(pretrained: Pretrained, seed: int = 0) -> Pretrained:
    """The same architecture, tokenizer, preprocessing and kind of head with freshly initialized weights: the
    random-initialization control of the tangent paper (task arithmetic should fail without pre-training).

    Hugging Face models are rebuilt from their config with their own init scheme; other modules re-run each
    layer's ``reset_parameters``. Heads are then built by the random encoder (zero-shot text heads, linear
    probes on its features). CLIP's zero-shot heads come from its text tower, which would stay pre-trained,
    so CLIP models are refused. Seeded without touching torch's global generator.
    """
    from transformers import PreTrainedModel

    if pretrained.modality == "image" and pretrained.build_head is not linear_probe_head:
        raise TaskArithError(
            f"model '{pretrained.name}': its zero-shot heads come from a pre-trained text tower, "
            "so a random-initialization control of it would not be random; use a text encoder or "
            "an image backbone with linear-probe heads"
        )
    # torch.manual_seed also seeds CUDA: fork those generators too, so the caller's streams are untouched.
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        encoder: nn.Module
        if isinstance(pretrained.encoder, PreTrainedModel):
            encoder = type(pretrained.encoder)(pretrained.encoder.config)
        else:
            # Reset on the CPU, so a seed gives the same random model whatever the device.
            encoder = copy.deepcopy(pretrained.encoder).cpu()
            for module in encoder.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # type: ignore[operator]  # a layer's method, not a tensor
            before = dict(pretrained.encoder.named_parameters())
            kept = [name for name, p in encoder.named_parameters() if torch.equal(p, before[name].cpu())]
            if kept:  # parameters held outside any layer with reset_parameters (e.g. a bare positional table)
                raise TaskArithError(
                    f"model '{pretrained.name}': no layer re-initializes {', '.join(kept[:5])}"
                    f"{' and more' if len(kept) > 5 else ''}, so a random-initialization "
                    "control would keep them pre-trained"
                )
    return Pretrained(
        name=f"{pretrained.name}@random-init-{seed}",
        encoder=encoder.to(pretrained.device),
        tokenizer=pretrained.tokenizer,
        max_length=pretrained.max_length,
        logit_scale=pretrained.logit_scale,
        preprocess=pretrained.preprocess,
        build_head=pretrained.build_head,
        modality=pretrained.modality,
        train_preprocess=pretrained.train_preprocess,
    )


def _family(spec: str) -> tuple[str, str, str | None]:
    """(family, name, weights file) of a model spec; see :func:`load_pretrained`."""
    for prefix in ("open_clip", "timm"):
        if spec.startswith(prefix + ":"):
            name, _, weights = spec[len(prefix) + 1 :].partition("@")
            if not name:
                raise TaskArithError(f"model '{spec}': expected {prefix}:NAME or {prefix}:NAME@WEIGHTS_FILE")
            return prefix, name, weights or None
    if spec.lower() == EMBEDDED_VISION_MODEL:
        return "efficientnet-lite0", spec, None
    if Path(spec).expanduser().is_dir():
        return ("clip" if is_clip_folder(Path(spec).expanduser()) else "hf"), spec, None
    check_local_model(spec)
    if not is_default_model(spec) and hub_model_type(spec) == "clip":
        return "clip", spec, None
    return "hf", spec, None


def load_pretrained(
    spec: str | Path = DEFAULT_MODEL,
    *,
    max_length: int = 64,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    attn_implementation: str = JVP_SAFE_ATTENTION,
    device: str = "auto",
) -> Pretrained:
    """Load a pre-trained model onto ``device`` ('auto': CUDA if present). ``spec`` is one of:

    * a Hugging Face text encoder: the embedded all-MiniLM-L6-v2 (default), a folder (any encoder or
      sequence-classification model; its task head is dropped) or a hub id; zero-shot heads from templates;
    * a Hugging Face ``CLIPModel`` folder or ``open_clip:NAME@WEIGHTS_FILE``: CLIP, zero-shot heads from its text tower;
    * ``timm:NAME@WEIGHTS_FILE`` or ``efficientnet-lite0`` (embedded): image backbones with linear-probe heads.
    """
    target = resolve_device(device)
    family, name, weights = _family(str(spec))
    if family == "open_clip":
        from taskarith.models.clip import load_open_clip

        if weights is None:
            raise TaskArithError(
                f"model '{spec}': name the weights, open_clip:{name}@FILE or @TAG (e.g. @openai); "
                "without them the model would be randomly initialised"
            )
        pretrained = load_open_clip(name, weights)
    elif family == "timm":
        from taskarith.models.timm import load_timm

        pretrained = load_timm(name, weights)
    elif family == "efficientnet-lite0":
        pretrained = load_efficientnet_lite0()
    elif family == "clip":
        from taskarith.models.clip import load_hf_clip

        source = Path(name).expanduser()
        pretrained = load_hf_clip(source if source.is_dir() else name, attn_implementation=attn_implementation)
    else:
        check_max_length(spec, max_length)  # from the config, before the weights load
        encoder, tokenizer = load_hf_encoder(spec, attn_implementation=attn_implementation)
        config: Any = encoder.config
        check_max_length(spec, max_length, config.to_dict())  # a hub model not in the cache before
        label = DEFAULT_MODEL if is_default_model(spec) else str(spec)
        pretrained = Pretrained(
            name=label, encoder=encoder, tokenizer=tokenizer, max_length=max_length, logit_scale=logit_scale
        )
    return pretrained.to(target)
