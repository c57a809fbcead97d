"""PEFT LoRA adapters in and out of task vectors, checked against hand computations and against peft itself."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from taskarith import patterns
from taskarith.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_REPORT
from taskarith.errors import TaskArithError
from taskarith.merging import merge_task_vectors
from taskarith.merging.methods import MERGE_METHODS
from taskarith.vectors import TaskVector, align

# peft calls a deprecated transformers property when it wraps a model; the warning is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

QUERY = "encoder.layer.0.attention.self.query"
VALUE = "encoder.layer.0.attention.self.value"


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def trained(model: nn.Module, seed: int = 1, **lora: object) -> PeftModel:
    """A peft LoRA model on a copy of ``model`` whose factors are all nonzero, as after training."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / 4)
    return peft_model


def adapter(folder: Path, model: nn.Module, seed: int = 1, **lora: object) -> Path:
    lora.setdefault("target_modules", ["query", "value"])
    trained(model, seed, **lora).save_pretrained(folder)
    return folder


def factors(folder: Path, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    return tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters()}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    pa, pb = parameters(a), parameters(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.allclose(pa[name], pb[name], atol=1e-5), name


# reading: deltas --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lora", "scalings"),
    [
        ({"r": 2, "lora_alpha": 4}, {QUERY: 4 / 2, VALUE: 4 / 2}),
        ({"r": 4, "lora_alpha": 3, "use_rslora": True}, {QUERY: 3 / math.sqrt(4), VALUE: 3 / math.sqrt(4)}),
        (
            {"r": 2, "lora_alpha": 4, "rank_pattern": {"value": 3}, "alpha_pattern": {"query": 10}},
            {QUERY: 10 / 2, VALUE: 4 / 3},
        ),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_delta_is_scaling_times_b_at_a_keyed_by_the_base_parameter(tmp_path, lora, scalings):
    base = tiny_bert()
    folder = adapter(tmp_path / "adapter", base, **lora)
    tau = TaskVector.from_peft(folder, base)
    assert sorted(tau.deltas) == [f"{QUERY}.weight", f"{VALUE}.weight"]
    for module, scaling in scalings.items():
        lora_a, lora_b = factors(folder, module)
        assert torch.allclose(tau.deltas[f"{module}.weight"], scaling * lora_b @ lora_a, atol=1e-6)
    assert tau.mode == "standard" and tau.task == "adapter" and tau.config["source"] == "peft-lora"


def test_conv1d_delta_is_transposed_and_names_drop_the_wrapper_prefix(tmp_path):
    lm = tiny_gpt2_lm()
    folder = tmp_path / "gpt2"
    trained(lm, target_modules=["c_attn"], r=2, lora_alpha=6, fan_in_fan_out=True).save_pretrained(folder)
    bare = lm.transformer  # the adapter was trained on GPT2LMHeadModel: its names start with 'transformer.'
    tau = TaskVector.from_peft(folder, bare)
    assert list(tau.deltas) == ["h.0.attn.c_attn.weight"]
    assert "without the leading 'transformer.'" in tau.config["module_names"]
    lora_a, lora_b = factors(folder, "transformer.h.0.attn.c_attn")
    delta = tau.deltas["h.0.attn.c_attn.weight"]
    assert delta.shape == bare.h[0].attn.c_attn.weight.shape == (16, 48)  # Conv1D stores (in, out)
    assert torch.allclose(delta, (3 * lora_b @ lora_a).T, atol=1e-6)


def test_a_wrapping_base_gets_the_prefix_added(tmp_path):
    lm = tiny_gpt2_lm()
    folder = tmp_path / "bare"
    trained(lm.transformer, target_modules=["c_proj"], r=2, lora_alpha=2, fan_in_fan_out=True).save_pretrained(folder)
    tau = TaskVector.from_peft(folder, lm)
    assert sorted(tau.deltas) == ["transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"]
    assert tau.config["module_names"] == "under 'transformer.'"


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_base_plus_vector_equals_peft_merge_and_unload(tmp_path, family):
    if family == "bert":
        base: nn.Module = tiny_bert()
        peft_model = trained(base, target_modules=["query", "key", "dense"], r=3, lora_alpha=5, use_rslora=True)
    else:
        base = tiny_gpt2_lm()
        peft_model = trained(base, target_modules=["c_attn", "c_fc"], r=2, lora_alpha=4, fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path / "adapter")
    tau = TaskVector.from_peft(tmp_path / "adapter", base)
    assert_same_weights(tau.apply_to(base), peft_model.merge_and_unload())


def test_the_vector_is_refused_on_another_base(tmp_path):
    base = tiny_bert()
    tau = TaskVector.from_peft(adapter(tmp_path / "adapter", base, r=2), base)
    with pytest.raises(TaskArithError, match="was built on base model"):
        tau.apply_to(tiny_bert(seed=5))


# writing: SVD -----------------------------------------------------------------------------------------


def test_full_rank_write_back_loads_in_peft_and_reproduces_the_merged_vector(tmp_path):
    base = tiny_bert()
    tau_a = TaskVector.from_peft(adapter(tmp_path / "a", base, seed=1, r=2, lora_alpha=4), base)
    tau_b = TaskVector.from_peft(adapter(tmp_path / "b", base, seed=2, r=3, lora_alpha=3), base)
    merged = merge_task_vectors([tau_a, tau_b], "task_arithmetic", scaling=0.5)
    report = merged.save_peft(tmp_path / "out", base, rank=5, base_model_name_or_path="tiny-bert")
    assert report.error < 1e-6 and set(report.errors) == set(merged.deltas)
    config = json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (5, 5, "tiny-bert")
    assert TaskVector.from_peft(tmp_path / "out", base, base_name="tiny-bert").allclose(merged, atol=1e-6)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").merge_and_unload()
    assert_same_weights(loaded, merged.apply_to(base))


def test_conv1d_write_back_sets_fan_in_fan_out_and_round_trips_through_peft(tmp_path):
    bare = tiny_gpt2_lm().transformer
    peft_model = trained(bare, target_modules=["c_attn", "c_proj"], r=2, lora_alpha=4, fan_in_fan_out=True)
    peft_model.save_pretrained(tmp_path / "adapter")
    tau = TaskVector.from_peft(tmp_path / "adapter", bare)
    tau.save_peft(tmp_path / "out", bare, rank=2)
    assert json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(copy.deepcopy(bare), tmp_path / "out").merge_and_unload()
    assert_same_weights(loaded, peft_model.merge_and_unload())


def test_lower_rank_reports_the_truncation_error_computed_directly(tmp_path):
    base = tiny_bert()
    tau = TaskVector.from_peft(adapter(tmp_path / "a", base, r=4, lora_alpha=4), base)
    report = tau.save_peft(tmp_path / "out", base, rank=2)
    written = TaskVector.from_peft(tmp_path / "out", base)
    residual = total = 0.0
    for key, delta in tau.deltas.items():
        u, s, vh = torch.linalg.svd(delta.double())
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert torch.allclose(written.deltas[key].double(), best, atol=1e-5)
        gap, size = float((delta.double() - best).norm()), float(delta.double().norm())
        assert report.errors[key] == pytest.approx(gap / size, rel=1e-4)
        residual, total = residual + gap**2, total + size**2
    assert 0.05 < report.error == pytest.approx(math.sqrt(residual / total), rel=1e-4)
    saved = json.loads((tmp_path / "out" / EXPORT_REPORT).read_text())
    assert saved["relative_error"] == pytest.approx(report.error)
    assert saved["relative_error_per_parameter"] == pytest.approx(report.errors)


def test_rank_above_a_matrix_size_is_refused_naming_module_shape_and_rank(tmp_path):
    base = tiny_bert()
    tau = TaskVector.from_peft(adapter(tmp_path / "a", base, r=2), base)
    with pytest.raises(TaskArithError, match=re.escape(f"rank 17 is larger than '{QUERY}.weight' of shape (16, 16)")):
        tau.save_peft(tmp_path / "out", base, rank=17)
    assert not (tmp_path / "out").exists()


def test_non_matrix_deltas_are_refused_by_name_or_dropped_with_their_share_reported(tmp_path):
    base, finetuned = tiny_bert(), tiny_bert()
    with torch.no_grad():
        finetuned.encoder.layer[0].attention.self.query.weight.add_(0.1)
        finetuned.encoder.layer[0].attention.self.query.bias.add_(0.2)
        finetuned.embeddings.LayerNorm.weight.add_(0.3)
    tau = TaskVector.from_models(base, finetuned)
    with pytest.raises(TaskArithError, match=r"not weights of Linear or Conv1D.*'embeddings\.LayerNorm\.bias'.*--drop"):
        tau.save_peft(tmp_path / "out", base, rank=1)
    report = tau.save_peft(tmp_path / "out", base, rank=1, drop_non_matrix=True)
    kept = {key for key in tau.deltas if key not in report.dropped}
    assert "embeddings.word_embeddings.weight" in report.dropped and f"{QUERY}.bias" in report.dropped
    assert f"{QUERY}.weight" in kept and report.errors[f"{QUERY}.weight"] < 1e-6  # a constant shift is rank 1
    dropped = math.sqrt(sum(float(tau.deltas[key].double().square().sum()) for key in report.dropped))
    assert report.dropped_norm_fraction == pytest.approx(dropped / tau.norm())
    assert 0 < report.dropped_norm_fraction < 1


def test_a_linear_mode_vector_is_refused_unless_allowed(tmp_path):
    base = tiny_bert()
    tau = TaskVector.from_peft(adapter(tmp_path / "a", base, r=2), base).with_mode("linear")
    with pytest.raises(TaskArithError, match=r"linear-mode.*another function.*allow_linear"):
        tau.save_peft(tmp_path / "out", base, rank=2)
    assert tau.save_peft(tmp_path / "out", base, rank=2, allow_linear=True).error < 1e-6


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path):
    base = tiny_bert()
    tau = TaskVector.from_peft(adapter(tmp_path / "a", base, r=2), base)
    tau.save_peft(tmp_path / "out", base, rank=1)
    with pytest.raises(TaskArithError, match="already exists"):
        tau.save_peft(tmp_path / "out", base, rank=2)
    assert tau.save_peft(tmp_path / "out", base, rank=2, overwrite=True).error < 1e-6
    with pytest.raises(TaskArithError, match="taskarith did not write"):
        tau.save_peft(tmp_path / "a", base, rank=2, overwrite=True)  # a peft folder, not ours


# merging ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_vectors_from_adapters_merge_with_every_registered_method(tmp_path, method):
    base = tiny_bert()
    vectors = [
        TaskVector.from_peft(adapter(tmp_path / f"a{seed}", base, seed=seed, r=2, lora_alpha=4), base)
        for seed in (1, 2)
    ]
    merged = merge_task_vectors(vectors, method, seed=0)
    assert merged.deltas.keys() == vectors[0].deltas.keys() and merged.base_hash == vectors[0].base_hash
    assert merged.norm() > 0 and all(torch.isfinite(delta).all() for delta in merged.deltas.values())
    # Sparsifying methods (TIES, DARE, ...) leave full-rank deltas: only the full rank reproduces them.
    assert merged.save_peft(tmp_path / "out", base, rank=16).error < 1e-5
    assert TaskVector.from_peft(tmp_path / "out", base).allclose(merged, atol=1e-5)


# refusals ---------------------------------------------------------------------------------------------


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"use_dora": True}, "use_dora is set"),
        ({"modules_to_save": ["pooler.dense"]}, "modules_to_save is set"),
        ({"bias": "all"}, "bias is 'all'"),
        ({"bias": "lora_only"}, "bias is 'lora_only'"),
        ({"target_modules": ["word_embeddings"]}, r"lora_embedding_A.*embedding LoRA is not supported"),
    ],
    ids=["dora", "modules_to_save", "bias_all", "bias_lora_only", "embedding"],
)
def test_adapters_that_are_not_plain_lora_are_refused_by_name(tmp_path, lora, message):
    base = tiny_bert()
    with pytest.raises(TaskArithError, match=message):
        TaskVector.from_peft(adapter(tmp_path / "a", base, **lora), base)


