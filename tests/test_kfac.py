"""Dataless K-FAC regularizer: exactness where K-FAC-reduce is exact, penalty properties, files, merging."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from transformers.modeling_outputs import BaseModelOutput

from taskarith.data import task_from_file
from taskarith.errors import TaskArithError
from taskarith.io import save_tensors
from taskarith.kfac import (
    FORMAT,
    KFACFactors,
    compute_kfac_factors,
    factors_from_texts,
    kfac_penalty,
    merge_factors,
)
from taskarith.linearize import hidden_and_tangent
from taskarith.models import Pretrained, load_pretrained
from taskarith.models.zero_shot import mean_pool
from taskarith.regularizers import PenaltyInputs, get_regularizer, pooled_tangents, taujp_penalty


class OneLayer(nn.Module):
    """Embedding -> LayerNorm -> one Linear, then (outside) mean pooling: K-FAC-reduce is exact for the Linear."""

    def __init__(self, vocab: int, dim: int = 8, hidden: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, hidden)
        with torch.no_grad():  # non-trivial affine parameters, so no Jacobian block is degenerate
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: torch.Tensor) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.proj(self.norm(self.embed(input_ids))))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Pretrained:
    return load_pretrained(tiny_model_dir, max_length=16, device="cpu")


@pytest.fixture(scope="module")
def task(tiny_csv: Path):
    return task_from_file(tiny_csv, templates=("this is about {}.",))


@pytest.fixture(scope="module")
def one_layer(tiny: Pretrained) -> Pretrained:
    return Pretrained(name="one-layer", encoder=OneLayer(len(tiny.tokenizer)), tokenizer=tiny.tokenizer, max_length=16)


@pytest.fixture(scope="module")
def texts(task) -> list[str]:
    return list(task.train.inputs[:24])


@pytest.fixture(scope="module")
def exact_factors(tiny: Pretrained, task) -> KFACFactors:
    return compute_kfac_factors(tiny, task, num_examples=32, mc_samples=None, progress=False)


def gauss_newton(pretrained: Pretrained, texts: list[str]) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    """Brute force: the full matrix E_x[J^T J] of the pooled output w.r.t. all parameters, from jacrev."""
    encoder = pretrained.encoder
    params = {name: p.detach() for name, p in encoder.named_parameters()}
    layout = [(name, p.shape) for name, p in params.items()]
    total, count = None, 0
    for _, batch in pretrained.batches(texts, 8):
        def pooled(p: dict[str, torch.Tensor], batch: dict = batch) -> torch.Tensor:
            return mean_pool(functional_call(encoder, p, kwargs=batch).last_hidden_state, batch["attention_mask"])

        jac = jacrev(pooled)(params)
        J = torch.cat([jac[name].reshape(*jac[name].shape[:2], -1) for name, _ in layout], dim=2).double()
        gram = torch.einsum("bhp,bhq->pq", J, J)
        total = gram if total is None else total + gram
        count += J.shape[0]
    return total / count, layout


def flat(delta: dict[str, torch.Tensor], layout: list[tuple[str, torch.Size]]) -> torch.Tensor:
    return torch.cat([delta[name].reshape(-1) for name, _ in layout]).double()


def exact_interference(pretrained: Pretrained, texts: list[str], delta: dict[str, torch.Tensor]) -> float:
    """tau-Jp measured directly: E_x ||J f(x) . delta||^2 over ``texts`` (JVPs, as the fine-tuning loop does)."""
    theta0 = dict(pretrained.encoder.named_parameters())
    total, count = 0.0, 0
    for _, batch in pretrained.batches(texts, 16):
        _, tangent = hidden_and_tangent(pretrained.encoder, theta0, delta, batch)
        tangents = pooled_tangents(tangent, batch["attention_mask"])
        total += taujp_penalty(PenaltyInputs(delta=delta, tangents=tangents)).item() * tangents.shape[0]
        count += tangents.shape[0]
    return total / count


def random_delta(pretrained: Pretrained, seed: int, keep=lambda name: True, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(p.shape, generator=generator) * scale if keep(name) else torch.zeros(p.shape))
            for name, p in pretrained.encoder.named_parameters()}


# ---- exactness ---------------------------------------------------------------------------------


def test_linear_block_matches_brute_force_gauss_newton(one_layer: Pretrained, texts: list[str]) -> None:
    factors = factors_from_texts(one_layer, texts, tasks=("t",), batch_size=8, mc_samples=None)
    G, layout = gauss_newton(one_layer, texts)
    for seed in range(3):
        delta = random_delta(one_layer, seed, keep=lambda name: name.startswith("proj."))
        x = flat(delta, layout)
        exact = (x @ G @ x).item()
        assert kfac_penalty(delta, factors).item() == pytest.approx(exact, rel=1e-4)
        # The same quantity the tau-Jp regularizer measures, by JVPs.
        assert exact_interference(one_layer, texts, delta) == pytest.approx(exact, rel=1e-4)


@pytest.mark.parametrize("name, index", [("norm.weight", (3,)), ("norm.bias", (5,)), ("embed.weight", None)])
def test_diagonal_entries_match_brute_force(one_layer: Pretrained, texts: list[str], name: str, index) -> None:
    factors = factors_from_texts(one_layer, texts, tasks=("t",), batch_size=8, mc_samples=None)
    G, layout = gauss_newton(one_layer, texts)
    delta = random_delta(one_layer, 0, keep=lambda _: False)
    if index is None:  # an embedding row the task uses: the first token of the first text
        row = one_layer.tokenize(texts[:1])["input_ids"][0, 1].item()
        index = (row, 2)
        assert row in factors.rows[name].tolist()
    delta[name][index] = 0.3
    x = flat(delta, layout)
    assert kfac_penalty(delta, factors).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)


def test_monte_carlo_directions_approximate_exact(one_layer: Pretrained, texts: list[str]) -> None:
    exact = factors_from_texts(one_layer, texts, tasks=("t",), batch_size=8, mc_samples=None)
    sampled = factors_from_texts(one_layer, texts, tasks=("t",), batch_size=8, mc_samples=32, seed=1)
    assert sampled.directions == "mc:32"
    for seed in range(3):
        delta = random_delta(one_layer, seed)
        assert kfac_penalty(delta, sampled).item() == pytest.approx(kfac_penalty(delta, exact).item(), rel=0.25)


def test_penalty_tracks_taujp_on_tiny_bert(tiny: Pretrained, task, exact_factors: KFACFactors) -> None:
    texts = [t for t in task.train.inputs]
    chosen = compute_kfac_factors(tiny, task, num_examples=32, mc_samples=None, progress=False)
    assert chosen.num_examples == 32
    # Ratios observed: about 0.8-1.1 (block-diagonal K-FAC-reduce against the exact JVPs).
    ratios = []
    for seed, keep in ((0, lambda n: True), (1, lambda n: True), (2, lambda n: n.startswith("encoder.layer"))):
        delta = random_delta(tiny, seed, keep=keep)
        ratios.append(kfac_penalty(delta, exact_factors).item() / exact_interference(tiny, texts, delta))
    print("kfac / taujp ratios:", [round(r, 3) for r in ratios])
    assert all(0.5 < r < 2.0 for r in ratios), ratios


# ---- penalty properties ------------------------------------------------------------------------


def test_penalty_is_a_positive_quadratic_form_with_gradients(tiny: Pretrained, exact_factors: KFACFactors) -> None:
    zero = random_delta(tiny, 0, keep=lambda _: False)
    assert kfac_penalty(zero, exact_factors).item() == 0.0
    assert kfac_penalty({}, exact_factors).item() == 0.0
    delta = {name: value.requires_grad_(True) for name, value in random_delta(tiny, 3).items()}
    penalty = kfac_penalty(delta, exact_factors)
    assert penalty.dim() == 0 and penalty.item() > 0
    doubled = kfac_penalty({name: 2 * value for name, value in delta.items()}, exact_factors)
    assert doubled.item() == pytest.approx(4 * penalty.item(), rel=1e-5)
    penalty.backward()
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.bias",
                 "encoder.layer.0.output.LayerNorm.weight", "embeddings.word_embeddings.weight"):
        assert delta[name].grad is not None and delta[name].grad.abs().sum() > 0, name
    # The pooler never reaches the mean-pooled token states: no factors, no penalty.
    assert "pooler.dense" not in exact_factors.A
    assert delta["pooler.dense.weight"].grad is None
    # Every Linear layer: a weight-only or bias-only delta counts too.
    layer = "encoder.layer.0.intermediate.dense"
    assert kfac_penalty({f"{layer}.bias": torch.ones(exact_factors.S[layer].shape[0])}, exact_factors).item() > 0


def test_regularizer_registry_uses_kfac(tiny: Pretrained, exact_factors: KFACFactors) -> None:
    delta = random_delta(tiny, 4)
    regularizer = get_regularizer("kfac")
    assert not regularizer.needs_inputs
    value = regularizer.penalty(PenaltyInputs(delta=delta, factors=exact_factors))
    assert value.item() == pytest.approx(kfac_penalty(delta, exact_factors).item())


def test_wrong_shapes_are_refused(exact_factors: KFACFactors) -> None:
    with pytest.raises(TaskArithError, match="query.weight"):
        kfac_penalty({"encoder.layer.0.attention.self.query.weight": torch.ones(3, 3)}, exact_factors)
    with pytest.raises(TaskArithError, match="word_embeddings"):
        kfac_penalty({"embeddings.word_embeddings.weight": torch.ones(5, 3)}, exact_factors)


def test_computation_is_deterministic_and_leaves_the_encoder_alone(tiny: Pretrained, task) -> None:
    before = {name: p.detach().clone() for name, p in tiny.encoder.named_parameters()}
    flags = {name: p.requires_grad for name, p in tiny.encoder.named_parameters()}
    first = compute_kfac_factors(tiny, task, num_examples=16, mc_samples=2, seed=5, progress=False)
    second = compute_kfac_factors(tiny, task, num_examples=16, mc_samples=2, seed=5, progress=False)
    other = compute_kfac_factors(tiny, task, num_examples=16, mc_samples=2, seed=6, progress=False)
    for layer in first.A:
        assert torch.equal(first.A[layer], second.A[layer]) and torch.equal(first.S[layer], second.S[layer])
    assert any(not torch.equal(first.S[layer], other.S[layer]) for layer in first.A)
    assert first.base_hash == tiny.base_hash and first.tasks == (task.name,) and first.num_examples == 16
    for name, p in tiny.encoder.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad == flags[name] and p.grad is None
    assert not tiny.encoder.training
    assert all(not m._forward_hooks for m in tiny.encoder.modules())


def test_bad_arguments(tiny: Pretrained, task) -> None:
    with pytest.raises(TaskArithError):
        compute_kfac_factors(tiny, task, num_examples=0, progress=False)
    with pytest.raises(TaskArithError):
        compute_kfac_factors(tiny, task, mc_samples=0, progress=False)
    with pytest.raises(TaskArithError):
        compute_kfac_factors(tiny, task, split="nope", progress=False)


# ---- files -------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tmp_path: Path, exact_factors: KFACFactors) -> None:
    path = tmp_path / "factors.safetensors"
    exact_factors.save(path)
    loaded = KFACFactors.load(path)
    assert (loaded.tasks, loaded.base_hash, loaded.num_examples, loaded.directions) == (
        exact_factors.tasks, exact_factors.base_hash, exact_factors.num_examples, exact_factors.directions)
    for field in ("A", "S", "diag", "rows"):
        mine, theirs = getattr(exact_factors, field), getattr(loaded, field)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine)
    assert loaded.memory_bytes() == exact_factors.memory_bytes()


def test_memory_bytes_per_layer(exact_factors: KFACFactors) -> None:
    sizes = exact_factors.memory_bytes()
    query = "encoder.layer.0.attention.self.query"
    assert sizes[query] == 4 * (33 * 33 + 32 * 32)  # hidden 32, plus the bias input
    rows = exact_factors.rows["embeddings.word_embeddings.weight"]
    assert sizes["embeddings.word_embeddings.weight"] == 4 * rows.numel() * 32 + 8 * rows.numel()


def test_loading_other_files_fails_clearly(tmp_path: Path, exact_factors: KFACFactors) -> None:
    other = tmp_path / "task_vector.safetensors"
    save_tensors(other, {"w": torch.ones(2)}, {"format": "taskarith.task_vector/1"})
    with pytest.raises(TaskArithError, match="task_vector.safetensors.*not a K-FAC factor file"):
        KFACFactors.load(other)
    with pytest.raises(TaskArithError, match="missing.safetensors"):
        KFACFactors.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(TaskArithError, match="garbage.safetensors"):
        KFACFactors.load(garbage)
    unpaired = tmp_path / "unpaired.safetensors"
    save_tensors(unpaired, {"A/x": torch.eye(2)}, {"format": FORMAT, "tasks": "[]", "base_hash": "h", "num_examples": "1"})
    with pytest.raises(TaskArithError, match="unpaired.safetensors.*A and S"):
        KFACFactors.load(unpaired)
    no_meta = tmp_path / "no_meta.safetensors"
    save_tensors(no_meta, {"A/x": torch.eye(2), "S/x": torch.eye(2)}, {"format": FORMAT})
    with pytest.raises(TaskArithError, match="no_meta.safetensors.*metadata"):
        KFACFactors.load(no_meta)


# ---- merging -----------------------------------------------------------------------------------


def test_merge_is_kfac_of_the_pooled_examples(tiny: Pretrained, task) -> None:
    texts = list(task.train.inputs)
    first, second = texts[:12], texts[12:32]
    a = factors_from_texts(tiny, first, tasks=("a",), mc_samples=None)
    b = factors_from_texts(tiny, second, tasks=("b",), mc_samples=None)
    pooled = factors_from_texts(tiny, first + second, tasks=("a", "b"), mc_samples=None)
    merged = merge_factors([a, b])
    assert merged.tasks == ("a", "b") and merged.num_examples == 32
    for layer in pooled.A:
        torch.testing.assert_close(merged.A[layer], pooled.A[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.S[layer], pooled.S[layer], rtol=1e-5, atol=1e-6)
    for name in pooled.diag:
        torch.testing.assert_close(merged.diag[name], pooled.diag[name], rtol=1e-5, atol=1e-7)
        if name in pooled.rows:
            assert torch.equal(merged.rows[name], pooled.rows[name])
    # Constant cost: the merged factors are exactly as large as one task's.
    assert merged.memory_bytes().keys() == a.memory_bytes().keys()
    assert sum(merged.memory_bytes().values()) <= sum(a.memory_bytes().values()) + sum(b.memory_bytes().values())
    for layer in a.A:
        assert merged.A[layer].shape == a.A[layer].shape and merged.S[layer].shape == a.S[layer].shape
    # Associative, and a single set merges to itself.
    c = factors_from_texts(tiny, texts[32:40], tasks=("c",), mc_samples=None)
    nested, flat_merge = merge_factors([merge_factors([a, b]), c]), merge_factors([a, b, c])
    for layer in flat_merge.A:
        torch.testing.assert_close(nested.S[layer], flat_merge.S[layer])
    assert merge_factors([a]) is a
    # Never ignores a task: the merged form bounds sum_t w_t^2 * penalty_t from above.
    for seed in range(3):
        delta = random_delta(tiny, seed)
        bound = (12 / 32) ** 2 * kfac_penalty(delta, a) + (20 / 32) ** 2 * kfac_penalty(delta, b)
        assert kfac_penalty(delta, merged).item() >= bound.item() * (1 - 1e-5)
        # Identical tasks merge without loss.
        assert kfac_penalty(delta, merge_factors([a, a])).item() == pytest.approx(kfac_penalty(delta, a).item(), rel=1e-5)


def test_merge_refuses_mixed_base_models(exact_factors: KFACFactors) -> None:
    other = dataclasses.replace(exact_factors, base_hash="0123456789abcdef")
    with pytest.raises(TaskArithError, match="different base models"):
        merge_factors([exact_factors, other])
    with pytest.raises(TaskArithError):
        merge_factors([])
    fewer = dataclasses.replace(exact_factors, A=dict(list(exact_factors.A.items())[1:]),
                                S=dict(list(exact_factors.S.items())[1:]))
    with pytest.raises(TaskArithError, match="other layers"):
        merge_factors([exact_factors, fewer])


def test_to_device_keeps_values(exact_factors: KFACFactors) -> None:
    moved = exact_factors.to("cpu")
    delta = {"encoder.layer.0.attention.self.query.weight": torch.ones(32, 32)}
    assert kfac_penalty(delta, moved).item() == kfac_penalty(delta, exact_factors).item()


# ---- image encoders: Conv2d, depthwise Conv2d, BatchNorm -----------------------------------------


class ImageEncoder(nn.Module):
    """The image-encoder interface: pixels -> one token, the pooled embedding, with an all-ones mask."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.body(pixel_values).unsqueeze(1))


class SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class StaticSamePadConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: nothing declared, ``static_padding`` applied in forward
    (here one TF-style "same" padding would not choose, so the test sees that it is read)."""

    def __init__(self, *args, pad: tuple[int, int, int, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


class DynamicSamePadConv(nn.Conv2d):
    """Like timm's Conv2dSame: TF-style 'same' padding computed in forward, nothing declared."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return super().forward(F.pad(x, [*pads[1], *pads[0]]))


def tiny_conv_net() -> nn.Module:
    """Conv 3->4 k3 + BatchNorm (eval, non-trivial statistics) + ReLU + depthwise conv + pooling + Linear."""
    torch.manual_seed(0)
    body = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, padding=1),
        bn=nn.BatchNorm2d(4),
        # In place on purpose: the BatchNorm's output gradient must be the one before the activation.
        act=nn.ReLU(inplace=True),
        depthwise=nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        proj=nn.Linear(4, 5),
    ))
    with torch.no_grad():
        body.bn.running_mean.normal_()
        body.bn.running_var.uniform_(0.5, 2.0)
        body.bn.weight.uniform_(0.5, 1.5)
        body.bn.bias.normal_()
    return ImageEncoder(body)


class ImageModel:
    """Duck-typed Pretrained for images: factors_from_texts needs only ``encoder`` and ``batches``."""

    def __init__(self, encoder: nn.Module, base_hash: str = "images") -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.base_hash = base_hash

    def batches(self, images: list[torch.Tensor], batch_size: int):
        for start in range(0, len(images), batch_size):
            chunk = torch.stack(images[start : start + batch_size])
            yield (torch.arange(start, start + len(chunk)),
                   {"pixel_values": chunk, "attention_mask": torch.ones(len(chunk), 1, dtype=torch.long)})


