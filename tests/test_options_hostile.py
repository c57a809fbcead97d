"""Options that cannot work are refused on the command line, with one `error:` line and exit 2, before the
expensive step: a max length above the model's positions before the data or the model load, a batch larger
than the training split before the model loads, zero, negative and out-of-range counts and seeds before
anything loads. Each refusal is checked to come first by making the later step fail loudly if reached."""

from __future__ import annotations

import pytest

from taskarith.errors import TaskArithError


def one_error(cli, *args: object) -> str:
    code, _, err = cli(*args)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error:") and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Make loading a model, or any task's data, an assertion failure."""
    import taskarith.cli
    import taskarith.data

    def model(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was refused")

    def data(*args, **kwargs):
        raise AssertionError("the data were loaded before the option was refused")

    monkeypatch.setattr(taskarith.cli, "_load_model", model)
    monkeypatch.setattr(taskarith.data, "load_task", data)


@pytest.fixture
def no_model_loads(monkeypatch):
    import taskarith.cli

    def model(*args, **kwargs):
        raise AssertionError("the model was loaded before the option was refused")

    monkeypatch.setattr(taskarith.cli, "_load_model", model)


def test_max_length_above_the_models_positions_is_refused_before_data_or_model(
    cli, tmp_path, tiny_model_dir, tiny_csv, nothing_loads
):
    # The tiny BERT has 64 positions (conftest); the embedded MiniLM has 512.
    message = one_error(
        cli, "finetune", tiny_csv, "--model", tiny_model_dir, "--max-length", "65", "--out", tmp_path / "run"
    )
    assert "max_length=65 is more than the 64 token positions of model" in message
    message = one_error(cli, "finetune", tiny_csv, "--max-length", "8192", "--out", tmp_path / "run")
    assert "max_length=8192 is more than the 512 token positions of model all-MiniLM-L6-v2" in message
    assert not (tmp_path / "run").exists()


def test_load_pretrained_refuses_it_too(tiny_model_dir):
    from taskarith.models import load_pretrained

    with pytest.raises(TaskArithError, match="max_length=100 is more than the 64 token positions"):
        load_pretrained(tiny_model_dir, max_length=100, device="cpu")
    assert load_pretrained(tiny_model_dir, max_length=64, device="cpu").max_length == 64


def test_positions_follow_the_models_own_numbering():
    from taskarith.models.hf import token_positions

    assert token_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512
    assert token_positions({"model_type": "roberta", "max_position_embeddings": 514}) == 512  # padding offset
    assert token_positions({"model_type": "gpt2", "n_positions": 1024}) == 1024
    assert (
        token_positions({"model_type": "deberta-v2", "max_position_embeddings": 512, "position_biased_input": False})
        is None
    )  # relative positions: any length
    assert token_positions({"model_type": "t5"}) is None


def test_a_batch_larger_than_the_training_split_is_refused_before_the_model_loads(
    cli, tmp_path, tiny_csv, no_model_loads
):
    message = one_error(cli, "finetune", tiny_csv, "--batch-size", "65536", "--out", tmp_path / "run")
    assert "batch_size=65536 is more than the" in message and "training examples of task" in message
    assert not (tmp_path / "run" / "task_vector.safetensors").exists()


def test_the_check_names_the_batch_and_the_split_and_the_library_still_walks_epochs(tiny_csv):
    from taskarith.data import load_task
    from taskarith.finetune import FinetuneConfig, batch_indices, check_against_task

    task = load_task(tiny_csv)
    n = len(task.train)
    with pytest.raises(TaskArithError, match=rf"batch_size={n + 1} is more than the {n}"):
        check_against_task(FinetuneConfig(task=task.name, batch_size=n + 1), task)
    # What the library does with such a batch (a probe on a tiny task): whole seeded epochs end to end.
    indices = batch_indices(n, n + 1, seed=0, step=0)
    assert len(indices) == n + 1 and set(indices[:n]) == set(range(n))


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2**63)])
def test_a_seed_torch_cannot_take_is_refused_before_the_model_loads(cli, tmp_path, tiny_csv, nothing_loads, seed):
    for command in (
        ("finetune", tiny_csv, "--out", tmp_path / "run"),
        ("kfac", tiny_csv, "--out", tmp_path / "f.st"),
        ("demo", "--out", tmp_path / "demo"),
    ):
        message = one_error(cli, *command, "--seed", seed)
        assert f"--seed {seed}: must be between 0 and {2**63 - 1}" in message
    assert not list(tmp_path.iterdir())


