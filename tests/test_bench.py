"""The protocol's metrics on a tiny model with hand-checkable values, and the bench end to end."""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from taskarith.cli import main
from taskarith.data import task_from_file
from taskarith.display import Output, StageProgress
from taskarith.errors import TaskArithError
from taskarith.evaluate import (
    EditedOutputs,
    control_constrained_alpha,
    disentanglement_error,
    normalized_accuracy,
)
from taskarith.experiments.bench import BenchProfile, Suite, evaluate_vectors, run_bench
from taskarith.experiments.stats import correlation
from taskarith.finetune import FinetuneConfig, finetune

SIZES = [("the", "cow"), ("a", "bird"), ("my", "sheep"), ("this", "mouse"), ("your", "horse")]


def write_task(path: Path, template: str, labels: tuple[str, str]) -> Path:
    rows = [f"{template.format(f=f, w=w, s=s)},{s}" for f, w in SIZES for s in labels for _ in range(2)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_csv):
    folder = tmp_path_factory.mktemp("suite")
    sizes = task_from_file(write_task(folder / "sizes.csv", "{f} {w} is quite {s}", ("big", "small")))
    moods = task_from_file(write_task(folder / "moods.csv", "{f} {w} is very {s}", ("red", "blue")))
    return task_from_file(tiny_csv), sizes, moods


@pytest.fixture(scope="module")
def linear_vectors(pretrained, suite):
    colours, sizes, _ = suite
    return {
        task.name: finetune(
            FinetuneConfig(task=task.name, mode="linear", steps=4, batch_size=8, lr=3e-3, max_length=16),
            pretrained,
            task,
            progress=False,
        ).task_vector
        for task in (colours, sizes)
    }


def test_normalized_accuracy_hand_checked():
    assert normalized_accuracy({"a": 0.45, "b": 0.9}, {"a": 0.9, "b": 0.9}) == {"a": 0.5, "b": 1.0}


def test_control_constrained_alpha_hand_checked():
    target = {0.0: 0.8, 0.5: 0.6, 1.0: 0.4, 1.5: 0.2}.__getitem__
    control = {0.0: 0.80, 0.5: 0.80, 1.0: 0.76, 1.5: 0.70}.__getitem__
    # floor 0.95 * 0.8 = 0.76: alpha 1.5 breaks the control task, 1.0 is the deepest allowed drop.
    assert control_constrained_alpha((0.5, 1.0, 1.5), target, control, 0.95 * 0.8) == 1.0
    # No alpha of the grid keeps the control: alpha = 0 (the pre-trained model) always does.
    assert control_constrained_alpha((0.5, 1.0, 1.5), target, control, 0.9) == 0.0
    # Equal target accuracy: the smaller edit wins (the pre-trained model too, when nothing lowers the target).
    assert control_constrained_alpha((0.5, 1.0), lambda a: 0.3 if a else 0.9, lambda a: 1.0, 0.5) == 0.5
    assert control_constrained_alpha((0.5, 1.0), lambda a: 0.3, lambda a: 1.0, 0.5) == 0.0