def random_images(count: int, seed: int = 0, size: int = 7) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randn(count, 3, size, size, generator=generator).unbind(0))


@pytest.fixture(scope="module")
def conv_model() -> ImageModel:
    return ImageModel(tiny_conv_net())


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return random_images(12)


@pytest.fixture(scope="module")
def conv_factors(conv_model: ImageModel, images: list[torch.Tensor]) -> KFACFactors:
    return factors_from_texts(conv_model, images, tasks=("img",), batch_size=5, mc_samples=None)


def test_batch_norm_diagonal_matches_brute_force(conv_model: ImageModel, images: list[torch.Tensor],
                                                 conv_factors: KFACFactors) -> None:
    G, layout = gauss_newton(conv_model, images)
    offsets, start = {}, 0
    for name, shape in layout:
        offsets[name] = (start, start + shape.numel())
        start += shape.numel()
    for name in ("body.bn.weight", "body.bn.bias"):
        lo, hi = offsets[name]
        torch.testing.assert_close(conv_factors.diag[name].double(), G.diagonal()[lo:hi], rtol=1e-4, atol=1e-8)
        # As a penalty too: a delta on one BatchNorm parameter.
        delta = random_delta(conv_model, 0, keep=lambda _: False)
        delta[name][2] = 0.3
        x = flat(delta, layout)
        assert kfac_penalty(delta, conv_factors).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)


