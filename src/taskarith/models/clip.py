"""CLIP, the papers' canonical setting: the image encoder is fine-tuned under frozen zero-shot heads.

Heads are built from class names and prompt templates with CLIP's own text tower (the mean of the
normalised text embeddings of the filled-in templates, normalised), and logits are CLIP's learned
``logit_scale * cos``. Only the image tower (and its projection) is ever trained, so task vectors hold
the image encoder's parameters, named as in the full model's state dict.

Two sources: Hugging Face ``CLIPModel`` folders (transformers), and open_clip (model name plus a
pretrained weights file). Both train on open_clip's training transform, the one the papers fine-tune with
(``model.train_preprocess``: a random resized crop, scale 0.9-1, bicubic; see
:func:`~taskarith.models.vision.image_train_preprocess`), and evaluate on its eval transform. Both run
attention through plain matrix products or SDPA's math kernel under forward-mode AD (see
:mod:`taskarith.linearize`), so every mode, linear included, works on them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from taskarith.errors import TaskArithError
from taskarith.models.vision import image_preprocess, image_train_preprocess

if TYPE_CHECKING:
    from taskarith.data import Task
    from taskarith.models import Pretrained

# CLIP's image normalisation (OpenAI), used when a folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_clip_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


class ClipImageEncoder(nn.Module):
    """CLIP's image tower and projection; parameter names match ``CLIPModel``'s (``vision_model.*``, ``visual_projection.*``)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self.config = vision_model.config  # lets linearization check the attention implementation

    def forward(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output
        return BaseModelOutput(last_hidden_state=self.visual_projection(pooled).unsqueeze(1))


def _zero_shot_head(embed_texts: Callable[[list[str]], torch.Tensor]) -> Callable[[Pretrained, Task], torch.Tensor]:
    @torch.no_grad()
    def build(pretrained: Pretrained, task: Task) -> torch.Tensor:
        rows = []
        for name in task.classes:
            prompts = [template.format(name) for template in task.templates]
            rows.append(F.normalize(F.normalize(embed_texts(prompts).float(), dim=-1).mean(dim=0), dim=-1))
        return torch.stack(rows).to(pretrained.device)

    return build


def _preprocessing_from_folder(folder: Path) -> tuple[Sequence[float], Sequence[float]]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TaskArithError(f"{path}: not valid JSON ({exc})") from None
    return tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


def load_hf_clip(spec: str | Path, *, attn_implementation: str = "eager") -> Pretrained:
    """A Hugging Face ``CLIPModel`` folder (or hub id): image encoder to fine-tune, text tower for heads."""
    from transformers import AutoTokenizer, CLIPModel

    from taskarith.models import Pretrained

    source = str(spec)
    try:
        # float32 whatever the checkpoint's dtype: task vectors and AdamW need it (transformers' default is "auto").
        model = CLIPModel.from_pretrained(source, attn_implementation=attn_implementation, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise TaskArithError(
            f"could not load CLIP model '{spec}': {exc}. Without network access, pass a local "
            "folder with config.json, weights and tokenizer files"
        ) from None
    size = model.config.vision_config.image_size
    mean, std = _preprocessing_from_folder(Path(source)) if Path(source).is_dir() else (CLIP_MEAN, CLIP_STD)
    context = model.config.text_config.max_position_embeddings

    def embed_texts(prompts: list[str]) -> torch.Tensor:
        # The text tower follows the image tower to its device: heads of many classes x templates are costly.
        device = model.visual_projection.weight.device
        model.text_model.to(device)
        model.text_projection.to(device)
        batch = tokenizer(prompts, padding=True, truncation=True, max_length=context, return_tensors="pt")
        out = model.get_text_features(**{k: v.to(device) for k, v in batch.items()})
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    encoder = ClipImageEncoder(model.vision_model, model.visual_projection)
    return Pretrained(
        name=source,
        encoder=encoder,
        logit_scale=float(model.logit_scale.exp()),
        preprocess=image_preprocess(size, mean, std, center_crop=True, interpolation="bicubic"),
        train_preprocess=image_train_preprocess(size, mean, std),
        build_head=_zero_shot_head(embed_texts),
        modality="image",
    )


# -------------------------------------------------------------------------------------------------
# open_clip


class OpenClipImageEncoder(nn.Module):
    """open_clip's ``visual`` tower; parameter names match the full model's (``visual.*``)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.visual(pixel_values).unsqueeze(1))


def load_open_clip(name: str, pretrained: str | Path | None = None) -> Pretrained:
    """An open_clip model by architecture name, with weights from a local file or an open_clip tag
    (e.g. ``openai``, found in the local hub cache when offline).

    OpenAI weights need the QuickGELU variant of the architecture (``ViT-B-32-quickgelu``), which a
    tag selects by itself but a bare file cannot. ``pretrained=None`` keeps open_clip's random
    initialisation (tests).
    """
    from taskarith.models import Pretrained

    if importlib.util.find_spec("open_clip") is None:
        raise TaskArithError(
            "open_clip models need the package open_clip_torch (and a torchvision matching "
            "your torch): pip install open_clip_torch"
        )
    import open_clip

    try:
        model = open_clip.create_model(name, pretrained=str(pretrained) if pretrained else None)
    except Exception as exc:  # open_clip reports unknown tags, missing files and bad weights with various types
        raise TaskArithError(f"could not build open_clip model '{name}' from {pretrained}: {exc}") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
    std = getattr(model.visual, "image_std", None) or CLIP_STD

    def embed_texts(prompts: list[str]) -> torch.Tensor:
        # The image tower may have moved to a GPU; the text tower stays where it was built.
        device = next(p for n, p in model.named_parameters() if not n.startswith("visual.")).device
        return model.encode_text(tokenizer(prompts).to(device))

    return Pretrained(
        name=f"open_clip:{name}" + (f"@{pretrained}" if pretrained else ""),
        encoder=OpenClipImageEncoder(model.visual),
        logit_scale=float(model.logit_scale.exp()),
        preprocess=image_preprocess(size, mean, std, center_crop=True, interpolation="bicubic"),
        train_preprocess=image_train_preprocess(size, mean, std),
        build_head=_zero_shot_head(embed_texts),
        modality="image",
    )
