"""Dataless K-FAC regularizer (TAK as published): exactness against brute force where each approximation is
exact, coverage of attention / class token / projection, Eq. 8 merging, files, compression, penalty scalers."""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from transformers.modeling_outputs import BaseModelOutput

from taskarith.errors import TaskArithError
from taskarith.io import save_tensors
from taskarith.kfac import (
    FORMAT,
    BlockDiagonal,
    KFACFactors,
    LowRank,
    _explicit_attention,
    compress_factors,
    compute_kfac_factors,
    factors_from_texts,
    kfac_penalty,
    merge_factors,
    uncovered_parameters,
)
from taskarith.linearize import hidden_and_tangent
from taskarith.models import Pretrained, load_pretrained
from taskarith.models.clip import OpenClipImageEncoder
from taskarith.models.zero_shot import mean_pool
from taskarith.regularizers import PenaltyInputs, get_regularizer, pooled_tangents

# taskarith's form before TAK was adopted: the unnormalized embedding, KFAC-reduce, diagonal LayerNorm blocks
# (and, at the penalty, no scalers). Exactness tests against the brute-force Gauss-Newton matrix of the
# unnormalized output use it where reduce is the exact rule.
LEGACY = dict(function="unnormalized", tokens="reduce", norm_blocks="diagonal")
PLAIN = dict(norm_scale=1.0, projection_scale=1.0)


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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: torch.Tensor
    ) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.proj(self.norm(self.embed(input_ids))))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Pretrained:
    return load_pretrained(tiny_model_dir, max_length=16, device="cpu")


@pytest.fixture(scope="module")
def one_layer(tiny: Pretrained) -> Pretrained:
    return Pretrained(name="one-layer", encoder=OneLayer(len(tiny.tokenizer)), tokenizer=tiny.tokenizer, max_length=16)


@pytest.fixture(scope="module")
def texts(task) -> list[str]:
    return list(task.train.inputs[:24])


@pytest.fixture(scope="module")
def exact_factors(tiny: Pretrained, task) -> KFACFactors:
    return compute_kfac_factors(tiny, task, num_examples=32, mc_samples=None, progress=False)


def gauss_newton(
    pretrained, inputs: list, normalized: bool = False
) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    """Brute force: the full matrix E_x[J^T J] of the pooled (optionally L2-normalized) output w.r.t. all
    parameters, from jacrev."""
    encoder = pretrained.encoder
    params = {name: p.detach() for name, p in encoder.named_parameters()}
    layout = [(name, p.shape) for name, p in params.items()]
    total, count = None, 0
    for _, batch in pretrained.batches(inputs, 8):

        def pooled(p: dict[str, torch.Tensor], batch: dict = batch) -> torch.Tensor:
            out = mean_pool(functional_call(encoder, p, kwargs=batch).last_hidden_state, batch["attention_mask"])
            return F.normalize(out, dim=-1) if normalized else out

        jac = jacrev(pooled)(params)
        J = torch.cat([jac[name].reshape(*jac[name].shape[:2], -1) for name, _ in layout], dim=2).double()
        gram = torch.einsum("bhp,bhq->pq", J, J)
        total = gram if total is None else total + gram
        count += J.shape[0]
    return total / count, layout


def span(layout: list[tuple[str, torch.Size]], name: str) -> slice:
    start = 0
    for other, shape in layout:
        if other == name:
            return slice(start, start + shape.numel())
        start += shape.numel()
    raise KeyError(name)


def flat(delta: dict[str, torch.Tensor], layout: list[tuple[str, torch.Size]]) -> torch.Tensor:
    return torch.cat([delta[name].reshape(-1) for name, _ in layout]).double()


def exact_interference(pretrained: Pretrained, texts: list[str], delta: dict[str, torch.Tensor]) -> float:
    """tau-Jp measured directly: E_x ||J f(x) . delta||^2 over ``texts`` (JVPs, as the fine-tuning loop does)."""
    theta0 = dict(pretrained.encoder.named_parameters())
    total, count = 0.0, 0
    for _, batch in pretrained.batches(texts, 16):
        _, tangent = hidden_and_tangent(pretrained.encoder, theta0, delta, batch)
        tangents = pooled_tangents(tangent, batch["attention_mask"])
        total += tangents.pow(2).sum().item()
        count += tangents.shape[0]
    return total / count


def random_delta(pretrained, seed: int, keep=lambda name: True, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(p.shape, generator=generator) * scale if keep(name) else torch.zeros(p.shape))
        for name, p in pretrained.encoder.named_parameters()
    }


class Tokens:
    """Duck-typed Pretrained for hand-made token batches: each input is (input_ids, attention_mask)."""

    def __init__(self, encoder: nn.Module, base_hash: str = "tokens") -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.base_hash = base_hash

    def batches(self, items: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield (
                torch.arange(start, start + len(chunk)),
                {
                    "input_ids": torch.stack([ids for ids, _ in chunk]),
                    "attention_mask": torch.stack([mask for _, mask in chunk]),
                },
            )


def token_items(count: int, length: int, vocab: int, real: list[int] | None = None, seed: int = 0):
    """Random ids with ``real[i]`` real tokens in example i (the rest padding, with random ids too)."""
    generator = torch.Generator().manual_seed(seed)
    real = real or [int(torch.randint(1, length + 1, (1,), generator=generator)) for _ in range(count)]
    items = []
    for n in real:
        ids = torch.randint(vocab, (length,), generator=generator)
        items.append((ids, (torch.arange(length) < n).long()))
    return items


# ---- exactness ---------------------------------------------------------------------------------


def test_reduce_is_exact_for_a_linear_layer_before_mean_pooling(one_layer: Pretrained, texts: list[str]) -> None:
    factors = factors_from_texts(one_layer, texts, task="t", batch_size=8, mc_samples=None, **LEGACY)
    G, layout = gauss_newton(one_layer, texts)
    for seed in range(3):
        delta = random_delta(one_layer, seed, keep=lambda name: name.startswith("proj."))
        x = flat(delta, layout)
        exact = (x @ G @ x).item()
        assert kfac_penalty(delta, factors).item() == pytest.approx(exact, rel=1e-4)
        # The same quantity the squared tau-Jp regularizer measures, by JVPs.
        assert exact_interference(one_layer, texts, delta) == pytest.approx(exact, rel=1e-4)


def test_normalized_function_is_exact_for_one_example(one_layer: Pretrained, texts: list[str]) -> None:
    """f / ||f||: its Jacobian (I - f^ f^T) J / ||f|| depends on the example, so K-FAC is exact for one."""
    G, layout = gauss_newton(one_layer, texts[:1], normalized=True)
    unnormalized, _ = gauss_newton(one_layer, texts[:1])
    for tokens in ("reduce", "expand"):
        factors = factors_from_texts(one_layer, texts[:1], task="t", mc_samples=None, tokens=tokens)
        assert factors.function == "normalized" and factors.tokens == tokens
        delta = random_delta(one_layer, 0, keep=lambda name: name.startswith("proj."))
        x = flat(delta, layout)
        if tokens == "reduce":
            assert kfac_penalty(delta, factors).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)
        # The normalized form differs from the unnormalized one (it ignores radial changes).
        assert (x @ G @ x).item() != pytest.approx((x @ unnormalized @ x).item(), rel=1e-2)


