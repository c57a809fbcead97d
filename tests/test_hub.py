"""Task vectors shared as the Hugging Face ecosystem shares models: folder, model card, hub cache, upload."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from taskarith.errors import TaskArithError
from taskarith.hub import CARD_NAME, WEIGHTS_NAME, markdown_text
from taskarith.outputs import MARKER
from taskarith.vectors import TaskVector

CONFIG = {
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "mode": "linear",
    "regularizer": "taujp",
    "reg_strength": 0.1,
    "penalty_form": "taujp/2",
    "steps": 16,
    "lr": 2e-4,
    "seed": 0,
}


def vector(task: str = "rt_sentiment", mode: str = "linear") -> TaskVector:
    generator = torch.Generator().manual_seed(0)
    deltas = {
        "encoder.layer.0.weight": torch.randn(4, 3, generator=generator),
        "encoder.layer.0.bias": torch.randn(4, generator=generator),
    }
    return TaskVector(deltas=deltas, base_hash="0123abcd", task=task, mode=mode, config=dict(CONFIG))


def same(a: TaskVector, b: TaskVector) -> bool:
    return (
        a.deltas.keys() == b.deltas.keys()
        and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
        and (a.base_hash, a.task, a.mode, a.config) == (b.base_hash, b.task, b.mode, b.config)
    )


def hub_cache(root: Path, repo_id: str, folder: Path, revision: str = "a" * 40) -> Path:
    """The layout huggingface_hub's cache keeps on disk: refs/main -> snapshots/<revision>/files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in (WEIGHTS_NAME, CARD_NAME):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def test_a_saved_folder_loads_back_identical_from_the_folder_and_from_a_hub_cache(tmp_path):
    tau = vector()
    tau.save_pretrained(tmp_path / "tau", accuracies={"rt_sentiment val": 0.81})
    assert sorted(p.name for p in (tmp_path / "tau").iterdir()) == sorted([WEIGHTS_NAME, CARD_NAME, MARKER])
    assert same(TaskVector.from_pretrained(tmp_path / "tau"), tau)
    cache = hub_cache(tmp_path / "cache", "alice/rt-sentiment-tau", tmp_path / "tau")
    loaded = TaskVector.from_pretrained("alice/rt-sentiment-tau", cache_dir=cache, local_files_only=True)
    assert same(loaded, tau)


def test_the_model_card_holds_base_task_mode_regularizer_configuration_and_accuracies(tmp_path):
    vector().save_pretrained(tmp_path / "tau", accuracies={"rt_sentiment val": 0.8125})
    card = ModelCard.load(tmp_path / "tau" / CARD_NAME)
    assert card.data.library_name == "taskarith" and "task-vector" in card.data.tags
    assert card.data.base_model == CONFIG["model"]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", card.text, flags=re.M))
    assert rows["base model hash"] == "0123abcd" and rows["task"] == r"rt\_sentiment"
    assert rows["mode"] == "linear" and rows["regularizer"] == "taujp"
    assert rows[r"rt\_sentiment val"] == "81.2 %"
    assert rows["steps"] == "16" and rows[r"reg\_strength"] == "0.1" and rows[r"penalty\_form"] == "taujp/2"
    assert "linearized model" in card.text  # a linear-mode vector says how it must be used


def test_metadata_from_outside_stays_inert_in_the_card(tmp_path):
    hostile = "x | y <img src=x onerror=alert(1)> [click](http://evil) ![i](http://evil/i.png)\x1b]0;t\x07\nz"
    tau = vector(task=hostile)
    tau.config["model"] = "../../etc\n---\nlicense: evil"
    tau.save_pretrained(tmp_path / "tau")
    text = (tmp_path / "tau" / CARD_NAME).read_text()
    body = text.split("\n---\n", 1)[1]
    assert "\x1b" not in text
    lines = body.splitlines()
    values = [line.removeprefix("# Task vector: ") for line in lines if line.startswith("# Task vector: ")]
    values += [
        line[len(field) + 5 : -2]
        for line in lines
        for field in ("task", "base model")
        if line.startswith(f"| {field} | ")
    ]
    assert len(values) == 3 and all("evil" in v for v in values)
    for value in values:  # every character that could open a link, an image, HTML or a cell is escaped
        assert not re.search(r"(?<!\\)[<>\[\]()|!]", value), value
    card = ModelCard.load(tmp_path / "tau" / CARD_NAME)
    assert card.data.base_model is None and getattr(card.data, "license", None) is None
    assert markdown_text("a|b") == r"a\|b"


