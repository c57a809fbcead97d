import math
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import BertModel

from taskarith.errors import TaskArithError
from taskarith.io import read_state_dict, state_hash
from taskarith.vectors import TaskVector, combine, cosine_similarity_matrix


def random_state(seed: int, shapes=((3, 4), (5,))) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(*shape, generator=g) for i, shape in enumerate(shapes)}


@pytest.fixture()
def pre() -> dict[str, torch.Tensor]:
    return random_state(0)


def vector(pre, seed: int, task: str) -> TaskVector:
    finetuned = {
        k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)) for k, v in pre.items()
    }
    return TaskVector.from_state_dicts(pre, finetuned, task=task)


def test_pre_plus_tau_minus_pre_is_tau(pre):
    tau = vector(pre, 1, "a")
    edited = pre + tau
    assert TaskVector.from_state_dicts(pre, edited).allclose(tau)
    assert all(torch.equal(pre[k], random_state(0)[k]) for k in pre), "the base must not be modified"


def test_tau_plus_minus_tau_is_zero(pre):
    tau = vector(pre, 1, "a")
    zero = tau + (-tau)
    assert all(torch.count_nonzero(v) == 0 for v in zero.deltas.values())
    assert zero.norm() == 0.0


def test_sum_scale_and_subtraction(pre):
    a, b = vector(pre, 1, "a"), vector(pre, 2, "b")
    total = sum([a, b])
    assert total.allclose(a + b)
    assert (total - b).allclose(a)
    assert (0.5 * total).allclose(total / 2)
    assert (a * 3).allclose(a + a + a)
    assert combine([a, b], [0.3, -0.7]).allclose(0.3 * a - 0.7 * b)
    assert total.task == "a+b" and (-a).task == "-a"


def test_norm_matches_flattened_vector(pre):
    tau = vector(pre, 1, "a")
    flat = torch.cat([v.flatten() for v in tau.deltas.values()])
    assert math.isclose(tau.norm(), float(flat.norm()), rel_tol=1e-6)


def test_cosine_matrix_hand_checked():
    base = {"w": torch.zeros(2)}
    x = TaskVector.from_state_dicts(base, {"w": torch.tensor([1.0, 0.0])})
    y = TaskVector.from_state_dicts(base, {"w": torch.tensor([0.0, 2.0])})
    z = TaskVector.from_state_dicts(base, {"w": torch.tensor([1.0, 1.0])})
    matrix = cosine_similarity_matrix([x, y, z])
    expected = torch.tensor(
        [[1, 0, 1 / math.sqrt(2)], [0, 1, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1 / math.sqrt(2), 1]],
        dtype=torch.float64,
    )
    assert torch.allclose(matrix, expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 10_000), st.floats(-3, 3), st.floats(-3, 3))
def test_algebra_is_linear(seed_a, seed_b, alpha, beta):
    pre = random_state(7)
    a, b = vector(pre, seed_a, "a"), vector(pre, seed_b, "b")
    assert (alpha * (a + b)).allclose(alpha * a + alpha * b, atol=1e-5)
    assert ((alpha + beta) * a).allclose(alpha * a + beta * a, atol=1e-5)
    assert (a + b).allclose(b + a)


def test_integer_buffers_take_no_part(pre):
    with_ids = {**pre, "position_ids": torch.arange(5)}
    tau = TaskVector.from_state_dicts(with_ids, {**with_ids, "w0": with_ids["w0"] + 1})
    assert "position_ids" not in tau.deltas
    edited = with_ids + tau
    assert torch.equal(edited["position_ids"], torch.arange(5))


def test_save_load_round_trip_keeps_metadata(tmp_path, pre):
    tau = TaskVector.from_state_dicts(
        pre, pre + vector(pre, 1, "x"), task="sst", mode="standard", config={"lr": 1e-4, "steps": 3}
    )
    tau.save(tmp_path / "tau.safetensors")
    loaded = TaskVector.load(tmp_path / "tau.safetensors")
    assert loaded.allclose(tau, atol=0, rtol=0)
    assert (loaded.base_hash, loaded.task, loaded.mode, loaded.config) == (
        tau.base_hash,
        "sst",
        "standard",
        {"lr": 1e-4, "steps": 3},
    )
    assert loaded.base_hash == state_hash(pre)


def test_applying_to_another_base_is_refused(pre):
    tau = vector(pre, 1, "a")
    other = random_state(99)
    with pytest.raises(TaskArithError) as info:
        other + tau
    assert tau.base_hash in str(info.value) and state_hash(other) in str(info.value)
    assert tau.apply_to(other, check_base=False)["w0"].shape == other["w0"].shape


def test_combining_vectors_of_different_bases_is_refused(pre):
    with pytest.raises(TaskArithError, match="different base models"):
        vector(pre, 1, "a") + vector(random_state(5), 2, "b")


def test_mismatched_keys_and_shapes_name_the_key(pre):
    with pytest.raises(TaskArithError, match="w1"):
        TaskVector.from_state_dicts(pre, {"w0": pre["w0"]})
    with pytest.raises(TaskArithError, match="w0"):
        TaskVector.from_state_dicts(pre, {**pre, "w0": torch.zeros(4, 3)})


def test_modules_edit_a_copy(tiny_model_dir):
    pre = BertModel.from_pretrained(tiny_model_dir)
    finetuned = BertModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.01)
    tau = TaskVector.from_models(pre, finetuned)
    edited = pre + tau
    assert edited is not pre
    assert TaskVector.from_models(pre, edited).allclose(tau)
    assert TaskVector.from_models(pre, pre + 0.0 * tau).norm() == 0.0


def test_from_checkpoints_sharded_equals_single_file(tmp_path, tiny_model_dir):
    finetuned = BertModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for i, p in enumerate(finetuned.parameters()):
            p.add_(0.001 * i)
    finetuned.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    save_file({k: v.contiguous() for k, v in finetuned.state_dict().items()}, tmp_path / "single.safetensors")
    a = TaskVector.from_checkpoints(tiny_model_dir, tmp_path / "sharded")
    b = TaskVector.from_checkpoints(tiny_model_dir / "model.safetensors", tmp_path / "single.safetensors")
    assert a.allclose(b, atol=0, rtol=0) and a.base_hash == b.base_hash


def test_bad_files_give_clear_errors(tmp_path, pre):
    with pytest.raises(TaskArithError, match="not found"):
        TaskVector.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    with pytest.raises(TaskArithError, match="junk.safetensors"):
        TaskVector.load(tmp_path / "junk.safetensors")
    save_file(pre, tmp_path / "plain.safetensors")
    with pytest.raises(TaskArithError, match="not a taskarith task vector"):
        TaskVector.load(tmp_path / "plain.safetensors")
    with pytest.raises(TaskArithError, match="NaN or Inf"):
        TaskVector.from_checkpoints(
            tmp_path / "plain.safetensors",
            _saved(tmp_path / "nan.safetensors", {**pre, "w1": torch.full((5,), float("nan"))}),
        )


def _saved(path: Path, tensors) -> Path:
    save_file(tensors, path)
    return path


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(_Exploit.marker),))


def test_malicious_pickle_is_not_executed(tmp_path):
    _Exploit.marker = str(tmp_path / "pwned")
    (tmp_path / "model.bin").write_bytes(pickle.dumps({"w": _Exploit()}))
    with pytest.raises(TaskArithError, match="refused"):
        read_state_dict(tmp_path / "model.bin")
    assert not (tmp_path / "pwned").exists()
