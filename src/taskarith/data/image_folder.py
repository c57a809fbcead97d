"""Image tasks from class folders on disk (``root/<class>/<image>`` or ``root/{train,val,test}/<class>/...``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from taskarith.data.pixels import IMAGE_SUFFIXES, _build_task, _Pool, check_split_rule
from taskarith.data.tasks import Task
from taskarith.display import shown
from taskarith.errors import TaskArithError

__all__ = ["DEFAULT_IMAGE_TEMPLATES", "task_from_image_folder"]

DEFAULT_IMAGE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.")

_SPLIT_ORDER = ("train", "val", "test")
_SPLIT_DIRS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path, root: Path, seen: set[str]) -> list[Path]:
    """Image files below ``folder`` (recursively), in torchvision ImageFolder's order: folders sorted by
    path, files by name (so the "paper" split draws the same images as the papers' ``random_split``).

    Links are followed only to what lies inside ``folder`` itself (its real path): a link to an ancestor
    (``b/loop -> ..``) or a second route to a folder already listed would list its files again, under this
    class, and one to another class's files would give them this label. Such links inside ``root`` are
    skipped (their files are listed where they lie); a link out of ``root`` is refused, since it would pull
    files the folder's owner did not put there into the task. ``seen`` holds the real path of every file
    already listed, so that no file is listed twice (in two classes or two splits).
    """
    home = os.path.realpath(folder)
    _check_inside(folder, home, root)
    visited = {home}
    walk = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if name.startswith(".") or real in visited or not _check_inside(Path(dirpath, name), real, root, home):
                continue
            visited.add(real)
            kept.append(name)
        dirnames[:] = kept
        walk.append((dirpath, filenames))
    found = []
    for dirpath, filenames in sorted(walk):
        for filename in sorted(filenames):
            if filename.startswith(".") or Path(filename).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / filename
            real = os.path.realpath(path)
            if real not in seen and _check_inside(path, real, root, home):
                seen.add(real)
                found.append(path)
    return found


def _check_inside(path: Path, real: str, root: Path, home: str | None = None) -> bool:
    """Whether ``real`` (``path`` with links resolved) lies inside ``home``; refused if it leaves ``root``."""
    if not Path(real).is_relative_to(root):
        raise TaskArithError(
            f"Image folder {shown(root)}: {shown(path)} leads through a link to {shown(real)}, "
            "outside the folder; taskarith reads only files inside an image folder: copy them in, or remove "
            "the link"
        )
    return home is None or Path(real).is_relative_to(home)


def task_from_image_folder(
    root: str | os.PathLike[str],
    *,
    name: str | None = None,
    templates: Sequence[str] = DEFAULT_IMAGE_TEMPLATES,
    domain: str = "images",
    splits: str = "paper",
    class_names: Mapping[str, str] | None = None,
) -> Task:
    """A Task from image files in class folders, read lazily (inputs are ``Path``s).

    Layouts: ``root/<class>/<images>``, or ``root/train/<class>/...`` with ``root/test/`` and/or
    ``root/val/``. Class names are the folder names, sorted, with underscores shown as spaces, or
    ``class_names[folder]`` when a mapping is given. Files whose suffix is not an image type
    (:data:`IMAGE_SUFFIXES`) and hidden files are ignored.

    ``splits`` is the split rule (:data:`~taskarith.data.pixels.SPLIT_RULES`). "paper" (default): the
    folders' splits whole; a missing val is 10 % of train (at most 5,000) drawn as the papers'
    ``random_split`` with seed 0 draws it; a missing test (one pool of class folders) is 15 % of every
    class, chosen by a stable hash. "taskarith": missing splits carved from train and every split capped
    (4,000 / 300 / 500) like the built-in tasks.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise TaskArithError(f"Image folder {str(base)!r} {what}; pass a folder with one subfolder per class.")
    base = base.resolve()
    check_split_rule(splits)
    top = _visible_dirs(base)
    split_dirs = {_SPLIT_DIRS[d.name.lower()]: d for d in top if d.name.lower() in _SPLIT_DIRS}
    layout: dict[str, Path]
    if "train" in split_dirs and len(split_dirs) == len(top) and len(split_dirs) >= 2:
        layout = split_dirs
    else:
        layout = {"train": base}
    # The source is what load_task reloads the task from: the path, with the rule when it is not the default.
    source = str(base) if splits == "paper" else f"{base}?splits={splits}"
    return _folder_task(
        base,
        layout,
        name=name or base.name,
        templates=templates,
        domain=domain,
        splits=splits,
        class_names=class_names,
        source=source,
    )


def _folder_task(
    base: Path,
    layout: dict[str, Path],
    *,
    name: str,
    templates: Sequence[str],
    domain: str,
    splits: str,
    source: str,
    class_names: Mapping[str, str] | None = None,
) -> Task:
    """The task of class folders under each of ``layout``'s split folders (split name -> folder)."""
    if isinstance(templates, str):
        templates = (templates,)
    classes, pools = _folder_pools(base, layout, class_names)
    return _build_task(name, classes, templates, pools, domain=domain, source=source, balance=False, splits=splits)


def _folder_pools(
    base: Path, layout: dict[str, Path], class_names: Mapping[str, str] | None = None
) -> tuple[list[str], dict[str, _Pool]]:
    """Class names and one pool per split folder; keys are paths relative to ``base``."""
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
        if class_names is not None:
            if folder_name not in class_names:
                raise TaskArithError(
                    f"Image folder {str(base)!r}: class folder {folder_name!r} has no class name "
                    "in the given names; remove the folder or name its class."
                )
            label = str(class_names[folder_name])
        else:
            label = " ".join(folder_name.replace("_", " ").split())
        clash = [f for f, s in display.items() if s == label]
        if clash or not label:
            raise TaskArithError(
                f"Image folder {str(base)!r}: class folders {clash + [folder_name]!r} give the same class name "
                f"{label!r}; rename one."
            )
        display[folder_name] = label
    index = {f: i for i, f in enumerate(all_names)}

    pools: dict[str, _Pool] = {}
    root = base.resolve()
    seen: set[str] = set()
    listed: dict[Path, Path] = {}
    # A file reached from two splits (through links) is kept in the first of train, val, test.
    order = sorted(layout, key=lambda split: _SPLIT_ORDER.index(split) if split in _SPLIT_ORDER else 3)
    for split in order:
        folder = layout[split]
        keys, labels, paths = [], [], []
        for folder_name in sorted(folder_names[split]):
            images = _images_under(folder / folder_name, root, seen)
            if not images and (folder / folder_name).resolve() in listed:
                raise TaskArithError(
                    f"Class folder {shown(folder / folder_name)} is the folder "
                    f"{shown(listed[(folder / folder_name).resolve()])} (through a link), whose images are "
                    "listed already; a file is used once, so that no test image is also a training one"
                )
            listed.setdefault((folder / folder_name).resolve(), folder / folder_name)
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
    pools = {split: pools[split] for split in layout}
    missing = [display[f] for f in all_names if f not in folder_names["train"]]
    if missing:
        raise TaskArithError(f"Image folder {str(base)!r}: classes {missing!r} have no training images under train/.")
    return [display[f] for f in all_names], pools