def test_correlation_hand_checked():
    perfect = correlation([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0])
    assert perfect["pearson"] == pytest.approx(1.0) and perfect["spearman"] == pytest.approx(1.0)
    # Monotone but not linear: Spearman 1, Pearson below 1; ties get averaged ranks.
    bent = correlation([1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 4.0])
    assert bent["spearman"] == pytest.approx(1.0) and bent["pearson"] < 0.99
    assert correlation([1.0, 1.0, 2.0], [0.0, 1.0, 2.0])["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(correlation([1.0, 1.0], [0.0, 1.0])["pearson"])


def test_linear_alpha_shortcut_equals_brute_force(pretrained, suite, linear_vectors):
    colours, sizes, _ = suite
    fast = EditedOutputs(pretrained, linear_vectors)
    slow = EditedOutputs(pretrained, linear_vectors, shortcut=False)
    assert fast.shortcut and not slow.shortcut
    for alphas in ((1.0, 1.0), (0.3, -0.7), (2.0, 0.5)):
        edit = tuple(zip(("colours", "sizes"), alphas, strict=True))
        for task in (colours, sizes):
            torch.testing.assert_close(
                fast.pooled(task, "test", edit), slow.pooled(task, "test", edit), atol=1e-5, rtol=1e-4
            )
            assert fast.accuracy(task, "test", edit) == slow.accuracy(task, "test", edit)
    # Three grid points on two input sets: the shortcut ran one JVP per (vector, input set) and stops there.
    assert fast.passes == 4 and slow.passes == 6


def test_a_shared_store_differentiates_each_vector_once(pretrained, suite, linear_vectors):
    from taskarith.evaluate import TangentStore

    colours, sizes, _ = suite
    store = TangentStore()
    first = EditedOutputs(pretrained, linear_vectors, store=store)
    edit = (("colours", 0.4), ("sizes", 1.0))
    expected = {task.name: first.pooled(task, "test", edit) for task in (colours, sizes)}
    assert first.passes == 4
    # The same vectors under other names: no JVP runs again, and the outputs are the same tensors.
    renamed = {"a": linear_vectors["colours"], "b": linear_vectors["sizes"]}
    second = EditedOutputs(pretrained, renamed, store=store)
    for task in (colours, sizes):
        assert torch.equal(second.pooled(task, "test", (("a", 0.4), ("b", 1.0))), expected[task.name])
    assert second.passes == 0
    # Other content is differentiated: the store keys on the deltas, not on the name.
    halved = linear_vectors["colours"] * 0.5
    third = EditedOutputs(pretrained, {"colours": halved}, store=store)
    third.pooled(colours, "test", (("colours", 1.0),))
    assert third.passes == 1


def test_edited_outputs_match_the_evaluator(pretrained, suite, linear_vectors):
    from taskarith.evaluate import accuracy, edited_encoder

    colours, sizes, _ = suite
    outputs = EditedOutputs(pretrained, linear_vectors)
    vectors = [linear_vectors["colours"], linear_vectors["sizes"]]
    direct = accuracy(pretrained, sizes, "test", edited_encoder(pretrained, vectors, [0.5, 1.0]))
    assert outputs.accuracy(sizes, "test", (("colours", 0.5), ("sizes", 1.0))) == pytest.approx(direct)
    assert outputs.accuracy(colours, "test") == pytest.approx(accuracy(pretrained, colours, "test"))


def test_cached_taujp_equals_the_interference_matrix(pretrained, suite, linear_vectors):
    from taskarith.experiments.interference import taujp_matrix

    colours, sizes, _ = suite
    outputs = EditedOutputs(pretrained, linear_vectors)
    matrix = taujp_matrix(
        pretrained,
        [linear_vectors["colours"], linear_vectors["sizes"]],
        [colours, sizes],
        split="val",
        max_examples=1000,
    )["taujp"]
    for i, name in enumerate(("colours", "sizes")):
        for j, task in enumerate((colours, sizes)):
            assert outputs.taujp(name, task, "val") == pytest.approx(matrix[i][j], rel=1e-4)


def test_disentanglement_error_is_zero_at_the_origin_and_bounded(pretrained, suite, linear_vectors):
    colours, sizes, _ = suite
    outputs = EditedOutputs(pretrained, linear_vectors)
    grid = disentanglement_error(outputs, (colours, sizes), ("colours", "sizes"), (0.0, 1.0, 3.0))
    assert grid[0][0] == 0.0
    assert all(0.0 <= value <= 2.0 for row in grid for value in row)
    # A larger second edit can only be checked against a direct count: row alpha_1 = 0 is sizes' own edit.
    alone = outputs.predictions(colours, "test")
    joint = outputs.predictions(colours, "test", (("sizes", 3.0),))
    assert grid[0][2] == pytest.approx(float((alone != joint).float().mean()))


def test_mixed_modes_are_refused(pretrained, linear_vectors):
    from taskarith.errors import TaskArithError

    mixed = {"a": linear_vectors["colours"], "b": linear_vectors["sizes"].with_mode("standard")}
    with pytest.raises(TaskArithError, match="share a mode"):
        EditedOutputs(pretrained, mixed)


def test_merging_methods_in_task_addition_and_the_sum_as_one_of_them(tmp_path, pretrained, suite, linear_vectors):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("linear",),
        eval_limit=None,
        alpha_grid=(0.5, 1.0),
        negation_grid=(1.0,),
        incremental_methods=(),
        merge_methods=("task_arithmetic", "ties"),
    )
    result = evaluate_vectors(
        Suite(pretrained, [colours, sizes], moods, profile, tmp_path, lambda stage: None), linear_vectors, with_xi=False
    )
    # Merging with task arithmetic is the plain sum, so it must reproduce the addition numbers.
    as_method = result["merging"]["task_arithmetic"]
    for label in ("alpha_1", "alpha_searched"):
        assert as_method[label]["alpha"] == result["addition"][label]["alpha"]
        assert as_method[label]["accuracy"] == pytest.approx(result["addition"][label]["accuracy"])
    ties = result["merging"]["ties"]
    assert set(ties["val_curve"]) == {"0.5", "1.0"} and ties["alpha_searched"]["alpha"] in (0.5, 1.0)
    from taskarith.errors import TaskArithError

    with pytest.raises(TaskArithError, match="unknown merging method 'tie'"):
        BenchProfile(tasks=("a", "b"), control="c", merge_methods=("tie",))


