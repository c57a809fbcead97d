"""YAML merge recipes, in the shape merge users know from mergekit.

```yaml
merge_method: ties            # any name in MERGE_METHODS
base_model: ./pretrained      # a model folder or a .safetensors file
models:                       # fine-tuned copies of base_model ...
  - model: ./ft-sentiment
    parameters: {weight: 1.0} # optional per-model weight on its delta
  - ./ft-topic
parameters: {density: 0.2}    # the method's hyper-parameters (defaults fill the rest)
# regmean and fisher: one statistics file per model (`taskarith statistics`), e.g.
#   - model: ./ft-sentiment
#     statistics: ./ft-sentiment.stats.safetensors
seed: 0                       # randomised methods (DARE) draw from it
out: ./merged
shard_size: 2GB
```

Instead of ``models`` a recipe may list ``task_vectors`` (taskarith ``.safetensors`` task vector files); the
result is then a merged task vector file, and ``base_model`` is not needed. Relative paths are relative to
the recipe file. Command-line options override the recipe's values.

``out`` must not be, lie inside or contain the recipe or any model or vector it names (``out: .`` is the
recipe's own folder, and is refused); an existing ``out`` is replaced only when overwriting is allowed and
it is a previous taskarith output (:func:`taskarith.outputs.check_output`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError
from taskarith.merging.hyperparameters import check_hyperparameters
from taskarith.merging.streaming import DEFAULT_SHARD_BYTES, merge_checkpoints
from taskarith.outputs import check_output, output_file

__all__ = ["MergeRecipe", "load_recipe", "parse_size", "run_recipe"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1024,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
_KEYS = {"merge_method", "method", "base_model", "models", "task_vectors", "parameters", "seed", "out", "shard_size"}


@dataclass(frozen=True)
class Source:
    """A fine-tuned model folder / file, or a task vector file, with the weight on its delta."""

    path: str
    weight: float = 1.0
    statistics: str | None = None  # its statistics file, for regmean and fisher


@dataclass(frozen=True)
class MergeRecipe:
    method: str = "task_arithmetic"
    base_model: str | None = None
    models: tuple[Source, ...] = ()
    task_vectors: tuple[Source, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    out: str | None = None
    shard_size: int = DEFAULT_SHARD_BYTES
    recipe: str | None = None  # the file this was read from: an input the output must not touch

    def validated(self, where: str = "recipe") -> MergeRecipe:
        if bool(self.models) == bool(self.task_vectors):
            raise TaskArithError(
                f"{where}: give either 'models' (with 'base_model') or 'task_vectors', not "
                f"{'both' if self.models else 'neither'}"
            )
        if self.models and not self.base_model:
            raise TaskArithError(f"{where}: 'models' need a 'base_model' to take deltas from")
        if not self.out:
            raise TaskArithError(f"{where}: no 'out' (where to write the merge)")
        if self.shard_size < 1:
            raise TaskArithError(f"{where}: 'shard_size' must be positive, got {self.shard_size}")
        sources = self.models or self.task_vectors
        with_statistics = [s.statistics is not None for s in sources]
        if any(with_statistics) and not all(with_statistics):
            lacking = with_statistics.index(False)
            raise TaskArithError(
                f"{where}: {'models' if self.models else 'task_vectors'}[{lacking}] has no 'statistics' file "
                "while others do; give one per model"
            )
        try:
            check_hyperparameters(
                self.method,
                self.parameters,
                models=len(self.models) + len(self.task_vectors) or None,
                statistics=all(with_statistics) if sources else None,
            )
        except TaskArithError as exc:
            raise TaskArithError(f"{where}: {exc}") from None
        return self

    @property
    def statistics(self) -> list[str] | None:
        """The sources' statistics files, in order, or None when they have none."""
        files = [s.statistics for s in (self.models or self.task_vectors)]
        return [f for f in files if f is not None] if files and all(f is not None for f in files) else None


