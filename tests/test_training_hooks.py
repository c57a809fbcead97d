"""The training-loop pieces: a loop of one's own gives taskarith finetune's vector; Linearized on any output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import write_tiny_csv
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from taskarith import patterns
from taskarith.data import load_task
from taskarith.errors import TaskArithError
from taskarith.finetune import FinetuneConfig, finetune
from taskarith.linearize import Linearized, linearized_call
from taskarith.models.zero_shot import ZeroShotClassifier
from taskarith.regularizers import OrthoReg, TauJp, orthogonality_gap
from taskarith.sampling import batch_indices, warmup_cosine
from taskarith.training import decay_theta_, task_vector, trainable_parameters


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    folder = tmp_path_factory.mktemp("others")
    return [str(write_tiny_csv(folder / f"other{i}.csv", n_per_class=10, seed=i + 1)) for i in range(2)]


def own_loop(config: FinetuneConfig, pretrained, task) -> torch.Tensor:
    """The loop a user writes with taskarith's pieces (the same steps as docs/training-loops.md)."""
    torch.manual_seed(config.seed)
    names = trainable_parameters(pretrained.encoder, config.trainable)
    if config.mode == "linear":
        model: nn.Module = Linearized(pretrained.encoder, trainable=True, params=names)
        delta = model.deltas  # type: ignore[assignment]
    else:
        model = copy.deepcopy(pretrained.encoder)
        for name, param in model.named_parameters():
            param.requires_grad_(name in names)
        theta0 = dict(pretrained.encoder.named_parameters())
        trained = {name: param for name, param in model.named_parameters() if param.requires_grad}

        def delta():
            return {name: param - theta0[name] for name, param in trained.items()}

    classifier = ZeroShotClassifier(model, pretrained.head(task), pretrained.logit_scale).eval()
    penalty = None
    if config.regularizer in ("taujp", "taujp_sq"):
        inputs = [load_task(name).train.inputs for name in config.reg_tasks]
        penalty = TauJp(
            pretrained.encoder,
            inputs,
            collate=pretrained.tokenize,
            form=config.regularizer,
            batch_size=config.reg_batch_size,
        )
    elif config.regularizer in ("orthoreg", "orthoreg_sq"):
        penalty = OrthoReg(form=config.regularizer)
    params = [p for p in model.parameters() if p.requires_grad]
    decay_on_theta = config.mode == "linear" and config.weight_decay_on == "theta"
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0 if decay_on_theta else config.weight_decay)
    schedule = warmup_cosine(config.steps, int(config.warmup_fraction * config.steps))
    labels = torch.tensor(task.train.labels)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * schedule(step)
        indices = batch_indices(len(task.train), config.batch_size, config.seed, step)
        batch = pretrained.tokenize([task.train.inputs[i] for i in indices])
        loss = F.cross_entropy(classifier(**batch), labels[indices])
        if penalty is not None:
            loss = loss + config.strength * penalty(delta(), step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if decay_on_theta:
            decay_theta_(
                model.deltas(),
                dict(pretrained.encoder.named_parameters()),
                optimizer.param_groups[0]["lr"],
                config.weight_decay,
            )  # type: ignore[operator]
        optimizer.step()
    return task_vector(model, pretrained.encoder, task=task.name, config=config)


CASES = {
    "linear": {},
    "linear+taujp": {"regularizer": "taujp", "reg_batch_size": 3},
    "standard+taujp": {"mode": "standard", "regularizer": "taujp", "reg_batch_size": 3},
    "standard-attention+orthoreg": {
        "mode": "standard",
        "trainable": "attention",
        "regularizer": "orthoreg",
        "reg_strength": 0.01,
    },
    "linear-regex+orthoreg_sq": {"trainable": r"layer\.0\.", "regularizer": "orthoreg_sq", "reg_strength": 0.001},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_own_loop_gives_the_vector_of_taskarith_finetune(pretrained, task, others, case):
    options = {"mode": "linear", **CASES[case]}
    if options.get("regularizer", "").startswith("taujp"):
        options["reg_tasks"] = tuple(others)
    config = FinetuneConfig(
        task=task.name, steps=4, batch_size=4, lr=3e-3, max_length=16, checkpoint_every=0, augment=False, **options
    )
    expected = finetune(config, pretrained, task, progress=False).task_vector
    got = own_loop(config, pretrained, task)
    assert got.mode == expected.mode and got.base_hash == expected.base_hash and got.config == expected.config
    assert sorted(got.deltas) == sorted(expected.deltas)
    # The loop's tau-Jp takes its own JVP where linear finetune shares one with the task's batch (padding to
    # one length): the same maths in another floating-point order.
    for name, value in expected.deltas.items():
        torch.testing.assert_close(got.deltas[name], value, rtol=1e-4, atol=1e-6)
    assert expected.norm() > 0


def test_subset_vectors_hold_only_the_trained_parameters(pretrained, task):
    config = FinetuneConfig(
        task=task.name, mode="standard", trainable="attention", steps=2, batch_size=4, max_length=16, checkpoint_every=0
    )
    tau = finetune(config, pretrained, task, progress=False).task_vector
    assert sorted(tau.deltas) == sorted(trainable_parameters(pretrained.encoder, "attention"))
    assert all(("attention" in name and name.endswith(".weight")) for name in tau.deltas)
    assert "trainable" in tau.config and "trainable" not in FinetuneConfig(task="t").to_json()


def test_attention_preset_refuses_a_model_without_attention_and_a_regex_matching_nothing(pretrained):
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(TaskArithError, match="no attention projections"):
        trainable_parameters(cnn, "attention", model_name="efficientnet-lite0")
    with pytest.raises(TaskArithError, match="matches none"):
        trainable_parameters(pretrained.encoder, r"^nothing$")
    with pytest.raises(TaskArithError, match="not a regular expression"):
        trainable_parameters(pretrained.encoder, "(")


def test_a_regex_that_backtracks_exponentially_is_stopped_and_named(pretrained, monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_SECONDS", 0.05)
    # Two identical alternatives under + make 2^n ways to fail on every name of n characters.
    with pytest.raises(TaskArithError, match=r"--trainable '\(\[a-z0-9\.\]\|.*' took over 0.05 s to match"):
        trainable_parameters(pretrained.encoder, r"([a-z0-9.]|[a-z0-9.])+[!#]")
    assert trainable_parameters(pretrained.encoder, r"([a-z0-9.]|[a-z0-9.])+query\.weight$")


def test_orthoreg_penalty_and_gradient_against_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    tall = (0.3 * torch.randn(6, 3, generator=generator, dtype=torch.float64)).requires_grad_(True)
    wide = (0.3 * torch.randn(2, 5, generator=generator, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64).requires_grad_(True)
    delta = {"tall": tall, "wide": wide, "bias": bias}

    def direct(squared: bool) -> torch.Tensor:
        # Column Gram of the tall matrix (3 x 3), row Gram of the wide one (2 x 2); vectors take no part.
        a = torch.sqrt(((tall.T @ tall - torch.eye(3, dtype=torch.float64)) ** 2).sum())
        b = torch.sqrt(((wide @ wide.T - torch.eye(2, dtype=torch.float64)) ** 2).sum())
        return a**2 + b**2 if squared else a + b

    for form, squared in (("orthoreg", False), ("orthoreg_sq", True)):
        value = OrthoReg(form=form)(delta)
        expected = direct(squared)
        assert float(value) == pytest.approx(float(expected), rel=1e-12)
        got = torch.autograd.grad(value, [tall, wide, bias], allow_unused=True)
        want = torch.autograd.grad(expected, [tall, wide])
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert got[2] is None
    assert float(orthogonality_gap(torch.eye(3, dtype=torch.float64)[:, :2])) == pytest.approx(0.0)
    with pytest.raises(TaskArithError, match="no trained matrix"):
        OrthoReg()({"bias": bias})


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor):
        hidden = torch.tanh(self.a(x))
        return {"pair": (hidden, self.b(hidden)), "count": torch.tensor(len(x)), "note": None}


class ClassifierModel(TupleModel):
    def forward(self, x: torch.Tensor):  # type: ignore[override]
        hidden = torch.tanh(self.a(x))
        return SequenceClassifierOutput(logits=self.b(hidden), hidden_states=(hidden,))


@pytest.mark.parametrize("kind", [TupleModel, ClassifierModel])
def test_linearized_keeps_any_output_structure_and_matches_finite_differences(kind):
    torch.manual_seed(0)
    model = kind().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    theta0 = dict(model.named_parameters())
    delta = {name: 1e-2 * torch.randn_like(value) for name, value in theta0.items()}
    primal, tangent = linearized_call(model, theta0, delta, args=(x,))

    def at(sign: float):
        moved = {name: value + sign * 1e-6 * delta[name] for name, value in theta0.items()}
        return torch.func.functional_call(model, moved, (x,))

    plus, minus = at(1.0), at(-1.0)
    if kind is TupleModel:
        for i in range(2):
            torch.testing.assert_close(
                tangent["pair"][i], (plus["pair"][i] - minus["pair"][i]) / 2e-6, rtol=1e-5, atol=1e-8
            )
        assert tangent["count"] is None and primal["count"] == 5 and primal["note"] is None
        with torch.no_grad():
            out = Linearized(model, delta)(x)
        torch.testing.assert_close(out["pair"][1], primal["pair"][1] + tangent["pair"][1])
    else:
        assert isinstance(primal, SequenceClassifierOutput) and isinstance(tangent, SequenceClassifierOutput)
        torch.testing.assert_close(tangent.logits, (plus.logits - minus.logits) / 2e-6, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(
            tangent.hidden_states[0], (plus.hidden_states[0] - minus.hidden_states[0]) / 2e-6, rtol=1e-5, atol=1e-8
        )


def test_linearized_subset_trains_only_its_parameters_and_equals_zero_tangents_elsewhere():
    torch.manual_seed(0)
    model = TupleModel().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    subset = Linearized(model, trainable=True, params=["b.weight"])
    assert [name for name, p in subset.named_parameters() if p.requires_grad] == ["delta.b__weight"]
    with torch.no_grad():
        subset.delta["b__weight"].normal_()
    full_delta = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    full_delta["b.weight"] = subset.deltas()["b.weight"].detach()
    with torch.no_grad():
        torch.testing.assert_close(subset(x)["pair"][1], Linearized(model, full_delta)(x)["pair"][1])
    with pytest.raises(TaskArithError, match="no parameters named"):
        Linearized(model, params=["c.weight"])
    with pytest.raises(TaskArithError, match="no linearized parameters"):
        Linearized(model, {"a.weight": torch.zeros(4, 3)}, params=["b.weight"])


def test_task_vector_of_a_model_trained_in_place_refuses_a_foreign_one(pretrained):
    copy_ = copy.deepcopy(pretrained.encoder).requires_grad_(False)
    with pytest.raises(TaskArithError, match="no trainable parameter"):
        task_vector(copy_, pretrained.encoder)
    with pytest.raises(TaskArithError, match="parameter names"):
        task_vector(nn.Linear(2, 2), pretrained.encoder)


class CountingOutputModel(TupleModel):
    def forward(self, x: torch.Tensor):  # type: ignore[override]
        hidden = torch.tanh(self.a(x))
        return SequenceClassifierOutput(logits=self.b(hidden), loss=None, attentions=(torch.argmax(hidden, dim=-1),))


def test_linearized_forward_keeps_non_float_fields_of_a_model_output():
    torch.manual_seed(0)
    model = CountingOutputModel()
    x = torch.randn(5, 3)
    with torch.no_grad():
        out = Linearized(model)(x)
        expected = model(x)
    assert isinstance(out, SequenceClassifierOutput)
    torch.testing.assert_close(out.logits, expected.logits)
    assert torch.equal(out.attentions[0], expected.attentions[0]) and out.attentions[0].dtype == torch.long


def test_a_decoder_with_a_key_value_cache_linearizes():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    decoder = GPT2Model(GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2, n_positions=8)).eval()
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        out = Linearized(decoder)(input_ids=ids)
        expected = decoder(input_ids=ids, use_cache=False)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)
    names = trainable_parameters(decoder, "attention")
    assert sorted(names) == ["h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight"]


def test_linearized_state_dict_holds_delta_only_and_saves_with_tied_weights(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    tied = BertForMaskedLM(
        BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    model = Linearized(tied, trainable=True)
    with torch.no_grad():
        next(iter(model.delta.parameters())).add_(1.0)
    state = model.state_dict()
    assert state and all(key.startswith("delta.") for key in state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    fresh = Linearized(tied, trainable=True)
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    for name, value in model.deltas().items():
        assert torch.equal(fresh.deltas()[name], value)


def test_attention_preset_takes_whole_blocks_of_every_family_it_knows(pretrained):
    from transformers import DebertaV2Config, DebertaV2Model

    names = trainable_parameters(pretrained.encoder, "attention")
    layers = pretrained.encoder.config.num_hidden_layers
    for projection in ("self.query", "self.key", "self.value", "output.dense"):
        assert sum(f"attention.{projection}.weight" in n for n in names) == layers
    assert len(names) == 4 * layers
    deberta = DebertaV2Model(
        DebertaV2Config(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    )
    found = trainable_parameters(deberta, "attention")
    assert len(found) == 8 and sum("query_proj" in n for n in found) == 2


def test_partly_known_attention_is_refused():
    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.ModuleDict({"output": nn.ModuleDict({"dense": nn.Linear(2, 2)})})

    with pytest.raises(TaskArithError, match="only in part"):
        trainable_parameters(Half(), "attention")
