"""YAML recipes cannot be bombs: aliases are refused at parse, and values quoted in errors are capped.

A 700-byte "billion laughs" recipe (nine levels of aliases) ran 52 s and reached 3.1 GB; a 281-byte one
printed a 481 KB "one-line" error. Each attack runs the command line: exit status 2, one bounded `error:`
line, nothing written.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from test_outputs import refused

from taskarith.errors import TaskArithError
from taskarith.merging.recipe import safe_yaml


def laughs(levels: int = 9) -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        previous, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
    return "\n".join(lines) + "\nbase_model: base\nmodels: [ftA]\nout: merged\n"


def test_an_alias_is_refused_at_parse(cli, tmp_path, work):
    (work / "recipe.yaml").write_text(laughs())
    message = refused(cli, tmp_path, "merge", "recipe.yaml")
    assert message == ("error: recipe.yaml: line 2: YAML aliases (*a) are not allowed in recipes; write the value out")


def test_a_single_alias_is_refused_before_it_is_resolved():
    with pytest.raises(TaskArithError, match=r"line 1: YAML aliases \(\*x\)"):
        safe_yaml("[&x 1, *x]")
    assert safe_yaml("a: {b: [1, 2.5, '&not an anchor']}") == {"a": {"b": [1, 2.5, "&not an anchor"]}}


def test_an_alias_in_set_is_refused(cli, tmp_path, work):
    message = refused(
        cli,
        tmp_path,
        "merge",
        "--base",
        "base",
        "--model",
        "ftA",
        "--out",
        "merged",
        "--set",
        "scaling=[&a [1,1,1,1,1,1,1,1], [*a,*a,*a,*a,*a,*a,*a,*a]]",
    )
    assert "YAML aliases (*a) are not allowed" in message


_BOMB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
sys.argv = ["taskarith", "merge", sys.argv[1]]
from taskarith.cli import main
main()
"""


def test_the_billion_laughs_recipe_stays_within_a_memory_limit(tmp_path, work):
    (work / "recipe.yaml").write_text(laughs())
    done = subprocess.run(
        [sys.executable, "-c", _BOMB, str(work / "recipe.yaml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error:") and "YAML aliases" in done.stderr and "MemoryError" not in done.stderr


@pytest.mark.parametrize("field", ["out", "base_model", "seed", "merge_method", "shard_size", "bogus"])
def test_huge_values_are_quoted_capped(cli, tmp_path, work, field):
    huge = "[" + ", ".join(["'" + "x" * 1000 + "'"] * 500) + "]"  # 500 KB of list
    text = {"out": "merged", "base_model": "base", "models": "[ftA]", field: huge}
    (work / "recipe.yaml").write_text("".join(f"{key}: {value}\n" for key, value in text.items()))
    message = refused(cli, tmp_path, "merge", "recipe.yaml")
    assert len(message) < 400, message
