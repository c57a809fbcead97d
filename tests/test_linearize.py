import copy

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from taskarith.data import task_from_file
from taskarith.errors import TaskArithError
from taskarith.evaluate import accuracy, edited_encoder
from taskarith.finetune import FinetuneConfig, finetune
from taskarith.linearize import LinearizedEncoder, hidden_and_tangent
from taskarith.models import load_pretrained
from taskarith.models.zero_shot import mean_pool
from taskarith.regularizers import PenaltyInputs, pooled_tangents, taujp_penalty, taujp_sq_penalty
from taskarith.vectors import TaskVector

TEXTS = ["the red cat is big", "a dog", "my blue fish is very small", "that horse"]


def random_delta(encoder, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in encoder.named_parameters()}


def test_jvp_matches_finite_differences(pretrained):
    encoder = copy.deepcopy(pretrained.encoder).double()
    theta0 = dict(encoder.named_parameters())
    delta = random_delta(encoder, 1e-2)
    batch = pretrained.tokenize(TEXTS)
    _, tangent = hidden_and_tangent(encoder, theta0, delta, batch)

    def states(sign: float) -> torch.Tensor:
        moved = {n: p + sign * 1e-5 * delta[n] for n, p in theta0.items()}
        return torch.func.functional_call(encoder, moved, args=(), kwargs=batch).last_hidden_state

    with torch.no_grad():
        finite_difference = (states(1.0) - states(-1.0)) / 2e-5
    assert torch.allclose(tangent, finite_difference, atol=1e-6, rtol=1e-5)


def test_linearized_at_theta0_equals_the_model(pretrained):
    batch = pretrained.tokenize(TEXTS)
    with torch.no_grad():
        expected = pretrained.encoder(**batch).last_hidden_state
        got = LinearizedEncoder(pretrained.encoder)(**batch).last_hidden_state
    assert torch.equal(got, expected)


def test_linearized_output_is_affine_in_delta(pretrained):
    batch = pretrained.tokenize(TEXTS)
    delta = random_delta(pretrained.encoder, 1e-2)
    with torch.no_grad():
        f0 = LinearizedEncoder(pretrained.encoder)(**batch).last_hidden_state
        f1 = LinearizedEncoder(pretrained.encoder, delta)(**batch).last_hidden_state
        f3 = LinearizedEncoder(pretrained.encoder, {n: 3 * d for n, d in delta.items()})(**batch).last_hidden_state
    assert torch.allclose(f3 - f0, 3 * (f1 - f0), atol=1e-5)


def test_only_delta_is_trained_and_theta0_is_shared(pretrained):
    linear = LinearizedEncoder(pretrained.encoder, trainable=True)
    trainable = [p for p in linear.parameters() if p.requires_grad]
    assert len(trainable) == len(list(pretrained.encoder.parameters()))
    assert all(a is b for a, b in zip(linear.theta0().values(), pretrained.encoder.parameters(), strict=True))


def test_sdpa_attention_linearizes_to_the_same_function_as_eager(tiny_model_dir, pretrained):
    # SDPA's fused CPU kernel has no forward-mode rule; under jvp_safe_kernels it runs its math kernel.
    sdpa = load_pretrained(tiny_model_dir, attn_implementation="sdpa", device="cpu")
    batch = pretrained.tokenize(TEXTS)
    delta = random_delta(pretrained.encoder, 1e-2)
    with torch.no_grad():
        eager_out = LinearizedEncoder(pretrained.encoder, delta)(**batch).last_hidden_state
        sdpa_out = LinearizedEncoder(sdpa.encoder, delta)(**batch).last_hidden_state
    assert torch.allclose(eager_out, sdpa_out, atol=1e-5)


