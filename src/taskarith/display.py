"""How strings that came from outside (file metadata, paths, names, recipe values) reach a terminal or a message.

Two layers, so that a command which forgets the first is still safe:

* :class:`Output` is where every command prints. Every string it is given is plain text: terminal escape
  sequences (ANSI colours, OSC window titles, cursor moves) and control characters are removed, and it is
  never read as rich markup, so ``task="[/x]"`` prints as ``[/x]`` instead of crashing after the output
  was written, and ``--out '[bold]y'`` is reported as ``[bold]y``. Rich renderables (tables, styled
  :class:`rich.text.Text`) pass through; their cells go through :func:`cell`.
* :func:`shown` and :func:`quoted` turn one value from outside into one harmless line of bounded length,
  for interpolating into a printed line or an error message: a 480 KB YAML value or a 5,000-digit
  integer becomes a few dozen characters saying how long it was.
"""

from __future__ import annotations

import json
import re
import reprlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.text import Text
from tqdm.auto import tqdm

__all__ = ["Output", "StageProgress", "cell", "duration", "plain", "quoted", "shown"]

# ESC-introduced sequences (CSI, OSC and the other string commands, up to their terminator, or a single
# two-character escape), their 8-bit C1 forms, then any remaining C0/C1 control character except tab and
# newline. Bidirectional overrides are removed too: they reorder what the reader sees ("trojan source").
_TERMINAL = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]?"
    r"|\x1b[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
    r"|\x9b[0-?]*[ -/]*[@-~]?"
    r"|[\x90\x98\x9d\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
)
_LINE_BREAKS = re.compile(r"[\t\n]+")
LIMIT = 200  # characters of one value shown before it is cut
_DIGITS_SHOWN = 40


def plain(text: str) -> str:
    """``text`` without terminal escape sequences and control characters (tabs and newlines kept)."""
    return _TERMINAL.sub("", text)


def _text(value: object) -> str:
    """str(value), also for integers too long for str() (Python refuses more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4000:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return str(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} that cannot be shown>"


def _cap(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"


def shown(value: object, limit: int = LIMIT) -> str:
    """One value from outside as one line: escapes and control characters removed, at most ``limit`` characters."""
    return _cap(_LINE_BREAKS.sub(" ", plain(_text(value))), limit)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, _DIGITS_SHOWN
for _name in ("maxdict", "maxlist", "maxtuple", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _name, 6)


def quoted(value: object, limit: int = 80) -> str:
    """repr(value) for a message, bounded: nesting, items, string length and digits are all capped."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4000:
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):
        text = f"<a {type(value).__name__} that cannot be shown>"
    return _cap(_LINE_BREAKS.sub(" ", plain(text)), limit)


def cell(value: object) -> Text:
    """A table cell holding ``value`` as plain text (a str cell would be read as markup)."""
    return value if isinstance(value, Text) else Text(plain(_text(value)))


class Output:
    """A terminal stream through which commands print; see the module docstring for what it guarantees."""

    def __init__(self, *, stderr: bool = False) -> None:
        self.console = Console(stderr=stderr, highlight=False)

    def print(self, *parts: object) -> None:
        """Print ``parts`` separated by spaces: strings and numbers as plain text, renderables as they are.

        A line of text is printed unbroken (a path cut by a line break cannot be pasted back); tables
        and other renderables are laid out to the terminal's width.
        """
        renderables = [self._renderable(part) for part in parts]
        self.console.print(*renderables, soft_wrap=all(isinstance(part, Text) for part in renderables))

    def json(self, data: Any) -> None:
        """``data`` as indented JSON, for programs to read: JSON escapes every control character itself."""
        self.console.file.write(json.dumps(data, indent=2) + "\n")

    def error(self, message: str, limit: int = 2000) -> None:
        """The one ``error:`` line of a failed command, on one line however long the message."""
        self.console.print(
            Text("error:", style="red"), Text(_cap(_LINE_BREAKS.sub(" ", plain(message)), limit)), soft_wrap=True
        )

    @contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner showing ``message`` (plain text) while the block runs."""
        with self.console.status(Text(plain(message))):
            yield

    @staticmethod
    def _renderable(part: object) -> Any:
        if isinstance(part, str) or not hasattr(part, "__rich_console__") and not hasattr(part, "__rich__"):
            return Text(plain(_text(part)))
        return part


def duration(seconds: float) -> str:
    """A duration as people say it: 45 s, 12 min, 1 h 05 min."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class StageProgress:
    """A long job's stages and an estimate of the time it has left.

    The job announces each stage (:meth:`stage`) and, as each finishes, the share of its planned work it was
    (:meth:`advance`, in any unit, against :meth:`start`'s total). The estimate is the elapsed time scaled
    by the work left over the work done. On a terminal, the stage lines scroll above an overall bar with
    that estimate, and the stages draw their own bars below it (:attr:`bars`); elsewhere (CI logs, a file)
    each stage is one plain line ending with the share done and the time left, and no bar is drawn.
    Every line goes through ``output``, so text from outside arrives as plain text.
    """

    def __init__(self, output: Output, label: str = "progress", *, terminal: bool | None = None) -> None:
        self.output = output
        self.label = label
        self.bars = output.console.is_terminal if terminal is None else terminal
        self.total = self.done = 0.0
        self.started = time.perf_counter()
        self._bar: Any = None

    def start(self, total: float) -> None:
        """Begin the clock on ``total`` units of planned work."""
        self.total, self.done, self.started = float(total), 0.0, time.perf_counter()
        if self.bars and self.total > 0:
            self._bar = tqdm(
                total=self.total,
                desc=self.label,
                file=self.output.console.file,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left",
                dynamic_ncols=True,
                position=0,
            )

    def stage(self, text: str) -> None:
        if self._bar is not None:
            with tqdm.external_write_mode(file=self.output.console.file):
                self.output.print(Text(">", style="bold"), text)
        else:
            self.output.print(Text(">", style="bold"), text + self._estimate())

    def advance(self, units: float) -> None:
        step = min(max(units, 0.0), self.total - self.done)
        self.done += step
        if self._bar is not None and step > 0:
            self._bar.update(step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _estimate(self) -> str:
        if self.total <= 0 or self.done <= 0:
            return ""
        elapsed = time.perf_counter() - self.started
        left = elapsed * (self.total - self.done) / self.done
        return f"  [{100 * self.done / self.total:.0f}% done, about {duration(left)} left]"
