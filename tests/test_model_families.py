"""Every model family on tiny offline models: load, head, one step in each mode, vector round-trip, f_lin(theta0) = f."""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import write_tiny_bert
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    DistilBertConfig,
    DistilBertModel,
    RobertaConfig,
    RobertaModel,
)

from taskarith.data import BUILTIN_TASKS, Examples, Task
from taskarith.errors import TaskArithError
from taskarith.finetune import FinetuneConfig, finetune
from taskarith.kfac import compute_kfac_factors
from taskarith.linearize import LinearizedEncoder
from taskarith.models import Pretrained, load_pretrained
from taskarith.models.clip import CLIP_MEAN, CLIP_STD
from taskarith.models.vision import (
    PooledImageEncoder,
    image_preprocess,
    image_train_preprocess,
    linear_probe_head,
    load_efficientnet_lite0,
    random_resized_crop_box,
)
from taskarith.vectors import TaskVector

COLOURS = ("red", "green", "blue")
RGB = np.array([[220, 30, 30], [30, 200, 40], [30, 40, 220]], dtype=np.uint8)


def colour_examples(n: int, seed: int, size: int = 20) -> Examples:
    """Noisy images whose dominant colour is the class: learnable from pixels by any backbone."""
    rng = np.random.default_rng(seed)
    labels = [i % 3 for i in range(n)]
    images = [np.clip(RGB[y] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8) for y in labels]
    return Examples(images, labels)


def colour_task(name: str = "colour_images", seed: int = 0) -> Task:
    return Task(
        name,
        COLOURS,
        ("a photo of a {} thing.", "a {} image."),
        colour_examples(48, seed),
        colour_examples(12, seed + 1),
        colour_examples(12, seed + 2),
        "colours",
        "tests",
    )


@pytest.fixture
def image_tasks(monkeypatch):
    """The task to fine-tune and another one to protect, resolvable by name as tau-Jp needs."""
    task, other = colour_task(), colour_task("other_colours", seed=10)
    monkeypatch.setitem(BUILTIN_TASKS, other.name, lambda: other)
    return task, other


def check_family(pretrained: Pretrained, task: Task, other: Task, tmp_path, modes=("standard", "linear")) -> None:
    inputs = list(task.test.inputs[:4])
    batch = pretrained.tokenize(inputs)

    head = pretrained.head(task)
    assert head.shape[0] == len(task.classes) and torch.isfinite(head).all()

    with torch.no_grad():
        plain = pretrained.encoder(**batch).last_hidden_state
        linear = LinearizedEncoder(pretrained.encoder)(**batch).last_hidden_state
    assert torch.allclose(plain, linear, atol=1e-5)

    factors = tmp_path / "kfac.safetensors"
    compute_kfac_factors(pretrained, other, num_examples=8, batch_size=4, progress=False).save(factors)
    runs = [dict(mode=mode) for mode in modes]
    runs += [
        dict(mode="standard", regularizer="taujp", reg_tasks=(other.name,), reg_batch_size=4),
        dict(mode="linear", regularizer="taujp", reg_tasks=(other.name,), reg_batch_size=4),
        dict(mode="linear", regularizer="kfac", reg_factors=(str(factors),)),
    ]
    for number, settings in enumerate(runs):
        if "regularizer" in settings:
            settings["reg_strength"] = 1.0
        config = FinetuneConfig(task=task.name, model=pretrained.name, steps=1, batch_size=4, lr=1e-3, **settings)
        out = tmp_path / f"run-{number}"
        tau = finetune(config, pretrained, task, out, progress=False).task_vector
        assert tau.norm() > 0 and all(torch.isfinite(d).all() for d in tau.deltas.values()), settings
        loaded = TaskVector.load(out / "task_vector.safetensors")
        assert loaded.allclose(tau, atol=0, rtol=0) and loaded.mode == settings["mode"]

    # Standard-mode round trip through a model: apply, then recover the vector from the two models.
    tau = finetune(
        FinetuneConfig(task=task.name, model=pretrained.name, steps=1, batch_size=4, lr=1e-3),
        pretrained,
        task,
        progress=False,
    ).task_vector
    edited = tau.apply_to(pretrained.encoder)
    recovered = TaskVector.from_models(pretrained.encoder, edited)  # also holds float buffers (BatchNorm statistics)
    assert all(torch.allclose(recovered.deltas[k], v, atol=1e-6) for k, v in tau.deltas.items())
    assert all(not recovered.deltas[k].any() for k in set(recovered.deltas) - set(tau.deltas))
    with torch.no_grad():
        assert not torch.allclose(edited(**batch).last_hidden_state, plain)


