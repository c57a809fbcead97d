"""timm image backbones (any architecture timm builds) with a frozen linear-probe head.

Weights come from a local file (``pretrained_cfg_overlay={"file": ...}``: safetensors or a state dict
that timm reads with ``weights_only``) or timm's own hub cache; the classifier is removed
(``num_classes=0``) so the backbone returns its pooled features, and preprocessing follows the
model's data config (input size, mean, std, interpolation, centre crop).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from taskarith.errors import TaskArithError
from taskarith.models.vision import PROBE_LOGIT_SCALE, PooledImageEncoder, image_preprocess, linear_probe_head

if TYPE_CHECKING:
    from taskarith.models import Pretrained


def _pooled(backbone: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return backbone(pixels)  # num_classes=0: timm returns the pooled pre-logits features


def load_timm(
    name: str,
    weights: str | Path | None = None,
    *,
    random_init: bool = False,
    image_size: int | None = None,
    **model_kwargs: object,
) -> Pretrained:
    """A timm backbone by architecture name; ``weights`` a local file, else timm's pretrained weights.

    ``random_init`` builds the architecture with random weights (tests); ``image_size`` overrides the
    input size (e.g. small images); ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size`` for ViTs).
    """
    from taskarith.models import Pretrained

    if importlib.util.find_spec("timm") is None:
        raise TaskArithError(
            "timm models need the package timm (and a torchvision matching your torch): pip install timm"
        )
    import timm
    import timm.data

    if weights is not None and not Path(weights).is_file():
        raise TaskArithError(f"{weights}: timm weights file not found")
    options: dict[str, object] = {"num_classes": 0, **model_kwargs}
    if weights is not None:
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    else:
        options["pretrained"] = not random_init
    try:
        backbone = timm.create_model(name, **options)
    except Exception as exc:  # timm surfaces unpickling, safetensors and config errors with their own types
        raise TaskArithError(
            f"could not build timm model '{name}'" + (f" from {weights}" if weights else "") + f": {exc}"
        ) from None
    config = timm.data.resolve_model_data_config(backbone)
    size = image_size or int(config["input_size"][-1])
    crop_pct = float(config.get("crop_pct") or 1.0)
    interpolation = "bicubic" if config.get("interpolation") == "bicubic" else "bilinear"
    label = f"timm:{name}" + (f"@{weights}" if weights else "")
    return Pretrained(
        name=label,
        encoder=PooledImageEncoder(backbone.eval(), _pooled),
        logit_scale=PROBE_LOGIT_SCALE,
        preprocess=image_preprocess(
            size,
            config["mean"],
            config["std"],
            center_crop=True,
            interpolation=interpolation,
            resize_to=int(size / crop_pct),
        ),
        build_head=linear_probe_head,
        modality="image",
    )
