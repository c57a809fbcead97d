"""Regular expressions that come from outside (``--trainable``, a PEFT adapter's ``rank_pattern``), compiled
and matched with a time limit.

A pattern such as ``(a|a)+$`` backtracks exponentially on a name it nearly matches; Python's ``re`` cannot be
interrupted, so an adapter file could hang a merge. The ``regex`` package (a dependency of transformers,
the same syntax as ``re`` for these patterns) takes a timeout per match, and taskarith turns an expired one
into an error that names the pattern and where it came from. Each match may take ``MATCH_SECONDS``, and all
matches of one source together (a :class:`MatchBudget`, e.g. one adapter's config) ``TOTAL_SECONDS``: a
file of many patterns each just under the limit cannot stall a run either. Patterns must also compile with
``re``, as the tools that read them (peft, transformers) do.
"""

from __future__ import annotations

import re
import time

import regex

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError

__all__ = ["MATCH_SECONDS", "TOTAL_SECONDS", "MatchBudget", "Pattern"]

MATCH_SECONDS = 1.0  # per name: the names matched are parameter and module names, a few dozen characters
TOTAL_SECONDS = 10.0  # per source, over all its patterns and names


class MatchBudget:
    """The seconds every match of one outside source may still take together."""

    def __init__(self, seconds: float | None = None) -> None:
        self.left = TOTAL_SECONDS if seconds is None else seconds


class Pattern:
    """A compiled outside pattern; ``where`` names its origin (an option or a file and key) in errors, and
    ``within`` (before, after) wraps it in a fixed context (errors show the outside pattern alone)."""

    def __init__(self, pattern: str, where: str, *, within: tuple[str, str] = ("", "")) -> None:
        self.pattern, self.where = pattern, where
        full = within[0] + pattern + within[1]
        try:
            re.compile(full)  # what the tools reading it accept; compiling does not backtrack
            self._compiled = regex.compile(full)
        except (re.error, regex.error, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise TaskArithError(f"{where} {quoted(pattern)} is not a regular expression ({shown(exc)})") from None

    def _run(self, method: str, text: str, budget: MatchBudget | None) -> bool:
        timeout = MATCH_SECONDS if budget is None else min(MATCH_SECONDS, budget.left)
        started = time.perf_counter()
        try:
            if timeout <= 0:
                raise TimeoutError
            return getattr(self._compiled, method)(text, timeout=timeout) is not None
        except TimeoutError:
            if budget is not None and budget.left <= MATCH_SECONDS:
                raise TaskArithError(
                    f"{self.where}: matching its regular expressions took over {TOTAL_SECONDS:g} s in all "
                    f"(stopped at {quoted(self.pattern)} on {shown(text)}): write fewer or simpler patterns"
                ) from None
            raise TaskArithError(
                f"{self.where} {quoted(self.pattern)} took over {MATCH_SECONDS:g} s to match {shown(text)} (the "
                "regular expression backtracks exponentially): write it without nested repetition"
            ) from None
        finally:
            if budget is not None:
                budget.left -= time.perf_counter() - started

    def search(self, text: str, budget: MatchBudget | None = None) -> bool:
        """Whether the pattern occurs anywhere in ``text``."""
        return self._run("search", text, budget)

    def fullmatch(self, text: str, budget: MatchBudget | None = None) -> bool:
        """Whether the pattern matches the whole of ``text``."""
        return self._run("fullmatch", text, budget)