def test_convolution_lora_is_refused(tmp_path):
    model = TinyConv()
    trained(model, target_modules=["conv"], r=2).save_pretrained(tmp_path / "conv")
    with pytest.raises(TaskArithError, match=r"'conv'\.lora_A has shape \(2, 2, 3, 3\): convolution LoRA"):
        TaskVector.from_peft(tmp_path / "conv", model)


def test_pickled_adapter_weights_are_refused_unread(tmp_path):
    base = tiny_bert()
    trained(base, target_modules=["query"]).save_pretrained(tmp_path / "a", safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").is_file()
    with pytest.raises(TaskArithError, match=r"adapter_model\.bin, a pickle, which taskarith never loads"):
        TaskVector.from_peft(tmp_path / "a", base)


def edit_config(folder: Path, **changes: object) -> Path:
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"peft_type": "LOHA"}, "peft_type is 'LOHA'"),
        ({"peft_type": None}, "peft_type is None"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'"),
        ({"r": 0}, "r must be an integer from 1 to 65536, found 0"),
        ({"r": -2}, "r must be an integer .* found -2"),
        ({"r": "2"}, "r must be an integer .* found '2'"),
        ({"r": True}, "r must be an integer .* found True"),
        ({"r": 10**40}, "r must be an integer .* found 1000000000000"),
        ({"lora_alpha": 1e300}, "lora_alpha must be a finite number"),
        ({"lora_alpha": [4]}, "lora_alpha must be a finite number"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"target_modules": 5}, "target_modules must be a string or a list"),
        ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a string"),
        ({"rank_pattern": ["query"]}, "rank_pattern must be an object"),
        ({"rank_pattern": {"query": 0}}, r"rank_pattern\['query'\] must be an integer"),
        ({"alpha_pattern": {"(": 2}}, r"alpha_pattern pattern '\(' is not a regular expression"),
        ({"r": 3}, r"'encoder\.layer\.0\.attention\.self\.query' has lora_A \(2, 16\) .* configured rank is 3"),
    ],
)
def test_malformed_configs_are_refused_naming_the_field(tmp_path, changes, message):
    base = tiny_bert()
    folder = edit_config(adapter(tmp_path / "a", base, r=2), **changes)
    with pytest.raises(TaskArithError, match=message):
        TaskVector.from_peft(folder, base)


