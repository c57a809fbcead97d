"""RegMean and Fisher merging: closed forms against least squares and hand computation, statistics computed
from tiny models, statistics files and their refusals, and streamed merges equal to in-memory ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import BertModel

from taskarith.errors import TaskArithError
from taskarith.io import read_state_dict
from taskarith.merging import load_recipe, merge_checkpoints, merge_task_vectors, run_recipe
from taskarith.merging.methods import fisher, regmean
from taskarith.merging.statistics import MergeStatistics, TensorStatistics, compute_merge_statistics
from taskarith.models import Pretrained, load_pretrained
from taskarith.vectors import TaskVector


def toy_layer(tasks: int = 3, rows: tuple[int, ...] = (40, 40, 40), d_in: int = 5, d_out: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    weights = [base + 0.3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(tasks)]
    inputs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in rows]
    return base, weights, inputs


def stats_of(inputs: list[torch.Tensor]) -> list[TensorStatistics]:
    return [TensorStatistics(gram=x.T @ x, tokens=x.shape[0]) for x in inputs]


def regmean_weight(base, weights, inputs, **hyper) -> torch.Tensor:
    return base + regmean("w", [w - base for w in weights], stats_of(inputs), **hyper)


# RegMean's closed form ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gram_mean", [0, 1])
def test_regmean_is_the_least_squares_solution(gram_mean: int) -> None:
    base, weights, inputs = toy_layer()
    merged = regmean_weight(base, weights, inputs, alpha=1.0, gram_mean=gram_mean)
    # argmin_W sum_t ||X_t W^T - X_t W_t^T||^2, solved directly on the stacked inputs and targets.
    solution = torch.linalg.lstsq(
        torch.cat(inputs), torch.cat([x @ w.T for x, w in zip(inputs, weights, strict=True)])
    ).solution
    torch.testing.assert_close(merged, solution.T, rtol=0, atol=1e-10)


def test_gram_mean_weighs_each_task_equally_whatever_its_token_count() -> None:
    base, weights, inputs = toy_layer(rows=(10, 40, 90))
    summed = regmean_weight(base, weights, inputs, alpha=1.0, gram_mean=0)
    lstsq = torch.linalg.lstsq(
        torch.cat(inputs), torch.cat([x @ w.T for x, w in zip(inputs, weights, strict=True)])
    ).solution
    torch.testing.assert_close(summed, lstsq.T, rtol=0, atol=1e-10)
    # Dividing task t's Gram by n_t is least squares on rows scaled by 1 / sqrt(n_t).
    scaled = [x / x.shape[0] ** 0.5 for x in inputs]
    weighted = torch.linalg.lstsq(
        torch.cat(scaled), torch.cat([x @ w.T for x, w in zip(scaled, weights, strict=True)])
    ).solution
    torch.testing.assert_close(
        regmean_weight(base, weights, inputs, alpha=1.0, gram_mean=1), weighted.T, atol=1e-10, rtol=0
    )


def test_alpha_shrinks_the_off_diagonal_entries() -> None:
    base, weights, inputs = toy_layer()
    alpha = 0.3
    grams = [alpha * x.T @ x + (1 - alpha) * torch.diag(torch.diagonal(x.T @ x)) for x in inputs]
    expected = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, weights, strict=True))).T
    torch.testing.assert_close(
        regmean_weight(base, weights, inputs, alpha=alpha, gram_mean=0), expected, atol=1e-10, rtol=0
    )
    # alpha = 0 keeps the diagonals only: each input column is a Gram-diagonal-weighted average.
    diagonals = torch.stack([torch.diagonal(x.T @ x) for x in inputs])
    columns = (torch.stack(weights) * diagonals[:, None, :]).sum(0) / diagonals.sum(0)
    torch.testing.assert_close(
        regmean_weight(base, weights, inputs, alpha=0.0, gram_mean=0), columns, atol=1e-10, rtol=0
    )


def test_transposed_layers_merge_x_at_p() -> None:
    base, weights, inputs = toy_layer()
    stats = [dataclasses.replace(s, transposed=True) for s in stats_of(inputs)]
    merged = base.T + regmean("p", [w.T - base.T for w in weights], stats, alpha=1.0, gram_mean=0)
    torch.testing.assert_close(
        merged, regmean_weight(base, weights, inputs, alpha=1.0, gram_mean=0).T, atol=1e-10, rtol=0
    )


def test_a_singular_gram_falls_back_to_the_average_where_no_input_reached() -> None:
    base, weights, inputs = toy_layer(rows=(3, 3, 3), d_in=6)
    for x in inputs:
        x[:, 2] = 0.0  # an input feature no example ever has, and fewer rows than inputs
    merged = regmean_weight(base, weights, inputs, alpha=1.0, gram_mean=0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged[:, 2], torch.stack(weights)[:, :, 2].mean(0), atol=1e-10, rtol=0)
    # Elsewhere it still attains the least-squares optimum.
    x, y = torch.cat(inputs), torch.cat([x @ w.T for x, w in zip(inputs, weights, strict=True)])
    best = torch.linalg.lstsq(x, y, driver="gelsd").solution
    assert float(((x @ merged.T - y) ** 2).sum()) == pytest.approx(float(((x @ best - y) ** 2).sum()), rel=1e-8)
    zero = [TensorStatistics(gram=torch.zeros(6, 6, dtype=torch.float64), tokens=1) for _ in weights]
    all_zero = base + regmean("w", [w - base for w in weights], zero, alpha=0.95)
    torch.testing.assert_close(all_zero, torch.stack(weights).mean(0), atol=1e-12, rtol=0)


def test_regmean_averages_tensors_without_a_gram() -> None:
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])]
    assert regmean("b", deltas, [TensorStatistics(), TensorStatistics()]).tolist() == [2.0, 0.0]
    with pytest.raises(TaskArithError, match="Gram of 'w' for every model or for none"):
        regmean("w", [torch.zeros(2, 2)] * 2, [TensorStatistics(gram=torch.eye(2), tokens=1), TensorStatistics()])


# Fisher merging ---------------------------------------------------------------------------------------


def test_fisher_merging_equals_a_hand_computation() -> None:
    deltas = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5.0, 3.0, -1.0])]
    stats = [
        TensorStatistics(fisher=torch.tensor([1.0, 0.0, 3.0]), fisher_norm=2.0),
        TensorStatistics(fisher=torch.tensor([3.0, 0.0, 1.0]), fisher_norm=6.0),
    ]
    # (1*1 + 3*5) / 4 = 4; no Fisher: the average 2; (3*1 + 1*-1) / 4 = 0.5.
    assert fisher("w", deltas, stats, epsilon=0.0).tolist() == [4.0, 2.0, 0.5]
    # With normalisation the models weigh 1/2 : 1/6, i.e. 3/4 : 1/4: (3/4*1 + 1/4*3*5) / (3/4 + 3/4) = 3.
    assert fisher("w", deltas, stats, epsilon=0.0, normalize=1).tolist() == pytest.approx(
        [3.0, 2.0, (9 / 4 - 1 / 4) / 2.5]
    )
    eps = fisher("w", deltas, stats, epsilon=1e-6)
    assert eps[1].item() == pytest.approx(2.0) and eps[0].item() == pytest.approx(4.0, abs=1e-5)


# statistics of tiny models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Pretrained:
    return load_pretrained(tiny_model_dir, max_length=16, device="cpu")


def fine_tuned_copy(base_dir: Path, folder: Path, seed: int) -> Path:
    model = BertModel.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("finetuned")
    return [fine_tuned_copy(tiny_model_dir, root / f"ft{i}", seed=i + 1) for i in range(2)]


@pytest.fixture(scope="module")
def vectors(tiny_model_dir, finetuned) -> list[TaskVector]:
    return [TaskVector.from_checkpoints(tiny_model_dir, ft, task=f"t{i}") for i, ft in enumerate(finetuned)]


@pytest.fixture(scope="module")
def stats_files(tmp_path_factory, tiny, task, vectors) -> list[Path]:
    root = tmp_path_factory.mktemp("stats")
    files = []
    for i, vector in enumerate(vectors):
        stats = compute_merge_statistics(tiny, task, vector, num_examples=12, seed=i)
        files.append(root / f"t{i}.safetensors")
        stats.save(files[-1])
    return files


def test_gram_is_the_sum_over_real_tokens_of_the_finetuned_layer_inputs(tiny, task, vectors) -> None:
    stats = compute_merge_statistics(tiny, task, vectors[0], fisher=False, num_examples=10, batch_size=4)
    model = vectors[0].apply_to(tiny.encoder)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    masks: list[torch.Tensor] = []

    def hook(name: str):
        def record(module, args, output) -> None:
            x = args[0].double()
            x = x[masks[-1].bool()] if x.dim() == 3 else x  # the pooler sees one row (CLS) per example
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(f"{name}.weight"))
    inputs = [
        task.train.inputs[i]
        for i in sorted(
            torch.randperm(len(task.train.inputs), generator=torch.Generator().manual_seed(0))[:10].tolist()
        )
    ]
    with torch.no_grad():
        for batch in (tiny.tokenize(inputs[i : i + 3]) for i in range(0, 10, 3)):
            masks.append(batch["attention_mask"])
            model(**batch)
    assert set(stats.gram) == set(sums) and stats.tokens == counts
    for name in sums:
        torch.testing.assert_close(stats.gram[name], sums[name].float(), rtol=1e-5, atol=1e-4)
    assert stats.activations == "finetuned" and stats.base_hash == tiny.base_hash


def test_pretrained_activations_are_the_base_models(tiny, task, vectors) -> None:
    theirs = compute_merge_statistics(tiny, task, vectors[0], fisher=False, num_examples=8, activations="pretrained")
    base = compute_merge_statistics(tiny, task, None, fisher=False, num_examples=8)
    mine = compute_merge_statistics(tiny, task, vectors[0], fisher=False, num_examples=8)
    assert all(torch.equal(theirs.gram[k], base.gram[k]) for k in base.gram)
    assert any(not torch.equal(mine.gram[k], base.gram[k]) for k in base.gram)


def test_empirical_fisher_is_the_mean_squared_per_example_gradient(tiny, task, vectors) -> None:
    stats = compute_merge_statistics(tiny, task, vectors[1], gram=False, num_examples=4, fisher_kind="empirical")
    model = vectors[1].apply_to(tiny.encoder).requires_grad_(True)
    classifier = tiny.classifier(task, model)
    order = sorted(torch.randperm(len(task.train.inputs), generator=torch.Generator().manual_seed(0))[:4].tolist())
    name = "encoder.layer.0.attention.self.query.weight"
    param = dict(model.named_parameters())[name]
    total = torch.zeros_like(param, dtype=torch.float64)
    for i in order:
        batch = tiny.tokenize([task.train.inputs[i]])
        loss = torch.nn.functional.cross_entropy(classifier(**batch).double(), torch.tensor([task.train.labels[i]]))
        (grad,) = torch.autograd.grad(loss, [param])
        total += grad.double() ** 2
    torch.testing.assert_close(stats.fisher[name], (total / 4).float(), rtol=1e-4, atol=1e-12)
    assert stats.fisher_norm == pytest.approx(sum(float(v.double().pow(2).sum()) for v in stats.fisher.values()) ** 0.5)


def test_statistics_are_deterministic_and_leave_the_encoder_alone(tiny, task, vectors) -> None:
    before = {k: v.clone() for k, v in tiny.encoder.state_dict().items()}
    a = compute_merge_statistics(tiny, task, vectors[0], num_examples=4, fisher_kind="sampled", seed=3)
    b = compute_merge_statistics(tiny, task, vectors[0], num_examples=4, fisher_kind="sampled", seed=3)
    assert all(torch.equal(a.fisher[k], b.fisher[k]) for k in a.fisher)
    assert all(torch.equal(a.gram[k], b.gram[k]) for k in a.gram)
    assert all(torch.equal(v, before[k]) for k, v in tiny.encoder.state_dict().items())
    assert not any(p.requires_grad for p in tiny.encoder.parameters())


def test_files_round_trip_and_bad_files_are_refused_by_name(tmp_path, stats_files) -> None:
    stats = MergeStatistics.load(stats_files[0])
    tensors = load_file(stats_files[0])
    assert set(tensors) == {f"gram/{k}" for k in stats.gram} | {f"fisher/{k}" for k in stats.fisher}
    assert all(torch.equal(stats.gram[k], tensors[f"gram/{k}"]) for k in stats.gram)
    save_file({"gram/x": torch.zeros(2, 2)}, tmp_path / "plain.safetensors", metadata={"format": "other"})
    with pytest.raises(TaskArithError, match="plain.safetensors: not a merge statistics file"):
        MergeStatistics.load(tmp_path / "plain.safetensors")
    name = next(iter(stats.gram))
    tensors[f"gram/{name}"] = tensors[f"gram/{name}"] * float("nan")
    with safe_open(str(stats_files[0]), framework="pt") as sf:
        metadata = sf.metadata()
    save_file(tensors, tmp_path / "nan.safetensors", metadata=metadata)
    with pytest.raises(TaskArithError, match=rf"nan.safetensors: statistic 'gram/{name}' contains NaN"):
        MergeStatistics.load(tmp_path / "nan.safetensors").gram[name]


# merges ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [("regmean", {}), ("regmean", {"alpha": 0.5, "gram_mean": 0}), ("fisher", {}), ("fisher", {"normalize": 1})],
)
def test_streamed_merge_equals_in_memory_bit_for_bit(
    tmp_path, tiny_model_dir, finetuned, vectors, stats_files, method, params
) -> None:
    merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "merged", method, statistics=stats_files, **params)
    streamed = read_state_dict(tmp_path / "merged")
    in_memory = merge_task_vectors(vectors, method, statistics=stats_files, **params).apply_to(
        read_state_dict(tiny_model_dir)
    )
    assert [k for k in streamed if not torch.equal(streamed[k], in_memory[k])] == []
    assert any(not torch.equal(streamed[k], v) for k, v in read_state_dict(tiny_model_dir).items())


def test_prefixed_checkpoints_are_mapped_and_unmapped_tensors_refused(
    tmp_path, tiny_model_dir, finetuned, vectors, stats_files
) -> None:
    def prefixed(source: Path, folder: Path, extra: bool = False) -> Path:
        folder.mkdir()
        state = {f"bert.{k}": v for k, v in read_state_dict(source).items()}
        if extra:
            state["classifier.weight"] = torch.zeros(2, 32)
        save_file(state, folder / "model.safetensors")
        return folder

    base = prefixed(tiny_model_dir, tmp_path / "base")
    fts = [prefixed(ft, tmp_path / f"p{i}") for i, ft in enumerate(finetuned)]
    merge_checkpoints(base, fts, tmp_path / "merged", "regmean", statistics=stats_files)
    streamed = read_state_dict(tmp_path / "merged")
    in_memory = merge_task_vectors(vectors, "regmean", statistics=stats_files).apply_to(read_state_dict(tiny_model_dir))
    assert all(torch.equal(streamed[f"bert.{k}"], v) for k, v in in_memory.items())
    base = prefixed(tiny_model_dir, tmp_path / "base-x", extra=True)
    fts = [prefixed(ft, tmp_path / f"x{i}", extra=True) for i, ft in enumerate(finetuned)]
    with pytest.raises(TaskArithError, match="no statistics for tensor 'classifier.weight'"):
        merge_checkpoints(base, fts, tmp_path / "merged-x", "regmean", statistics=stats_files)


def test_statistics_of_another_base_or_lacking_a_layer_are_refused_by_name(
    tmp_path, tiny_model_dir, other_model_dir, task, finetuned, vectors, stats_files
) -> None:
    other = load_pretrained(other_model_dir, max_length=16, device="cpu")
    foreign = tmp_path / "foreign.safetensors"
    compute_merge_statistics(other, task, None, num_examples=4).save(foreign)
    with pytest.raises(
        TaskArithError, match=r"foreign.safetensors was computed on base model \w+, \S+t0.safetensors on"
    ):
        merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "a", "regmean", statistics=[stats_files[0], foreign])
    with pytest.raises(
        TaskArithError, match=r"foreign.safetensors was computed on base model \w+, but the merge's base"
    ):
        merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "a", "regmean", statistics=[foreign, foreign])
    with pytest.raises(TaskArithError, match="foreign.safetensors was computed on base model"):
        merge_task_vectors(vectors, "fisher", statistics=[foreign, foreign])
    stats = MergeStatistics.load(stats_files[1])
    layer = sorted(stats.gram)[0]
    lacking = dataclasses.replace(stats, gram={k: v for k, v in stats.gram.items() if k != layer}, source="")
    lacking.save(tmp_path / "lacking.safetensors")
    with pytest.raises(TaskArithError, match=rf"lacking.safetensors lacks the Gram of layer '{layer}'"):
        merge_checkpoints(
            tiny_model_dir,
            finetuned,
            tmp_path / "b",
            "regmean",
            statistics=[stats_files[0], tmp_path / "lacking.safetensors"],
        )
    with pytest.raises(TaskArithError, match="needs one statistics file per model"):
        merge_task_vectors(vectors, "regmean")
    with pytest.raises(TaskArithError, match="uses no statistics"):
        merge_task_vectors(vectors, "ties", statistics=stats_files)
    with pytest.raises(TaskArithError, match="got 1 for 2 models"):
        merge_task_vectors(vectors, "regmean", statistics=stats_files[:1])


def test_cli_and_recipes_reach_the_statistics_methods(
    tmp_path, cli, tiny_model_dir, tiny_csv, finetuned, vectors, stats_files
) -> None:
    vector_file = tmp_path / "t0.safetensors"
    vectors[0].save(vector_file)
    code, out, err = cli(
        "statistics",
        tiny_csv,
        "--vector",
        vector_file,
        "--model",
        tiny_model_dir,
        "--num-examples",
        4,
        "--no-fisher",
        "--out",
        tmp_path / "s.safetensors",
    )
    assert code == 0, err
    assert "Grams of" in out and MergeStatistics.load(tmp_path / "s.safetensors").fisher == {}
    args = ["merge", "--method", "fisher", "--base", tiny_model_dir, "--out", tmp_path / "cli-merged"]
    for ft, stats in zip(finetuned, stats_files, strict=True):
        args += ["--model", ft, "--statistics", stats]
    code, out, err = cli(*args)
    assert code == 0, err
    recipe = tmp_path / "recipe.yaml"
    models = "".join(f"  - model: {ft}\n    statistics: {s}\n" for ft, s in zip(finetuned, stats_files, strict=True))
    recipe.write_text(
        f"merge_method: fisher\nbase_model: {tiny_model_dir}\nmodels:\n{models}out: {tmp_path / 'recipe-merged'}\n"
    )
    run_recipe(load_recipe(recipe))
    assert read_state_dict(tmp_path / "recipe-merged").keys() == read_state_dict(tmp_path / "cli-merged").keys()
    assert all(
        torch.equal(v, read_state_dict(tmp_path / "cli-merged")[k])
        for k, v in read_state_dict(tmp_path / "recipe-merged").items()
    )
    code, out, err = cli(
        "merge",
        "--method",
        "regmean",
        "--base",
        tiny_model_dir,
        "--model",
        finetuned[0],
        "--model",
        finetuned[1],
        "--out",
        tmp_path / "x",
    )
    assert code != 0 and "needs one statistics file per model" in err


def test_vectors_of_a_parameter_subset_merge_with_statistics_of_the_whole_model(vectors, stats_files) -> None:
    # An attention-only or LoRA vector holds some of the parameters: the statistics of the rest take no part.
    kept = sorted(k for k in vectors[0].deltas if "attention.self.query" in k)
    subset = [dataclasses.replace(v, deltas={k: v.deltas[k] for k in kept}) for v in vectors]
    whole = merge_task_vectors(vectors, "regmean", statistics=stats_files)
    part = merge_task_vectors(subset, "regmean", statistics=stats_files)
    assert sorted(part.deltas) == kept
    for key in kept:  # RegMean is per layer: the same layers merge to the same weights
        torch.testing.assert_close(part.deltas[key], whole.deltas[key])


# statistics of linear-mode vectors (f_lin at delta = tau) -----------------------------------------------


@pytest.fixture(scope="module")
def linear_vectors(vectors) -> list[TaskVector]:
    return [v.with_mode("linear") for v in vectors]


def test_linear_mode_grams_are_the_pretrained_layer_inputs(tiny, task, linear_vectors) -> None:
    linear = compute_merge_statistics(tiny, task, linear_vectors[0], fisher=False, num_examples=8)
    base = compute_merge_statistics(tiny, task, None, fisher=False, num_examples=8)
    assert (linear.mode, linear.activations) == ("linear", "pretrained")
    assert set(linear.gram) == set(base.gram) and all(torch.equal(linear.gram[k], base.gram[k]) for k in base.gram)
    with pytest.raises(TaskArithError, match="multiply the pre-trained model's layer inputs"):
        compute_merge_statistics(tiny, task, linear_vectors[0], fisher=False, activations="finetuned")


def test_linear_mode_fisher_is_the_squared_gradient_of_f_lin_in_delta(tiny, task, linear_vectors) -> None:
    vector = linear_vectors[1]
    # f_lin turns the base's requires_grad off and eval() its training flag: both must come back.
    tiny.encoder.requires_grad_(True).train()
    try:
        stats = compute_merge_statistics(tiny, task, vector, gram=False, num_examples=3, fisher_kind="empirical")
        assert all(p.requires_grad for p in tiny.encoder.parameters()) and tiny.encoder.training
    finally:
        tiny.encoder.requires_grad_(False).eval()
    # f_lin's pooled output is p0 + J tau, so the gradient in delta of log p(y | f_lin) at tau is
    # J^T (d log p / d pooled): a JVP for the point, then the plain network's VJP at theta0.
    theta0 = {k: v.detach() for k, v in tiny.encoder.named_parameters()}
    head = tiny.head(task)

    def pooled(params, batch):
        hidden = torch.func.functional_call(tiny.encoder, params, args=(), kwargs=batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)

    order = sorted(torch.randperm(len(task.train.inputs), generator=torch.Generator().manual_seed(0))[:3].tolist())
    name = "encoder.layer.1.output.dense.weight"
    total = torch.zeros_like(theta0[name], dtype=torch.float64)
    tangent = {k: vector.deltas[k] if k in vector.deltas else torch.zeros_like(v) for k, v in theta0.items()}
    for i in order:
        batch = tiny.tokenize([task.train.inputs[i]])
        p0, jt = torch.func.jvp(lambda params, batch=batch: pooled(params, batch), (theta0,), (tangent,))
        point = (p0 + jt).detach().requires_grad_(True)
        logits = tiny.logit_scale * torch.nn.functional.normalize(point, dim=-1) @ head.T
        (upstream,) = torch.autograd.grad(torch.log_softmax(logits.double(), -1)[0, task.train.labels[i]], point)
        params = {k: v.clone().requires_grad_(k == name) for k, v in theta0.items()}
        (grad,) = torch.autograd.grad(pooled(params, batch), [params[name]], grad_outputs=upstream)
        total += grad.double() ** 2
    torch.testing.assert_close(stats.fisher[name], (total / 3).float(), rtol=1e-4, atol=1e-12)
    assert stats.mode == "linear"
    standard = compute_merge_statistics(
        tiny, task, vector.with_mode("standard"), gram=False, num_examples=3, fisher_kind="empirical"
    )
    assert not torch.equal(standard.fisher[name], stats.fisher[name])


def test_merges_refuse_statistics_of_the_other_mode_by_name(
    tmp_path, tiny, task, tiny_model_dir, finetuned, vectors, linear_vectors, stats_files
) -> None:
    files = []
    for i, vector in enumerate(linear_vectors):
        files.append(tmp_path / f"lin{i}.safetensors")
        compute_merge_statistics(tiny, task, vector, num_examples=4, seed=i).save(files[-1])
    assert MergeStatistics.load(files[0]).mode == "linear" and MergeStatistics.load(stats_files[0]).mode == "standard"
    for method in ("regmean", "fisher"):
        merged = merge_task_vectors(linear_vectors, method, statistics=files)
        assert merged.mode == "linear"
        with pytest.raises(TaskArithError, match=r"t0.safetensors holds statistics of a standard-mode model"):
            merge_task_vectors(linear_vectors, method, statistics=stats_files)
    # A linear model's Fisher is f_lin's, not the weights'; its Grams are the pre-trained inputs', which any
    # merge may use (as it may a standard file's with activations "pretrained").
    with pytest.raises(TaskArithError, match=r"lin0.safetensors holds statistics of a linear-mode model"):
        merge_task_vectors(vectors, "fisher", statistics=files)
    with pytest.raises(TaskArithError, match=r"lin0.safetensors holds statistics of a linear-mode model"):
        merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "out-fisher", "fisher", statistics=files)
    assert not (tmp_path / "out-fisher").exists()
    assert merge_task_vectors(vectors, "regmean", statistics=files).mode == "standard"
    # RegMean of linear vectors is RegMean on the pre-trained Grams: the delta it returns is the same.
    pretrained_grams = []
    for i, vector in enumerate(vectors):
        pretrained_grams.append(tmp_path / f"pre{i}.safetensors")
        compute_merge_statistics(
            tiny, task, vector, num_examples=4, seed=i, activations="pretrained", fisher=False
        ).save(pretrained_grams[-1])
    ours = merge_task_vectors(linear_vectors, "regmean", statistics=files)
    theirs = merge_task_vectors(vectors, "regmean", statistics=pretrained_grams)
    assert all(torch.equal(ours.deltas[k], theirs.deltas[k]) for k in ours.deltas)
    # Grams of the pre-trained inputs do not depend on the fine-tuned model, so they serve linear vectors too.
    also = merge_task_vectors(linear_vectors, "regmean", statistics=pretrained_grams)
    assert all(torch.equal(ours.deltas[k], also.deltas[k]) for k in ours.deltas)
    stats = MergeStatistics.load(files[0])
    with pytest.raises(TaskArithError, match="Grams of a linear-mode model with activations 'finetuned'"):
        dataclasses.replace(stats, activations="finetuned")


def test_statistics_cli_refuses_finetuned_activations_of_a_linear_vector_before_loading(
    cli, tmp_path, tiny_csv, linear_vectors, monkeypatch
) -> None:
    import taskarith.cli

    def model(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was refused")

    monkeypatch.setattr(taskarith.cli, "_load_model", model)
    linear_vectors[0].save(tmp_path / "tau")
    code, _, err = cli(
        "statistics", tiny_csv, "--vector", tmp_path / "tau", "--activations", "finetuned", "--out", tmp_path / "s"
    )
    assert code == 2 and "--activations finetuned: task vector" in err and "is linear-mode" in err
    assert not (tmp_path / "s").exists()