def test_multihead_attention_fast_path_is_bypassed_under_jvp():
    # nn.MultiheadAttention's fused inference path (taken by open_clip and timm blocks) has no JVP rule.
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, inputs_embeds, attention_mask):
            out = self.attention(inputs_embeds, inputs_embeds, inputs_embeds, need_weights=False)[0]
            return BaseModelOutput(last_hidden_state=out)

    encoder = Encoder().eval()
    batch = {"inputs_embeds": torch.randn(3, 5, 8), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    delta = {n: 1e-4 * torch.randn_like(p) for n, p in encoder.named_parameters()}
    with torch.no_grad():
        linear = LinearizedEncoder(encoder, delta)(**batch).last_hidden_state
        moved = torch.func.functional_call(
            encoder, {n: p + delta[n] for n, p in encoder.named_parameters()}, args=(), kwargs=batch
        ).last_hidden_state
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the JVP
    assert torch.allclose(linear, moved, atol=1e-6)  # first order: they differ by O(|delta|^2)


def test_unsupported_attention_is_refused(tiny_model_dir, pretrained):
    encoder = pretrained.trainable_copy()
    encoder.config._attn_implementation = "flash_attention_2"
    with pytest.raises(TaskArithError, match="eager"):
        LinearizedEncoder(encoder)


def test_taujp_penalty_is_zero_for_zero_vector_and_matches_direct_computation(pretrained):
    batch = pretrained.tokenize(TEXTS)
    theta0 = dict(pretrained.encoder.named_parameters())
    zero = {n: torch.zeros_like(p) for n, p in theta0.items()}
    _, tangent = hidden_and_tangent(pretrained.encoder, theta0, zero, batch)
    assert taujp_penalty(PenaltyInputs(zero, [pooled_tangents(tangent, batch["attention_mask"])])) == 0

    delta = random_delta(pretrained.encoder, 1e-3)
    _, tangent = hidden_and_tangent(pretrained.encoder, theta0, delta, batch)
    tangents = [pooled_tangents(tangent, batch["attention_mask"])]
    penalty = taujp_penalty(PenaltyInputs(delta, tangents))
    squared = taujp_sq_penalty(PenaltyInputs(delta, tangents))
    # Direct: one example at a time, pooled output change of the linearized model, (squared) norm, mean.
    direct = []
    for text in TEXTS:
        single = pretrained.tokenize([text])
        with torch.no_grad():
            f0 = mean_pool(pretrained.encoder(**single).last_hidden_state, single["attention_mask"])
            f1 = mean_pool(
                LinearizedEncoder(pretrained.encoder, delta)(**single).last_hidden_state, single["attention_mask"]
            )
        direct.append(float((f1 - f0).pow(2).sum()))
    assert float(squared) == pytest.approx(sum(direct) / len(direct), rel=1e-4)
    assert float(penalty) == pytest.approx(sum(d**0.5 for d in direct) / len(direct), rel=1e-4)


def test_batched_tangents_equal_separate_ones(pretrained):
    theta0 = dict(pretrained.encoder.named_parameters())
    delta = random_delta(pretrained.encoder, 1e-2)
    together = pretrained.tokenize(TEXTS + ["a cat"])
    alone = pretrained.tokenize(["a cat"])
    _, both = hidden_and_tangent(pretrained.encoder, theta0, delta, together)
    _, single = hidden_and_tangent(pretrained.encoder, theta0, delta, alone)
    assert torch.allclose(
        pooled_tangents(both[-1:], together["attention_mask"][-1:]),
        pooled_tangents(single, alone["attention_mask"]),
        atol=1e-5,
    )


def test_linear_mode_finetuning_and_evaluation(pretrained, task):
    config = FinetuneConfig(task=task.name, mode="linear", steps=30, batch_size=8, lr=3e-3, max_length=16)
    tau = finetune(config, pretrained, task, progress=False).task_vector
    assert tau.mode == "linear" and tau.base_hash == pretrained.base_hash
    edited = edited_encoder(pretrained, [tau])
    assert isinstance(edited, LinearizedEncoder)
    assert accuracy(pretrained, task, "test", edited) > accuracy(pretrained, task, "test")
    with pytest.raises(TaskArithError, match="linear-mode"):
        tau.apply_to(dict(pretrained.encoder.state_dict()))
    with pytest.raises(TaskArithError, match="linear-mode task vector"):
        tau + tau.with_mode("standard")


def test_post_hoc_linearization_evaluates_a_standard_vector_through_f_lin(pretrained, task):
    tau = TaskVector(deltas=random_delta(pretrained.encoder, 1e-4), base_hash=pretrained.base_hash, task="r")
    batch = pretrained.tokenize(TEXTS)
    linear = tau.with_mode("linear").apply_to(pretrained.encoder)
    nonlinear = tau.apply_to(pretrained.encoder)
    with torch.no_grad():
        lin, non = linear(**batch).last_hidden_state, nonlinear(**batch).last_hidden_state
    assert isinstance(linear, LinearizedEncoder)
    assert torch.allclose(lin, non, atol=1e-4)  # small step: both agree to first order
    assert not torch.equal(lin, non)


@pytest.mark.parametrize("mode", ["standard", "linear"])
def test_taujp_regularization_reduces_interference(pretrained, task, tmp_path, mode):
    other = tmp_path / "other.csv"
    fillers = ["the", "a", "my", "your", "this"]
    other.write_text(
        "text,label\n"
        + "".join(
            f"{f} {w} is quite small,{i % 2}\n"
            for i, (f, w) in enumerate((f, w) for f in fillers for w in ["bird", "cow", "sheep", "mouse"])
        )
    )

    def measured(tau: TaskVector) -> float:
        batch = pretrained.tokenize(list(task_from_file(other).train.inputs))
        _, tangent = hidden_and_tangent(
            pretrained.encoder, dict(pretrained.encoder.named_parameters()), tau.deltas, batch
        )
        return float(taujp_penalty(PenaltyInputs(tau.deltas, [pooled_tangents(tangent, batch["attention_mask"])])))

    base = dict(task=task.name, mode=mode, steps=20, batch_size=8, lr=3e-3, max_length=16)
    plain = finetune(FinetuneConfig(**base), pretrained, task, progress=False)
    regularized = finetune(
        FinetuneConfig(**base, regularizer="taujp", reg_strength=10.0, reg_tasks=(str(other),), reg_batch_size=8),
        pretrained,
        task,
        progress=False,
    )
    assert measured(regularized.task_vector) < 0.5 * measured(plain.task_vector)
    assert "penalty" in regularized.record["history"][0]
