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

The same rules are decided again, atomically, when the finished output is moved into place
(:func:`commit`, used by :func:`output_file` for every file a command writes and by the streamed merge for
its folder): the rename is one that fails if anything is at the target, so an output that appeared while
the command ran (a concurrent run, a user's folder) is never replaced; with ``overwrite``, what is there is
first moved aside under a name of our own and examined there, so what is replaced is exactly what was
checked. A fine-tuning run folder is locked for the whole run (:class:`RunLock`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError, safe_open

from taskarith.errors import TaskArithError
from taskarith.io import atomic_path, rename_no_replace, sync_folder, temporary_beside, write_json

__all__ = [
    "LOCK",
    "MARKER",
    "MERGED_MODEL_FORMAT",
    "RunLock",
    "check_output",
    "claim_results_folder",
    "commit",
    "output_file",
    "output_folder",
    "write_marker",
]

# The file a taskarith output folder carries, and the format of a merged model folder.
MARKER = "taskarith-output.json"
MERGED_MODEL_FORMAT = "taskarith.merged_model/1"
# The lock file of a fine-tuning run folder (kept after the run: removing a lock file races with its next taker).
LOCK = ".taskarith.lock"

Inputs = Iterable[tuple[str, "str | os.PathLike[str]"]]
_Identity = tuple[int, int]


def write_marker(folder: str | os.PathLike, format: str, **record: Any) -> None:
    """Mark ``folder`` as a taskarith output of ``format``, listing every file in it (call it last)."""
    folder = Path(folder)
    files = sorted({path.name for path in folder.iterdir()} | {MARKER})
    write_json(folder / MARKER, {"format": format, "written_by": "taskarith", **record, "files": files})


def claim_results_folder(folder: str | os.PathLike, format: str, names: Sequence[str]) -> Path:
    """Make ``folder`` a results folder of ``format`` (a report, its numbers, its figures and caches), or refuse.

    A report command reruns into its own folder on purpose (the bench reuses its cache there), so a folder
    whose :data:`MARKER` names ``format`` is written into again. Any other existing folder is used only if
    none of ``names`` (file or folder names; ``*.png`` matches by suffix) is in it, and is then marked, so
    a user's ``report.md`` or ``results.json`` is never written over. Called before the expensive work."""
    if os.path.islink(folder) or not os.path.isdir(folder):  # a link or a file is refused there, with its reason
        target = check_output(folder, (), overwrite=True, format=format, folder=True)
    else:
        target = _entry(folder)
    marker = target / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("format") == format:
                return target
        except (OSError, ValueError, AttributeError):
            pass
    if target.is_dir():
        present = sorted(
            entry.name
            for entry in target.iterdir()
            if any(entry.name == name or (name.startswith("*") and entry.name.endswith(name[1:])) for name in names)
        )
        if present or marker.exists():
            what = ", ".join(present) if present else f"{MARKER} of another kind"
            raise TaskArithError(
                f"{target} holds {what}, not written by this command; taskarith does not write "
                "over them: choose another --out or remove them"
            )
    try:
        target.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"format": format, "written_by": "taskarith", "files": list(names)})
    except OSError as exc:
        raise TaskArithError(f"could not write {target}: {exc.strerror or exc}") from None
    return target


def check_output(out: str | os.PathLike, inputs: Inputs, *, overwrite: bool, format: str, folder: bool) -> Path:
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
        raise TaskArithError(
            f"{named} is a symbolic link (to {os.readlink(target)}); taskarith neither replaces "
            "links nor writes through them: give the link's target itself, or remove the link"
        )
    for role, path in inputs:
        relation = _relation(target, path)
        if relation:
            raise TaskArithError(
                f"{named} {relation} the {role} {path}, an input of this command; write the output somewhere else"
            )
    here = _relation(target, os.getcwd())
    if here in ("is", "contains"):  # replacing it would leave the shell in a deleted folder
        raise TaskArithError(f"{named} {here} the current folder {os.getcwd()}; write the output somewhere else")
    if not os.path.lexists(target):
        return target
    if not overwrite:
        raise TaskArithError(
            f"{named} already exists; choose another output or allow overwriting (--overwrite), "
            "which replaces only a previous taskarith output"
        )
    problem = _not_replaceable(target, format, folder)
    if problem:
        raise TaskArithError(
            f"{named} {problem}; --overwrite replaces only a previous taskarith output, so nothing "
            "was touched: remove it yourself or choose another output"
        )
    return target