def test_bench_end_to_end_and_cached(tmp_path, pretrained, suite):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        steps=3,
        batch_size=8,
        lr=3e-3,
        seeds=(0, 1),
        kfac_examples=16,
        eval_limit=None,
        xi_limit=10,
        xi_seeds=1,
        xi_grid=(0.0, 1.0),
        alpha_grid=(0.5, 1.0),
        negation_grid=(0.5, 1.0),
    )
    stages: list[str] = []
    result = run_bench(pretrained, [colours, sizes], moods, profile, tmp_path / "cache", on_stage=stages.append)
    assert set(result["summary"]) >= set(profile.methods)
    for method in profile.methods:
        run = result["per_seed"]["0"]["methods"][method]
        assert run["xi"]["colours+sizes"][0][0] == 0.0
        assert len(run["taujp"]) == 2 and run["taujp"][0][1] > 0
        assert math.isnan(run["interference_drop"][0][0]) and not math.isnan(run["interference_drop"][0][1])
        assert run["addition"]["alpha_searched"]["alpha"] in (0.5, 1.0)
        spread = result["summary"][method]["addition_alpha_1_accuracy"]
        assert spread["n"] == 2 and 0.0 <= spread["mean"] <= 1.0
        # xi is measured on the first seed only (xi_seeds=1).
        assert result["per_seed"]["1"]["methods"][method]["xi"] == {}
        assert result["summary"][method]["xi_mean"]["n"] == 1
    assert {f"evaluating {m}" for m in profile.methods} <= set(result["stage_seconds"])
    incremental = result["per_seed"]["0"]["incremental"]
    assert set(incremental) == {"linear_taujp", "linear"}
    # The first arrival protects only the control task (tau-Jp's regularization set holds it, as published);
    # in the suite, every task protects the other one and the control.
    assert any(stage.startswith("fine-tuning (linear_taujp, colours, protecting 1,") for stage in stages)
    assert any(stage.startswith("fine-tuning (linear_taujp, colours, protecting 2,") for stage in stages)
    assert result["reg_strength_selection"]["linear_taujp"] == {"grid": [0.1], "chosen": 0.1, "criterion": "fixed"}
    # Negation always has an answer: no seed is dropped.
    assert all(result["summary"][m]["negation_alpha_searched_target"]["n"] == 2 for m in profile.methods)
    assert any(stage.startswith("K-FAC") for stage in stages)
    again: list[str] = []
    second = run_bench(pretrained, [colours, sizes], moods, profile, tmp_path / "cache", on_stage=again.append)
    # Everything came from the cache: the recorded training times are the first run's, no factors were recomputed.
    assert second["finetune_seconds"] == result["finetune_seconds"]
    assert second["summary"]["linear"] == result["summary"]["linear"]
    assert not any(stage.startswith("K-FAC") for stage in again)


