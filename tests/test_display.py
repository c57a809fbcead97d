"""Strings from outside never reach the terminal as markup or escapes (taskarith.display).

The attacks of the adversarial pass: a vector's `task` or a K-FAC file's `tasks` holding rich markup
(`[/x]` crashed `compose` and `kfac-merge` after they had written their output), ANSI/OSC escapes
(`\\x1b]0;title\\x07` retitled the terminal), `--out '[bold]y.safetensors'` reported as `y.safetensors`;
then a hypothesis fuzzer over metadata strings for every command that prints them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskarith.display import LIMIT, Output, plain, quoted, shown
from taskarith.kfac import KFACFactors
from taskarith.vectors import TaskVector

# What must never reach a terminal: C0 controls but tab and newline, DEL, C1 controls (ESC among them).
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
HOSTILE = [
    "[/x]",
    "[bold]y",
    "[link=file:///etc/passwd]z[/link]",
    "\x1b]0;pwned\x07",
    "\x1b[2J\x1b[H",
    "\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\",
    "\x9b31m",
    "a\rb",
    "\x00\x08\x7f",
    "\u202eevil",
    "[/]" * 5000,
]


def vector(task: str, path: Path) -> Path:
    TaskVector(deltas={"w": torch.tensor([1.0, 2.0])}, base_hash="0123456789abcdef", task=task).save(path)
    return path


def factors(task: str, path: Path, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(3, 3, generator=generator)
    KFACFactors(
        A={"l": m @ m.T}, S={"l": torch.eye(2)}, examples={task: 2}, sampling={task: "mc:1"}, base_hash="h"
    ).save(path)
    return path


def assert_safe(text: str) -> None:
    assert not UNSAFE.search(text), repr(text)


@pytest.mark.parametrize("value", HOSTILE)
def test_helpers_strip_escapes_and_cap_length(value):
    for rendered in (shown(value), quoted(value)):
        assert_safe(rendered)
        assert "\n" not in rendered and "\t" not in rendered and len(rendered) < LIMIT + 40
    assert_safe(plain(value))


def test_values_that_str_and_repr_cannot_show_are_named_not_raised():
    huge = 10**5000
    assert shown(huge) == quoted(huge) == f"<an integer of {huge.bit_length()} bits>"
    nested: list = []
    for _ in range(10_000):
        nested = [nested]
    assert len(quoted(nested)) < 40
    assert len(quoted({"k" * 10_000: "v" * 10_000, "more": list(range(10**4))})) <= 80 + 30


@pytest.mark.parametrize("task", ["[/x]", "[bold]y[/bold]", "\x1b]0;pwned\x07t", "\x1b[2Jt"])
def test_compose_prints_metadata_as_plain_text_after_writing(cli, tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    vector(task, tmp_path / "v.safetensors")
    code, out, err = cli("compose", "--add", "v.safetensors", "--out", "sum.safetensors")
    assert code == 0, err
    assert_safe(out + err)
    assert f"1*{plain(task)}" in out and (tmp_path / "sum.safetensors").is_file()


def test_an_out_path_with_markup_is_reported_as_given(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    vector("a", tmp_path / "v.safetensors")
    code, out, err = cli("compose", "--add", "v.safetensors", "--out", "[bold]y.safetensors")
    assert code == 0, err
    assert "wrote [bold]y.safetensors:" in out and (tmp_path / "[bold]y.safetensors").is_file()


@pytest.mark.parametrize("task", ["[/x]", "\x1b]0;pwned\x07t"])
def test_kfac_merge_and_compress_print_task_names_as_plain_text(cli, tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    factors(task, tmp_path / "a.safetensors")
    factors(task + "2", tmp_path / "b.safetensors", seed=1)
    code, out, err = cli("kfac-merge", "a.safetensors", "b.safetensors", "--out", "m.safetensors")
    assert code == 0, err
    assert_safe(out + err)
    assert f"K-FAC factors of {plain(task)}, {plain(task)}2 (rule sum)" in out
    code, out, err = cli("kfac-compress", "m.safetensors", "--rank", "1", "--out", "c.safetensors")
    assert code == 0, err
    assert_safe(out + err)
    assert f"eigen:1 K-FAC factors of {plain(task)}, {plain(task)}2" in out


def test_an_error_naming_a_hostile_path_is_one_clean_line(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("compose", "--add", "\x1b]0;pwned\x07[/x]" + "a" * 5000 + ".safetensors", "--out", "o")
    assert code == 2
    assert_safe(err)
    assert err.count("\n") == 1 and err.startswith("error: [/x]aaa") and len(err) < 2100


def test_output_passes_renderables_and_reads_no_markup(capsys):
    from rich.table import Table

    from taskarith.report import rich_table

    out = Output()
    out.print("[red]x[/red]", 5, rich_table(["task", "acc"], [["[/x]", "\x1b[31m1"]], title="[/t]"))
    table = Table()
    table.add_column("c")
    out.print(table)
    printed = capsys.readouterr().out
    assert "[red]x[/red] 5" in printed and "[/x]" in printed and "[/t]" in printed
    assert_safe(printed)


# Metadata contents a hostile file may carry: markup, terminal escapes, control characters, huge length.
metadata_text = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60),
    st.lists(st.sampled_from(HOSTILE[:-1] + ["[", "]", "/", "\\", "\x1b", "\x07", "\n", "x"]), max_size=12).map(
        "".join
    ),
    st.integers(1000, 20_000).map(lambda n: "[/x]\x1b[" * n),
)
fuzz = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(task=metadata_text)
def test_fuzz_compose_prints_any_task_metadata_safely(cli, tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    vector(task, tmp_path / "v.safetensors")
    code, out, err = cli("compose", "--add", "v.safetensors", "--out", "sum.safetensors", "--overwrite")
    assert code == 0, err
    assert_safe(out + err)
    assert out.count("\n") == 1 and len(out) < LIMIT + 120
    assert TaskVector.load(tmp_path / "sum.safetensors").task == f"1*{task or None}"  # an empty task is unnamed


@fuzz
@given(task=metadata_text.filter(bool))
def test_fuzz_kfac_merge_prints_any_tasks_metadata_safely(cli, tmp_path, monkeypatch, task):
    monkeypatch.chdir(tmp_path)
    factors(task, tmp_path / "a.safetensors")
    factors(task + "b", tmp_path / "b.safetensors", seed=1)
    code, out, err = cli("kfac-merge", "a.safetensors", "b.safetensors", "--out", "m.safetensors", "--overwrite")
    assert code == 0, err
    assert_safe(out + err)
    assert out.count("\n") == 1 and len(out) < LIMIT + 120
    assert KFACFactors.load(tmp_path / "m.safetensors").tasks == (task, task + "b")