def test_push_to_hub_uploads_the_weights_and_the_card(tmp_path):
    uploaded: dict[str, object] = {}

    class FakeHub:
        def create_repo(self, repo_id, **options):
            uploaded["created"] = (repo_id, options)

        def upload_folder(self, *, repo_id, folder_path, commit_message, **options):
            uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
            uploaded["message"] = commit_message

            class Info:
                commit_url = f"https://huggingface.co/{repo_id}/commit/123"

            return Info()

    tau = vector()
    url = tau.push_to_hub("alice/rt-sentiment-tau", api=FakeHub(), accuracies={"val": 0.5}, private=True)
    assert url == "https://huggingface.co/alice/rt-sentiment-tau/commit/123"
    assert uploaded["created"] == ("alice/rt-sentiment-tau", {"repo_type": "model", "private": True, "exist_ok": True})
    assert sorted(uploaded["files"]) == [CARD_NAME, WEIGHTS_NAME] and "rt_sentiment" in uploaded["message"]
    (tmp_path / "got").mkdir()
    for name, data in uploaded["files"].items():
        (tmp_path / "got" / name).write_bytes(data)
    assert same(TaskVector.load(tmp_path / "got" / WEIGHTS_NAME), tau)
    assert "| val | 50.0 % |" in (tmp_path / "got" / CARD_NAME).read_text()


def test_a_failed_upload_is_one_line_naming_the_repository():
    class DownHub:
        def create_repo(self, repo_id, **options):
            raise OSError("connection refused\nretry later")

    with pytest.raises(TaskArithError, match=r"^could not push the task vector to alice/tau: connection refused retry"):
        vector().push_to_hub("alice/tau", api=DownHub())


@pytest.mark.parametrize(
    "source, message",
    [
        ("not a repo !!", "neither a folder nor a hub repository id"),
        ("a/b/c", "neither a folder nor a hub repository id"),
        ("alice/missing", "could not read task_vector.safetensors of hub repository alice/missing"),
    ],
)
def test_bad_sources_are_one_clear_line(tmp_path, source, message):
    with pytest.raises(TaskArithError, match=re.escape(message)) as info:
        TaskVector.from_pretrained(source, cache_dir=tmp_path / "empty-cache", local_files_only=True)
    assert "\n" not in str(info.value)


def test_a_folder_without_a_vector_and_bad_accuracies_are_refused(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(TaskArithError, match="no task_vector.safetensors in this folder"):
        TaskVector.from_pretrained(tmp_path / "other")
    with pytest.raises(TaskArithError, match=r"accuracy val=81: must be a fraction between 0 and 1"):
        vector().save_pretrained(tmp_path / "tau", accuracies={"val": 81})
    assert not (tmp_path / "tau").exists()


def test_save_pretrained_never_replaces_a_folder_taskarith_did_not_write(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("weeks of notes\n")
    with pytest.raises(TaskArithError, match="already exists"):
        vector().save_pretrained(mine)
    with pytest.raises(TaskArithError, match="replaces only a previous taskarith output"):
        vector().save_pretrained(mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    vector().save_pretrained(tmp_path / "tau")
    vector(task="other").save_pretrained(tmp_path / "tau", overwrite=True)  # its own earlier output: replaced
    assert TaskVector.from_pretrained(tmp_path / "tau").task == "other"


def test_share_writes_the_folder_with_the_run_accuracy_and_pushes(cli, tmp_path, monkeypatch):
    import json

    import huggingface_hub

    run = tmp_path / "run"
    run.mkdir()
    tau = vector()
    tau.save(run / "task_vector.safetensors")
    record = {"format": "taskarith.run_record/1", "config": tau.config, "val_accuracy": 0.75}
    (run / "run.json").write_text(json.dumps(record))
    code, printed, err = cli("share", run / "task_vector.safetensors", "--out", tmp_path / "shared")
    assert code == 0, err
    assert same(TaskVector.from_pretrained(tmp_path / "shared"), tau)
    assert (
        "| rt\\_sentiment \\(validation split, after fine-tuning\\) | 75.0 % |"
        in (tmp_path / "shared" / CARD_NAME).read_text()
    )
    pushed = []

    class FakeHub:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **options):
            pushed.append((repo_id, options["private"]))

        def upload_folder(self, *, repo_id, **options):
            return "https://huggingface.co/alice/tau/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    code, printed, err = cli("share", run / "task_vector.safetensors", "--hub", "alice/tau", "--public")
    assert code == 0, err
    assert pushed == [("alice/tau", False)] and "https://huggingface.co/alice/tau/commit/1" in printed
    code, _, err = cli("share", run / "task_vector.safetensors")
    assert code == 2 and "nothing to do" in err
