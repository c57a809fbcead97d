"""Image tasks from class folders on disk (``root/<class>/<image>`` or ``root/{train,val,test}/<class>/...``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from taskarith.data.pixels import IMAGE_SUFFIXES, _build_task, _Pool
from taskarith.data.tasks import Task
from taskarith.errors import TaskArithError

__all__ = ["DEFAULT_IMAGE_TEMPLATES", "task_from_image_folder"]

DEFAULT_IMAGE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.")

_SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, like torchvision's ImageFolder), in name order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if not filename.startswith(".") and Path(filename).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / filename)
    return found


def task_from_image_folder(
    root: str | os.PathLike[str],
    *,
    name: str | None = None,
    templates: Sequence[str] = DEFAULT_IMAGE_TEMPLATES,
    domain: str = "images",
) -> Task:
    """A Task from image files in class folders, read lazily (inputs are ``Path``s).

    Layouts: ``root/<class>/<images>`` (split deterministically into train/val/test), or
    ``root/train/<class>/...`` with ``root/test/`` and/or ``root/val/`` (a missing one is carved from
    train). Class names are the folder names, sorted, with underscores shown as spaces. Files whose
    suffix is not an image type (:data:`IMAGE_SUFFIXES`) and hidden files are ignored. Splits are
    capped like every other task.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise TaskArithError(f"Image folder {str(base)!r} {what}; pass a folder with one subfolder per class.")
    base = base.resolve()
    if isinstance(templates, str):
        templates = (templates,)
    top = _visible_dirs(base)
    split_dirs = {_SPLIT_DIRS[d.name.lower()]: d for d in top if d.name.lower() in _SPLIT_DIRS}
    layout: dict[str, Path]
    if "train" in split_dirs and len(split_dirs) == len(top) and len(split_dirs) >= 2:
        layout = split_dirs
    else:
        layout = {"train": base}

    folder_names: dict[str, set[str]] = {}
    for split, folder in layout.items():
        classes_here = _visible_dirs(folder)
        if not classes_here:
            raise TaskArithError(
                f"Image folder {str(folder)!r} has no class subfolders; put each class's images in "
                f"{folder}/<class name>/."
            )
        folder_names[split] = {d.name for d in classes_here}
    all_names = sorted(set().union(*folder_names.values()))
    display: dict[str, str] = {}
    for folder_name in all_names:
        shown = " ".join(folder_name.replace("_", " ").split())
        clash = [f for f, s in display.items() if s == shown]
        if clash or not shown:
            raise TaskArithError(
                f"Image folder {str(base)!r}: class folders {clash + [folder_name]!r} give the same class name "
                f"{shown!r}; rename one."
            )
        display[folder_name] = shown
    index = {f: i for i, f in enumerate(all_names)}

    pools: dict[str, _Pool] = {}
    for split, folder in layout.items():
        keys, labels, paths = [], [], []
        for folder_name in sorted(folder_names[split]):
            images = _images_under(folder / folder_name)
            if not images:
                raise TaskArithError(
                    f"Class folder {str(folder / folder_name)!r} has no image files "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))})."
                )
            for path in images:
                # Relative keys keep the split independent of where the folder lives.
                keys.append(path.relative_to(base).as_posix())
                labels.append(index[folder_name])
                paths.append(path)
        pools[split] = _Pool(keys, labels, paths)
    missing = [display[f] for f in all_names if f not in folder_names["train"]]
    if missing:
        raise TaskArithError(f"Image folder {str(base)!r}: classes {missing!r} have no training images under train/.")
    return _build_task(name or base.name, [display[f] for f in all_names], templates, pools, domain=domain,
                       source=str(base), balance=False)  # a path: load_task reloads the task from it