def parse_size(value: object, where: str = "shard_size") -> int:
    """``2GB``, ``500MiB``, ``1e9`` or an integer number of bytes."""
    if isinstance(value, bool):
        raise TaskArithError(f"{where}: expected a size like 2GB, got {quoted(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise TaskArithError(f"{where}: expected a size like 2GB, got {quoted(value)}")
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(str(value))
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise TaskArithError(f"{where}: expected a size like 2GB or 500MiB, got {quoted(value)}")
    size = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(size):
        raise TaskArithError(f"{where}: expected a size like 2GB or 500MiB, got {quoted(value)}")
    return int(size)


def _sources(entries: object, key: str, folder: Path, where: str) -> tuple[Source, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise TaskArithError(f"{where}: '{key}' must be a list")
    sources = []
    for i, entry in enumerate(entries):
        path_key = "model" if key == "models" else "vector"
        statistics = None
        if isinstance(entry, str) and entry.strip():
            path, params = entry, dict[str, Any]()
        elif isinstance(entry, dict) and isinstance(entry.get(path_key), str) and entry[path_key].strip():
            path, params = entry[path_key], entry.get("parameters") or {}
            unknown = set(entry) - {path_key, "parameters", "statistics"}
            if unknown or not isinstance(params, dict) or set(params) - {"weight"}:
                raise TaskArithError(
                    f"{where}: {key}[{i}] takes '{path_key}', 'statistics' and 'parameters: {{weight: ...}}' only"
                )
            statistics = entry.get("statistics")
            if statistics is not None and (not isinstance(statistics, str) or not statistics.strip()):
                raise TaskArithError(f"{where}: {key}[{i}] 'statistics' must be a file path, got {quoted(statistics)}")
        else:
            raise TaskArithError(f"{where}: {key}[{i}] must be a path or a mapping with '{path_key}: PATH'")
        weight = params.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise TaskArithError(f"{where}: {key}[{i}] weight must be a finite number, got {quoted(weight)}")
        sources.append(
            Source(
                path=str(_resolve(path, folder)),
                weight=float(weight),
                statistics=str(_resolve(statistics, folder)) if statistics is not None else None,
            )
        )
    return tuple(sources)


def _path_field(data: Mapping[str, Any], key: str, folder: Path, where: str) -> str | None:
    """A path-valued field, relative to the recipe's folder; absent is None, anything but a non-empty string
    is refused (``out: ''`` would otherwise be the recipe's folder, ``out: {}`` a folder named '{}')."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise TaskArithError(f"{where}: '{key}' must be a path (a non-empty string), got {quoted(value)}")
    return str(_resolve(value, folder))


def _resolve(path: str, folder: Path) -> Path:
    candidate = Path(os.path.expanduser(path))
    return candidate if candidate.is_absolute() else folder / candidate


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: nine levels of ``*a`` in 700 bytes expand to gigabytes ("billion laughs").

    Refused at the alias event, before any node is built; a recipe has no use for them.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise TaskArithError(
                f"line {event.start_mark.line + 1}: YAML aliases (*{quoted(event.anchor)[1:-1]}) "
                "are not allowed in recipes; write the value out"
            )
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` refusing aliases (see :class:`_NoAliasLoader`); the one YAML reader of recipes and --set."""
    return yaml.load(text, Loader=_NoAliasLoader)


def load_recipe(path: str | os.PathLike) -> MergeRecipe:
    """Read and check a YAML recipe; paths in it are taken relative to its folder."""
    source = Path(path)
    try:
        data = safe_yaml(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskArithError(f"{source}: recipe not found") from None
    except TaskArithError as exc:
        raise TaskArithError(f"{source}: {exc}") from None
    # ValueError: also an integer of over 4300 digits, which Python refuses to convert; RecursionError: deep nesting.
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
        raise TaskArithError(f"{source}: not a readable YAML recipe ({shown(exc)})") from None
    where = str(source)
    if not isinstance(data, dict):
        raise TaskArithError(f"{where}: a recipe is a mapping with keys {sorted(_KEYS)}")
    unknown = sorted(set(map(str, data)) - _KEYS)
    if unknown:
        raise TaskArithError(f"{where}: unknown key(s) {quoted(unknown)}; known: {sorted(_KEYS)}")
    folder = source.parent
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise TaskArithError(f"{where}: 'parameters' must be a mapping of hyper-parameters")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskArithError(f"{where}: 'seed' must be an integer, got {quoted(seed)}")
    method = data.get("merge_method", data.get("method", "task_arithmetic"))
    if not isinstance(method, str):
        raise TaskArithError(f"{where}: 'merge_method' must be a method name, got {quoted(method)}")
    return MergeRecipe(
        method=method,
        base_model=_path_field(data, "base_model", folder, where),
        models=_sources(data.get("models"), "models", folder, where),
        task_vectors=_sources(data.get("task_vectors"), "task_vectors", folder, where),
        parameters=dict(parameters),
        seed=seed,
        out=_path_field(data, "out", folder, where),
        shard_size=parse_size(data.get("shard_size", DEFAULT_SHARD_BYTES), f"{where}: shard_size"),
        recipe=str(source),
    ).validated(where)


def with_overrides(recipe: MergeRecipe, parameters: Mapping[str, Any] | None = None, **fields_: Any) -> MergeRecipe:
    """The recipe with command-line values in place of its own (None leaves a field as it is)."""
    changes = {k: v for k, v in fields_.items() if v is not None and v != ()}
    merged_parameters = {**recipe.parameters, **(parameters or {})}
    return replace(recipe, parameters=merged_parameters, **changes).validated("command line")


def run_recipe(
    recipe: MergeRecipe, *, overwrite: bool = False, on_tensor: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Carry out a recipe: a streamed model merge, or an in-memory merge of task vectors."""
    recipe = recipe.validated()
    recipe_file = [("recipe", recipe.recipe)] if recipe.recipe else []
    if recipe.out is None:  # validated() has refused a recipe without one; this keeps the types honest
        raise TaskArithError("the recipe names no 'out'")
    if recipe.models:
        if recipe.base_model is None:
            raise TaskArithError("the recipe merges models but names no 'base_model'")
        return merge_checkpoints(
            recipe.base_model,
            [m.path for m in recipe.models],
            recipe.out,
            recipe.method,
            weights=[m.weight for m in recipe.models],
            seed=recipe.seed,
            shard_bytes=recipe.shard_size,
            overwrite=overwrite,
            on_tensor=on_tensor,
            other_inputs=recipe_file,
            statistics=recipe.statistics,
            **recipe.parameters,
        )
    from taskarith.merging.methods import merge_task_vectors  # torch, needed for task vectors only
    from taskarith.vectors import FORMAT, TaskVector

    out = Path(recipe.out)
    inputs = [
        *recipe_file,
        *(("task vector", v.path) for v in recipe.task_vectors),
        *(("statistics file", path) for path in recipe.statistics or ()),
    ]
    check_output(out, inputs, overwrite=overwrite, format=FORMAT, folder=False)
    vectors = [
        TaskVector.load(v.path) * v.weight if v.weight != 1.0 else TaskVector.load(v.path) for v in recipe.task_vectors
    ]
    merged = merge_task_vectors(
        vectors, recipe.method, seed=recipe.seed, statistics=recipe.statistics, **recipe.parameters
    )
    with output_file(out, inputs, overwrite=overwrite, format=FORMAT) as tmp:
        merged.save(tmp)
    return {
        "method": recipe.method,
        "hyperparameters": check_hyperparameters(recipe.method, recipe.parameters),
        "seed": recipe.seed,
        "out": str(out),
        "vectors": len(vectors),
        "norm": merged.norm(),
    }