# -------------------------------------------------------------------------------------------------
# Image backbones with linear-probe heads


def test_embedded_efficientnet_every_mode(image_tasks, tmp_path):
    task, other = image_tasks
    check_family(load_efficientnet_lite0(), task, other, tmp_path)


def test_embedded_efficientnet_is_the_imagenet_backbone_and_its_probe_learns(image_tasks):
    task, _ = image_tasks
    pretrained = load_pretrained("efficientnet-lite0", device="cpu")
    assert pretrained.modality == "image" and pretrained.encoder.backbone._bn0.running_var.max() != 1
    from taskarith.evaluate import accuracy

    assert accuracy(pretrained, task, "test") == 1.0  # colour is linearly separable in ImageNet features
    assert torch.equal(pretrained.head(task), linear_probe_head(pretrained, task))  # deterministic


def test_image_model_refuses_text_and_text_model_refuses_images(tiny_model_dir):
    image = load_efficientnet_lite0(random_init=True)
    with pytest.raises(TaskArithError, match="image inputs"):
        image.tokenize(["a sentence"])
    text = load_pretrained(tiny_model_dir, device="cpu")
    with pytest.raises(TaskArithError, match="text inputs"):
        text.tokenize(list(colour_examples(2, 0).inputs))


def test_image_preprocess_resizes_crops_and_normalises():
    square = image_preprocess(8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    white = np.full((4, 4), 255, dtype=np.uint8)  # grayscale becomes 3 channels
    batch = square([white, np.zeros((16, 16, 3), dtype=np.uint8)])
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["attention_mask"].shape == (2, 1)
    assert torch.allclose(batch["pixel_values"][0], torch.ones(3, 8, 8))
    assert torch.allclose(batch["pixel_values"][1], -torch.ones(3, 8, 8))
    crop = image_preprocess(6, center_crop=True)([np.zeros((12, 30, 3), dtype=np.uint8)])
    assert crop["pixel_values"].shape == (1, 3, 6, 6)


def test_pooled_image_encoder_wraps_any_backbone(image_tasks, tmp_path):
    task, other = image_tasks
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 6),
    )
    encoder = PooledImageEncoder(backbone, lambda module, pixels: module(pixels))
    pretrained = Pretrained(
        name="conv", encoder=encoder, preprocess=image_preprocess(16), build_head=linear_probe_head, modality="image"
    )
    check_family(pretrained, task, other, tmp_path)


# -------------------------------------------------------------------------------------------------
# CLIP from Hugging Face


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIPModel folder; its tokenizer is the tiny BERT one (any tokenizer AutoTokenizer loads)."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    write_tiny_bert(folder / "bert")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "bert")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=32,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder / "clip")
    tokenizer.save_pretrained(folder / "clip")
    return folder / "clip"


def test_hf_clip_every_mode(tiny_clip_dir, image_tasks, tmp_path):
    task, other = image_tasks
    pretrained = load_pretrained(tiny_clip_dir, device="cpu")
    assert pretrained.modality == "image"
    assert pretrained.logit_scale == pytest.approx(float(CLIPModel.from_pretrained(tiny_clip_dir).logit_scale.exp()))
    names = {name for name, _ in pretrained.encoder.named_parameters()}
    assert "visual_projection.weight" in names and not any(n.startswith("text_model") for n in names)
    check_family(pretrained, task, other, tmp_path)


def test_hf_clip_zero_shot_head_is_the_mean_of_template_embeddings(tiny_clip_dir, image_tasks):
    task, _ = image_tasks
    pretrained = load_pretrained(tiny_clip_dir, device="cpu")
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        prompts = [template.format(task.classes[1]) for template in task.templates]
        out = clip.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt"))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        expected = torch.nn.functional.normalize(torch.nn.functional.normalize(out, dim=-1).mean(0), dim=-1)
    assert torch.allclose(pretrained.head(task)[1], expected, atol=1e-5)


