"""Task vectors shared the way the Hugging Face ecosystem shares models: a folder, a model card, the hub.

A task-vector folder holds ``task_vector.safetensors`` (the deltas and their metadata: base hash, task,
mode, training configuration, taskarith version) and ``README.md``, a model card generated from that
metadata with huggingface_hub's :class:`~huggingface_hub.ModelCard`. :func:`vector_file` finds the file
of a folder, or of a hub repository through huggingface_hub's local cache (``local_files_only=True`` or
``HF_HUB_OFFLINE=1`` never touch the network); :func:`push_to_hub` uploads the same two files.

Every string of the card comes from a vector's metadata, which may come from anyone: it is written as
YAML by huggingface_hub (quoted there) and, in the card's text, through :func:`markdown_text`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.outputs import output_folder

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelCard

    from taskarith.vectors import TaskVector

__all__ = ["VECTOR_FOLDER_FORMAT", "WEIGHTS_NAME", "model_card", "push_to_hub", "save_pretrained", "vector_file"]

VECTOR_FOLDER_FORMAT = "taskarith.task_vector_folder/1"
WEIGHTS_NAME = "task_vector.safetensors"
CARD_NAME = "README.md"
# The training options a reader of the card wants first; the whole configuration follows them.
_HEADLINE = ("model", "mode", "regularizer", "reg_strength", "penalty_form", "steps", "batch_size", "lr", "seed")
# Characters that would start markdown or HTML constructs inside a line of the card.
_MARKDOWN = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def markdown_text(value: object, limit: int = 200) -> str:
    """One value from outside as one line of inert markdown: :func:`~taskarith.display.shown`, then every
    character that could start a link, an image, HTML, emphasis or a table cell escaped."""
    return _MARKDOWN.sub(r"\\\1", shown(value, limit))


def model_card(vector: TaskVector, accuracies: Mapping[str, float] | None = None) -> ModelCard:
    """The model card of ``vector``: base model and its hash, task, mode, regularizer, training
    configuration, and ``accuracies`` (name -> fraction) where they were measured."""
    from huggingface_hub import ModelCard, ModelCardData

    config = vector.config if isinstance(vector.config, dict) else {}
    base = config.get("model")
    data = ModelCardData(
        library_name="taskarith",
        tags=["task-vector", "task-arithmetic", f"{vector.mode}-fine-tuning"],
        base_model=str(base) if isinstance(base, str) and _is_repo_id(base) else None,
    )
    lines = [
        f"# Task vector: {markdown_text(vector.task or 'unnamed task')}",
        "",
        "A task vector τ = θ_finetuned − θ_pretrained made by [taskarith](https://pypi.org/project/taskarith/). "
        "Load it with `TaskVector.from_pretrained` and apply it to its base model: `base + alpha * tau`.",
        "",
        "| field | value |",
        "|---|---|",
        f"| base model | {markdown_text(base if base is not None else 'unknown')} |",
        f"| base model hash | {markdown_text(vector.base_hash or 'unknown')} |",
        f"| task | {markdown_text(vector.task or 'unknown')} |",
        f"| mode | {markdown_text(vector.mode)} |",
        f"| regularizer | {markdown_text(config.get('regularizer') or 'none')} |",
        f"| parameters | {vector.num_parameters:,} in {len(vector.deltas)} tensors |",
    ]
    if vector.mode == "linear":
        lines += [
            "",
            "A linear-mode vector edits the linearized model f_lin(x; θ0 + τ) = f(x; θ0) + J(x) τ: evaluate and "
            "compose it through taskarith (adding it to the weights computes another function).",
        ]
    if accuracies:
        lines += ["", "## Measured accuracy", "", "| measured on | accuracy |", "|---|---|"]
        lines += [f"| {markdown_text(name)} | {100 * float(value):.1f} % |" for name, value in accuracies.items()]
    if config:
        lines += ["", "## Training configuration", "", "| option | value |", "|---|---|"]
        ordered = [k for k in _HEADLINE if k in config] + sorted(k for k in config if k not in _HEADLINE)
        lines += [f"| {markdown_text(key)} | {markdown_text(config[key])} |" for key in ordered]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _write(vector: TaskVector, folder: Path, accuracies: Mapping[str, float] | None) -> None:
    vector.save(folder / WEIGHTS_NAME)
    model_card(vector, accuracies).save(folder / CARD_NAME)


def save_pretrained(
    vector: TaskVector,
    folder: str | os.PathLike,
    *,
    accuracies: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``vector`` as a folder (weights and model card) under the rules of every writer
    (taskarith.outputs): an existing folder is replaced only with ``overwrite`` and only if taskarith wrote it."""
    _check_accuracies(accuracies)
    with output_folder(folder, (), overwrite=overwrite, format=VECTOR_FOLDER_FORMAT) as building:
        _write(vector, building, accuracies)
    return Path(folder)


def vector_file(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local ``task_vector.safetensors`` of a folder written by :func:`save_pretrained`, or of a hub
    repository id (``owner/name``), downloaded through (or, offline, read from) huggingface_hub's cache.
    ``TaskVector.from_pretrained`` loads it."""
    text = os.fspath(source)
    if os.path.isdir(text):
        path = Path(text) / WEIGHTS_NAME
        if not path.is_file():
            raise TaskArithError(f"{shown(text)}: no {WEIGHTS_NAME} in this folder (written by save_pretrained?)")
        return path
    if not _is_repo_id(text):
        raise TaskArithError(f"{shown(text)}: neither a folder nor a hub repository id (owner/name)")
    return Path(_download(text, revision, cache_dir, local_files_only, token))


def push_to_hub(
    vector: TaskVector,
    repo_id: str,
    *,
    accuracies: Mapping[str, float] | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload ``vector`` (weights and model card) to the hub model repository ``repo_id``, creating it if
    needed; returns the commit's URL. ``api`` replaces the default client (tests, other endpoints)."""
    from huggingface_hub import HfApi

    if not _is_repo_id(repo_id):
        raise TaskArithError(f"{shown(repo_id)}: not a hub repository id (owner/name)")
    _check_accuracies(accuracies)
    client = api or HfApi(token=token)
    message = commit_message or f"Upload task vector {shown(vector.task or 'unnamed', 80)}"
    with tempfile.TemporaryDirectory(prefix="taskarith-push-") as folder:
        _write(vector, Path(folder), accuracies)
        try:
            client.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            info = client.upload_folder(
                repo_id=repo_id, repo_type="model", folder_path=folder, revision=revision, commit_message=message
            )
        except Exception as exc:  # huggingface_hub raises HTTP, OS and validation errors alike
            raise TaskArithError(f"could not push the task vector to {shown(repo_id)}: {shown(exc)}") from None
    return str(getattr(info, "commit_url", info))


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    token: str | bool | None,
) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(
            repo_id,
            WEIGHTS_NAME,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=local_files_only,
            token=token,
        )
    except Exception as exc:  # offline, missing repo or file, HTTP: one line naming it
        where = f"{shown(repo_id)}" + (f"@{shown(revision)}" if revision else "")
        raise TaskArithError(
            f"could not read {WEIGHTS_NAME} of hub repository {where} ({type(exc).__name__}: {shown(exc, 160)}); "
            "offline, it must be in the local cache"
        ) from None


def _check_accuracies(accuracies: Mapping[str, Any] | None) -> None:
    for name, value in (accuracies or {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise TaskArithError(f"accuracy {shown(name)}={shown(value)}: must be a fraction between 0 and 1")
