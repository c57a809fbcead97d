"""Built-in tasks from WordNet 3.0 glosses (``apt-get install wordnet-base``): ``wordnet_topic``, ``wordnet_pos``.

The folder can be moved with ``TASKARITH_WORDNET_DIR`` (read at the first load of a task; results are
cached per process).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from taskarith.data.tasks import Task
from taskarith.data.text import _make_task, _require
from taskarith.errors import TaskArithError

__all__ = ["LEXNAMES", "WORDNET_HINT", "wordnet_pos", "wordnet_topic"]

WORDNET_HINT = "apt-get install wordnet-base"

# lexnames(5WN): lexicographer file names, indexed by the lex_filenum field of data.* lines.
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)


def _wordnet_dir() -> Path:
    return Path(os.environ.get("TASKARITH_WORDNET_DIR", "/usr/share/wordnet"))


def _gloss_definition(gloss: str) -> str:
    # Glosses are 'definition; "example"; "example"'; keep the definition parts only.
    parts = [p.strip() for p in gloss.split(";")]
    return "; ".join(p for p in parts if p and not p.startswith(('"', "`")))


def _wordnet_glosses(pos: str) -> tuple[tuple[str, str], ...]:
    """(lexname, definition) for every synset in ``data.<pos>``."""
    return _read_wordnet(_require(_wordnet_dir() / f"data.{pos}", WORDNET_HINT))


@functools.cache
def _read_wordnet(path: Path) -> tuple[tuple[str, str], ...]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(" "):  # license header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split(" ", 2)
            if not sep or len(fields) < 2 or not fields[1].isdigit():
                continue
            lex = int(fields[1])
            if lex < len(LEXNAMES):
                out.append((LEXNAMES[lex], _gloss_definition(gloss)))
    if not out:
        raise TaskArithError(f"No synsets found in {path}; reinstall with: {WORDNET_HINT}")
    return tuple(out)


_WN_SOURCE = "wordnet-base (apt) /usr/share/wordnet"

# Clearly distinct, large lexicographer files (smallest, noun.body, has ~2k synsets).
WORDNET_TOPICS: dict[str, str] = {
    "noun.animal": "animal",
    "noun.plant": "plant",
    "noun.food": "food",
    "noun.artifact": "artifact",
    "noun.person": "person",
    "noun.location": "location",
    "noun.body": "body part",
    "noun.substance": "substance",
}


def wordnet_topic() -> Task:
    """WordNet noun gloss -> semantic category (lexicographer file)."""
    items = (
        (definition, WORDNET_TOPICS[lex], "") for lex, definition in _wordnet_glosses("noun") if lex in WORDNET_TOPICS
    )
    return _make_task(
        "wordnet_topic",
        tuple(WORDNET_TOPICS.values()),
        ("a dictionary definition of a kind of {}.", "the definition of a word for a {}."),
        items,
        domain="dictionary glosses",
        source=f"{_WN_SOURCE}/data.noun (lex_filenum)",
    )


WORDNET_POS: dict[str, str] = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def wordnet_pos() -> Task:
    """WordNet gloss -> part of speech of the word it defines."""
    items = ((definition, cls, "") for pos, cls in WORDNET_POS.items() for _, definition in _wordnet_glosses(pos))
    return _make_task(
        "wordnet_pos",
        tuple(WORDNET_POS.values()),
        ("a dictionary definition of a {}.", "the meaning of a {}."),
        items,
        domain="dictionary glosses",
        source=f"{_WN_SOURCE}/data.{{noun,verb,adj,adv}}",
    )
