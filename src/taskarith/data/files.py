"""User tasks from files: CSV with a header row, or JSON lines (``.jsonl`` / ``.json``).

Each row / record needs a text and a label (names configurable); an optional ``split`` column
with values ``train`` / ``val`` / ``test`` fixes the split, otherwise
:func:`~taskarith.data.tasks.split_examples` makes a deterministic one. A ``.json`` file may also
be a single JSON array of records.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from taskarith.data.tasks import SPLITS, Examples, Task, split_examples
from taskarith.display import quoted
from taskarith.errors import TaskArithError

__all__ = ["task_from_file"]

DEFAULT_TEMPLATES: tuple[str, ...] = ("{}",)
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
_WS = re.compile(r"\s+")
_INT = re.compile(r"[+-]?\d+")
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_LABEL_CHARACTERS = 1000

# (line number, text, label, split or None)
Record = tuple[int, str, str, "str | None"]


def task_from_file(
    path: str | os.PathLike[str],
    *,
    text_key: str = "text",
    label_key: str = "label",
    name: str | None = None,
    templates: Sequence[str] | None = None,
    split_key: str = "split",
) -> Task:
    """Build a Task from a ``.csv`` / ``.jsonl`` / ``.json`` file.

    Classes are the distinct label strings, sorted (numerically when all are integers). Repeated
    texts keep their first occurrence; a text given two different labels is dropped. Results are
    cached per (file, mtime, size, arguments).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise TaskArithError(f"Task file {str(p)!r} {what}; pass the path to a .csv, .jsonl or .json file.")
    if templates is not None:
        if isinstance(templates, str):
            templates = (templates,)
        templates = tuple(str(t) for t in templates)
    stat = p.stat()
    return _cached(str(p.resolve()), stat.st_mtime_ns, stat.st_size, text_key, label_key, name, templates, split_key)


@functools.lru_cache(maxsize=64)
def _cached(
    path: str,
    _mtime: int,
    _size: int,
    text_key: str,
    label_key: str,
    name: str | None,
    templates: tuple[str, ...] | None,
    split_key: str,
) -> Task:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise TaskArithError(f"Task file {path!r} has suffix {p.suffix or '(none)'!r}; use .csv, .jsonl or .json.")
    text = _read_utf8(p)
    if not text.strip():
        raise TaskArithError(f"Task file {path!r} is empty; it needs a '{text_key}' and a '{label_key}' per example.")
    reader = _csv_records if suffix == ".csv" else _json_records
    records = list(reader(path, text, text_key, label_key, split_key))
    if not records:
        raise TaskArithError(f"Task file {path!r} has no examples (only a header or blank lines).")
    return _build(p, records, name or p.stem, templates or DEFAULT_TEMPLATES, label_key, split_key)


def _read_utf8(p: Path) -> str:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise TaskArithError(f"Cannot read task file {str(p)!r}: {exc.strerror or exc}.") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TaskArithError(
            f"Task file {str(p)!r} is not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset "
            f"{exc.start} (line {line}). Re-save the file as UTF-8."
        ) from exc


def _norm_label(value: object, path: str, line: int, label_key: str) -> str:
    # bool is an int subclass, but True/False as class labels is almost surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TaskArithError(
            f"{path}, line {line}: '{label_key}' must be a string or an integer, got {type(value).__name__} {quoted(value)}."
        )
    label = str(value).strip()  # JSON integers of over 4300 digits are refused by the JSON reader already
    if not label:
        raise TaskArithError(f"{path}, line {line}: '{label_key}' is empty; give every example a label.")
    if len(label) > MAX_LABEL_CHARACTERS:
        raise TaskArithError(
            f"{path}, line {line}: '{label_key}' is {len(label)} characters long; a class label "
            f"is a name of at most {MAX_LABEL_CHARACTERS} characters."
        )
    _refuse_surrogates(label, path, line, label_key)
    return label


def _refuse_surrogates(text: str, path: str, line: int, key: str) -> None:
    # A JSON escape such as "\ud800" without its pair decodes to a lone surrogate, which is not text: it
    # cannot be encoded, so hashing the task or writing its record would fail long after loading.
    match = _SURROGATE.search(text)
    if match:
        raise TaskArithError(
            f"{path}, line {line}: '{key}' holds a lone surrogate (\\u{ord(match.group()):04x}), "
            "which is not a character; fix the escape in the file."
        )


def _norm_text(value: object, path: str, line: int, text_key: str) -> str:
    if not isinstance(value, str):
        raise TaskArithError(f"{path}, line {line}: '{text_key}' must be a string, got {type(value).__name__}.")
    text = _WS.sub(" ", value).strip()
    if not text:
        raise TaskArithError(f"{path}, line {line}: '{text_key}' is empty; remove the row or fill in its text.")
    _refuse_surrogates(text, path, line, text_key)
    return text


def _norm_split(value: object, path: str, line: int, split_key: str) -> str:
    key = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if key not in SPLIT_ALIASES:
        raise TaskArithError(f"{path}, line {line}: '{split_key}' is {value!r}; use one of {', '.join(SPLITS)}.")
    return SPLIT_ALIASES[key]


