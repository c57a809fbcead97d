"""Outside regular expressions: compiled as the tools reading them compile them, matched within a budget."""

from __future__ import annotations

import pytest

from taskarith.errors import TaskArithError
from taskarith.patterns import MatchBudget, Pattern


def test_a_pattern_matches_as_re_would_and_spends_its_sources_budget() -> None:
    budget = MatchBudget(5.0)
    wrapped = Pattern("query|value", "adapter: rank_pattern pattern", within=(r"(.*\.)?(", ")"))
    assert wrapped.fullmatch("encoder.layer.0.attention.self.query", budget)
    assert not wrapped.fullmatch("encoder.layer.0.attention.self.query.weight", budget)
    assert Pattern(r"\.query\.", "--trainable").search("self.query.weight")
    assert 0 < 5.0 - budget.left < 5.0


def test_a_spent_budget_stops_the_next_match_and_names_the_source() -> None:
    with pytest.raises(TaskArithError, match=r"adapter: matching its regular expressions took over 10 s in all"):
        Pattern("query", "adapter").fullmatch("self.query", MatchBudget(0.0))


@pytest.mark.parametrize(
    ("pattern", "within"),
    [("(", ("", "")), ("(?i)query", (r"(.*\.)?(", ")")), (r"\p{L}+", ("", ""))],
)
def test_what_pythons_re_cannot_compile_is_refused_by_name(pattern: str, within: tuple[str, str]) -> None:
    # peft compiles the wrapped pattern with re: a global flag inside the wrapper, or regex-only syntax,
    # would load here and fail there.
    with pytest.raises(TaskArithError, match="--trainable '.*' is not a regular expression"):
        Pattern(pattern, "--trainable", within=within)
