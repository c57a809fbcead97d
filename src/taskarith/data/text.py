"""Helpers the built-in text tasks share: whitespace cleaning, de-duplication, a sentence splitter."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from taskarith.data.tasks import Task, split_examples
from taskarith.errors import TaskArithError

_WS = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _WS.sub(" ", text).strip()


def _dedupe(items: Iterable[tuple[str, str, str]]) -> tuple[list[str], list[str], list[str]]:
    """Drop empty texts and duplicates; a text seen with two labels is dropped entirely.

    Items are (text, label, group); the first occurrence's group is kept.
    """
    first: dict[str, tuple[str, str]] = {}
    conflicted: set[str] = set()
    for text, label, group in items:
        text = _clean(text)
        if not text:
            continue
        if text in first:
            if first[text][0] != label:
                conflicted.add(text)
            continue
        first[text] = (label, group)
    kept = [t for t in first if t not in conflicted]
    return kept, [first[t][0] for t in kept], [first[t][1] for t in kept]


def _make_task(
    name: str,
    classes: tuple[str, ...],
    templates: tuple[str, ...],
    items: Iterable[tuple[str, str, str]],
    *,
    domain: str,
    source: str,
    grouped: bool = False,
) -> Task:
    """Dedupe, map labels to ints in ``classes`` order, balanced deterministic split."""
    texts, labels, groups = _dedupe(items)
    index = {c: i for i, c in enumerate(classes)}
    ys = [index[y] for y in labels]
    train, val, test = split_examples(texts, ys, groups=groups if grouped else None, balance=True)
    return Task(
        name=name, classes=classes, templates=templates, train=train, val=val, test=test, domain=domain, source=source
    )


_SENT_BOUNDARY = re.compile(
    # Titles and 'U.S.' end with a period but rarely end a sentence.
    r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bJr\.)(?<!\bU\.S\.)"
    r"(?<=[.!?])[\"'\u201d\u2019)]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"  # '. Next'
    r"|(?<=[a-z][.!?])(?=[A-Z])"  # 'much.Thank' (missing space in the transcripts)
    r"|\n+"
)


def _sentences(text: str, min_words: int) -> Iterator[str]:
    """Simple regex sentence splitter; drops sentences shorter than ``min_words`` words."""
    for sent in _SENT_BOUNDARY.split(text):
        sent = _clean(sent or "")
        if len(sent.split()) >= min_words:
            yield sent


def _require(path: Path, install: str) -> Path:
    if not path.exists():
        raise TaskArithError(f"Missing data file {path}. Install it with: {install}")
    return path
