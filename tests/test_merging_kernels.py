"""The torch-free streaming path: NumPy and torch run the same kernels to the same bits, bfloat16 is
rounded as torch rounds it, and a checkpoint merge with task arithmetic or TIES never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from taskarith.errors import TaskArithError
from taskarith.io import read_state_dict
from taskarith.merging import kernels, merge_checkpoints, merge_task_vectors
from taskarith.merging.methods import merged_delta, task_arithmetic, ties
from taskarith.merging.streaming import CheckpointIndex, from_working, read_bytes, to_working
from taskarith.vectors import TaskVector

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Few distinct magnitudes, both zeros and both signs: ties at the trim threshold, masses that cancel
# exactly, and signed zeros are the cases where two implementations would drift apart.
_ENTRY = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 0.25, -0.75, 3.0, 1e-3, -1e-3])
_DELTAS = st.integers(1, 4).flatmap(
    lambda tasks: st.integers(1, 40).flatmap(
        lambda size: st.lists(st.lists(_ENTRY, min_size=size, max_size=size), min_size=tasks, max_size=tasks)
    )
)


def bits(array: np.ndarray | torch.Tensor) -> bytes:
    return (array.numpy() if isinstance(array, torch.Tensor) else array).tobytes()


@FUZZ
@given(_DELTAS, st.sampled_from([0.1, 0.2, 0.5, 1.0]), st.sampled_from([1.0, 0.3]), st.sampled_from([1, 3, 1 << 18]))
def test_numpy_and_torch_run_ties_and_task_arithmetic_to_the_same_bits(deltas, density, scaling, chunk):
    arrays = [np.array(d, dtype=np.float32) for d in deltas]
    tensors = [torch.tensor(d, dtype=torch.float32) for d in deltas]
    original = kernels._CHUNK
    kernels._CHUNK = chunk  # chunks of 1 and 3 make the two-pass majority cross chunk boundaries
    try:
        expected_ties = ties(tensors, density=density, scaling=scaling)
        assert bits(kernels.ties(arrays, density, scaling)) == bits(expected_ties)
        assert bits(kernels.ties([a.copy() for a in arrays], density, scaling, in_place=True)) == bits(expected_ties)
    finally:
        kernels._CHUNK = original
    expected_sum = task_arithmetic(tensors, scaling=scaling)
    assert bits(kernels.task_arithmetic(arrays, scaling)) == bits(expected_sum)
    assert bits(kernels.task_arithmetic([a.copy() for a in arrays], scaling, in_place=True)) == bits(expected_sum)


def test_top_k_mask_gives_ties_to_the_lowest_indices_in_both_libraries():
    magnitude = [1.0, 3.0, 3.0, 3.0, 2.0, 3.0]
    for k, kept in [(2, [1, 2]), (3, [1, 2, 3]), (5, [1, 2, 3, 4, 5]), (0, []), (6, [0, 1, 2, 3, 4, 5])]:
        for array in (np.array(magnitude, dtype=np.float32), torch.tensor(magnitude)):
            mask = kernels.top_k_mask(array, k)
            assert [i for i, keep in enumerate(mask.tolist()) if keep] == kept


def test_top_k_mask_of_half_precision_tensors_uses_torch_itself():
    magnitude = torch.tensor([1.0, 3.0, 2.0, 3.0], dtype=torch.bfloat16)  # NumPy has no bfloat16
    assert kernels.top_k_mask(magnitude, 2).tolist() == [False, True, False, True]


def test_majority_breaks_a_cancelled_mass_across_chunks():
    # Entry 3's mass cancels (1 - 1); the other entries elect +1 three times and -1 once, so the
    # tensor's majority (+1) is elected there and the task agreeing with it (+1) is kept alone.
    deltas = [
        np.array([1.0, 1.0, -1.0, 1.0, 1.0], dtype=np.float32),
        np.array([1.0, 1.0, -1.0, -1.0, 1.0], dtype=np.float32),
    ]
    original = kernels._CHUNK
    kernels._CHUNK = 2
    try:
        merged = kernels.disjoint_mean(deltas)
    finally:
        kernels._CHUNK = original
    assert merged.tolist() == [1.0, 1.0, -1.0, 1.0, 1.0]


@FUZZ
@given(st.integers(0, 2**32 - 1))
def test_bfloat16_rounding_matches_torch(pattern):
    value = np.array([pattern], dtype=np.uint32).view(np.float32)
    ours = from_working(value, "BF16")
    if np.isnan(value[0]):
        assert ours.tolist() == [0x7FC0]
        return
    theirs = torch.from_numpy(value.copy()).to(torch.bfloat16).view(torch.uint16).numpy()
    assert ours.tolist() == theirs.tolist()
    widened = to_working(ours.view(np.uint8), "BF16")
    assert bits(widened) == bits(torch.from_numpy(ours.view(np.int16).copy()).view(torch.bfloat16).float())


def test_bfloat16_rounding_matches_torch_on_every_halfway_and_neighbouring_pattern():
    # Random patterns almost never sit exactly between two bfloat16 values (1 in 65536), where
    # round-half-to-even differs from rounding half up; so every upper half, with the lower halves
    # around the midpoint and at the ends.
    upper = np.arange(2**16, dtype=np.uint32) << 16
    patterns = (upper[:, None] | np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)).reshape(-1)
    values = patterns.view(np.float32)
    values = values[~np.isnan(values)]
    theirs = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(from_working(values, "BF16"), theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "method, params", [("task_arithmetic", {"scaling": 0.7}), ("ties", {"density": 0.4}), ("dare", {"density": 0.6})]
)
def test_streamed_low_and_high_precision_merges_equal_the_torch_definition(tmp_path, dtype, method, params):
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(7, 5, generator=generator).to(dtype), "ids": torch.arange(4)}
    fts = [
        {
            "w": (base["w"].double() + 0.01 * torch.randn(7, 5, generator=generator, dtype=torch.float64)).to(dtype),
            "ids": torch.arange(4),
        }
        for _ in range(3)
    ]
    save_file(base, tmp_path / "base.safetensors")
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"ft{i}.safetensors")
    weights = [0.3, 1.0, 1 / 3]
    merge_checkpoints(
        tmp_path / "base.safetensors",
        [tmp_path / f"ft{i}.safetensors" for i in range(3)],
        tmp_path / "out",
        method,
        weights=weights,
        seed=5,
        **params,
    )
    # The definition: deltas in working precision (float32, float64 for float64), weighted, merged, added, rounded once.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    deltas = [w * (ft["w"].to(work) - base["w"].to(work)) for ft, w in zip(fts, weights, strict=True)]
    filled = {
        "task_arithmetic": {"scaling": 0.7},
        "ties": {"density": 0.4, "scaling": 1.0},
        "dare": {"density": 0.6, "scaling": 1.0},
    }[method]
    expected = (base["w"].to(work) + merged_delta("w", deltas, method, filled, 5)).to(dtype)
    merged = read_state_dict(tmp_path / "out")
    assert merged["w"].dtype == dtype and torch.equal(
        merged["w"].view(-1).view(torch.uint8), expected.view(-1).view(torch.uint8)
    )
    assert torch.equal(merged["ids"], base["ids"])


def test_weights_that_are_not_powers_of_two_stream_like_scaled_task_vectors(tmp_path):
    generator = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(300, generator=generator), "b": torch.randn(4, 6, generator=generator)}
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i in range(3):
        save_file(
            {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()},
            tmp_path / f"ft{i}.safetensors",
        )
        paths.append(tmp_path / f"ft{i}.safetensors")
    weights = [0.3, 0.7, 1 / 3]
    for method in ("task_arithmetic", "ties"):
        merge_checkpoints(tmp_path / "base.safetensors", paths, tmp_path / method, method, weights=weights)
        vectors = [
            w * TaskVector.from_checkpoints(tmp_path / "base.safetensors", p)
            for p, w in zip(paths, weights, strict=True)
        ]
        expected = merge_task_vectors(vectors, method).apply_to(base)
        streamed = read_state_dict(tmp_path / method)
        assert all(torch.equal(streamed[k], expected[k]) for k in base)


_MERGE_WITHOUT_TORCH = """
import sys
from typer.testing import CliRunner
from taskarith.cli import app
for method in ("task_arithmetic", "ties"):
    result = CliRunner().invoke(app, ["merge", "--method", method, "--base", sys.argv[1], "--model", sys.argv[2],
                                      "--model", sys.argv[3] + ":0.5", "--out", sys.argv[4] + "/" + method])
    assert result.exit_code == 0, result.output