def test_expand_is_exact_with_one_real_token_per_example(one_layer: Pretrained) -> None:
    """KFAC-expand's exact case: one (real) token per example; padding tokens must be left out."""
    model = Tokens(one_layer.encoder)
    items = token_items(12, 5, 30, real=[1] * 12)
    factors = factors_from_texts(model, items, task="t", batch_size=5, mc_samples=None, function="unnormalized")
    G, layout = gauss_newton(model, items)
    for seed in range(3):
        delta = random_delta(model, seed, keep=lambda name: name.startswith("proj."))
        x = flat(delta, layout)
        assert kfac_penalty(delta, factors).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)


def test_expand_factors_are_tak_token_means_over_real_tokens(one_layer: Pretrained) -> None:
    """mammoth's hooks: A = E_n[(1/R_n) sum_r a a^T], S = E_n[(1/R_n) sum_r g g^T] over example n's R_n real
    tokens, g the gradient of the normalized output at token r (every direction), by brute force."""
    encoder = one_layer.encoder
    model = Tokens(encoder)
    items = token_items(10, 6, 30, seed=3)
    factors = factors_from_texts(model, items, task="t", batch_size=4, mc_samples=None)
    A, S = torch.zeros(9, 9, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
    for ids, mask in items:
        a = encoder.norm(encoder.embed(ids)).double()  # (tokens, 8): the Linear's inputs
        a = torch.cat([a, torch.ones(len(ids), 1, dtype=torch.float64)], dim=1)

        def output(z: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            return F.normalize(mean_pool(z.unsqueeze(0), mask.unsqueeze(0)), dim=-1)[0]

        z = encoder.proj(encoder.norm(encoder.embed(ids))).double()
        g = jacrev(output)(z)  # (out direction k, token r, unit j)
        real = mask.bool()
        A += a[real].T @ a[real] / real.sum()
        S += torch.einsum("krj,kri->ji", g[:, real], g[:, real]) / real.sum()
    torch.testing.assert_close(factors.A["proj"].double(), A / len(items), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(factors.S["proj"].double(), S / len(items), rtol=1e-4, atol=1e-7)
    reduce = factors_from_texts(model, items, task="t", batch_size=4, mc_samples=None, tokens="reduce")
    assert not torch.allclose(reduce.A["proj"], factors.A["proj"])


@pytest.mark.parametrize("normalized", [False, True], ids=["unnormalized", "normalized"])
def test_layer_norm_full_blocks_match_brute_force(one_layer: Pretrained, texts: list[str], normalized: bool) -> None:
    function = "normalized" if normalized else "unnormalized"
    factors = factors_from_texts(one_layer, texts, task="t", batch_size=8, mc_samples=None, function=function)
    G, layout = gauss_newton(one_layer, texts, normalized=normalized)
    # Two blocks, as mammoth's ffT: weight and bias, each the full per-example gradient Gram matrix.
    assert set(factors.gram) == {"norm.weight", "norm.bias"} and "norm.weight" not in factors.diag
    for name in ("norm.weight", "norm.bias"):
        where = span(layout, name)
        torch.testing.assert_close(factors.gram[name].double(), G[where, where], rtol=1e-4, atol=1e-9)
        assert factors.kinds[name] == "layer-norm"
        delta = random_delta(one_layer, 1, keep=lambda n, name=name: n == name)
        x = flat(delta, layout)
        assert kfac_penalty(delta, factors, **PLAIN).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)
        # TAK's x10 on LayerNorm blocks.
        assert kfac_penalty(delta, factors).item() == pytest.approx(10 * (x @ G @ x).item(), rel=1e-4)


@pytest.mark.parametrize("name, index", [("norm.weight", (3,)), ("norm.bias", (5,)), ("embed.weight", None)])
def test_diagonal_entries_match_brute_force(one_layer: Pretrained, texts: list[str], name: str, index) -> None:
    factors = factors_from_texts(one_layer, texts, task="t", batch_size=8, mc_samples=None, **LEGACY)
    G, layout = gauss_newton(one_layer, texts)
    delta = random_delta(one_layer, 0, keep=lambda _: False)
    if index is None:  # an embedding row the task uses: the first token of the first text
        row = one_layer.tokenize(texts[:1])["input_ids"][0, 1].item()
        index = (row, 2)
        assert row in factors.rows[name].tolist()
    delta[name][index] = 0.3
    x = flat(delta, layout)
    assert kfac_penalty(delta, factors, **PLAIN).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)


def test_monte_carlo_directions_approximate_exact(one_layer: Pretrained, texts: list[str]) -> None:
    exact = factors_from_texts(one_layer, texts, task="t", batch_size=8, mc_samples=None)
    sampled = factors_from_texts(one_layer, texts, task="t", batch_size=8, mc_samples=32, seed=1)
    assert sampled.directions == "mc:32" and exact.directions == "exact"
    for seed in range(3):
        delta = random_delta(one_layer, seed)
        assert kfac_penalty(delta, sampled).item() == pytest.approx(kfac_penalty(delta, exact).item(), rel=0.25)


def test_legacy_penalty_tracks_taujp_on_tiny_bert(tiny: Pretrained, task) -> None:
    """Kept from before TAK: the legacy recipe (unnormalized, reduce, diagonal, no scalers) is close to the
    squared tau-Jp of the unnormalized embedding; the published form is not meant to be (other function,
    expand's 1/R scale, x10 / x0.1 scalers)."""
    texts = list(task.train.inputs)
    legacy = compute_kfac_factors(tiny, task, num_examples=32, mc_samples=None, progress=False, **LEGACY)
    # Ratios observed: about 0.8-1.1 (block-diagonal K-FAC-reduce against the exact JVPs).
    ratios = []
    for seed, keep in ((0, lambda n: True), (1, lambda n: True), (2, lambda n: n.startswith("encoder.layer"))):
        delta = random_delta(tiny, seed, keep=keep)
        ratios.append(kfac_penalty(delta, legacy, **PLAIN).item() / exact_interference(tiny, texts, delta))
    print("legacy kfac / taujp ratios:", [round(r, 3) for r in ratios])
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
    for name in (
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.output.dense.bias",
        "encoder.layer.0.output.LayerNorm.weight",
        "embeddings.word_embeddings.weight",
    ):
        assert delta[name].grad is not None and delta[name].grad.abs().sum() > 0, name
    # The pooler never reaches the mean-pooled token states: no factors, no penalty, zero curvature.
    assert "pooler.dense" not in exact_factors.A
    assert delta["pooler.dense.weight"].grad is None
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(exact_factors.zero)
    assert uncovered_parameters(tiny.encoder, exact_factors) == []
    # Every Linear layer: a weight-only or bias-only delta counts too.
    layer = "encoder.layer.0.intermediate.dense"
    assert kfac_penalty({f"{layer}.bias": torch.ones(exact_factors.S[layer].shape[0])}, exact_factors).item() > 0


def test_scalers_apply_to_norm_and_projection_blocks_only(tiny: Pretrained, exact_factors: KFACFactors) -> None:
    delta = random_delta(tiny, 5)
    norms = {k: v for k, v in delta.items() if "LayerNorm" in k}
    others = {k: v for k, v in delta.items() if "LayerNorm" not in k}
    plain_norms = kfac_penalty(norms, exact_factors, **PLAIN).item()
    assert kfac_penalty(norms, exact_factors).item() == pytest.approx(10 * plain_norms, rel=1e-6)
    assert kfac_penalty(norms, exact_factors, norm_scale=3.0).item() == pytest.approx(3 * plain_norms, rel=1e-6)
    # A text encoder has no projection: nothing else is scaled.
    assert kfac_penalty(others, exact_factors).item() == pytest.approx(
        kfac_penalty(others, exact_factors, **PLAIN).item()
    )
    assert "projection" not in exact_factors.kinds.values()


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
    with pytest.raises(TaskArithError, match="LayerNorm.weight"):
        kfac_penalty({"embeddings.LayerNorm.weight": torch.ones(5)}, exact_factors)


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
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.encoder.modules())