def test_hf_clip_image_features_match_clipmodel(tiny_clip_dir):
    pretrained = load_pretrained(tiny_clip_dir, device="cpu")
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    batch = pretrained.tokenize(list(colour_examples(3, 0).inputs))
    with torch.no_grad():
        ours = pretrained.encoder(**batch).last_hidden_state[:, 0]
        theirs = clip.get_image_features(pixel_values=batch["pixel_values"])
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    assert torch.allclose(ours, theirs, atol=1e-5)


# -------------------------------------------------------------------------------------------------
# Training augmentation (the papers' open_clip train_preprocess)


def test_random_resized_crop_box_follows_its_definition():
    boxes = [
        random_resized_crop_box(200, 220, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(s))
        for s in range(200)
    ]
    assert boxes[7] == random_resized_crop_box(200, 220, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(7))
    for top, left, h, w in boxes:
        assert 0 <= top <= 200 - h and 0 <= left <= 220 - w
        # Area within the scale range and aspect within the ratio range, up to the rounding of h and w.
        assert 0.9 * 44000 - 2 * (h + w) <= h * w <= 44000 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert len(set(boxes)) > 100
    # A 200 x 300 picture has no crop of 90 % of its area within the ratio range: the centred fallback.
    assert random_resized_crop_box(200, 300, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)) == (
        0,
        16,
        200,
        267,
    )
    # Nothing fits a 1 x 100 strip: the fallback is the largest centred crop within the ratio range.
    assert random_resized_crop_box(1, 100, (0.9, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)) == (
        0,
        49,
        1,
        1,
    )
    # The global generator draws as a generator seeded alike.
    torch.manual_seed(3)
    assert random_resized_crop_box(50, 50, (0.5, 1.0), (3 / 4, 4 / 3)) == random_resized_crop_box(
        50, 50, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3)
    )


def test_image_train_preprocess_is_seeded_per_input():
    images = list(colour_examples(4, 0, size=40).inputs)
    train = image_train_preprocess(16, CLIP_MEAN, CLIP_STD)
    a, b = train(images, seeds=[1, 2, 3, 4]), train(images, seeds=[1, 2, 3, 4])
    assert a["pixel_values"].shape == (4, 3, 16, 16) and torch.equal(a["pixel_values"], b["pixel_values"])
    # A crop depends on its own seed only, not on the rest of the batch.
    assert torch.equal(train(images[2:3], seeds=[3])["pixel_values"][0], a["pixel_values"][2])
    assert not torch.equal(train(images, seeds=[5, 6, 7, 8])["pixel_values"], a["pixel_values"])
    torch.manual_seed(0)
    first = train(images)["pixel_values"]
    torch.manual_seed(0)
    assert torch.equal(train(images)["pixel_values"], first)
    with pytest.raises(TaskArithError, match="2 seeds for 4 inputs"):
        train(images, seeds=[1, 2])
    # Scale and ratio 1 on square images is the whole image, resized: the eval transform without its crop.
    whole = image_train_preprocess(16, CLIP_MEAN, CLIP_STD, scale=(1.0, 1.0), ratio=(1.0, 1.0))(images, seeds=[0] * 4)
    plain = image_preprocess(16, CLIP_MEAN, CLIP_STD, interpolation="bicubic")(images)
    assert torch.allclose(whole["pixel_values"], plain["pixel_values"], atol=1e-6)


def test_clip_trains_on_augmented_batches_and_a_seed_gives_the_same_task_vector(tiny_clip_dir):
    pretrained = load_pretrained(tiny_clip_dir, device="cpu")
    assert pretrained.train_preprocess is not None
    images = list(colour_examples(6, 0, size=40).inputs)
    evaluated = pretrained.tokenize(images)["pixel_values"]
    trained = pretrained.tokenize(images, train=True, seeds=range(6))["pixel_values"]
    assert trained.shape == evaluated.shape and not torch.equal(trained, evaluated)

    def two_steps() -> dict[str, torch.Tensor]:
        encoder = pretrained.trainable_copy()
        optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
        for step in range(2):
            seeds = [(0 * 1_000_003 + step) * 100_003 + k for k in range(len(images))]
            batch = pretrained.tokenize(images, train=True, seeds=seeds)
            encoder(**batch).last_hidden_state.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return {name: p.detach().clone() for name, p in encoder.named_parameters()}

    first, second = two_steps(), two_steps()
    assert all(torch.equal(first[name], second[name]) for name in first)
    # Models without a training transform train on the eval batches.
    text_like = Pretrained(
        name="conv",
        encoder=pretrained.encoder,
        preprocess=image_preprocess(32),
        build_head=linear_probe_head,
        modality="image",
    )
    assert torch.equal(
        text_like.tokenize(images, train=True, seeds=range(6))["pixel_values"],
        text_like.tokenize(images)["pixel_values"],
    )
    assert load_efficientnet_lite0().train_preprocess is None