print("torch" in sys.modules, "transformers" in sys.modules)
"""


def test_merging_checkpoints_with_task_arithmetic_or_ties_never_imports_torch(tmp_path):
    generator = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(50, generator=generator)}
    save_file(base, tmp_path / "base.safetensors")
    for i in range(2):
        save_file({"w": base["w"] + torch.randn(50, generator=generator)}, tmp_path / f"ft{i}.safetensors")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _MERGE_WITHOUT_TORCH,
            str(tmp_path / "base.safetensors"),
            str(tmp_path / "ft0.safetensors"),
            str(tmp_path / "ft1.safetensors"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["False", "False"]
    assert (tmp_path / "ties" / "model.safetensors").is_file()


def test_float8_checkpoints_are_refused_by_name(tmp_path):
    save_file({"w": torch.zeros(4).to(torch.float8_e4m3fn)}, tmp_path / "base.safetensors")
    save_file({"w": torch.ones(4).to(torch.float8_e4m3fn)}, tmp_path / "ft.safetensors")
    with pytest.raises(TaskArithError, match=r"base.safetensors: tensor 'w' is F8_E4M3; dequantize"):
        merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_truncated_after_its_header_was_read_is_named(tmp_path):
    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, tmp_path / "m.safetensors")
    index = CheckpointIndex.open(tmp_path / "m.safetensors")
    size = (tmp_path / "m.safetensors").stat().st_size
    with open(tmp_path / "m.safetensors", "r+b") as fh:
        fh.truncate(size - 100)
    last = max(index.entries.values(), key=lambda entry: entry.end)
    with pytest.raises(TaskArithError, match=r"m.safetensors: the file was replaced or changed during the merge"):
        read_bytes(last)


def test_headers_are_validated_by_the_library_before_offsets_are_trusted(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(TaskArithError, match="bad.safetensors: not a readable safetensors file"):
        CheckpointIndex.open(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, bad):
    save_file({"w": torch.zeros(4)}, tmp_path / "base.safetensors")
    save_file({"w": torch.tensor([0.0, bad, 0.0, 0.0])}, tmp_path / "ft.safetensors")
    for method in ("task_arithmetic", "ties", "dare"):
        with pytest.raises(TaskArithError, match=r"ft.safetensors: tensor 'w' contains NaN or Inf"):
            merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"], tmp_path / "out", method)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "ft.safetensors"]


def test_periodic_sync_works_on_files_and_is_skipped_for_in_memory_buffers(tmp_path, monkeypatch):
    import io as std_io

    from safetensors.torch import load as load_bytes

    import taskarith.io as taskarith_io

    monkeypatch.setattr(taskarith_io, "SYNC_BYTES", 16)  # sync after every tensor
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}
    buffer = std_io.BytesIO()
    taskarith_io.write_safetensors(buffer, tensors, {})
    assert all(torch.equal(v, tensors[k]) for k, v in load_bytes(buffer.getvalue()).items())
    taskarith_io.save_tensors(tmp_path / "t.safetensors", tensors, {})
    assert (tmp_path / "t.safetensors").read_bytes() == buffer.getvalue()
