"""Built-in tasks from fortune-cookie databases: ``fortune_language``, ``fortune_topic``.

Read from the apt packages ``fortunes``, ``fortunes-min``, ``fortunes-de``, ``fortunes-es``,
``fortunes-it``, ``fortunes-pl`` and ``fortunes-br``. The folder can be moved with
``TASKARITH_FORTUNE_DIR`` (read at the first load of a task; results are cached per process).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from taskarith.data.tasks import Task
from taskarith.data.text import _clean, _make_task, _require
from taskarith.errors import TaskArithError

__all__ = ["ENGLISH_FORTUNES", "FORTUNES_HINT", "FORTUNE_LANGUAGES", "fortune_language", "fortune_topic"]

FORTUNES_HINT = "apt-get install fortunes fortunes-min"

# English files of the 'fortunes' package. The top folder also holds symlinks to Italian files
# (fortunes-it) and the Portuguese 'brasil' file, so it cannot be globbed.
# Left out: ascii-art (pictures), perl (mostly code), translate-me (a handful of stubs).
ENGLISH_FORTUNES: tuple[str, ...] = (
    "art",
    "computers",
    "cookie",
    "debian",
    "definitions",
    "disclaimer",
    "drugs",
    "education",
    "ethnic",
    "food",
    "goedel",
    "humorists",
    "kids",
    "knghtbrd",
    "law",
    "linux",
    "linuxcookie",
    "love",
    "magic",
    "medicine",
    "men-women",
    "miscellaneous",
    "news",
    "paradoxum",
    "people",
    "pets",
    "platitudes",
    "politics",
    "pratchett",
    "science",
    "songs-poems",
    "sports",
    "startrek",
    "tao",
    "wisdom",
    "work",
    "zippy",
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


@functools.cache
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
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith((".dat", ".u8")) and f"{sub}/{p.name}" not in FORTUNE_SKIP
    ]
    if not files:
        raise TaskArithError(f"No fortune files in {folder}; reinstall with: apt-get install {package}")
    return files


FORTUNE_LANGUAGES: tuple[str, ...] = ("English", "German", "Spanish", "Italian", "Portuguese", "Polish")


def fortune_language() -> Task:
    """Fortune cookie -> language (non-offensive files of the fortunes-* packages)."""
    items = (
        (record, language, "")
        for language in FORTUNE_LANGUAGES
        for path in _fortune_files(language)
        for record in _fortune_records(path)
    )
    return _make_task(
        "fortune_language",
        FORTUNE_LANGUAGES,
        ("a fortune cookie written in {}.", "a saying in {}."),
        items,
        domain="fortune cookies",
        source="fortunes, fortunes-min, fortunes-de, -es, -it, -pl, -br (apt) /usr/share/games/fortunes",
    )


# topic class name -> English fortune file; the six largest clearly distinct topic files.
FORTUNE_TOPICS: dict[str, str] = {
    "computers": "computers",
    "food": "food",
    "law": "law",
    "politics": "politics",
    "science": "science",
    "education": "education",
}


def fortune_topic() -> Task:
    """English fortune cookie -> topic (the fortune file it comes from)."""
    base = _fortune_dir()
    items = (
        (record, topic, "")
        for topic, name in FORTUNE_TOPICS.items()
        for record in _fortune_records(_require(base / name, FORTUNES_HINT))
    )
    return _make_task(
        "fortune_topic",
        tuple(FORTUNE_TOPICS),
        ("a fortune cookie about {}.", "a joke about {}."),
        items,
        domain="fortune cookies",
        source="fortunes (apt) /usr/share/games/fortunes/{" + ",".join(FORTUNE_TOPICS.values()) + "}",
    )
