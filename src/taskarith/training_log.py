"""What a fine-tuning run logs while it trains, where people look for it.

Always ``train_log.jsonl`` in the run folder: a header line (``{"format": ..., "task": ..., "mode": ...}``),
then one line per logged step (``step``, ``loss``, ``lr``, ``grad_norm``, and ``penalty`` when regularized)
and one per validation (``step``: updates done, ``val_accuracy``), flushed as they come, so a run can be
watched (``tail -f``) and plotted (``taskarith plot-run``) while it trains. With the optional
``tensorboard`` package, the same scalars also go to TensorBoard event files in ``tensorboard/``.

A resumed run keeps the lines of the steps its checkpoint covers and drops the rest (they will be logged
again); a new run starts both logs afresh. Neither is ever written over unless taskarith wrote it: the JSONL
file by its header's format, the TensorBoard folder by holding only event files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from taskarith.errors import TaskArithError
from taskarith.io import atomic_path

LOG_FORMAT = "taskarith.train_log/1"
LOG_FILE = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.[\w.\-]+")
# Scalars of a training line, as TensorBoard tags.
_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "penalty": "train/penalty"}


def tensorboard_available() -> bool:
    """Whether the optional ``tensorboard`` package (which torch.utils.tensorboard writes through) is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def check_log_outputs(folder: Path) -> None:
    """Refuse a run folder whose log file or TensorBoard folder taskarith did not write (before training)."""
    log = folder / LOG_FILE
    if os.path.lexists(log):
        header = _header(log)
        if header is None or header.get("format") != LOG_FORMAT:
            raise TaskArithError(
                f"{log} is not a taskarith training log (its first line has no format {LOG_FORMAT!r}); "
                "taskarith does not write over it: move it or choose another --out"
            )
    board = folder / TENSORBOARD_DIR
    if os.path.lexists(board):
        strangers = _strangers(board)
        if strangers is None or strangers:
            what = "is not a folder" if strangers is None else f"holds {', '.join(strangers[:3])}"
            raise TaskArithError(
                f"{board} {what}, not TensorBoard event files taskarith wrote; move it or choose another --out"
            )


class TrainingLog:
    """The run's JSONL log (and TensorBoard events, when available), from step ``start`` on."""

    def __init__(
        self, folder: Path, header: Mapping[str, Any], *, start: int = 0, tensorboard: bool | None = None
    ) -> None:
        check_log_outputs(folder)
        self.path = folder / LOG_FILE
        kept = _lines_before(self.path, start) if start > 0 else []
        # Rewritten whole (atomically), then appended to: a crash leaves a file of whole lines.
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in [dict(header), *kept]))
        self.file = open(self.path, "a", encoding="utf-8")  # open for the whole run; close() closes it
        self.board = None
        if tensorboard if tensorboard is not None else tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            board = folder / TENSORBOARD_DIR
            if start == 0 and board.is_dir():
                for entry in board.iterdir():  # a new run: the previous run's events, checked to be only that
                    entry.unlink()
            self.board = SummaryWriter(str(board), purge_step=start if start > 0 else None)

    def write(self, entry: Mapping[str, Any]) -> None:
        self.file.write(json.dumps(dict(entry), sort_keys=True) + "\n")
        self.file.flush()
        if self.board is not None:
            step = int(entry["step"])
            for key, value in entry.items():
                if key == "val_accuracy":
                    self.board.add_scalar("val/accuracy", value, step)
                elif key in _TAGS:
                    self.board.add_scalar(_TAGS[key], value, step)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.board is not None:
            self.board.close()


def read_log(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the lines of a training log, refused with one line naming the file and line at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskArithError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskArithError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    lines: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            raise TaskArithError(f"{path}, line {number}: not valid JSON") from None
        if not isinstance(value, dict):
            raise TaskArithError(f"{path}, line {number}: not a JSON object")
        lines.append(value)
    if not lines or lines[0].get("format") != LOG_FORMAT:
        raise TaskArithError(f"{path}: not a taskarith training log (no {LOG_FORMAT!r} header)")
    for number, entry in enumerate(lines[1:], start=2):
        step = entry.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TaskArithError(f"{path}, line {number}: 'step' must be a non-negative integer")
        for key in ("loss", "lr", "grad_norm", "penalty", "val_accuracy"):
            if key in entry and not (isinstance(entry[key], (int, float)) and not isinstance(entry[key], bool)):
                raise TaskArithError(f"{path}, line {number}: '{key}' must be a number")
    return lines[0], lines[1:]


def _header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline(1 << 16)
        value = json.loads(first)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _lines_before(path: Path, start: int) -> list[dict[str, Any]]:
    """The logged lines of steps before ``start`` (validations count the updates done: at most ``start``)."""
    if not path.is_file():
        return []
    _, lines = read_log(path)
    return [line for line in lines if line["step"] < start or ("val_accuracy" in line and line["step"] <= start)]


def _strangers(board: Path) -> list[str] | None:
    if board.is_symlink() or not board.is_dir():
        return None
    return sorted(
        entry.name for entry in board.iterdir() if entry.is_symlink() or not _EVENT_FILE.fullmatch(entry.name)
    )