class Rows(nn.Module):
    """(batch, channels, height, width) -> (batch, channels, height * width): a BatchNorm1d sequence input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)


class LastMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=-1)


@pytest.mark.parametrize("sequence", [False, True], ids=["batch-channels", "batch-channels-length"])
def test_batch_norm_1d_diagonal_matches_brute_force(sequence: bool, images: list[torch.Tensor]) -> None:
    torch.manual_seed(3)
    norm = nn.BatchNorm1d(4)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    # A nonlinearity after the norm, so its parameters' per-example gradients are not just linear in x_hat.
    layers = [nn.Conv2d(3, 4, 3), Rows(), norm, nn.Tanh(), LastMean()] if sequence else [
        nn.Conv2d(3, 4, 3), SpatialMean(), norm, nn.Tanh()]
    model = ImageModel(ImageEncoder(nn.Sequential(*layers)))
    factors = factors_from_texts(model, images, tasks=("t",), batch_size=5, mc_samples=None)
    G, layout = gauss_newton(model, images)
    names = [name for name, _ in layout]
    for name in ("body.2.weight", "body.2.bias"):
        start = sum(shape.numel() for _, shape in layout[: names.index(name)])
        torch.testing.assert_close(factors.diag[name].double(), G.diagonal()[start : start + 4], rtol=1e-4, atol=1e-8)


def test_conv_covers_every_layer_kind(conv_factors: KFACFactors) -> None:
    assert set(conv_factors.A) == {"body.conv", "body.depthwise", "body.proj"}
    assert conv_factors.A["body.conv"].shape == (3 * 9 + 1, 3 * 9 + 1) and conv_factors.S["body.conv"].shape == (4, 4)
    # Depthwise: one (9 taps + bias) block and one 1 x 1 output block per channel.
    assert conv_factors.A["body.depthwise"].shape == (4, 10, 10) and conv_factors.S["body.depthwise"].shape == (4, 1, 1)
    assert set(conv_factors.diag) == {"body.bn.weight", "body.bn.bias"} and not conv_factors.rows
    sizes = conv_factors.memory_bytes()
    assert sizes["body.depthwise"] == 4 * (4 * 10 * 10 + 4 * 1 * 1)
    assert sizes["body.bn.weight"] == 4 * 4


@pytest.mark.parametrize("conv", [
    pytest.param(lambda: nn.Conv2d(3, 5, 3, padding=1), id="k3-pad1"),
    pytest.param(lambda: nn.Conv2d(3, 5, 3, stride=2, bias=False), id="k3-stride2-nobias"),
    pytest.param(lambda: nn.Conv2d(3, 4, (4, 2), padding="same"), id="same-even-kernel"),  # padding (1, 2), (0, 1)
    pytest.param(lambda: nn.Conv2d(3, 4, 3, padding=1, dilation=2), id="dilated"),
    pytest.param(lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), id="reflect"),
    pytest.param(lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3), id="grouped-multiplier2"),
    pytest.param(lambda: nn.Conv2d(3, 3, 5, padding=2, groups=3), id="depthwise"),
    pytest.param(lambda: nn.Conv2d(3, 4, 2, stride=2), id="patch-embedding"),
    pytest.param(lambda: StaticSamePadConv(3, 4, 3, stride=2, pad=(2, 0, 2, 0)), id="static-padding"),
    pytest.param(lambda: DynamicSamePadConv(3, 4, 5, stride=2, groups=1), id="dynamic-same"),
])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_block_is_exact_before_mean_pooling(conv, images: list[torch.Tensor]) -> None:
    torch.manual_seed(1)
    model = ImageModel(ImageEncoder(nn.Sequential(OrderedDict(conv=conv(), pool=SpatialMean()))))
    factors = factors_from_texts(model, images, tasks=("t",), batch_size=5, mc_samples=None)
    G, layout = gauss_newton(model, images)
    for seed in range(3):
        delta = random_delta(model, seed)
        x = flat(delta, layout)
        assert kfac_penalty(delta, factors).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)
    # A bias-only (or weight-only) delta is exact too: the missing part is zero.
    part = {name: value for name, value in delta.items() if name.endswith("bias")}
    part = part or {"body.conv.weight": delta["body.conv.weight"]}
    x = flat({**random_delta(model, 0, keep=lambda _: False), **part}, layout)
    assert kfac_penalty(part, factors).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)


def test_conv_factors_save_load_and_merge(tmp_path: Path, conv_model: ImageModel, images: list[torch.Tensor],
                                          conv_factors: KFACFactors) -> None:
    path = tmp_path / "conv.safetensors"
    conv_factors.save(path)
    loaded = KFACFactors.load(path)
    for field in ("A", "S", "diag", "rows"):
        mine, theirs = getattr(conv_factors, field), getattr(loaded, field)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.memory_bytes() == conv_factors.memory_bytes()
    first = factors_from_texts(conv_model, images[:4], tasks=("a",), batch_size=5, mc_samples=None)
    second = factors_from_texts(conv_model, images[4:], tasks=("b",), batch_size=5, mc_samples=None)
    merged = merge_factors([first, second])
    assert merged.tasks == ("a", "b") and merged.num_examples == len(images)
    for layer in conv_factors.A:
        torch.testing.assert_close(merged.A[layer], conv_factors.A[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.S[layer], conv_factors.S[layer], rtol=1e-5, atol=1e-6)
    for name in conv_factors.diag:
        torch.testing.assert_close(merged.diag[name], conv_factors.diag[name], rtol=1e-5, atol=1e-7)
    # Merged factors of a conv net save and load like any other.
    merged.save(tmp_path / "merged.safetensors")
    again = KFACFactors.load(tmp_path / "merged.safetensors")
    delta = random_delta(conv_model, 5)
    assert kfac_penalty(delta, again).item() == pytest.approx(kfac_penalty(delta, merged).item(), rel=1e-6)


def test_conv_penalty_is_positive_with_gradients(conv_model: ImageModel, conv_factors: KFACFactors) -> None:
    delta = {name: value.requires_grad_(True) for name, value in random_delta(conv_model, 3).items()}
    penalty = kfac_penalty(delta, conv_factors)
    assert penalty.dim() == 0 and torch.isfinite(penalty) and penalty.item() > 0
    penalty.backward()
    for name in ("body.conv.weight", "body.conv.bias", "body.bn.weight", "body.bn.bias", "body.depthwise.weight",
                 "body.depthwise.bias", "body.proj.weight"):
        assert delta[name].grad is not None and delta[name].grad.abs().sum() > 0, name
    # Monte Carlo directions, the default, estimate the same quantity.
    sampled = factors_from_texts(conv_model, random_images(12), tasks=("img",), batch_size=5, mc_samples=64)
    value = kfac_penalty({k: v.detach() for k, v in delta.items()}, sampled).item()
    assert value == pytest.approx(penalty.item(), rel=0.3)


def test_conv_shapes_are_refused(conv_factors: KFACFactors) -> None:
    with pytest.raises(TaskArithError, match="body.depthwise.weight"):
        kfac_penalty({"body.depthwise.weight": torch.ones(4, 1, 5, 5)}, conv_factors)
    with pytest.raises(TaskArithError, match="body.conv.weight"):
        kfac_penalty({"body.conv.weight": torch.ones(4, 2, 3, 3)}, conv_factors)
    with pytest.raises(TaskArithError, match="body.depthwise.bias"):
        kfac_penalty({"body.depthwise.bias": torch.ones(5)}, conv_factors)
    with pytest.raises(TaskArithError, match="layer 'body.depthwise'"):
        dataclasses.replace(conv_factors, S={**conv_factors.S, "body.depthwise": torch.ones(4, 1)})


def test_first_conv_is_a_root_even_before_an_inplace_activation(images: list[torch.Tensor]) -> None:
    torch.manual_seed(2)
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1), SpatialMean())
    model = ImageModel(ImageEncoder(body))
    factors = factors_from_texts(model, images, tasks=("t",), batch_size=6, mc_samples=2)
    assert set(factors.A) == {"body.0", "body.2"}
    assert all(not m._forward_hooks for m in model.encoder.modules())


def test_encoders_without_supported_layers_are_refused(images: list[torch.Tensor]) -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)) * self.scale

    with pytest.raises(TaskArithError, match="at least one supported layer"):
        factors_from_texts(ImageModel(ImageEncoder(Scale())), images, tasks=("t",))
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), SpatialMean())
    with pytest.raises(TaskArithError, match="BatchNorm layer 'body.1'.*running statistics"):
        factors_from_texts(ImageModel(ImageEncoder(no_stats)), images, tasks=("t",))


class Features(nn.Module):
    def __init__(self, backbone: nn.Module, features) -> None:
        super().__init__()
        self.backbone = backbone
        self.features = features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(self.backbone, pixel_values)


def uncovered(model: ImageModel, factors: KFACFactors) -> list[str]:
    covered = set(factors.diag) | {f"{layer}.{part}" for layer in factors.A for part in ("weight", "bias")}
    return [name for name, _ in model.encoder.named_parameters() if name not in covered]


def test_efficientnet_lite0_is_fully_covered() -> None:
    """The real backbone (random weights): static-same-padded convs, depthwise convs and BatchNorms all get factors."""
    EfficientNet = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    torch.manual_seed(0)
    backbone = EfficientNet.from_name("efficientnet-lite0", image_size=32)
    del backbone._fc, backbone._dropout
    model = ImageModel(ImageEncoder(Features(backbone, lambda b, x: b.extract_features(x).mean(dim=(2, 3)))))
    factors = factors_from_texts(model, random_images(4, size=32), tasks=("t",), batch_size=4, mc_samples=1)
    assert uncovered(model, factors) == []
    depthwise = "body.backbone._blocks.15._depthwise_conv"  # 1152 channels, 3 x 3, no bias
    assert factors.A[depthwise].shape == (1152, 9, 9) and factors.S[depthwise].shape == (1152, 1, 1)
    delta = {name: torch.randn(p.shape) * 1e-3 for name, p in model.encoder.named_parameters()}
    assert 0 < kfac_penalty(delta, factors).item() < float("inf")


def test_clip_vision_tower_patch_embedding_is_a_root() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                              num_attention_heads=4, image_size=16, patch_size=4)
    model = ImageModel(ImageEncoder(Features(CLIPVisionModelWithProjection(config),
                                             lambda m, x: m(pixel_values=x).image_embeds)))
    factors = factors_from_texts(model, random_images(4, size=16), tasks=("t",), batch_size=4, mc_samples=1)
    patches = "body.backbone.vision_model.embeddings.patch_embedding"
    assert factors.A[patches].shape == (3 * 4 * 4, 3 * 4 * 4) and factors.S[patches].shape == (32, 32)
    # Only the class token, a bare nn.Parameter, has no factor.
    assert uncovered(model, factors) == ["body.backbone.vision_model.embeddings.class_embedding"]