def test_defaults_are_tak_s(tiny: Pretrained, task) -> None:
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(compute_kfac_factors).parameters.items()}
    assert defaults["num_examples"] == 128 and defaults["mc_samples"] == 1
    factors = compute_kfac_factors(tiny, task, num_examples=8, progress=False)
    assert (factors.function, factors.tokens, factors.conv, factors.norm_blocks, factors.merge) == (
        "normalized",
        "expand",
        "reduce",
        "full",
        "none",
    )
    assert factors.directions == "mc:1" and factors.examples == {task.name: 8}


def test_bad_arguments(tiny: Pretrained, task) -> None:
    with pytest.raises(TaskArithError):
        compute_kfac_factors(tiny, task, num_examples=0, progress=False)
    with pytest.raises(TaskArithError):
        compute_kfac_factors(tiny, task, mc_samples=0, progress=False)
    with pytest.raises(TaskArithError):
        compute_kfac_factors(tiny, task, split="nope", progress=False)
    with pytest.raises(TaskArithError, match="tokens='sum'"):
        compute_kfac_factors(tiny, task, tokens="sum", progress=False)
    with pytest.raises(TaskArithError, match="function"):
        compute_kfac_factors(tiny, task, function="cosine", progress=False)


# ---- files -------------------------------------------------------------------------------------


def assert_same_factors(mine: KFACFactors, theirs: KFACFactors) -> None:
    for name in (
        "examples",
        "sampling",
        "base_hash",
        "layers",
        "kinds",
        "zero",
        "function",
        "tokens",
        "conv",
        "norm_blocks",
        "merge",
        "compression",
    ):
        assert getattr(mine, name) == getattr(theirs, name), name
    for table in ("A", "S", "gram", "diag", "rows"):
        a, b = getattr(mine, table), getattr(theirs, table)
        assert a.keys() == b.keys(), table
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, (table, key)
            else:
                assert type(a[key]) is type(b[key])
                assert torch.equal(a[key].dense(), b[key].dense()), (table, key)
    assert mine.memory_bytes() == theirs.memory_bytes()


def test_save_load_round_trip_is_bit_exact(tmp_path: Path, exact_factors: KFACFactors) -> None:
    path = tmp_path / "factors.safetensors"
    exact_factors.save(path)
    assert_same_factors(exact_factors, KFACFactors.load(path))


def test_memory_bytes_per_layer(exact_factors: KFACFactors) -> None:
    sizes = exact_factors.memory_bytes()
    query = "encoder.layer.0.attention.self.query"
    assert sizes[query] == 4 * (33 * 33 + 32 * 32)  # hidden 32, plus the bias input
    assert sizes["encoder.layer.0.output.LayerNorm.weight"] == 4 * 32 * 32  # a full Gram block
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
    metadata = {
        "format": FORMAT,
        "tasks": '["t"]',
        "examples": '{"t": 1}',
        "base_hash": "h",
        "function": "normalized",
        "tokens": "expand",
        "conv": "reduce",
        "norm_blocks": "full",
        "merge": "none",
    }
    unpaired = tmp_path / "unpaired.safetensors"
    save_tensors(unpaired, {"A/x": torch.eye(2)}, metadata)
    with pytest.raises(TaskArithError, match="unpaired.safetensors.*A and S"):
        KFACFactors.load(unpaired)
    no_meta = tmp_path / "no_meta.safetensors"
    save_tensors(no_meta, {"A/x": torch.eye(2), "S/x": torch.eye(2)}, {"format": FORMAT})
    with pytest.raises(TaskArithError, match="no_meta.safetensors.*metadata"):
        KFACFactors.load(no_meta)


def test_version_1_files_are_refused_with_one_line(tmp_path: Path) -> None:
    """Files made before TAK's published form (unnormalized, reduce, diagonal, averaged) are never misread."""
    old = tmp_path / "old.safetensors"
    save_tensors(
        old,
        {"A/x": torch.eye(2), "S/x": torch.eye(2)},
        {
            "format": "taskarith.kfac/1",
            "variant": "kfac-reduce",
            "tasks": '["t"]',
            "base_hash": "h",
            "num_examples": "4",
        },
    )
    with pytest.raises(TaskArithError) as error:
        KFACFactors.load(old)
    message = str(error.value)
    assert "old.safetensors" in message and "taskarith.kfac/1" in message and "recompute" in message
    assert "\n" not in message