def _csv_records(path: str, text: str, text_key: str, label_key: str, split_key: str) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)  # skip leading blank lines
        if header is None:
            raise TaskArithError(f"Task file {path!r} has no header row; the first row must name the columns.")
        columns = [h.strip() for h in header]
        for key in (text_key, label_key):
            if key not in columns:
                raise TaskArithError(
                    f"Task file {path!r} has no '{key}' column; columns present: {columns}. "
                    f"Rename the column or pass text_key= / label_key=."
                )
        ti, li = columns.index(text_key), columns.index(label_key)
        si = columns.index(split_key) if split_key in columns else None
        needed = max(ti, li, si if si is not None else 0)
        for row in reader:
            line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= needed:
                raise TaskArithError(
                    f"{path}, line {line}: {len(row)} field(s) but the header has {len(columns)} ({columns})."
                )
            split = _norm_split(row[si], path, line, split_key) if si is not None else None
            yield (line, _norm_text(row[ti], path, line, text_key), _norm_label(row[li], path, line, label_key), split)
    except csv.Error as exc:
        raise TaskArithError(f"{path}, line {reader.line_num}: malformed CSV ({exc}).") from exc


def _json_records(path: str, text: str, text_key: str, label_key: str, split_key: str) -> Iterator[Record]:
    stripped = text.lstrip()
    if path.lower().endswith(".json") and stripped.startswith("["):
        # A whole-file JSON array; line numbers become record numbers.
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise TaskArithError(f"Task file {path!r} is not valid JSON: {exc}.") from exc
        entries = list(enumerate(data if isinstance(data, list) else [data], 1))
        where = "record"
    else:
        entries = []
        for n, raw in enumerate(text.split("\n"), 1):
            if not raw.strip():
                continue
            try:
                entries.append((n, json.loads(raw)))
            except (ValueError, RecursionError) as exc:
                raise TaskArithError(
                    f"{path}, line {n}: malformed JSON ({exc}). Each line must be one object like "
                    f'{{"{text_key}": "...", "{label_key}": "..."}}.'
                ) from exc
        where = "line"
    has_split = any(isinstance(obj, dict) and split_key in obj for _, obj in entries)
    for n, obj in entries:
        if not isinstance(obj, dict):
            raise TaskArithError(f"{path}, {where} {n}: expected a JSON object, got {type(obj).__name__}.")
        for key in (text_key, label_key) + ((split_key,) if has_split else ()):
            if key not in obj:
                raise TaskArithError(f"{path}, {where} {n}: no '{key}' field; fields present: {sorted(map(str, obj))}.")
        split = _norm_split(obj[split_key], path, n, split_key) if has_split else None
        yield (n, _norm_text(obj[text_key], path, n, text_key), _norm_label(obj[label_key], path, n, label_key), split)


def _build(
    p: Path, records: list[Record], name: str, templates: tuple[str, ...], label_key: str, split_key: str
) -> Task:
    path = str(p)
    first: dict[str, Record] = {}
    conflicted: set[str] = set()
    for rec in records:
        text = rec[1]
        if text in first:
            if first[text][2] != rec[2]:
                conflicted.add(text)
            continue
        first[text] = rec
    kept = [rec for text, rec in first.items() if text not in conflicted]

    labels = sorted(
        {rec[2] for rec in kept}, key=(lambda s: (int(s), s)) if all(_INT.fullmatch(r[2]) for r in kept) else None
    )
    if len(labels) < 2:
        raise TaskArithError(
            f"Task file {path!r} has fewer than 2 classes in column '{label_key}' (found: {labels}); "
            "a classification task needs at least two distinct labels."
        )
    classes = tuple(labels)
    index = {c: i for i, c in enumerate(classes)}

    if kept[0][3] is not None:
        splits: dict[str | None, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
        for _, text, label, split in kept:
            splits[split][0].append(text)
            splits[split][1].append(index[label])
        examples = {s: Examples(tuple(t), tuple(y)) for s, (t, y) in splits.items()}
        hint = f"add rows with {split_key}=" + "{}"
        unseen = sorted(set(range(len(classes))) - set(examples["train"].labels))
        if unseen:
            raise TaskArithError(
                f"Task file {path!r}: label(s) {[classes[i] for i in unseen]} appear only outside the train split; "
                "fine-tuning cannot learn a class it never sees. Add train rows for them or drop them."
            )
    else:
        train, val, test = split_examples([r[1] for r in kept], [index[r[2]] for r in kept])
        examples = {"train": train, "val": val, "test": test}
        hint = "add more examples per class (at least 3 each) or a '" + split_key + "' column for {}"
    for s in SPLITS:
        if not len(examples[s]):
            raise TaskArithError(f"Task file {path!r}: the {s} split has no examples; {hint.format(s)}.")
    for t in templates:
        if "{}" not in t:
            raise TaskArithError(f"Template {t!r} for task {name!r} has no '{{}}' placeholder for the class name.")
    return Task(
        name=name,
        classes=classes,
        templates=templates,
        train=examples["train"],
        val=examples["val"],
        test=examples["test"],
        domain=f"user file {p.name}",
        source=path,
    )
