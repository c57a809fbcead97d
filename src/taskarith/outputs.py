"""Where a command may write: never over its own inputs, and over nothing taskarith did not write.

Two rules, checked before any expensive work by :func:`check_output`:

1. The output must not be, lie inside, or contain any input (the base model, the models, the task vectors,
   the recipe file), nor be or contain the current folder. Paths are compared after resolving ``~``, ``.``,
   ``..``, relative paths and symbolic links, and by file identity (device and inode), so two spellings of
   one folder are one folder.
2. An existing output is replaced only with ``overwrite`` and only if it looks like a previous taskarith
   output of the same kind: a folder holding :data:`MARKER` (written last by taskarith, naming the format
   and every file it wrote) and nothing else besides those files, or a safetensors file whose header
   metadata ``format`` is the expected taskarith format. Anything else is refused, naming what is in the way.

A symbolic link at the output is refused, with or without ``overwrite``: replacing the link would leave its
target in place while saying the output was replaced, and writing through it would replace a folder the
command line did not name. Give the link's target itself, or remove the link.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from taskarith.errors import TaskArithError
from taskarith.io import write_json

__all__ = ["MARKER", "MERGED_MODEL_FORMAT", "check_output", "write_marker"]

# The file a taskarith output folder carries, and the format of a merged model folder.
MARKER = "taskarith-output.json"
MERGED_MODEL_FORMAT = "taskarith.merged_model/1"

Inputs = Iterable[tuple[str, "str | os.PathLike[str]"]]
_Identity = tuple[int, int]


def write_marker(folder: str | os.PathLike, format: str, **record: Any) -> None:
    """Mark ``folder`` as a taskarith output of ``format``, listing every file in it (call it last)."""
    folder = Path(folder)
    files = sorted({path.name for path in folder.iterdir()} | {MARKER})
    write_json(folder / MARKER, {"format": format, "written_by": "taskarith", **record, "files": files})


def check_output(out: str | os.PathLike, inputs: Inputs, *, overwrite: bool, format: str,
                 folder: bool) -> Path:
    """Refuse an output that would touch an input or something taskarith did not write; return its path.

    ``inputs`` are ``(role, path)`` pairs ("base model", "model", "task vector", "recipe"); ``format`` is the
    taskarith format of the output, a folder (``folder=True``, recognised by :data:`MARKER`) or a safetensors
    file (recognised by its metadata ``format``). Raises :class:`TaskArithError`, one line naming the output
    and the input or file at fault.
    """
    if not os.fspath(out).strip():
        raise TaskArithError("the output path is empty; name the folder or file to write")
    target = _entry(out)
    named = os.fspath(out) if os.fspath(out) == str(target) else f"{os.fspath(out)} ({target})"
    if os.path.islink(target):
        raise TaskArithError(f"{named} is a symbolic link (to {os.readlink(target)}); taskarith neither replaces "
                             "links nor writes through them: give the link's target itself, or remove the link")
    for role, path in inputs:
        relation = _relation(target, path)
        if relation:
            raise TaskArithError(f"{named} {relation} the {role} {path}, an input of this command; "
                                 "write the output somewhere else")
    here = _relation(target, os.getcwd())
    if here in ("is", "contains"):  # replacing it would leave the shell in a deleted folder
        raise TaskArithError(f"{named} {here} the current folder {os.getcwd()}; write the output somewhere else")
    if not os.path.lexists(target):
        return target
    if not overwrite:
        raise TaskArithError(f"{named} already exists; choose another output or allow overwriting (--overwrite), "
                             "which replaces only a previous taskarith output")
    problem = _not_replaceable(target, format, folder)
    if problem:
        raise TaskArithError(f"{named} {problem}; --overwrite replaces only a previous taskarith output, so nothing "
                             "was touched: remove it yourself or choose another output")
    return target


def _not_replaceable(target: Path, format: str, folder: bool) -> str | None:
    """Why an existing ``target`` is not a previous taskarith output of ``format`` (None if it is one)."""
    if not folder:
        if not target.is_file():
            return "is a folder, not a taskarith file"
        try:
            with safe_open(str(target), framework="numpy") as fh:
                found = (fh.metadata() or {}).get("format")
        except (SafetensorError, OSError, ValueError):
            return "is not a safetensors file written by taskarith"
        return None if found == format else f"is not a taskarith {format} file (its metadata 'format' is {found!r})"
    if not target.is_dir():
        return "is a file, not a taskarith output folder"
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = None
    listed = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(listed, list) or marker.get("format") != format:
        return f"is a folder taskarith did not write (no {MARKER} naming {format})"
    strangers = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in target.iterdir()
                       if entry.name not in listed or entry.is_symlink() or not entry.is_file())
    if strangers:
        shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
        return f"holds {shown}, which the previous taskarith output did not write"
    return None


def _entry(path: str | os.PathLike) -> Path:
    """The absolute location of ``path`` itself: links above it resolved, a link at its end not followed."""
    text = os.path.join(os.getcwd(), os.path.expanduser(os.fspath(path)))
    head, name = os.path.split(text)
    if name in ("", ".", ".."):
        return Path(os.path.realpath(text))
    return Path(os.path.realpath(head)) / name


def _identity(path: Path) -> _Identity | None:
    try:
        stat = os.lstat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _lineage(paths: Sequence[Path]) -> tuple[set[Path], set[_Identity]]:
    """The paths and file identities of ``paths`` (a path and its ancestors) that exist or are named."""
    identities = {ident for ident in map(_identity, paths) if ident is not None}
    return set(paths), identities


def _relation(target: Path, path: str | os.PathLike) -> str | None:
    """How ``target`` stands to ``path``: "is", "is inside", "contains", or None when they are apart.

    ``path`` is taken both as itself (a link is an entry of its folder) and as what it resolves to.
    """
    target_id = _identity(target)
    above_target = _lineage(list(target.parents))
    for candidate in {_entry(path), Path(os.path.realpath(os.path.expanduser(os.fspath(path))))}:
        candidate_id = _identity(candidate)
        if candidate == target or (candidate_id is not None and candidate_id == target_id):
            return "is"
        if candidate in above_target[0] or (candidate_id is not None and candidate_id in above_target[1]):
            return "is inside"
        above_candidate = _lineage(list(candidate.parents))
        if target in above_candidate[0] or (target_id is not None and target_id in above_candidate[1]):
            return "contains"
    return None