# ---- merging (Eq. 8) ---------------------------------------------------------------------------


def hand_built(task: str, n: int, seed: int, **options) -> KFACFactors:
    """One Linear layer 'l' (3 inputs + bias, 2 outputs), a full block 'g' (4) and a diagonal 'd' (3)."""
    generator = torch.Generator().manual_seed(seed)

    def psd(size: int) -> torch.Tensor:
        m = torch.randn(size, size, generator=generator)
        return m @ m.T / size

    return KFACFactors(
        A={"l": psd(4)},
        S={"l": psd(2)},
        gram={"g.weight": psd(4)},
        diag={"d.weight": torch.rand(3, generator=generator)},
        examples={task: n},
        sampling={task: "mc:1"},
        base_hash="h",
        kinds={"g.weight": "layer-norm"},
        **options,
    )


def test_merge_is_eq_8_on_a_hand_built_case() -> None:
    a, b = hand_built("a", 1, 0), hand_built("b", 3, 1)
    merged = merge_factors([a, b])
    assert merged.merge == "sum" and merged.tasks == ("a", "b") and merged.examples == {"a": 1, "b": 3}
    # (sum_t B_t) x (sum_t lambda_t A_t), lambda = n_t / N: B (our S) summed unweighted, A weighted.
    torch.testing.assert_close(merged.S["l"], a.S["l"] + b.S["l"])
    torch.testing.assert_close(merged.A["l"], 0.25 * a.A["l"] + 0.75 * b.A["l"])
    # Full and diagonal blocks: the lambda-weighted mean (mammoth pools ffT over all examples).
    torch.testing.assert_close(merged.gram["g.weight"], 0.25 * a.gram["g.weight"] + 0.75 * b.gram["g.weight"])
    torch.testing.assert_close(merged.diag["d.weight"], 0.25 * a.diag["d.weight"] + 0.75 * b.diag["d.weight"])
    W = torch.randn(2, 3)
    c = torch.randn(2)
    X = torch.cat([W, c[:, None]], dim=1)
    expected = torch.trace((a.S["l"] + b.S["l"]) @ X @ (0.25 * a.A["l"] + 0.75 * b.A["l"]) @ X.T)
    assert kfac_penalty({"l.weight": W, "l.bias": c}, merged).item() == pytest.approx(expected.item(), rel=1e-5)
    # The old rule averages both sides.
    average = merge_factors([a, b], rule="average")
    assert average.merge == "average"
    torch.testing.assert_close(average.S["l"], 0.25 * a.S["l"] + 0.75 * b.S["l"])
    torch.testing.assert_close(average.A["l"], merged.A["l"])


@pytest.mark.parametrize("rule", ["sum", "average"])
def test_merging_merged_files_is_associative(tmp_path: Path, rule: str) -> None:
    a, b, c = hand_built("a", 2, 0), hand_built("b", 5, 1), hand_built("c", 3, 2)
    path = tmp_path / "ab.safetensors"
    merge_factors([a, b], rule=rule).save(path)
    nested, flat_merge = merge_factors([KFACFactors.load(path), c], rule=rule), merge_factors([a, b, c], rule=rule)
    assert nested.examples == flat_merge.examples == {"a": 2, "b": 5, "c": 3}
    for table in ("A", "S", "gram", "diag"):
        for key in getattr(flat_merge, table):
            torch.testing.assert_close(getattr(nested, table)[key], getattr(flat_merge, table)[key])
    # Order of the inputs changes nothing but the order of the tasks.
    swapped = merge_factors([c, a, b], rule=rule)
    torch.testing.assert_close(swapped.S["l"], flat_merge.S["l"])
    torch.testing.assert_close(swapped.A["l"], flat_merge.A["l"])