def test_bench_cli_writes_report(tmp_path, monkeypatch, capsys, tiny_model_dir, tiny_csv):
    sizes = write_task(tmp_path / "sizes.csv", "{f} {w} is quite {s}", ("big", "small"))
    moods = write_task(tmp_path / "moods.csv", "{f} {w} is very {s}", ("red", "blue"))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "taskarith",
            "bench",
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model_dir),
            "--task",
            str(tiny_csv),
            "--task",
            str(sizes),
            "--control",
            str(moods),
            "--method",
            "standard",
            "--method",
            "linear",
            "--steps",
            "2",
            "--merge-method",
            "ties",
            "--merge-method",
            "tsv",
        ],
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    report = (tmp_path / "out" / "report.md").read_text()
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["profile"]["methods"] == ["standard", "linear"] and "| linear |" in report
    assert (tmp_path / "out" / "xi_linear.png").stat().st_size > 0 and "## Claims ledger" in report
    # One seed: every measured claim carries a verdict marked indicative; none is left out.
    assert len(result["claims"]) >= 20 and "(indicative: one seed)**" in report
    assert "## Merging methods" in report and "ties a=1" in report and "tsv a*" in report
    assert set(result["summary"]["linear"]["merging"]) == {"ties", "tsv"}
    assert "task addition by merging method" in capsys.readouterr().out


