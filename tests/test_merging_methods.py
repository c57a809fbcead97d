"""Merging methods: hand-checked tiny cases, properties, and the registry's contract.

Expected values are written out literally (worked by hand in the comments), not recomputed with the
formula under test.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taskarith.errors import TaskArithError
from taskarith.merging.methods import (
    DEFAULTS,
    HYPERPARAMETERS,
    MERGE_METHODS,
    STATISTICS_METHODS,
    breadcrumbs,
    check_hyperparameters,
    consensus,
    dare,
    dare_ties,
    get_merge_method,
    merge_task_vectors,
    merged_delta,
    parameter_generator,
    task_arithmetic,
    task_singular_components,
    ties,
    tsv,
)
from taskarith.vectors import TaskVector


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# task arithmetic ------------------------------------------------------------------------------


def test_task_arithmetic_two_tensors():
    # 2 * ([1, 2, -3] + [0.5, -2, 1]) = 2 * [1.5, 0, -2]
    merged = task_arithmetic([t(1, 2, -3), t(0.5, -2, 1)], scaling=2.0)
    assert torch.equal(merged, t(3, 0, -4))


finite = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(
    pairs=st.lists(st.tuples(finite, finite), min_size=1, max_size=8),
    scaling=st.floats(min_value=-3, max_value=3, allow_nan=False),
    c=st.floats(min_value=-3, max_value=3, allow_nan=False),
)
def test_task_arithmetic_is_linear(pairs, scaling, c):
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    merged = task_arithmetic([a, b], scaling=scaling)
    assert torch.allclose(merged, scaling * a + scaling * b, atol=1e-9)
    assert torch.allclose(task_arithmetic([c * a, c * b], scaling=scaling), c * merged, atol=1e-8)


# TIES -----------------------------------------------------------------------------------------


def test_ties_trims_elects_by_mass_and_averages_only_agreeing_entries():
    # density 0.5 of 4 entries keeps the 2 largest magnitudes per task:
    #   [3, 1, -4, 0.5]   -> [ 3, 0, -4, 0]
    #   [2, -0.5, -1, 6]  -> [ 2, 0,  0, 6]
    #   [-7, 2, 0.25, -1] -> [-7, 2,  0, 0]
    # entry 0: values 3, 2, -7. Two of three are positive, but the mass 3 + 2 - 7 = -2 elects "-",
    #          so only -7 agrees -> -7.
    # entry 1: only 2 survives trimming (-0.5 was trimmed, else the mean would mix signs) -> 2.
    # entry 2: -4 (0.25 trimmed) -> -4.    entry 3: 6 (0.5 and -1 trimmed) -> 6.
    deltas = [t(3, 1, -4, 0.5), t(2, -0.5, -1, 6), t(-7, 2, 0.25, -1)]
    assert torch.equal(ties(deltas, density=0.5), t(-7, 2, -4, 6))
    assert torch.equal(ties(deltas, density=0.5, scaling=0.5), t(-3.5, 1, -2, 3))


def test_ties_disjoint_mean_divides_by_the_agreeing_count():
    # No trimming. Entry 0: 2, 4, -1 -> mass 5 elects "+", mean of {2, 4} = 3 (not 6, not 5/3).
    # Entry 1: -1, 3, -1 -> mass 1 elects "+", only 3 agrees -> 3.
    assert torch.equal(ties([t(2, -1), t(4, 3), t(-1, -1)], density=1.0), t(3, 3))


def test_ties_breaks_magnitude_ties_by_lowest_index():
    # Keep 2 of 4: 3 is largest, then 1, -1, 1 tie in magnitude: the lowest index (1) wins.
    assert torch.equal(ties([t(3, 1, -1, 1)], density=0.5), t(3, 1, 0, 0))


def test_ties_all_zero_and_cancelling_mass():
    zeros = torch.zeros(2, 3)
    merged = ties([zeros, zeros])
    assert torch.equal(merged, zeros)
    # Entry 0's mass cancels (1 - 1); the tensor's other elected sign is "+", so 1 agrees -> 1.
    # Entry 1: 2 and 1 agree with "+" -> mean 1.5.
    assert torch.equal(ties([t(1, 2), t(-1, 1)], density=1.0), t(1, 1.5))
    # A lone cancelling entry has no majority to fall back on: it merges to 0, not NaN.
    assert torch.equal(ties([t(1), t(-1)], density=1.0), t(0))


@settings(max_examples=50, deadline=None)
@given(columns=st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=6))
def test_ties_entries_are_zero_or_agree_with_the_elected_sign(columns):
    deltas = [torch.tensor([col[i] for col in columns], dtype=torch.float64) for i in range(3)]
    merged = ties(deltas, density=1.0)
    mass = sum(deltas)
    largest = torch.stack(deltas).abs().max(dim=0).values
    for value, m, bound in zip(merged.tolist(), mass.tolist(), largest.tolist(), strict=True):
        assert value == 0 or m == 0 or math.copysign(1, value) == math.copysign(1, m)
        assert abs(value) <= bound + 1e-9  # a mean of agreeing entries never exceeds the largest


# DARE -----------------------------------------------------------------------------------------


def test_dare_is_deterministic_for_a_seed():
    deltas = [torch.randn(50, generator=seeded(1)), torch.randn(50, generator=seeded(2))]
    first = dare(deltas, generator=seeded(7), density=0.3)
    assert torch.equal(first, dare(deltas, generator=seeded(7), density=0.3))
    assert not torch.equal(first, dare(deltas, generator=seeded(8), density=0.3))


def test_dare_survivors_are_input_over_density():
    x = torch.arange(1.0, 65.0)
    merged = dare([x], generator=seeded(0), density=0.25)
    kept = merged != 0
    assert 0 < int(kept.sum()) < 64
    # 1 / 0.25 = 4 exactly, so survivors are exactly 4x.
    assert torch.equal(merged[kept], 4 * x[kept])


def test_dare_is_unbiased_over_seeds():
    # Each entry's output is x/d with probability d, else 0: mean x, standard deviation
    # |x| sqrt((1 - d) / d) = |x| at d = 0.5. Over N = 2000 seeds the mean's standard error is
    # |x| / sqrt(2000) ~ 0.022 |x|; the tolerance 0.12 |x| is over 5 standard errors.
    x = t(1, -2, 0.5, 3)
    runs = 2000
    total = torch.zeros(4)
    for seed in range(runs):
        total += dare([x], generator=seeded(seed), density=0.5)
    assert torch.all((total / runs - x).abs() <= 0.12 * x.abs())


def test_dare_with_density_one_is_task_arithmetic():
    deltas = [t(1, -2, 3), t(0.5, 0.5, -4)]
    assert torch.equal(
        dare(deltas, generator=seeded(0), density=1.0, scaling=0.7), task_arithmetic(deltas, scaling=0.7)
    )


def test_dare_ties_rescales_then_takes_the_disjoint_mean():
    n = 2000
    # Same signs, keep probability 0.5: survivors are 2/0.5 = 4 and 4/0.5 = 8. Per entry:
    # neither survives -> 0; only the first -> 4; only the second -> 8; both -> mean(4, 8) = 6
    # (a disjoint sum would give 12).
    same = dare_ties([torch.full((n,), 2.0), torch.full((n,), 4.0)], generator=seeded(3), density=0.5)
    assert set(same.tolist()) == {0.0, 4.0, 6.0, 8.0}
    # Opposite signs: 2 -> 4, -6 -> -12; both survive: mass 4 - 12 elects "-" -> -12.
    mixed = dare_ties([torch.full((n,), 2.0), torch.full((n,), -6.0)], generator=seeded(3), density=0.5)
    assert set(mixed.tolist()) == {0.0, 4.0, -12.0}
    deltas = [t(2, -1), t(4, 3), t(-1, -1)]
    assert torch.equal(dare_ties(deltas, generator=seeded(0), density=1.0), ties(deltas, density=1.0))


# Breadcrumbs ----------------------------------------------------------------------------------


def test_breadcrumbs_masks_outliers_and_small_entries():
    # 10 entries, gamma 0.1 removes the single largest magnitude, density 0.5 keeps the next 5.
    # Task 1 magnitudes 1..10: drop 10 (outlier), keep 9, 8, 7, 6, 5, drop 4..1.
    # Task 2 magnitudes [0.5, 4, 1, 2, 0, 0, 3, 0, 0, 6]: drop 6, keep 4, 3, 2, 1, 0.5.
    first = t(1, -2, 3, -4, 5, -6, 7, -8, 9, -10)
    second = t(0.5, 4, -1, 2, 0, 0, 3, 0, 0, 6)
    assert torch.equal(breadcrumbs([first], density=0.5, gamma=0.1), t(0, 0, 0, 0, 5, -6, 7, -8, 9, 0))
    assert torch.equal(breadcrumbs([second], density=0.5, gamma=0.1), t(0.5, 4, -1, 2, 0, 0, 3, 0, 0, 0))
    # The sum of the two masked deltas.
    assert torch.equal(
        breadcrumbs([first, second], density=0.5, gamma=0.1, scaling=1.0), t(0.5, 4, -1, 2, 5, -6, 10, -8, 9, 0)
    )


# Consensus ------------------------------------------------------------------------------------


CONSENSUS_DELTAS = [t(1, 0, 2, -1), t(1, 3, 0, 1), t(0, 1, -1, 4)]
# tau_MTL = [2, 4, 1, 4]. With lambda 0.4, task t's mask is |tau_t| >= 0.4 |tau_MTL - tau_t|:
#   task 1: |[1, 0, 2, 1]| vs 0.4 * [1, 4, 1, 5] = [0.4, 1.6, 0.4, 2.0] -> [1, 0, 1, 0]
#   task 2: |[1, 3, 0, 1]| vs 0.4 * [1, 1, 1, 3] = [0.4, 0.4, 0.4, 1.2] -> [1, 1, 0, 0]
#   task 3: |[0, 1, 1, 4]| vs 0.4 * [2, 3, 2, 0] = [0.8, 1.2, 0.8, 0.0] -> [0, 0, 1, 1]
# votes per entry: [2, 1, 2, 1]


@pytest.mark.parametrize(
    ("k", "expected"),
    [(0, (2, 4, 1, 4)), (1, (2, 4, 1, 4)), (2, (2, 0, 1, 0)), (3, (0, 0, 0, 0))],
)
def test_consensus_masks(k, expected):
    assert torch.equal(consensus(CONSENSUS_DELTAS, tall_lambda=0.4, k=k), t(*expected))


def test_consensus_scaling():
    assert torch.equal(consensus(CONSENSUS_DELTAS, tall_lambda=0.4, k=2, scaling=0.5), t(1, 0, 0.5, 0))


# TSV ------------------------------------------------------------------------------------------


def test_tsv_components_are_orthonormal():
    deltas = [torch.randn(6, 5, generator=seeded(i)) for i in range(2)]
    u, s, v = task_singular_components(deltas)
    # Each of the 2 tasks keeps floor(5 / 2) = 2 directions.
    assert u.shape == (6, 4) and s.shape == (4,) and v.shape == (5, 4)
    assert torch.allclose(u.T @ u, torch.eye(4), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(4), atol=1e-5)
    assert torch.allclose(tsv(deltas), (u * s) @ v.T)


def test_tsv_one_task_full_rank_returns_it():
    x = torch.randn(4, 3, generator=seeded(0))
    assert torch.allclose(tsv([x]), x, atol=1e-5)


def test_tsv_of_orthogonal_subspaces_is_their_sum():
    # First task lives in rows/cols {0, 1}, second in rows/cols {2, 3}: each has rank <= 2 = 4 // 2,
    # their singular vectors are already orthogonal, so nothing is lost or rotated.
    a = torch.tensor([[1.0, 2, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    b = torch.tensor([[0.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 5, 0], [0, 0, 1, 2]])
    expected = torch.tensor([[1.0, 2, 0, 0], [3, 4, 0, 0], [0, 0, 5, 0], [0, 0, 1, 2]])
    assert torch.allclose(tsv([a, b]), expected, atol=1e-5)


def test_tsv_averages_tensors_that_are_not_matrices():
    # mean([1, 2], [3, 6]) = [2, 4], times 2.
    assert torch.equal(tsv([t(1, 2), t(3, 6)], scaling=2.0), t(4, 8))
    kernels = [torch.ones(2, 2, 3), 3 * torch.ones(2, 2, 3)]
    assert torch.equal(tsv(kernels), 2 * torch.ones(2, 2, 3))


def test_tsv_components_refuse_vectors():
    with pytest.raises(TaskArithError, match="2-D"):
        task_singular_components([t(1, 2)])


# registry -------------------------------------------------------------------------------------


def test_every_method_has_defaults():
    assert set(MERGE_METHODS) | set(STATISTICS_METHODS) == set(DEFAULTS) == set(HYPERPARAMETERS)
    for name in DEFAULTS:
        assert check_hyperparameters(name, {}) == DEFAULTS[name]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MERGE_METHODS))
def test_every_method_keeps_shape_and_half_dtype(name, dtype):
    method = get_merge_method(name)
    for shape in [(6, 5), (7,)]:
        deltas = [torch.randn(*shape, generator=seeded(i)).to(dtype) for i in range(3)]
        merged = method(deltas, generator=seeded(0), **DEFAULTS[name])
        assert merged.shape == torch.Size(shape) and merged.dtype == dtype
        assert torch.isfinite(merged.float()).all()


def test_unknown_method_is_named_with_the_known_ones():
    with pytest.raises(TaskArithError, match="'tiess'.*ties"):
        get_merge_method("tiess")
    with pytest.raises(TaskArithError, match="tiess"):
        check_hyperparameters("tiess", {})


def test_unknown_hyperparameter_is_named_with_the_accepted_ones():
    with pytest.raises(TaskArithError, match=r"'densty'.*accepted: density, scaling"):
        check_hyperparameters("ties", {"densty": 0.3})


@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("dare", {"density": 0}, r"'density' = 0 is out of range"),
        ("ties", {"density": 1.5}, r"'density' = 1.5 is out of range"),
        ("consensus", {"k": 1.5}, r"'k' = 1.5 .*integer"),
        ("consensus", {"tall_lambda": -1}, r"'tall_lambda' = -1"),
        ("task_arithmetic", {"scaling": float("nan")}, r"'scaling' = nan"),
        ("ties", {"density": True}, r"'density' must be a number"),
        ("breadcrumbs", {"density": 0.995, "gamma": 0.01}, r"'density' = 0.995 .*'gamma' = 0.01"),
    ],
)
def test_out_of_range_values_name_key_and_value(name, params, pattern):
    with pytest.raises(TaskArithError, match=pattern):
        check_hyperparameters(name, params)


def test_check_hyperparameters_fills_defaults_and_converts():
    assert check_hyperparameters("breadcrumbs", {"density": "0.3"}) == {"density": 0.3, "gamma": 0.01, "scaling": 1.0}
    assert check_hyperparameters("consensus", {"k": 3.0})["k"] == 3


def vector(seed: int, task: str, base_hash: str | None = "base", keys=("w", "b")) -> TaskVector:
    """A small task vector whose tensors do not depend on the order of ``keys`` (only the dict order does)."""
    shapes = {"w": (4, 3), "b": (3,)}
    offsets = {"w": 0, "b": 1000}
    deltas = {k: torch.randn(*shapes[k], generator=seeded(seed + offsets[k])) for k in keys}
    return TaskVector(deltas=deltas, base_hash=base_hash, task=task)


def test_merge_refuses_different_bases():
    with pytest.raises(TaskArithError, match="different base models"):
        merge_task_vectors([vector(1, "a", "base1"), vector(2, "b", "base2")])
    # A vector without a hash between them does not hide the conflict.
    with pytest.raises(TaskArithError, match="different base models"):
        merge_task_vectors([vector(0, "x", None), vector(1, "a", "base1"), vector(2, "b", "base2")], "ties")


def test_merge_refuses_mixed_modes_and_nothing():
    with pytest.raises(TaskArithError, match="linear"):
        merge_task_vectors([vector(1, "a"), vector(2, "b").with_mode("linear")])
    with pytest.raises(TaskArithError, match="no task vectors"):
        merge_task_vectors([])


def test_merge_with_task_arithmetic_is_the_sum():
    a, b = vector(1, "a"), vector(2, "b")
    merged = merge_task_vectors([a, b], "task_arithmetic")
    assert merged.allclose(a + b, atol=0, rtol=0)
    assert merged.task == "task_arithmetic(a+b)"
    assert merged.base_hash == "base" and merged.mode == "standard"
    assert merged.config == {
        "merge_method": "task_arithmetic",
        "hyperparameters": {"scaling": 1.0},
        "seed": 0,
        "merged_tasks": ["a", "b"],
    }
    assert merge_task_vectors([a, b], scaling=0.5).allclose(0.5 * (a + b))


def test_merge_records_method_and_hyperparameters():
    merged = merge_task_vectors([vector(1, "a"), vector(2, "b")], "ties", density=0.5)
    assert merged.task == "ties(a+b)"
    assert merged.config["hyperparameters"] == {"density": 0.5, "scaling": 1.0}


def test_merge_is_deterministic_and_independent_of_dict_order():
    forward = [vector(1, "a", keys=("w", "b")), vector(2, "b", keys=("w", "b"))]
    backward = [vector(1, "a", keys=("b", "w")), vector(2, "b", keys=("b", "w"))]
    first = merge_task_vectors(forward, "dare", seed=5, density=0.5)
    again = merge_task_vectors(forward, "dare", seed=5, density=0.5)
    reordered = merge_task_vectors(backward, "dare", seed=5, density=0.5)
    assert list(reordered.deltas) == ["b", "w"]
    for key in ("w", "b"):
        assert torch.equal(first.deltas[key], again.deltas[key])
        assert torch.equal(first.deltas[key], reordered.deltas[key])
    other_seed = merge_task_vectors(forward, "dare", seed=6, density=0.5)
    assert not all(torch.equal(first.deltas[k], other_seed.deltas[k]) for k in ("w", "b"))


def test_merged_delta_matches_merge_task_vectors():
    vectors = [vector(1, "a"), vector(2, "b")]
    merged = merge_task_vectors(vectors, "dare_ties", seed=9, density=0.4)
    params = check_hyperparameters("dare_ties", {"density": 0.4})
    for key in ("w", "b"):
        streamed = merged_delta(key, [v.deltas[key] for v in vectors], "dare_ties", params, 9)
        assert torch.equal(streamed, merged.deltas[key])


def test_parameter_generator_depends_on_seed_and_name_only():
    def draw(seed: int, name: str) -> torch.Tensor:
        return torch.rand(4, generator=parameter_generator(seed, name))

    assert torch.equal(draw(0, "w"), draw(0, "w"))
    assert not torch.equal(draw(0, "w"), draw(0, "b"))
    assert not torch.equal(draw(0, "w"), draw(1, "w"))


def test_methods_refuse_mismatched_tensors():
    with pytest.raises(TaskArithError, match="shapes"):
        task_arithmetic([t(1, 2), t(1, 2, 3)])
    with pytest.raises(TaskArithError, match="no task-vector tensors"):
        ties([])
