"""Regular expressions that come from outside (``--trainable``, a PEFT adapter's ``rank_pattern``), compiled
and matched with a time limit.

A pattern such as ``(a|a)+$`` backtracks exponentially on a name it nearly matches; Python's ``re`` cannot be
interrupted, so an adapter file could hang a merge. The ``regex`` package (a dependency of transformers,
the same syntax as ``re`` for these patterns) takes a timeout per match, and taskarith turns an expired one
into an error that names the pattern and where it came from.
"""

from __future__ import annotations

import regex

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError

__all__ = ["MATCH_SECONDS", "Pattern"]

MATCH_SECONDS = 1.0  # per name: the names matched are parameter and module names, a few dozen characters


class Pattern:
    """A compiled outside pattern; ``where`` names its origin (an option or a file and key) in errors, and
    ``within`` (before, after) wraps it in a fixed context (errors show the outside pattern alone)."""

    def __init__(self, pattern: str, where: str, *, within: tuple[str, str] = ("", "")) -> None:
        self.pattern, self.where = pattern, where
        try:
            self._compiled = regex.compile(within[0] + pattern + within[1])
        except (regex.error, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise TaskArithError(f"{where} {quoted(pattern)} is not a regular expression ({shown(exc)})") from None

    def _run(self, method: str, text: str) -> bool:
        try:
            return getattr(self._compiled, method)(text, timeout=MATCH_SECONDS) is not None
        except TimeoutError:
            raise TaskArithError(
                f"{self.where} {quoted(self.pattern)} took over {MATCH_SECONDS:g} s to match {shown(text)} (the "
                "regular expression backtracks exponentially): write it without nested repetition"
            ) from None

    def search(self, text: str) -> bool:
        """Whether the pattern occurs anywhere in ``text``."""
        return self._run("search", text)

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches the whole of ``text``."""
        return self._run("fullmatch", text)