def hf_trained_checkpoint(model_dir: Path, csv: Path, out: Path, steps: int = 4) -> Path:
    """A checkpoint made the way users make them elsewhere: a Hugging Face task model, its own loss, save_pretrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = task_from_file(csv)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(task.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        texts, labels = task.train.inputs[step * 8 : (step + 1) * 8], task.train.labels[step * 8 : (step + 1) * 8]
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        model(**batch, labels=torch.tensor(labels)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory, tiny_model_dir, tiny_csv) -> Path:
    return hf_trained_checkpoint(tiny_model_dir, tiny_csv, tmp_path_factory.mktemp("hf") / "colours-ft")


def test_vector_of_a_checkpoint_made_elsewhere(pretrained, hf_checkpoint):
    from transformers import AutoModelForSequenceClassification

    from taskarith.vectors import TaskVector

    tau = TaskVector.from_finetuned_checkpoint(pretrained.encoder, hf_checkpoint, task="colours")
    trained = AutoModelForSequenceClassification.from_pretrained(hf_checkpoint).base_model
    base = dict(pretrained.encoder.named_parameters())
    assert set(tau.deltas) == set(base) and tau.base_hash == pretrained.base_hash and tau.norm() > 0
    for name, param in trained.named_parameters():
        torch.testing.assert_close(base[name] + tau.deltas[name], param.detach(), rtol=0, atol=1e-6)
    # The classification head is not part of the encoder, so it is not part of the vector.
    assert not any(name.startswith("classifier") for name in tau.deltas)


def test_checkpoint_of_another_architecture_is_refused(pretrained, tmp_path, tiny_csv):
    from transformers import BertConfig, BertModel

    from taskarith.errors import TaskArithError
    from taskarith.vectors import TaskVector

    BertModel(
        BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "other")
    with pytest.raises(TaskArithError, match="other"):
        TaskVector.from_finetuned_checkpoint(pretrained.encoder, tmp_path / "other")


def test_existing_checkpoints_study(tmp_path, pretrained, suite, hf_checkpoint):
    from taskarith.report import bench_markdown

    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("standard",),
        steps=3,
        batch_size=8,
        lr=3e-3,
        eval_limit=None,
        xi_limit=10,
        xi_grid=(0.0, 1.0),
        alpha_grid=(1.0,),
        negation_grid=(1.0,),
        incremental_methods=(),
    )
    result = run_bench(
        pretrained, [colours, sizes], moods, profile, tmp_path / "cache", checkpoints=[(colours, hf_checkpoint)]
    )
    study = result["existing_checkpoints"]
    assert study["new_task"] == "sizes" and study["checkpoints"] == {"colours": str(hf_checkpoint)}
    assert study["taujp"][0][0] > 0
    for label in ("plain", "taujp"):
        run = study[f"with_new_{label}"]
        assert set(run["accuracy"]) == {"colours", "sizes"} and run["taujp_on_checkpoint_tasks"]["colours"] > 0
    assert study["method"] == "linear_taujp" and study["checkpoints_read_as"] == "post-hoc linearized"
    # Regularizing against the checkpoint task lowers the new vector's tau-Jp on it.
    assert (
        study["with_new_taujp"]["taujp_on_checkpoint_tasks"]["colours"]
        < study["with_new_plain"]["taujp_on_checkpoint_tasks"]["colours"]
    )
    assert "Fine-tuned checkpoints made elsewhere" in bench_markdown(result, {})


def test_lambda_is_chosen_on_validation_against_the_unregularized_vectors(tmp_path, pretrained, suite):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("linear_taujp",),
        steps=3,
        batch_size=8,
        lr=3e-3,
        eval_limit=None,
        xi_limit=5,
        xi_grid=(0.0,),
        alpha_grid=(1.0,),
        negation_grid=(1.0,),
        incremental_methods=(),
        seeds=(0, 1),
        reg_strengths={"taujp": (100.0, 0.01)},
    )
    result = run_bench(pretrained, [colours, sizes], moods, profile, tmp_path / "cache")
    choice = result["reg_strength_selection"]["linear_taujp"]
    scores = {float(k): v for k, v in choice["val_normalized_alpha_1"].items()}
    assert choice["grid"] == [0.01, 100.0] and set(scores) == {0.01, 100.0} and choice["seed"] == 0
    assert choice["chosen"] == min(scores, key=lambda v: (-scores[v], v))
    records = [json.loads((d / "run.json").read_text()) for d in (tmp_path / "cache" / "vectors").iterdir()]
    configs = [r["config"] for r in records]
    # The denominator is the same for every lambda: the plain linear vectors of the first seed, alone.
    plain = {
        r["config"]["task"]: r["val_accuracy"]
        for r in records
        if r["config"]["regularizer"] is None and r["config"]["seed"] == 0
    }
    assert choice["unregularized_val"] == pytest.approx(plain)
    # Both grid values were fine-tuned on the first seed only; every other seed uses the chosen one.
    assert {c["reg_strength"] for c in configs if c["regularizer"] and c["seed"] == 0} == {0.01, 100.0}
    assert {c["reg_strength"] for c in configs if c["regularizer"] and c["seed"] == 1} == {choice["chosen"]}


def test_bench_cli_grids_strengths_and_zero_overrides(tmp_path, monkeypatch, capsys, tiny_model_dir, tiny_csv):
    sizes = write_task(tmp_path / "sizes.csv", "{f} {w} is quite {s}", ("big", "small"))
    moods = write_task(tmp_path / "moods.csv", "{f} {w} is very {s}", ("red", "blue"))
    common = [
        "taskarith",
        "bench",
        "--out",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model_dir),
        "--task",
        str(tiny_csv),
        "--task",
        str(sizes),
        "--control",
        str(moods),
    ]
    for bad, message in (
        (["--steps", "0"], "--steps 0"),
        (["--alpha-grid", "a,b"], "--alpha-grid"),
        (["--reg-strength", "taujp=-1"], "positive"),
        (["--reg-strength", "magic=1"], "REGULARIZER"),
    ):
        monkeypatch.setattr(sys, "argv", [*common, *bad])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(
        sys,
        "argv",
        [
            *common,
            "--method",
            "linear",
            "--method",
            "linear_taujp",
            "--steps",
            "2",
            "--alpha-grid",
            "1,0",
            "--xi-grid",
            "-1,0,1",
            "--reg-strength",
            "taujp=0.5",
            "--reg-sampling",
            "cyclical",
            "--no-reg-control",
        ],
    )
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code in (0, None)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    p = result["profile"]
    assert p["alpha_grid"] == p["negation_grid"] == [0.0, 1.0] and p["xi_grid"] == [-1.0, 0.0, 1.0]
    assert p["reg_sampling"] == "cyclical" and p["reg_control"] is False
    assert result["reg_strength_selection"]["linear_taujp"]["chosen"] == 0.5


def test_random_init_control_and_its_ledger_row(tmp_path, pretrained, suite):
    from taskarith.experiments.claims import FAILS, HOLDS, NOISE, NOT_APPLICABLE
    from taskarith.models import reinitialized

    colours, sizes, moods = suite
    # The tiny model is itself a seed-0 random init, so another seed gives other weights.
    random_model = reinitialized(pretrained, seed=5)
    # Fresh weights of the same architecture, the same every time, the global generator untouched.
    state = torch.random.get_rng_state()
    again = reinitialized(pretrained, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    first = dict(random_model.encoder.named_parameters())
    assert first.keys() == dict(pretrained.encoder.named_parameters()).keys()
    assert all(torch.equal(p, first[k]) for k, p in again.encoder.named_parameters())
    assert random_model.base_hash != pretrained.base_hash
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("standard", "linear"),
        incremental_methods=(),
        steps=3,
        batch_size=8,
        lr=3e-3,
        eval_limit=None,
        xi_limit=10,
        xi_seeds=0,
        xi_grid=(0.0, 1.0),
        alpha_grid=(0.5, 1.0),
        negation_grid=(0.5, 1.0),
    )
    result = run_bench(
        pretrained, [colours, sizes], moods, profile, tmp_path / "cache", random_model=random_model, ntk_examples=2
    )
    study = result["per_seed"]["0"]["random_init"]
    assert set(study["methods"]) == {"standard", "linear"} and study["model"].endswith("@random-init-5")
    learnt = all(study["methods"]["linear"]["finetuned"][t] >= study["chance"][t] + 0.10 for t in study["chance"])
    assert study["applicable"] == learnt and (study["why"] == "") == learnt
    row = next(r for r in result["claims"] if r["key"] == "tangent.pretraining")
    assert row["verdict"] in ((HOLDS, FAILS, NOISE) if learnt else (NOT_APPLICABLE,))
    # The NTK study ran on the same random model, and its row of the ledger is measured (one run: indicative).
    assert result["ntk"]["random_init"]["model"] == random_model.name and result["ntk"]["examples_per_task"] == 2
    ntk_row = next(r for r in result["claims"] if r["key"] == "tangent.ntk_localization")
    assert ntk_row["indicative"] and ntk_row["left"]["mean"] == result["ntk"]["pretrained"]["mean_top_share"]
    from taskarith.report import bench_figures, bench_markdown

    report = bench_markdown(result, bench_figures(result, tmp_path))
    assert "## NTK localization" in report and (tmp_path / "ntk.png").stat().st_size > 0


@pytest.mark.parametrize("terminal", [False, True])
def test_bench_progress_bars_on_a_terminal_plain_lines_elsewhere(tmp_path, pretrained, suite, capsys, terminal):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("standard", "posthoc", "linear_taujp"),
        incremental_methods=("linear_taujp",),
        steps=2,
        batch_size=8,
        lr=3e-3,
        seeds=(0, 1),
        eval_limit=10,
        xi_limit=10,
        xi_grid=(0.0, 1.0),
        alpha_grid=(0.5, 1.0),
        negation_grid=(0.5, 1.0),
        reg_strengths={"taujp": (0.1, 1.0), "taujp_sq": (1.0,), "kfac": (500.0,)},
    )
    progress = StageProgress(Output(stderr=True), "bench", terminal=terminal)
    run_bench(pretrained, [colours, sizes], moods, profile, tmp_path / "cache", progress=progress)
    # The plan adds up to the work the run reported, stage by stage: the estimate ends at 100 %.
    assert progress.total > 0 and progress.done == pytest.approx(progress.total)
    err = capsys.readouterr().err
    stages = [line for line in err.splitlines() if line.startswith("> ")]
    assert any(line.startswith("> fine-tuning (linear_taujp, colours") for line in stages)
    if terminal:  # the overall bar with its estimate, and the stages' own bars (fine-tuning, evaluation)
        assert re.search(r"bench: 100%\|.*\| \S+ elapsed, about \S+ left", err)
        assert "fine-tune colours (linear)" in err and "evaluate (standard)" in err
    else:  # plain stage lines with the share done and the time left, no bar
        assert "%|" not in err and "\r" not in err
        assert re.search(r"^> evaluating linear_taujp \(seed 1\)  \[\d+% done, about \d+ s left\]$", err, re.M)


def test_opt_in_attention_and_orthoreg_methods_run_beside_the_others(tmp_path, pretrained, suite):
    colours, sizes, moods = suite
    methods = ("standard", "attention_only", "attention_only_taujp", "standard_orthoreg")
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=methods,
        steps=2,
        batch_size=8,
        lr=3e-3,
        eval_limit=None,
        xi_limit=5,
        xi_grid=(0.0,),
        alpha_grid=(0.5, 1.0),
        negation_grid=(1.0,),
        incremental_methods=(),
        reg_strengths={"taujp": (0.1,), "orthoreg": (0.01,)},
    )
    assert not set(methods[1:]) & set(BenchProfile(tasks=("a", "b"), control="c").methods)  # opt-in only
    result = run_bench(pretrained, [colours, sizes], moods, profile, tmp_path / "cache")
    assert set(methods) <= set(result["summary"])
    assert all(result["summary"][m]["addition_alpha_1_accuracy"]["mean"] > 0 for m in methods)
    records = [json.loads((d / "run.json").read_text()) for d in (tmp_path / "cache" / "vectors").iterdir()]
    orthoreg = [r["config"] for r in records if r["config"]["regularizer"] == "orthoreg"]
    assert orthoreg and all(c["reg_tasks"] == [] and c["reg_strength"] == 0.01 for c in orthoreg)
    attention = [r["config"] for r in records if r["config"].get("trainable") == "attention"]
    assert {c["regularizer"] for c in attention} == {None, "taujp"}


def test_attention_methods_are_refused_up_front_on_a_model_without_attention(tmp_path, pretrained, suite):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name), control=moods.name, methods=("attention_only",), incremental_methods=()
    )
    no_attention = copy.copy(pretrained)
    no_attention.encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(TaskArithError, match="no attention projections"):
        run_bench(no_attention, [colours, sizes], moods, profile, tmp_path / "cache")
    orthoreg = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("standard_orthoreg",),
        incremental_methods=(),
        checkpoint_method="standard_orthoreg",
        reg_strengths={"orthoreg": (0.1,)},
    )
    with pytest.raises(TaskArithError, match="OrthoReg regularizes weight matrices"):
        run_bench(no_attention, [colours, sizes], moods, orthoreg, tmp_path / "cache")
    assert not (tmp_path / "cache" / "vectors").exists()


def test_regmean_and_fisher_in_the_bench_on_standard_and_linear_vectors_with_cached_statistics(
    tmp_path, pretrained, suite, linear_vectors, monkeypatch
):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("standard",),
        eval_limit=None,
        alpha_grid=(0.5, 1.0),
        negation_grid=(1.0,),
        incremental_methods=(),
        merge_methods=("ties", "regmean", "fisher"),
    )
    bench_suite = Suite(pretrained, [colours, sizes], moods, profile, tmp_path, lambda stage: None)
    standard = {name: vector.with_mode("standard") for name, vector in linear_vectors.items()}
    result = evaluate_vectors(bench_suite, standard, with_xi=False)
    for method in ("regmean", "fisher"):
        entry = result["merging"][method]
        assert entry["cost"]["statistics_examples"] > 0 and entry["cost"]["seconds"] >= 0
        assert 0 <= entry["alpha_1"]["mean_accuracy"] <= 1
    assert result["merging"]["ties"]["cost"]["statistics_examples"] == 0
    # Linear vectors merge with f_lin's statistics (pre-trained Grams, the Fisher in delta): no longer n/a.
    linear = evaluate_vectors(bench_suite, linear_vectors, with_xi=False)
    assert "not_applicable" not in linear["merging"]
    for method in ("regmean", "fisher"):
        assert linear["merging"][method]["cost"]["statistics_examples"] > 0
        assert 0 <= linear["merging"][method]["alpha_1"]["mean_accuracy"] <= 1
    # A second evaluation of the same vectors reads their statistics from the suite's cache.
    import taskarith.experiments.bench as bench_module

    def computed(*args, **kwargs):
        raise AssertionError("statistics computed again")

    monkeypatch.setattr(bench_module, "compute_merge_statistics", computed)
    again = evaluate_vectors(bench_suite, standard, with_xi=False)
    for method in ("regmean", "fisher"):
        assert again["merging"][method]["cost"]["statistics_from_cache"] == 2
        assert result["merging"][method]["cost"]["statistics_from_cache"] == 0
        assert again["merging"][method]["alpha_1"] == result["merging"][method]["alpha_1"]
    assert len(list((tmp_path / "statistics").glob("*.safetensors"))) == 8  # 2 tasks x 2 methods x 2 modes
    # A damaged cache file is computed again and replaced (the folder is the bench's own).
    monkeypatch.undo()
    damaged = sorted((tmp_path / "statistics").glob("*-standard-*-fisher-*.safetensors"))[0]
    damaged.write_bytes(b"not a safetensors file")
    healed = evaluate_vectors(bench_suite, standard, with_xi=False)
    assert healed["merging"]["fisher"]["cost"]["statistics_from_cache"] == 1
    assert healed["merging"]["fisher"]["alpha_1"] == result["merging"]["fisher"]["alpha_1"]
    assert damaged.read_bytes()[:8] != b"not a sa"


def test_adamerging_in_the_bench_is_read_at_its_learned_coefficients(tmp_path, pretrained, suite, linear_vectors):
    colours, sizes, moods = suite
    profile = BenchProfile(
        tasks=(colours.name, sizes.name),
        control=moods.name,
        methods=("linear",),
        eval_limit=6,
        alpha_grid=(0.5, 1.0),
        negation_grid=(1.0,),
        incremental_methods=(),
        merge_methods=("adamerging_taskwise",),
        adamerging_steps=3,
    )
    bench_suite = Suite(pretrained, [colours, sizes], moods, profile, tmp_path, lambda stage: None)
    entry = evaluate_vectors(bench_suite, linear_vectors, with_xi=False)["merging"]["adamerging_taskwise"]
    cost = entry["cost"]
    assert cost["path"] == "shortcut" and cost["transductive"] is True and cost["backward_passes"] == 0
    assert set(cost["coefficients"]) == {colours.name, sizes.name}
    assert entry["alpha_searched"]["alpha"] == 1.0 and set(entry["val_curve"]) == {"1.0"}
    with pytest.raises(TaskArithError, match="adamerging_steps"):
        BenchProfile(tasks=("a", "b"), control="c", adamerging_steps=-1)