def test_average_merge_is_kfac_of_the_pooled_examples(tiny: Pretrained, task) -> None:
    texts = list(task.train.inputs)
    first, second = texts[:12], texts[12:32]
    a = factors_from_texts(tiny, first, task="a", mc_samples=None)
    b = factors_from_texts(tiny, second, task="b", mc_samples=None)
    pooled = factors_from_texts(tiny, first + second, task="ab", mc_samples=None)
    merged, summed = merge_factors([a, b], rule="average"), merge_factors([a, b])
    assert merged.tasks == ("a", "b") and merged.num_examples == 32
    for layer in pooled.A:
        torch.testing.assert_close(merged.A[layer], pooled.A[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged.S[layer], pooled.S[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(summed.A[layer], pooled.A[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(summed.S[layer], a.S[layer] + b.S[layer], rtol=1e-5, atol=1e-6)
    for name in pooled.gram:
        torch.testing.assert_close(merged.gram[name], pooled.gram[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(summed.gram[name], pooled.gram[name], rtol=1e-5, atol=1e-7)
    for name in pooled.diag:
        torch.testing.assert_close(merged.diag[name], pooled.diag[name], rtol=1e-5, atol=1e-7)
        if name in pooled.rows:
            assert torch.equal(merged.rows[name], pooled.rows[name])
    # Constant cost: the merged factors are as large as one task's (up to embedding rows).
    assert merged.memory_bytes().keys() == a.memory_bytes().keys()
    assert merge_factors([a]) is a
    # Eq. 8 never ignores a task: its Kronecker part bounds each task's own from above (lambda_t <= 1).
    for seed in range(3):
        delta = random_delta(tiny, seed, keep=lambda n: "LayerNorm" not in n and "embeddings" not in n)
        assert kfac_penalty(delta, summed).item() >= max(
            kfac_penalty(delta, f).item() * w for f, w in ((a, 12 / 32), (b, 20 / 32))
        ) * (1 - 1e-5)


def test_merge_refusals(exact_factors: KFACFactors) -> None:
    other = dataclasses.replace(exact_factors, base_hash="0123456789abcdef")
    with pytest.raises(TaskArithError, match="different base models"):
        merge_factors([exact_factors, other])
    with pytest.raises(TaskArithError):
        merge_factors([])
    renamed = dataclasses.replace(exact_factors, examples={"other": 32}, sampling={"other": "exact"})
    fewer = dataclasses.replace(
        renamed, A=dict(list(exact_factors.A.items())[1:]), S=dict(list(exact_factors.S.items())[1:])
    )
    with pytest.raises(TaskArithError, match="other layers"):
        merge_factors([exact_factors, fewer])
    # Eq. 8 sums S over tasks: a task merged twice would count twice.
    with pytest.raises(TaskArithError, match="more than one"):
        merge_factors([exact_factors, exact_factors])
    with pytest.raises(TaskArithError, match="function"):
        merge_factors([exact_factors, dataclasses.replace(renamed, function="unnormalized")])
    third = dataclasses.replace(exact_factors, examples={"third": 4}, sampling={})
    with pytest.raises(TaskArithError, match="rule 'sum'"):
        merge_factors([merge_factors([exact_factors, renamed], rule="sum"), third], rule="average")
    with pytest.raises(TaskArithError, match="compress"):
        merge_factors([exact_factors, compress_factors(renamed, "block", blocks=2)])
    with pytest.raises(TaskArithError, match="merge rule"):
        merge_factors([exact_factors, renamed], rule="max")


def test_to_device_keeps_values(exact_factors: KFACFactors) -> None:
    moved = exact_factors.to("cpu")
    delta = {"encoder.layer.0.attention.self.query.weight": torch.ones(32, 32)}
    assert kfac_penalty(delta, moved).item() == kfac_penalty(delta, exact_factors).item()


# ---- compression -------------------------------------------------------------------------------


def test_compression_round_trips_are_identities(tmp_path: Path, exact_factors: KFACFactors, tiny: Pretrained) -> None:
    delta = random_delta(tiny, 7)
    full = kfac_penalty(delta, exact_factors).item()
    one_block = compress_factors(exact_factors, "block", blocks=1)
    assert one_block.compression == "block:1"
    for layer, value in exact_factors.A.items():
        assert torch.equal(one_block.A[layer].dense(), value) and torch.equal(
            one_block.S[layer].dense(), exact_factors.S[layer]
        )
    assert kfac_penalty(delta, one_block).item() == pytest.approx(full, rel=1e-6)
    full_rank = compress_factors(exact_factors, "eigen", rank=10_000)
    for layer, value in exact_factors.A.items():
        torch.testing.assert_close(full_rank.A[layer].dense(), value, rtol=1e-4, atol=1e-5)
    assert kfac_penalty(delta, full_rank).item() == pytest.approx(full, rel=1e-4)
    # Saved as an ordinary factor file, compression recorded.
    for compressed in (one_block, full_rank, compress_factors(exact_factors, "eigen", rank=3)):
        path = tmp_path / f"{compressed.compression.replace(':', '-')}.safetensors"
        compressed.save(path)
        loaded = KFACFactors.load(path)
        assert_same_factors(compressed, loaded)
        assert kfac_penalty(delta, loaded).item() == pytest.approx(kfac_penalty(delta, compressed).item(), rel=1e-6)


def test_block_and_eigen_compression_keep_what_they_say(exact_factors: KFACFactors, tiny: Pretrained) -> None:
    layer = "encoder.layer.0.intermediate.dense"  # A 33 x 33, S 64 x 64
    blocks = compress_factors(exact_factors, "block", blocks=4)
    A, dense = blocks.A[layer], exact_factors.A[layer]
    assert isinstance(A, BlockDiagonal) and A.blocks.shape == (4, 9, 9) and A.size == 33
    kept = A.dense()
    torch.testing.assert_close(kept[:9, :9], dense[:9, :9])
    torch.testing.assert_close(kept[27:, 27:], dense[27:, 27:])
    assert kept[:9, 9:].abs().max() == 0 and kept[30:, :27].abs().max() == 0
    assert sum(blocks.memory_bytes().values()) < 0.5 * sum(exact_factors.memory_bytes().values())
    low = compress_factors(exact_factors, "eigen", rank=5)
    S = low.S[layer]
    assert isinstance(S, LowRank) and S.vectors.shape == (64, 5) and (S.values >= 0).all()
    values = torch.linalg.eigvalsh(exact_factors.S[layer].double())
    torch.testing.assert_close(S.values.double().sort().values, values[-5:], rtol=1e-4, atol=1e-7)
    # The penalty of the compressed factors is the one of their dense form.
    delta = random_delta(tiny, 2)
    dense_low = dataclasses.replace(
        low,
        A={k: v.dense() for k, v in low.A.items()},
        S={k: v.dense() for k, v in low.S.items()},
        gram={k: v.dense() for k, v in low.gram.items()},
        compression="none",
    )
    assert kfac_penalty(delta, low).item() == pytest.approx(kfac_penalty(delta, dense_low).item(), rel=1e-5)
    with pytest.raises(TaskArithError, match="already compressed"):
        compress_factors(low, "block")
    with pytest.raises(TaskArithError, match="compression"):
        compress_factors(exact_factors, "prune")


@pytest.mark.parametrize("method, option", [("block", {"blocks": 2}), ("eigen", {"rank": 2})])
def test_compressed_factors_merge_exactly(method: str, option: dict) -> None:
    a, b = hand_built("a", 1, 0), hand_built("b", 3, 1)
    merged = merge_factors([compress_factors(a, method, **option), compress_factors(b, method, **option)])
    assert merged.compression == f"{method}:{next(iter(option.values()))}"
    for table in ("A", "S", "gram"):
        expected = {"A": (0.25, 0.75), "S": (1.0, 1.0), "gram": (0.25, 0.75)}[table]
        key = next(iter(getattr(a, table)))
        parts = [getattr(compress_factors(f, method, **option), table)[key].dense() for f in (a, b)]
        torch.testing.assert_close(
            _dense(getattr(merged, table)[key]), expected[0] * parts[0] + expected[1] * parts[1], rtol=1e-5, atol=1e-6
        )


def _dense(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value.dense()


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
        for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return super().forward(F.pad(x, [*pads[1], *pads[0]]))


def tiny_conv_net() -> nn.Module:
    """Conv 3->4 k3 + BatchNorm (eval, non-trivial statistics) + ReLU + depthwise conv + pooling + Linear."""
    torch.manual_seed(0)
    body = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            # In place on purpose: the BatchNorm's output gradient must be the one before the activation.
            act=nn.ReLU(inplace=True),
            depthwise=nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            proj=nn.Linear(4, 5),
        )
    )
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
            yield (
                torch.arange(start, start + len(chunk)),
                {"pixel_values": chunk, "attention_mask": torch.ones(len(chunk), 1, dtype=torch.long)},
            )


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
    return factors_from_texts(conv_model, images, task="img", batch_size=5, mc_samples=None, function="unnormalized")


def test_batch_norm_diagonal_matches_brute_force(
    conv_model: ImageModel, images: list[torch.Tensor], conv_factors: KFACFactors
) -> None:
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
    layers = (
        [nn.Conv2d(3, 4, 3), Rows(), norm, nn.Tanh(), LastMean()]
        if sequence
        else [nn.Conv2d(3, 4, 3), SpatialMean(), norm, nn.Tanh()]
    )
    model = ImageModel(ImageEncoder(nn.Sequential(*layers)))
    factors = factors_from_texts(model, images, task="t", batch_size=5, mc_samples=None, function="unnormalized")
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


@pytest.mark.parametrize(
    "conv",
    [
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
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_conv_block_is_exact_before_mean_pooling(conv, images: list[torch.Tensor]) -> None:
    torch.manual_seed(1)
    model = ImageModel(ImageEncoder(nn.Sequential(OrderedDict(conv=conv(), pool=SpatialMean()))))
    factors = factors_from_texts(model, images, task="t", batch_size=5, mc_samples=None, function="unnormalized")
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


def test_conv_factors_save_load_and_merge(
    tmp_path: Path, conv_model: ImageModel, images: list[torch.Tensor], conv_factors: KFACFactors
) -> None:
    path = tmp_path / "conv.safetensors"
    conv_factors.save(path)
    loaded = KFACFactors.load(path)
    assert_same_factors(conv_factors, loaded)
    first = factors_from_texts(conv_model, images[:4], task="a", batch_size=5, mc_samples=None, function="unnormalized")
    second = factors_from_texts(
        conv_model, images[4:], task="b", batch_size=5, mc_samples=None, function="unnormalized"
    )
    merged = merge_factors([first, second], rule="average")
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
    for name in (
        "body.conv.weight",
        "body.conv.bias",
        "body.bn.weight",
        "body.bn.bias",
        "body.depthwise.weight",
        "body.depthwise.bias",
        "body.proj.weight",
    ):
        assert delta[name].grad is not None and delta[name].grad.abs().sum() > 0, name
    # Monte Carlo directions, the default, estimate the same quantity.
    sampled = factors_from_texts(
        conv_model, random_images(12), task="img", batch_size=5, mc_samples=64, function="unnormalized"
    )
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
    factors = factors_from_texts(model, images, task="t", batch_size=6, mc_samples=2)
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
        factors_from_texts(ImageModel(ImageEncoder(Scale())), images, task="t")
    # With a supported layer, the bare parameter is named at run time.
    scaled = ImageModel(ImageEncoder(nn.Sequential(nn.Conv2d(3, 3, 1), Scale())))
    with pytest.warns(UserWarning, match=r"1 of the encoder's parameters \(body.1.scale\)"):
        factors = factors_from_texts(scaled, images, task="t")
    assert uncovered_parameters(scaled.encoder, factors) == ["body.1.scale"]
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), SpatialMean())
    with pytest.raises(TaskArithError, match="BatchNorm layer 'body.1'.*running statistics"):
        factors_from_texts(ImageModel(ImageEncoder(no_stats)), images, task="t")


class Features(nn.Module):
    def __init__(self, backbone: nn.Module, features) -> None:
        super().__init__()
        self.backbone = backbone
        self.features = features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(self.backbone, pixel_values)


def test_efficientnet_lite0_is_fully_covered() -> None:
    """The real backbone (random weights): static-same-padded convs, depthwise convs and BatchNorms all get factors."""
    EfficientNet = pytest.importorskip("efficientnet_lite_pytorch").EfficientNet
    torch.manual_seed(0)
    backbone = EfficientNet.from_name("efficientnet-lite0", image_size=32)
    del backbone._fc, backbone._dropout
    model = ImageModel(ImageEncoder(Features(backbone, lambda b, x: b.extract_features(x).mean(dim=(2, 3)))))
    factors = factors_from_texts(model, random_images(4, size=32), task="t", batch_size=4, mc_samples=1)
    assert uncovered_parameters(model.encoder, factors) == []
    depthwise = "body.backbone._blocks.15._depthwise_conv"  # 1152 channels, 3 x 3, no bias
    assert factors.A[depthwise].shape == (1152, 9, 9) and factors.S[depthwise].shape == (1152, 1, 1)
    delta = {name: torch.randn(p.shape) * 1e-3 for name, p in model.encoder.named_parameters()}
    assert 0 < kfac_penalty(delta, factors).item() < float("inf")


def test_clip_vision_tower_patch_embedding_is_a_root() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        patch_size=4,
    )
    model = ImageModel(
        ImageEncoder(Features(CLIPVisionModelWithProjection(config), lambda m, x: m(pixel_values=x).image_embeds))
    )
    factors = factors_from_texts(model, random_images(4, size=16), task="t", batch_size=4, mc_samples=1)
    patches = "body.backbone.vision_model.embeddings.patch_embedding"
    assert factors.A[patches].shape == (3 * 4 * 4, 3 * 4 * 4) and factors.S[patches].shape == (32, 32)
    # The class token, a bare nn.Parameter, gets a full block from the embeddings' output; the projection
    # is the one TAK scales by 0.1.
    assert uncovered_parameters(model.encoder, factors) == []
    cls = "body.backbone.vision_model.embeddings.class_embedding"
    assert factors.gram[cls].shape == (32, 32) and factors.kinds[cls] == "class-token"
    assert factors.kinds["body.backbone.visual_projection"] == "projection"
    assert factors.layers["body.backbone.visual_projection"] == ("body.backbone.visual_projection.weight", None, False)


# ---- attention, class token, positions and projection (open_clip-shaped towers) ---------------------


class ExplicitAttention(nn.Module):
    """Self-attention written out: one qkv Linear (TAK's surgery of CLIP's attention) and an out Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (t.reshape(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, dim))


class AttentionModel(nn.Module):
    """Embedding -> LayerNorm -> self-attention over the real tokens -> tanh -> Linear, token states out."""

    def __init__(
        self,
        vocab: int,
        dim: int = 8,
        heads: int = 2,
        explicit: bool = False,
        batch_first: bool = True,
        cross: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = (
            ExplicitAttention(dim, heads) if explicit else nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        )
        self.head = nn.Linear(dim, 5)
        self.explicit, self.batch_first, self.cross = explicit, batch_first, cross
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()
            if not explicit:
                self.attn.in_proj_bias.normal_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: torch.Tensor) -> BaseModelOutput:
        x = self.norm(self.embed(input_ids))
        pad = attention_mask == 0
        if self.explicit:
            y = self.attn(x, pad)
        else:
            x = x if self.batch_first else x.transpose(0, 1)
            y, _ = self.attn(
                x, 2 * x if self.cross else x, 2 * x if self.cross else x, key_padding_mask=pad, need_weights=False
            )
            y = y if self.batch_first else y.transpose(0, 1)
        return BaseModelOutput(last_hidden_state=self.head(torch.tanh(y)))


EXPLICIT_NAMES = {
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.out.weight",
    "attn.out_proj.bias": "attn.out.bias",
}


def explicit_copy(model: AttentionModel) -> AttentionModel:
    rebuilt = AttentionModel(model.embed.num_embeddings, explicit=True)
    state = {EXPLICIT_NAMES.get(name, name): value for name, value in model.state_dict().items()}
    rebuilt.load_state_dict(state)
    return rebuilt


def test_explicit_attention_forward_is_multihead_attention_s() -> None:
    torch.manual_seed(4)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
        x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
        pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
        causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
        float_mask = torch.randn(6, 5, 5)
        explicit = _explicit_attention(mha, mha.forward)
        for kwargs in (
            {},
            {"key_padding_mask": pad},
            {"attn_mask": causal},
            {"attn_mask": float_mask},
            {"key_padding_mask": pad, "attn_mask": causal, "average_attn_weights": False},
            {"need_weights": False, "key_padding_mask": pad},
        ):
            expected, expected_weights = mha(x, x, x, **kwargs)
            got, weights = explicit(x, x, x, **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            if expected_weights is None:
                assert weights is None
            else:
                torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_multihead_attention_penalty_is_that_of_explicit_linear_layers(batch_first: bool) -> None:
    """nn.MultiheadAttention runs its projections through the functional path, which module hooks never see:
    its in_proj is a Linear with q, k, v rows and out_proj a Linear, exactly as when written out."""
    model = Tokens(AttentionModel(30, batch_first=batch_first))
    rebuilt = Tokens(explicit_copy(model.encoder))
    items = token_items(10, 6, 30, seed=1)
    # The same function, so the same Monte-Carlo directions from the same seed.
    _, batch = next(model.batches(items, 10))
    torch.testing.assert_close(
        model.encoder(**batch).last_hidden_state, rebuilt.encoder(**batch).last_hidden_state, rtol=1e-5, atol=1e-6
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = factors_from_texts(model, items, task="t", batch_size=4, mc_samples=1, seed=3)
    reference = factors_from_texts(rebuilt, items, task="t", batch_size=4, mc_samples=1, seed=3)
    assert uncovered_parameters(model.encoder, factors) == []
    assert factors.layers["attn.in_proj"] == ("attn.in_proj_weight", "attn.in_proj_bias", False)
    for mine, theirs in (("attn.in_proj", "attn.qkv"), ("attn.out_proj", "attn.out"), ("head", "head")):
        torch.testing.assert_close(factors.A[mine], reference.A[theirs], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(factors.S[mine], reference.S[theirs], rtol=1e-4, atol=1e-6)
    delta = random_delta(model, 2)
    mapped = {EXPLICIT_NAMES.get(name, name): value for name, value in delta.items()}
    assert kfac_penalty(delta, factors).item() == pytest.approx(kfac_penalty(mapped, reference).item(), rel=1e-5)
    # The attention module is itself again afterwards.
    assert "forward" not in vars(model.encoder.attn)


def test_cross_attention_stays_uncovered_and_is_named() -> None:
    model = Tokens(AttentionModel(30, cross=True))
    with pytest.warns(UserWarning, match="attn.in_proj_weight"):
        factors = factors_from_texts(model, token_items(6, 5, 30), task="t", batch_size=3)
    assert uncovered_parameters(model.encoder, factors) == [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
    ]


class FunctionalAttention(nn.Module):
    """Like the newest open_clip Attention: a bare in_proj_weight used through F.linear, an out_proj Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5)
        self.in_proj_bias = nn.Parameter(torch.randn(3 * dim) * 0.1)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (
            t.reshape(batch, length, self.heads, -1).transpose(1, 2)
            for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        )
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, attention: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads) if attention == "mha" else FunctionalAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(), c_proj=nn.Linear(2 * width, width))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + (
            self.attn(h, h, h, need_weights=False)[0] if isinstance(self.attn, nn.MultiheadAttention) else self.attn(h)
        )
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """Shaped like open_clip's VisionTransformer: patch conv without bias, bare class_embedding,
    positional_embedding and proj, ln_pre, blocks (nn.MultiheadAttention in the (tokens, batch, width) layout
    of older open_clip, or the newest open_clip's functional attention), ln_post on the class token, @ proj."""

    def __init__(
        self,
        attention: str = "mha",
        width: int = 8,
        heads: int = 2,
        layers: int = 2,
        image: int = 4,
        patch: int = 2,
        output: int = 6,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Sequential(*[Block(width, heads, attention) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output))
        self.sequence_first = attention == "mha"
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding)
        if self.sequence_first:
            x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        else:
            x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


def vit_model(attention: str = "mha") -> ImageModel:
    return ImageModel(OpenClipImageEncoder(TinyViT(attention)))


@pytest.mark.parametrize("attention", ["mha", "functional"])
def test_open_clip_vision_tower_is_fully_covered(attention: str) -> None:
    model = vit_model(attention)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        factors = factors_from_texts(model, random_images(10, size=4), task="t", batch_size=4)
    assert uncovered_parameters(model.encoder, factors) == []
    block = "visual.transformer.0"
    for layer in (
        f"{block}.attn.in_proj",
        f"{block}.attn.out_proj",
        f"{block}.mlp.c_fc",
        "visual.conv1",
        "visual.proj",
    ):
        assert layer in factors.A, layer
    assert factors.layers["visual.proj"] == ("visual.proj", None, True) and factors.kinds["visual.proj"] == "projection"
    assert factors.A["visual.proj"].shape == (8, 8) and factors.S["visual.proj"].shape == (6, 6)
    assert factors.gram["visual.class_embedding"].shape == (8, 8)
    assert factors.kinds["visual.class_embedding"] == "class-token"
    assert factors.diag["visual.positional_embedding"].shape == (5, 8)
    delta = {name: value.requires_grad_(True) for name, value in random_delta(model, 0).items()}
    penalty = kfac_penalty(delta, factors)
    penalty.backward()
    for name in (
        f"{block}.attn.in_proj_weight",
        f"{block}.attn.out_proj.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.ln_pre.weight",
    ):
        assert delta[name].grad is not None and delta[name].grad.abs().sum() > 0, name


def test_class_token_positions_and_projection_match_brute_force() -> None:
    model = vit_model()
    images = random_images(6, size=4)
    factors = factors_from_texts(model, images, task="t", batch_size=4, mc_samples=None)
    G, layout = gauss_newton(model, images, normalized=True)
    cls, pos = span(layout, "visual.class_embedding"), span(layout, "visual.positional_embedding")
    torch.testing.assert_close(factors.gram["visual.class_embedding"].double(), G[cls, cls], rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(
        factors.diag["visual.positional_embedding"].double().flatten(), G.diagonal()[pos], rtol=1e-4, atol=1e-9
    )
    # The projection is the last layer: with the unnormalized output its output side is exactly I.
    plain = factors_from_texts(model, images, task="t", batch_size=4, mc_samples=None, function="unnormalized")
    G, layout = gauss_newton(model, images)
    delta = random_delta(model, 1, keep=lambda name: name == "visual.proj")
    x = flat(delta, layout)
    assert kfac_penalty(delta, plain, **PLAIN).item() == pytest.approx((x @ G @ x).item(), rel=1e-4)
    assert kfac_penalty(delta, plain).item() == pytest.approx(0.1 * (x @ G @ x).item(), rel=1e-4)


class TinyTimmViT(TinyViT):
    """The same tower under timm's names and shapes: cls_token (1, 1, width), pos_embed (1, tokens, width),
    norm_pre. The positional embedding's leading 1 once made its factor (tokens, width) and the penalty refuse
    every timm ViT vector (found when the timm tests first ran, in the torchvision environment)."""

    def __init__(self) -> None:
        super().__init__("functional")
        self.cls_token = nn.Parameter(self.class_embedding.detach().view(1, 1, -1).clone())
        self.pos_embed = nn.Parameter(self.positional_embedding.detach().unsqueeze(0).clone())
        self.norm_pre = self.ln_pre
        del self.class_embedding, self.positional_embedding, self.ln_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.transformer(self.norm_pre(x + self.pos_embed))
        return self.ln_post(x[:, 0]) @ self.proj


def test_timm_shaped_positions_keep_the_parameter_shape_and_match_brute_force() -> None:
    model = ImageModel(OpenClipImageEncoder(TinyTimmViT()))
    images = random_images(6, size=4)
    factors = factors_from_texts(model, images, task="t", batch_size=4, mc_samples=None)
    assert uncovered_parameters(model.encoder, factors) == []
    assert factors.diag["visual.pos_embed"].shape == (1, 5, 8)
    G, layout = gauss_newton(model, images, normalized=True)
    pos = span(layout, "visual.pos_embed")
    torch.testing.assert_close(
        factors.diag["visual.pos_embed"].double().flatten(), G.diagonal()[pos], rtol=1e-4, atol=1e-9
    )
    delta = random_delta(model, 2, keep=lambda name: name == "visual.pos_embed")
    x = flat(delta, layout)
    # A diagonal block: the penalty of a positions-only delta is sum_i G_ii x_i^2 (scaled as published).
    expected = (G.diagonal()[pos] * x[pos] ** 2).sum().item()
    assert kfac_penalty(delta, factors, **PLAIN).item() == pytest.approx(expected, rel=1e-4)


class Patches(nn.Module):
    """(batch, channels, h, w) -> (batch, positions, channels * k * k): the 3 x 3 (padding 1) patches as tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.unfold(x, 3, padding=1).transpose(1, 2)


class TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


@pytest.mark.parametrize("rule", ["expand", "reduce"])
def test_conv_rules_are_the_token_rules_over_positions(rule: str, images: list[torch.Tensor]) -> None:
    """A conv is a Linear shared over output positions: its factors under conv=rule are those of the same
    Linear on the unfolded patches under tokens=rule."""
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    linear = nn.Linear(27, 4)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(4, -1))
        linear.bias.copy_(conv.bias)
    as_conv = ImageModel(ImageEncoder(nn.Sequential(OrderedDict(conv=conv, pool=SpatialMean()))))
    as_tokens = ImageModel(ImageEncoder(nn.Sequential(OrderedDict(patches=Patches(), conv=linear, pool=TokenMean()))))
    mine = factors_from_texts(as_conv, images, task="t", batch_size=5, mc_samples=None, conv=rule)
    theirs = factors_from_texts(as_tokens, images, task="t", batch_size=5, mc_samples=None, tokens=rule)
    assert mine.conv == rule
    torch.testing.assert_close(mine.A["body.conv"], theirs.A["body.conv"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mine.S["body.conv"], theirs.S["body.conv"], rtol=1e-4, atol=1e-6)


# ---- command line ----------------------------------------------------------------------------------


def test_cli_kfac_merge_and_compress(cli, tmp_path: Path, tiny_model_dir: Path, tiny_csv: Path) -> None:
    files = []
    for seed in (0, 1):
        path = tmp_path / f"f{seed}.safetensors"
        code, out, _ = cli(
            "kfac",
            tiny_csv,
            "--out",
            path,
            "--num-examples",
            "8",
            "--seed",
            str(seed),
            "--tokens",
            "reduce",
            "--model",
            tiny_model_dir,
        )
        assert code == 0 and "K-FAC factors of colours (8 examples" in out
        files.append(path)
    one = KFACFactors.load(files[0])
    assert (one.tokens, one.function, one.norm_blocks, one.directions) == ("reduce", "normalized", "full", "mc:1")
    # The same task twice would count twice under Eq. 8: refused in one line, no traceback.
    code, _, err = cli("kfac-merge", *files, "--out", tmp_path / "merged.safetensors")
    assert code == 2 and "more than one" in err and "Traceback" not in err
    code, out, _ = cli("kfac-compress", files[0], "--out", tmp_path / "block.safetensors", "--blocks", "4")
    assert code == 0 and "block:4" in out and KFACFactors.load(tmp_path / "block.safetensors").compression == "block:4"
    code, _, err = cli("kfac-compress", files[0], "--out", tmp_path / "x.safetensors")
    assert code == 2 and "exactly one of --blocks and --rank" in err