# -------------------------------------------------------------------------------------------------
# Any Hugging Face text encoder or sequence classifier


def _text_folder(tmp_path, kind: str, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = len(tokenizer)
    torch.manual_seed(0)
    if kind == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    elif kind == "roberta":
        model = RobertaModel(
            RobertaConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=70,
                pad_token_id=0,
            )
        )
    else:
        model = BertForSequenceClassification(
            BertConfig(
                vocab_size=vocab,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                num_labels=3,
            )
        )
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["distilbert", "roberta", "bert-sequence-classifier"])
def test_hugging_face_text_families(kind, tmp_path, tiny_model_dir, tiny_csv, monkeypatch):
    from taskarith.data import task_from_file

    task = task_from_file(tiny_csv)
    other = Task("other_text", task.classes, task.templates, task.val, task.val, task.test, "t", "tests")
    monkeypatch.setitem(BUILTIN_TASKS, other.name, lambda: other)
    pretrained = load_pretrained(_text_folder(tmp_path, kind, tiny_model_dir), max_length=16, device="cpu")
    assert not any("classifier" in name for name, _ in pretrained.encoder.named_parameters())
    check_family(pretrained, task, other, tmp_path)


# -------------------------------------------------------------------------------------------------
# timm and open_clip: their packages import torchvision, which needs a build matching torch exactly


def require_vision_package(name: str) -> None:
    """Skip where ``name`` (and the torchvision it imports, which must match torch exactly) does not import;
    fail instead in the environment CI builds for these tests (TASKARITH_REQUIRE_VISION=1), so they never
    silently stop running there."""
    try:
        importlib.import_module(name)
    except Exception as exc:  # ImportError, or torchvision's RuntimeError on a torch it was not built for
        reason = f"{name} does not import here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        if os.environ.get("TASKARITH_REQUIRE_VISION"):
            pytest.fail(reason)
        pytest.skip(reason)


def test_timm_backbone_every_mode(image_tasks, tmp_path):
    require_vision_package("timm")
    from taskarith.models.timm import load_timm

    task, other = image_tasks
    check_family(load_timm("resnet10t", random_init=True, image_size=32), task, other, tmp_path)
    check_family(
        load_timm("vit_tiny_patch16_224", random_init=True, img_size=32, image_size=32), task, other, tmp_path / "vit"
    )


def test_open_clip_every_mode(image_tasks, tmp_path, monkeypatch):
    require_vision_package("open_clip")
    import open_clip
    from open_clip import factory

    from taskarith.models.clip import load_open_clip

    tiny = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    monkeypatch.setitem(factory._MODEL_CONFIGS, "taskarith-tiny", tiny)
    task, other = image_tasks
    pretrained = load_open_clip("taskarith-tiny")
    weights = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file

    model = open_clip.create_model("taskarith-tiny")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    loaded = load_open_clip("taskarith-tiny", weights).encoder.state_dict()
    assert all(torch.equal(loaded[f"visual.{k}"], v) for k, v in model.visual.state_dict().items())
    check_family(pretrained, task, other, tmp_path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("open_clip:ViT-B-32", "name the weights"),  # never a silently random CLIP
        ("timm:", "expected timm:NAME"),
        ("open_clip:@weights.bin", "expected open_clip:NAME"),
    ],
)
def test_model_specs_are_checked(spec, message):
    with pytest.raises(TaskArithError, match=message):
        load_pretrained(spec, device="cpu")


def test_task_specs_for_torchvision_are_checked(tmp_path):
    from taskarith.data import load_task

    with pytest.raises(TaskArithError, match="torchvision:DATASET@ROOT"):
        load_task("torchvision:MNIST")
    with pytest.raises(TaskArithError, match="not a folder"):
        load_task(f"torchvision:MNIST@{tmp_path / 'missing'}")