def test_a_rank_pattern_that_backtracks_exponentially_is_stopped_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(patterns, "MATCH_SECONDS", 0.05)
    base = tiny_bert()
    folder = edit_config(adapter(tmp_path / "a", base, r=2), rank_pattern={"([a-z0-9.]|[a-z0-9.])+[!#]": 4})
    with pytest.raises(
        TaskArithError,
        match=r"a/adapter_config\.json: rank_pattern pattern '.*' took over 0.05 s to match encoder\.layer",
    ):
        TaskVector.from_peft(folder, base)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a JSON object, found list"),
        ("{", "not valid JSON"),
        ('{"r": ' + "9" * 5000 + "}", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        (
            '{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}',
            r"lora_alpha must be a finite number up to 1e\+09, found nan",
        ),
    ],
    ids=["list", "truncated", "huge_integer", "deep", "nan"],
)
def test_hostile_config_files_are_refused_in_one_line(tmp_path, text, message):
    base = tiny_bert()
    folder = adapter(tmp_path / "a", base, r=2)
    (folder / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(TaskArithError, match=message) as info:
        TaskVector.from_peft(folder, base)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def edit_weights(folder: Path, edit) -> Path:
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / ADAPTER_WEIGHTS)
    return folder


A_KEY = f"base_model.model.{QUERY}.lora_A.weight"
B_KEY = f"base_model.model.{QUERY}.lora_B.weight"
EMBEDDINGS = "base_model.model.embeddings.word_embeddings"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t[A_KEY].__setitem__((0, 0), float("nan")), f"tensor '{A_KEY}' contains NaN or Inf"),
        (lambda t: t.pop(B_KEY), f"module '{QUERY}' has no lora_B.weight"),
        (lambda t: t.pop(A_KEY), f"module '{QUERY}' has no lora_A.weight"),
        (lambda t: t.__setitem__("base_model.model.pooler.dense.bias", torch.zeros(16)), "is a trained bias"),
        (lambda t: t.__setitem__("pooler.dense.weight", torch.zeros(16, 16)), "is not a LoRA factor"),
        (lambda t: t.__setitem__(A_KEY, t[A_KEY].to(torch.int64)), "lora_A is torch.int64, not a float"),
        (lambda t: t.clear(), "holds no LoRA weights"),
        (
            lambda t: t.update(
                {f"{EMBEDDINGS}.lora_A.weight": torch.ones(2, 30), f"{EMBEDDINGS}.lora_B.weight": torch.ones(16, 2)}
            ),
            "'embeddings.word_embeddings.weight' belongs to a layer of type Embedding: embedding LoRA is not supported",
        ),
    ],
    ids=["nan", "missing_b", "missing_a", "bias", "stray", "integer", "empty", "embedding_pair"],
)
def test_damaged_weights_are_refused_naming_the_tensor(tmp_path, edit, message):
    base = tiny_bert()
    folder = edit_weights(adapter(tmp_path / "a", base, r=2), edit)
    with pytest.raises(TaskArithError, match=re.escape(message)):
        TaskVector.from_peft(folder, base)