def test_a_seed_in_a_config_is_refused_naming_it():
    from taskarith.finetune import FinetuneConfig

    with pytest.raises(TaskArithError, match=r"fine-tuning option seed=99999999999999999999 must be between 0"):
        FinetuneConfig(task="t", seed=99999999999999999999)


@pytest.mark.parametrize(
    "args, expected",
    [
        (("bench", "--steps", "0"), "--steps 0: must be at least 1"),
        (("bench", "--batch-size", "-4"), "--batch-size -4: must be at least 1"),
        (("bench", "--reg-batch-size", "0"), "--reg-batch-size 0: must be at least 1"),
        (("bench", "--seeds", "0"), "--seeds 0: must be at least 1"),
        (("bench", "--seeds", "1000000000000"), "--seeds 1000000000000: at most 1000"),
        (("bench", "--warmup-steps", "-1"), "--warmup-steps -1: must be at least 0"),
        (("bench", "--lr", "0"), "--lr 0.0: must be in (0, 1)"),
        (("bench", "--lr", "nan"), "--lr nan: must be in (0, 1)"),
        (("bench", "--eval-limit", "-1"), "--eval-limit -1: must be at least 0"),
        (("demo", "--steps", "0"), "--steps 0: must be at least 1"),
        (("kfac", "t.csv", "--out", "f.safetensors", "--num-examples", "0"), "--num-examples 0: must be at least 1"),
        (("kfac", "t.csv", "--out", "f.safetensors", "--mc-samples", "-1"), "--mc-samples -1: must be at least 0"),
        (
            ("interference", "v.safetensors", "--task", "t.csv", "--max-examples", "0"),
            "--max-examples 0: must be at least 1",
        ),
    ],
)
def test_zero_and_negative_counts_are_refused_before_anything_loads(
    cli, tmp_path, monkeypatch, nothing_loads, args, expected
):
    monkeypatch.chdir(tmp_path)
    assert expected in one_error(cli, *args, *(() if "--out" in args else ("--out", tmp_path / "o")))
    assert not (tmp_path / "o").exists() and not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("option", ["--blocks", "--rank"])
def test_kfac_compress_refuses_zero_before_reading(cli, tmp_path, option):
    message = one_error(
        cli, "kfac-compress", tmp_path / "missing.safetensors", "--out", tmp_path / "c.safetensors", option, "0"
    )
    assert f"{option} 0: must be at least 1" in message  # not "file not found": the option is checked first


def test_a_mistyped_local_model_path_is_named_not_sent_to_the_hub(cli, tmp_path, tiny_csv, monkeypatch):
    import transformers

    def hub(*args, **kwargs):
        raise AssertionError("a path was sent to the hub")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", hub)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", hub)
    for spec in ("./modles/tiny", "~/no-such-model", str(tmp_path / "nope"), "runs/a/model"):
        message = one_error(cli, "eval", "--task", tiny_csv, "--model", spec)
        assert "the path does not exist" in message and spec in message, message


@pytest.mark.parametrize("command", ["bench", "ntk"])
def test_an_unknown_suite_is_named_escaped_before_anything_loads(cli, tmp_path, nothing_loads, command):
    line = one_error(cli, command, "--suite", "vision\x1b[2J", "--out", tmp_path / "out")
    assert "--suite" in line and "unknown suite" in line and "\x1b" not in line and "text, vision" in line
    assert not (tmp_path / "out").exists()