def commit(
    built: str | os.PathLike, out: str | os.PathLike, inputs: Inputs, *, overwrite: bool, format: str, folder: bool
) -> None:
    """Move the finished output ``built`` (beside ``out``) to ``out`` under the rules of :func:`check_output`.

    Decided at the rename: without ``overwrite`` the rename fails if anything appeared at ``out``; with it,
    what is at ``out`` is moved aside first, checked where it now lies, and put back if it is not a previous
    taskarith output. The folder is synced after each rename, so the result survives a power cut. On a
    refusal ``built`` is left for the caller to remove; nothing at ``out`` has changed.
    """
    inputs = list(inputs)
    target = check_output(out, inputs, overwrite=overwrite, format=format, folder=folder)
    try:
        rename_no_replace(built, target)
    except FileExistsError:
        if not overwrite:
            raise TaskArithError(
                f"{target} appeared while this command ran; nothing was replaced and the new "
                "output was discarded: choose another output or allow overwriting (--overwrite)"
            ) from None
    else:
        sync_folder(target.parent)
        return
    aside = target.parent / f".{target.name[:100]}.{Path(built).name[-12:]}.old"
    try:
        rename_no_replace(target, aside)
    except FileNotFoundError:  # it went away meanwhile: nothing left to replace
        return commit(built, out, inputs, overwrite=False, format=format, folder=folder)
    sync_folder(target.parent)
    problem = "is a symbolic link" if os.path.islink(aside) else _not_replaceable(aside, format, folder, target)
    if problem:
        rename_no_replace(aside, target)
        sync_folder(target.parent)
        raise TaskArithError(
            f"{target} {problem} (it appeared while this command ran); --overwrite replaces only "
            "a previous taskarith output, so nothing was replaced and the new output was discarded"
        )
    try:
        rename_no_replace(built, target)
    except FileExistsError:
        raise TaskArithError(
            f"something appeared at {target} while its previous output was being replaced; the "
            f"new output was discarded and the previous one lies at {aside}"
        ) from None
    sync_folder(target.parent)
    try:
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
    except OSError as exc:
        raise TaskArithError(
            f"wrote {target}, but the output it replaced, moved aside to {aside}, could not be "
            f"removed ({exc.strerror or exc}); delete it"
        ) from exc


@contextmanager
def output_file(out: str | os.PathLike, inputs: Inputs, *, overwrite: bool, format: str) -> Iterator[Path]:
    """Check ``out`` (:func:`check_output`), yield a temporary path beside it to write the file to, then
    :func:`commit` it. The one way a command writes a file the user named."""
    inputs = list(inputs)
    target = check_output(out, inputs, overwrite=overwrite, format=format, folder=False)

    def place(tmp: Path, _: Path) -> None:
        commit(tmp, out, inputs, overwrite=overwrite, format=format, folder=False)

    with atomic_path(target, place, kept="nothing was replaced") as tmp:
        yield tmp


@contextmanager
def output_folder(
    out: str | os.PathLike, inputs: Inputs, *, overwrite: bool, format: str, what: str = "", **record: Any
) -> Iterator[Path]:
    """Check ``out`` (:func:`check_output`), yield a new hidden folder beside it to write into, then mark it
    (:func:`write_marker`, with ``record``), sync it and :func:`commit` it. The one way a command writes a
    folder the user named; on any failure the folder is removed and nothing at ``out`` has changed.
    ``what`` names the output in an error ("could not write the merged model to OUT")."""
    inputs = list(inputs)
    target = check_output(out, inputs, overwrite=overwrite, format=format, folder=True)
    where = f"{what} to {target}" if what else str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        building = temporary_beside(target, suffix=".partial", folder=True)
    except OSError as exc:
        raise TaskArithError(f"could not write {where}: {exc.strerror or exc}") from None
    try:
        yield building
        write_marker(building, format, **record)
        sync_folder(building)
        commit(building, out, inputs, overwrite=overwrite, format=format, folder=True)
    except OSError as exc:
        raise TaskArithError(f"could not write {where} (nothing was replaced): {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(building, ignore_errors=True)


class RunLock:
    """An exclusive lock on a run folder, held until :meth:`release` (or the process ends, even by SIGKILL).

    The kernel's ``flock`` on :data:`LOCK` in the folder: a second run into the folder is refused at once,
    naming the process that holds it, and a killed run leaves no stale lock behind. Within one process the
    lock is re-entrant (the command line takes it before loading the model, the library again around the
    run). Where ``flock`` is missing (Windows) runs are not locked.
    """

    _held: dict[Path, int] = {}  # folders this process has locked, and how many holders each has

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._key = Path(os.path.realpath(self.folder))
        self._file: IO[str] | None = None
        self._nested = self._key in RunLock._held
        if self._nested:
            RunLock._held[self._key] += 1
            return
        try:
            import fcntl
        except ImportError:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / LOCK, "a+", encoding="utf-8")
        except OSError as exc:
            raise TaskArithError(
                f"{self.folder}: cannot create the run folder's lock ({exc.strerror or exc})"
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read(200).strip() or "another process"
            handle.close()
            raise TaskArithError(
                f"{self.folder} is in use by another taskarith run ({holder}); wait for it to end "
                "or choose another output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this machine'}\n")
        handle.flush()
        self._file = handle
        RunLock._held[self._key] = 1

    def release(self) -> None:
        if self._key not in RunLock._held:
            return
        RunLock._held[self._key] -= 1
        if RunLock._held[self._key]:
            return
        del RunLock._held[self._key]
        if self._file is not None:
            self._file.close()  # closing the file releases the lock
            self._file = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _not_replaceable(target: Path, format: str, folder: bool, named: Path | None = None) -> str | None:
    """Why an existing ``target`` is not a previous taskarith output of ``format`` (None if it is one).

    ``named``: the output's own path when ``target`` is where it was moved aside (whose suffix is not its kind's).
    """
    if not folder:
        if not target.is_file():
            return "is a folder, not a taskarith file"
        if (named or target).suffix == ".json":  # a record: its own "format" field says who wrote it
            try:
                found = json.loads(target.read_text(encoding="utf-8")).get("format")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
                return "is not a JSON record written by taskarith"
            return None if found == format else f"is not a taskarith {format} record (its 'format' is {found!r})"
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
    strangers = sorted(
        entry.name + ("/" if entry.is_dir() else "")
        for entry in target.iterdir()
        if entry.name not in listed or entry.is_symlink() or not entry.is_file()
    )
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