def test_the_recorded_base_name_is_checked_unless_ignored(tmp_path):
    base = tiny_bert()
    folder = edit_config(adapter(tmp_path / "a", base, r=2), base_model_name_or_path="org/bert-tiny")
    assert TaskVector.from_peft(folder, base, base_name="org/bert-tiny/").deltas
    assert TaskVector.from_peft(folder, base).deltas  # no name given: nothing to compare
    with pytest.raises(TaskArithError, match=r"trained on base model 'org/bert-tiny', but the base given is 'org/gpt'"):
        TaskVector.from_peft(folder, base, base_name="org/gpt")
    assert TaskVector.from_peft(folder, base, base_name="org/gpt", ignore_base_name=True).deltas


def test_a_base_without_the_target_modules_or_of_other_shapes_is_refused(tmp_path):
    base = tiny_bert()
    folder = adapter(tmp_path / "a", base, r=2)
    with pytest.raises(TaskArithError, match=f"target module '{QUERY}' is not in the base model"):
        TaskVector.from_peft(folder, tiny_gpt2_lm())
    wider = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TaskArithError, match=re.escape(f"'{QUERY}.weight' has shape (32, 32)")):
        TaskVector.from_peft(folder, wider)
    with pytest.raises(TaskArithError, match="already holds LoRA layers"):
        TaskVector.from_peft(folder, trained(base, target_modules=["key"]))
    with pytest.raises(TaskArithError, match="no adapter_config.json"):
        TaskVector.from_peft(tmp_path, base)
    with pytest.raises(TaskArithError, match="the base must be a torch model, not a OrderedDict"):
        TaskVector.from_peft(folder, base.state_dict())  # type: ignore[arg-type]


