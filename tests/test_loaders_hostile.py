"""Hostile metadata and tensors given to the loaders (task vectors, K-FAC files, weights, task files, recipes,
checkpoints): each is one TaskArithError naming the file, never a RecursionError, a ValueError from Python's
integer-digit limit, an OverflowError or a torch error. Ends with a hypothesis fuzzer over metadata contents."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from taskarith.errors import TaskArithError
from taskarith.io import read_state_dict
from taskarith.kfac import KFACFactors
from taskarith.vectors import FORMAT, TaskVector

DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "7" * 5000


def vector_file(path: Path, metadata: dict[str, str] | None = None, tensors: dict | None = None) -> Path:
    meta = {"format": FORMAT, "base_hash": "h", "task": "t", "mode": "standard", "config": "{}", **(metadata or {})}
    save_file(tensors or {"w": torch.ones(3)}, str(path), metadata=meta)
    return path


def factor_file(path: Path, metadata: dict[str, str] | None = None, tensors: dict | None = None, **fields) -> Path:
    KFACFactors(
        **{"A": {"l": torch.eye(3)}, "S": {"l": torch.eye(2)}, "examples": {"t": 2}, "base_hash": "h", **fields}
    ).save(path)
    with safe_open(str(path), "pt") as fh:
        meta, saved = dict(fh.metadata()), {key: fh.get_tensor(key) for key in fh.keys()}
    save_file({**saved, **(tensors or {})}, str(path), metadata={**meta, **(metadata or {})})
    return path


# ---- item 11: nesting and digits --------------------------------------------------------------------------


@pytest.mark.parametrize("config", [DEEP, '{"a": ' + DEEP + "}", '{"steps": ' + HUGE + "}"])
def test_a_vectors_config_nested_deep_or_with_huge_numbers_is_named(tmp_path, config):
    with pytest.raises(TaskArithError, match=r"v.safetensors: metadata 'config' is not valid JSON"):
        TaskVector.load(vector_file(tmp_path / "v.safetensors", {"config": config}))


@pytest.mark.parametrize(
    "key, value", [("tasks", DEEP), ("examples", '{"t": ' + HUGE + "}"), ("layers", '{"l": ' + DEEP + "}")]
)
def test_a_kfac_files_metadata_nested_deep_or_with_huge_numbers_is_named(tmp_path, key, value):
    with pytest.raises(TaskArithError, match=r"k.safetensors: unreadable K-FAC metadata"):
        KFACFactors.load(factor_file(tmp_path / "k.safetensors", {key: value}))


def test_a_shard_index_nested_deep_or_with_huge_numbers_is_named(tmp_path):
    from taskarith.merging.streaming import CheckpointIndex

    save_file({"w": torch.ones(2)}, str(tmp_path / "shard.safetensors"))
    for text in (DEEP, '{"weight_map": {"w": "shard.safetensors"}, "metadata": {"total_size": ' + HUGE + "}}"):
        (tmp_path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(TaskArithError, match="model.safetensors.index.json: not"):
            read_state_dict(tmp_path)
        with pytest.raises(TaskArithError, match="model.safetensors.index.json: not"):
            CheckpointIndex.open(tmp_path)


def test_task_files_with_huge_labels_or_lone_surrogates_are_named(tmp_path):
    from taskarith.data import load_task

    (tmp_path / "big.csv").write_text("text,label\n" + "".join(f"row {i},{HUGE if i % 2 else 7}\n" for i in range(20)))
    with pytest.raises(TaskArithError, match=r"big.csv, line 3: 'label' is 5000 characters long"):
        load_task(str(tmp_path / "big.csv"))
    (tmp_path / "big.jsonl").write_text(
        "".join(f'{{"text": "t{i}", "label": {HUGE if i else 3}}}\n' for i in range(20))
    )
    with pytest.raises(TaskArithError, match=r"big.jsonl, line 2: malformed JSON"):
        load_task(str(tmp_path / "big.jsonl"))
    (tmp_path / "lone.jsonl").write_text(
        "".join(f'{{"text": "a\\ud800b {i}", "label": "{"xy"[i % 2]}"}}\n' for i in range(20))
    )
    with pytest.raises(TaskArithError, match=r"lone.jsonl, line 1: 'text' holds a lone surrogate \(\\ud800\)"):
        load_task(str(tmp_path / "lone.jsonl"))


@pytest.mark.parametrize(
    "line",
    [
        f"seed: {HUGE}",
        "shard_size: .inf",
        "shard_size: .nan",
        f"shard_size: {HUGE}.0 GB",
        f"models: [{{model: a, weight: {HUGE}}}]",
        f"parameters: {{scaling: {HUGE}}}",
    ],
)
def test_recipes_with_huge_numbers_or_infinite_sizes_are_one_error_line(cli, tmp_path, line):
    base = {"merge_method": "task_arithmetic", "base_model": "b", "models": "[a]", "out": "o"}
    key = line.split(":")[0]
    text = "".join(f"{k}: {v}\n" for k, v in base.items() if k != key) + line + "\n"
    (tmp_path / "recipe.yaml").write_text(text)
    code, _, err = cli("merge", tmp_path / "recipe.yaml")
    errors = [entry for entry in err.splitlines() if "error:" in entry]
    assert code == 2 and len(errors) == 1 and "recipe.yaml" in errors[0] and "Traceback" not in err, err
    assert len(errors[0]) < 400


def test_a_set_value_with_a_huge_integer_is_one_error_line(cli, tmp_path):
    code, _, err = cli("merge", "--base", "b", "--model", "a", "--out", tmp_path / "o", "--set", f"scaling={HUGE}")
    assert code == 2 and err.startswith("error: --set") and "not a number" in err and len(err) < 400, err


def test_a_checkpoint_with_a_valid_header_but_a_bad_config_is_named(tmp_path, tiny_csv):
    from taskarith.finetune import CHECKPOINT_FORMAT, FinetuneConfig, _load_checkpoint

    config = FinetuneConfig(task="t", steps=10)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    good = {"format": CHECKPOINT_FORMAT, "base_hash": "h", "config": json.dumps(config.to_json()), "step": "5"}
    for metadata, tensors, message in (
        ({"config": DEEP}, {}, "another configuration"),
        ({"config": '{"steps": ' + HUGE + "}"}, {}, "another configuration"),
        ({"step": "x"}, {}, "checkpoint step 'x' is not a step of this run"),
        ({"step": HUGE}, {}, "is not a step of this run"),
        ({"step": "11"}, {}, "checkpoint step '11' is not a step of this run"),
        ({}, {"param/p": torch.zeros(3)}, r"checkpoint tensor 'param/p' is missing or not torch.float32 \(2,\)"),
        ({}, {"param/p": torch.zeros(2), "exp_avg/p": torch.zeros(5)}, "'exp_avg/p' is missing or not"),
        ({}, {"other": torch.zeros(2)}, "'param/p' is missing"),
    ):
        save_file(
            tensors or {"param/p": torch.zeros(2)}, str(tmp_path / "c.safetensors"), metadata={**good, **metadata}
        )
        with pytest.raises(TaskArithError, match=rf"c.safetensors: .*{message}"):
            _load_checkpoint(tmp_path / "c.safetensors", config, "h", [("p", param)], optimizer)
    save_file({"param/p": torch.ones(2)}, str(tmp_path / "c.safetensors"), metadata=good)
    assert _load_checkpoint(tmp_path / "c.safetensors", config, "h", [("p", param)], optimizer) == 5
    assert param.tolist() == [1.0, 1.0]


# ---- item 12 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [torch.int16, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2],
)
def test_tensors_that_are_not_float_deltas_are_refused(tmp_path, dtype):
    tensor = torch.ones(3).to(dtype)
    with pytest.raises(TaskArithError, match=rf"v.safetensors: tensor 'w' is {dtype}; a task vector holds float16"):
        TaskVector.load(vector_file(tmp_path / "v.safetensors", tensors={"w": tensor}))


def test_a_uint16_vector_is_refused_by_compose(cli, tmp_path):
    save_file(
        {"w": torch.full((3,), 65535, dtype=torch.int32)},
        str(tmp_path / "raw.safetensors"),
        metadata={"format": FORMAT, "base_hash": "h", "task": "t", "mode": "standard", "config": "{}"},
    )
    code, _, err = cli("compose", "--add", tmp_path / "raw.safetensors", "--out", tmp_path / "sum.safetensors")
    assert code == 2 and "tensor 'w' is torch.int32" in err and not (tmp_path / "sum.safetensors").exists()


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"A/l": torch.full((3, 3), float("nan"))}, r"K-FAC factor 'A/l' contains NaN or Inf"),
        ({"S/l": torch.tensor([[1.0, float("inf")], [0.0, 1.0]])}, r"K-FAC factor 'S/l' contains NaN or Inf"),
        ({"A/l": torch.eye(3, dtype=torch.int64)}, r"K-FAC factor 'A/l' is torch.int64, not a float tensor"),
    ],
)
def test_kfac_files_with_non_finite_or_non_float_factors_are_refused(tmp_path, tensors, message):
    with pytest.raises(TaskArithError, match=rf"k.safetensors: {message}"):
        KFACFactors.load(factor_file(tmp_path / "k.safetensors", tensors=tensors))


@pytest.mark.parametrize("rows", [[-1, 0], [2, 1], [1, 1], [0.5, 1.5]])
def test_kfac_row_indices_out_of_range_are_refused(tmp_path, rows):
    path = factor_file(
        tmp_path / "k.safetensors",
        diag={"emb": torch.ones(2, 4)},
        rows={"emb": torch.tensor([0, 1])},
        tensors={"rows/emb": torch.tensor(rows)},
    )
    with pytest.raises(TaskArithError, match=r"K-FAC row index 'rows/emb' is not"):
        KFACFactors.load(path)


def test_the_pickle_refusal_is_one_line_without_torchs_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(TaskArithError) as info:
        read_state_dict(tmp_path / "evil.bin")
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message and "trust" not in message, message
    assert message.startswith(f"{tmp_path / 'evil.bin'}: refused to load") and len(message) < 400
    assert not (tmp_path / "ran").exists()


def test_consensus_with_k_above_the_number_of_models_is_refused(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    from taskarith.merging import merge_checkpoints, merge_task_vectors

    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        save_numpy(
            {"w": np.random.default_rng(seed).standard_normal(8).astype(np.float32)},
            str(tmp_path / f"{name}.safetensors"),
        )
    with pytest.raises(TaskArithError, match=r"consensus 'k' = 3 is more than the 2 models merged"):
        merge_checkpoints(
            tmp_path / "base.safetensors",
            [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
            tmp_path / "out",
            "consensus",
            k=3,
        )
    vectors = [TaskVector(deltas={"w": torch.randn(8)}, base_hash="h", task=t) for t in "ab"]
    with pytest.raises(TaskArithError, match=r"consensus 'k' = 3 is more than the 2 models"):
        merge_task_vectors(vectors, "consensus", k=3)
    assert merge_task_vectors(vectors, "consensus", k=2).deltas["w"].shape == (8,)
    assert not (tmp_path / "out").exists()


# ---- a fuzzer over metadata contents, for every loader -----------------------------------------------------

_LEAF = st.one_of(
    st.integers(min_value=-(10**5000), max_value=10**5000),
    st.floats(allow_nan=True),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["\x1b]0;x\x07", "[/x]", "\u202e", "\x00", "\ud800"]),
    st.none(),
    st.booleans(),
)
_JSON = st.recursive(
    _LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


def _text(value: object, depth: int) -> str:
    """``value`` as JSON (Python's huge-integer limit lifted for writing), inside ``depth`` nested arrays."""
    import sys

    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        text = json.dumps(value)
    finally:
        sys.set_int_max_str_digits(limit)
    return "[" * depth + text + "]" * depth


FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(
    value=_JSON,
    depth=st.sampled_from([0, 1, 50, 5000, 60_000]),
    key=st.sampled_from(["config", "task", "base_hash", "mode"]),
)
def test_fuzz_task_vector_metadata(tmp_path_factory, value, depth, key):
    path = tmp_path_factory.mktemp("v") / "v.safetensors"
    try:
        vector_file(path, {key: _text(value, depth)})
    except UnicodeEncodeError:  # a lone surrogate cannot even be written into a header
        return
    try:
        TaskVector.load(path)
    except TaskArithError:
        pass


@FUZZ
@given(
    value=_JSON,
    depth=st.sampled_from([0, 1, 50, 5000, 60_000]),
    key=st.sampled_from(["tasks", "examples", "sampling", "layers", "kinds", "zero", "base_hash", "merge"]),
)
def test_fuzz_kfac_metadata(tmp_path_factory, value, depth, key):
    path = tmp_path_factory.mktemp("k") / "k.safetensors"
    try:
        factor_file(path, {key: _text(value, depth)})
    except UnicodeEncodeError:
        return
    try:
        KFACFactors.load(path)
    except TaskArithError:
        pass


@FUZZ
@given(value=_JSON, depth=st.sampled_from([0, 1, 5000, 60_000]), place=st.sampled_from(["weight_map", "value", "root"]))
def test_fuzz_shard_index_contents(tmp_path_factory, value, depth, place):
    folder = tmp_path_factory.mktemp("sharded")
    save_file({"w": torch.ones(2)}, str(folder / "shard.safetensors"))
    index = {"weight_map": {"w": "shard.safetensors"}}
    if place == "weight_map":
        index["weight_map"] = value
    elif place == "value":
        index["weight_map"]["w"] = value
    text = _text(value, depth) if place == "root" else _text(index, depth)
    try:
        (folder / "model.safetensors.index.json").write_text(text, encoding="utf-8")
    except UnicodeEncodeError:
        return
    try:
        read_state_dict(folder)
    except TaskArithError:
        pass
