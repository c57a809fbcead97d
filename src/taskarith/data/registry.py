"""The built-in tasks by name, and :func:`load_task`: one entry point for every kind of task.

A built-in task is one plain builder function in its source's module; this table names it and caches
it (Tasks are immutable, so one build per process serves every caller). A new built-in task is one
function and one line here. The source modules never import this one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from taskarith.data import fortunes, image_corpora, scattertext, wordnet
from taskarith.data.files import task_from_file
from taskarith.data.image_folder import task_from_image_folder
from taskarith.data.pixels import check_split_rule
from taskarith.data.tasks import Task
from taskarith.data.torchvision_datasets import task_from_torchvision
from taskarith.errors import TaskArithError

__all__ = ["BUILTIN_TASKS", "FILE_SUFFIXES", "load_task"]

_BUILDERS: dict[str, Callable[[], Task]] = {
    "rt_sentiment": scattertext.rt_sentiment,
    "rt_subjectivity": scattertext.rt_subjectivity,
    "convention_party": scattertext.convention_party,
    "debate_party": scattertext.debate_party,
    "wordnet_topic": wordnet.wordnet_topic,
    "wordnet_pos": wordnet.wordnet_pos,
    "fortune_language": fortunes.fortune_language,
    "fortune_topic": fortunes.fortune_topic,
    "fashion_mnist": image_corpora.fashion_mnist,
    "mnist": image_corpora.mnist,
    "digits": image_corpora.digits,
    "animal_shapes": image_corpora.animal_shapes,
}
# Cached per process; call the source's function directly (e.g. wordnet.wordnet_topic()) to rebuild.
BUILTIN_TASKS: dict[str, Callable[[], Task]] = {name: functools.cache(build) for name, build in _BUILDERS.items()}

FILE_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl", ".json")


def load_task(spec: str | Path) -> Task:
    """Load a built-in task by name, a user task from a ``.csv`` / ``.jsonl`` / ``.json`` path, an image
    folder (one sub-folder per class, optionally under train/val/test), or ``torchvision:DATASET@ROOT``
    (a torchvision dataset already on disk, e.g. ``torchvision:EuroSAT@/data``).

    Image folders and torchvision datasets take the papers' splits; ``?splits=taskarith`` at the end of the
    spec (``torchvision:EuroSAT@/data?splits=taskarith``, ``/data/pets?splits=taskarith``) caps them as the
    built-in tasks are capped (:data:`~taskarith.data.pixels.SPLIT_RULES`)."""
    key = str(spec)
    if key in BUILTIN_TASKS:
        return BUILTIN_TASKS[key]()
    key, splits = _split_rule(key)
    if key.startswith("torchvision:"):
        name, sep, root = key[len("torchvision:") :].partition("@")
        if not name or not sep or not root:
            raise TaskArithError(f"task {key!r}: expected torchvision:DATASET@ROOT_FOLDER")
        return task_from_torchvision(name, root, splits=splits)
    path = Path(key).expanduser()
    if path.is_dir():
        return task_from_image_folder(path, splits=splits)
    if splits != "paper":
        raise TaskArithError(f"task {str(spec)!r}: ?splits= applies to image folders and torchvision datasets only.")
    if path.suffix.lower() in FILE_SUFFIXES:
        return task_from_file(path)
    known = ", ".join(sorted(BUILTIN_TASKS))
    if path.exists():
        raise TaskArithError(
            f"Task file {key!r} has suffix {path.suffix or '(none)'!r}; use a .csv, .jsonl or .json file."
        )
    raise TaskArithError(
        f"Unknown task {key!r}. Known tasks: {known}. Or pass a path to a .csv / .jsonl / .json file "
        "or to an image folder."
    )


def _split_rule(key: str) -> tuple[str, str]:
    """(spec, rule) of a spec that may end in ``?splits=RULE``; a path that really ends so stays a path."""
    head, sep, query = key.rpartition("?")
    if not sep or not query.startswith("splits=") or Path(key).expanduser().exists():
        return key, "paper"
    return head, check_split_rule(query[len("splits=") :])