def test_write_back_refuses_bad_ranks_and_parameters_the_base_lacks(tmp_path):
    base = tiny_bert()
    tau = TaskVector.from_peft(adapter(tmp_path / "a", base, r=2), base)
    for rank in (0, -1, True, 2.0):
        with pytest.raises(TaskArithError, match=f"rank {re.escape(repr(rank))}: must be an integer"):
            tau.save_peft(tmp_path / "out", base, rank=rank)  # type: ignore[arg-type]
    stray = TaskVector(deltas={"head.weight": torch.ones(2, 2)})
    with pytest.raises(TaskArithError, match="changes 'head.weight', which is not a parameter of the base"):
        stray.save_peft(tmp_path / "out", base, rank=1)
    with pytest.raises(TaskArithError, match="was built on base model"):
        tau.save_peft(tmp_path / "out", tiny_bert(seed=3), rank=2)
    assert not (tmp_path / "out").exists()


# command line -----------------------------------------------------------------------------------------


def test_cli_import_and_export_round_trip_through_peft(tmp_path, tiny_model_dir, cli):
    base = BertModel.from_pretrained(tiny_model_dir).eval()
    folder = adapter(tmp_path / "adapter", base, r=2, lora_alpha=4, target_modules=["query", "value"])
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    vector_file = tmp_path / "tau.safetensors"
    code, stdout, stderr = cli("lora", "import", folder, "--base", tiny_model_dir, "--out", vector_file)
    assert code == 0, stderr
    assert f"wrote {vector_file}: adapter, 4 weights" in stdout
    tau = TaskVector.load(vector_file)
    assert (
        tau.allclose(TaskVector.from_peft(folder, base))
        and tau.base_hash == TaskVector.from_peft(folder, base).base_hash
    )

    code, stdout, stderr = cli(
        "lora", "export", vector_file, "--base", tiny_model_dir, "--rank", 2, "--out", tmp_path / "out"
    )
    assert code == 0, stderr
    assert "rank-2 LoRA adapter of 4 modules, relative error" in stdout and f"{QUERY}.weight: " in stdout
    assert json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").merge_and_unload()
    assert_same_weights(loaded, tau.apply_to(base))

    again = tmp_path / "again.safetensors"
    code, _, stderr = cli(
        "lora", "import", tmp_path / "out", "--base", tiny_model_dir, "--base-name", "org/x", "-o", again
    )
    assert code == 2 and "error:" in stderr and "trained on base model" in stderr and "--ignore-base-name" in stderr
    assert not again.exists()
    code, _, stderr = cli(
        "lora",
        "import",
        tmp_path / "out",
        "--base",
        tiny_model_dir,
        "--base-name",
        "org/x",
        "--ignore-base-name",
        "-o",
        again,
    )
    assert code == 0, stderr
    assert TaskVector.load(again).allclose(tau, atol=1e-5)


def test_cli_export_drops_other_deltas_only_when_asked_and_reports_their_share(tmp_path, tiny_model_dir, cli):
    base = BertModel.from_pretrained(tiny_model_dir).eval()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        finetuned.encoder.layer[0].attention.self.query.weight.add_(0.1)
        finetuned.pooler.dense.bias.add_(0.1)
    vector_file = tmp_path / "tau.safetensors"
    TaskVector.from_models(base, finetuned).save(vector_file)
    args = ("lora", "export", vector_file, "--base", tiny_model_dir, "--rank", 1, "--out", tmp_path / "out")
    code, _, stderr = cli(*args)
    assert code == 2 and "--drop-others" in stderr and "Traceback" not in stderr
    code, stdout, stderr = cli(*args, "--drop-others")
    assert code == 0, stderr
    assert re.search(
        r"dropped \d+ deltas LoRA cannot hold, \d+\.\d\d% of the vector's norm .*\n(  .*\n)*  pooler\.dense\.bias\n",
        stdout,
    )
    code, _, stderr = cli("lora", "export", vector_file, "--base", tiny_model_dir, "--rank", 0, "--out", tmp_path / "x")
    assert code == 2 and "--rank 0: must be at least 1" in stderr


# documentation ----------------------------------------------------------------------------------------


def test_the_example_of_docs_adapters_md_runs(tmp_path, monkeypatch, capsys):
    page = (Path(__file__).parents[1] / "docs" / "adapters.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", page, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "docs/adapters.md should hold exactly one runnable python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "docs/adapters.md", "exec"), {"__name__": "docs_adapters"})
    assert re.fullmatch(r"relative error at rank 4: \d\.\de-\d\d\n", capsys.readouterr().out)
    assert (tmp_path / "merged-adapter" / ADAPTER_CONFIG).is_file()


def test_adapters_on_different_modules_merge_once_aligned(tmp_path):
    base = tiny_bert()
    tau_q = TaskVector.from_peft(adapter(tmp_path / "q", base, seed=1, r=2, target_modules=["query"]), base)
    tau_v = TaskVector.from_peft(adapter(tmp_path / "v", base, seed=2, r=2, target_modules=["value"]), base)
    with pytest.raises(TaskArithError, match="have different parameters"):
        merge_task_vectors([tau_q, tau_v])
    aligned = align([tau_q, tau_v], base)
    assert aligned[0].base_hash == aligned[1].base_hash and aligned[0].deltas.keys() == aligned[1].deltas.keys()
    merged = merge_task_vectors(aligned, "ties", density=1.0)
    assert_same_weights(merged.apply_to(base), tau_v.apply_to(tau_q.apply_to(base), check_base=False))
    with pytest.raises(TaskArithError, match="was built on base model"):
        align([tau_q], tiny_bert(seed=4))


class Nested(nn.Module):
    """``inner.lin`` ends with ``.lin``: peft's suffix match of target_modules=["lin"] would adapt both."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Module()
        self.inner.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.lin(self.lin(x))


def test_target_modules_adapt_exactly_the_vector_modules_when_a_suffix_would_catch_more(tmp_path):
    base = Nested()
    tau = TaskVector(deltas={"lin.weight": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))})
    tau.save_peft(tmp_path / "out", base, rank=4)
    assert json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())["target_modules"] == "(lin)"
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    assert [name for name, _ in loaded.named_modules() if name.endswith("lora_A")] == ["base_model.model.lin.lora_A"]
    assert_same_weights(loaded.merge_and_unload(), tau.apply_to(base))
