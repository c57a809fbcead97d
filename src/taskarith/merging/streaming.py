"""Merging checkpoints far larger than memory, one tensor at a time, without importing torch.

A base model and N fine-tuned copies stored as safetensors (single files or sharded Hugging Face folders)
are read tensor by tensor; for each parameter name the N deltas are merged and the result is written
straight into the output shard. Peak memory is a few tensors per model, whatever the model size. The
output is a loadable Hugging Face folder: shards, an index, and the base folder's other files (config,
tokenizer) copied.

Headers are validated by the safetensors library; tensor bytes are then read with plain ``read`` calls
into NumPy arrays. Reading through a memory map instead would leave every page touched resident (and
counted in the process's memory) until the map is closed. Task arithmetic and TIES run on the NumPy
arrays (:mod:`taskarith.merging.kernels`, the same code the in-memory merge runs on tensors), so these
merges never import torch, whose import alone takes longer than the rest of a 58M-parameter merge; the
other methods wrap the same arrays as tensors (no copy) and call :data:`MERGE_METHODS`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.io import (
    SAFETENSORS_ITEMSIZE,
    layout_bytes,
    shard_files,
    stream_safetensors,
    write_json,
)
from taskarith.merging import kernels
from taskarith.merging.hyperparameters import check_hyperparameters
from taskarith.outputs import MARKER, MERGED_MODEL_FORMAT, check_output, output_folder

__all__ = ["CheckpointIndex", "TensorEntry", "merge_checkpoints"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# Files of a model folder that are weights (rewritten by the merge), as opposed to config and tokenizer files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = (SAFETENSORS_INDEX, "pytorch_model.bin.index.json")
# Floating-point storage dtypes and the precision their deltas are merged in: half precision is widened to
# float32 so that rounding does not compound across N models.
_WORK_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float32, "BF16": np.float32}
_STORED_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16}  # BF16: NumPy has none; see to_working
# How torch names each floating dtype, which io.state_hash writes into the hash of a base model.
_TORCH_DTYPE_NAMES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16"}
# Methods whose bodies run on NumPy arrays; the others need torch. The deltas are the merge loop's own
# temporaries, so the kernels may overwrite them.
_NUMPY_METHODS: dict[str, Callable[..., np.ndarray]] = {
    "task_arithmetic": lambda deltas, scaling: kernels.task_arithmetic(deltas, scaling, in_place=True),
    "ties": lambda deltas, density, scaling: kernels.ties(deltas, density, scaling, in_place=True),
}


# A file's identity as os.stat gives it: a file renamed over the path has another inode, one rewritten in
# place another size or modification time.
FileIdentity = tuple[int, int, int, int]


def file_identity(stat: os.stat_result) -> FileIdentity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: its file, its safetensors dtype and shape, its byte range, and the
    identity the file had when its header was read (every later read must find the same file)."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    identity: FileIdentity


@dataclass(frozen=True)
class CheckpointIndex:
    """Which file holds each tensor of a checkpoint, with its dtype, shape and byte range, from headers only."""

    source: Path
    entries: dict[str, TensorEntry]

    @classmethod
    def open(cls, path: str | os.PathLike) -> CheckpointIndex:
        source = Path(path)
        if source.is_dir():
            if (source / SAFETENSORS_INDEX).is_file():
                shards = _shards_of_index(source / SAFETENSORS_INDEX)
            elif (source / SAFETENSORS_SINGLE).is_file():
                shards = [source / SAFETENSORS_SINGLE]
            else:
                raise TaskArithError(
                    f"{source}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; the streaming merge reads safetensors "
                    "only (pickled .bin weights cannot be read one tensor at a time safely; convert them first)"
                )
        elif source.is_file() and source.suffix == ".safetensors":
            shards = [source]
        else:
            raise TaskArithError(f"{source}: not a safetensors file or a model folder with safetensors weights")
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            entries.update(_shard_entries(shard))
        return cls(source=source, entries=entries)

    @property
    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {name: (entry.dtype, entry.shape) for name, entry in self.entries.items()}

    @property
    def folder(self) -> Path | None:
        return self.source if self.source.is_dir() else None

    def check_unchanged(self) -> None:
        """Refuse if any weight file is no longer the file whose header was read (replaced or rewritten)."""
        for file, identity in sorted({(entry.file, entry.identity) for entry in self.entries.values()}):
            try:
                now: FileIdentity | None = file_identity(os.stat(file))
            except OSError:
                now = None
            if now != identity:
                raise _changed(file)


def _changed(file: Path) -> TaskArithError:
    return TaskArithError(
        f"{file}: the file was replaced or changed during the merge (was it still being "
        "saved?); nothing was written: merge again once it is complete"
    )


def _shard_entries(shard: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, after the library has validated its header."""
    try:
        # The identity comes from the handle the header is read through; the path, stated after the
        # library's validation, must still name that file, so the header trusted is the header validated.
        with open(shard, "rb") as raw:
            identity = file_identity(os.fstat(raw.fileno()))
            with safe_open(str(shard), framework="numpy") as fh:
                validated = set(fh.keys())
            (header_size,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(header_size))
        same = file_identity(os.stat(shard)) == identity
    except (SafetensorError, OSError, ValueError, struct.error, RecursionError) as exc:
        raise TaskArithError(f"{shard}: not a readable safetensors file ({shown(exc)})") from None
    header.pop("__metadata__", None)
    if not same or set(header) != validated:
        raise TaskArithError(f"{shard}: the file changed while its header was being read")
    entries = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_ITEMSIZE:
            raise TaskArithError(f"{shard}: tensor '{name}' has dtype {info['dtype']}, which taskarith cannot merge")
        start, end = info["data_offsets"]
        if end - start != layout_bytes(info["dtype"], tuple(info["shape"])):
            raise TaskArithError(f"{shard}: the file changed while its header was being read")
        entries[name] = TensorEntry(
            shard, info["dtype"], tuple(info["shape"]), 8 + header_size + start, 8 + header_size + end, identity
        )
    return entries


def _shards_of_index(index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise TaskArithError(f"{index_path}: not a readable JSON index ({shown(exc)})") from None
    shards = shard_files(index_path, index)
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise TaskArithError(f"{index_path}: shards listed but absent: {missing[:3]}")
    return shards


def _check_compatible(base: CheckpointIndex, other: CheckpointIndex) -> None:
    only_base, only_other = sorted(set(base.layout) - set(other.layout)), sorted(set(other.layout) - set(base.layout))
    if only_base or only_other:
        raise TaskArithError(
            f"{other.source} does not have the tensors of base {base.source}: "
            f"missing {only_base[:3]}, extra {only_other[:3]}"
        )
    for name, (dtype, shape) in base.layout.items():
        if other.layout[name] != (dtype, shape):
            theirs = other.layout[name]
            raise TaskArithError(
                f"tensor '{name}' is {dtype} {list(shape)} in base {base.source} "
                f"but {theirs[0]} {list(theirs[1])} in {other.source}"
            )


def read_bytes(entry: TensorEntry, buffer: np.ndarray | None = None) -> np.ndarray:
    """One tensor's bytes, read into the front of ``buffer`` (uint8, large enough) or a fresh array."""
    size = entry.end - entry.start
    data = np.empty(size, dtype=np.uint8) if buffer is None else buffer[:size]
    view, done = data.data, 0
    try:
        with open(entry.file, "rb", buffering=0) as fh:
            # Each tensor re-opens its file (holding every shard of every model open could pass the limit
            # on open files), so each open checks that the path still names the file whose header was read.
            if file_identity(os.fstat(fh.fileno())) != entry.identity:
                raise _changed(entry.file)
            fh.seek(entry.start)
            while done < len(data):
                got = fh.readinto(view[done:])
                if not got:
                    raise TaskArithError(
                        f"{entry.file}: ends before the bytes its header announces; "
                        "was it truncated or replaced during the merge?"
                    )
                done += got
    except OSError as exc:
        raise TaskArithError(f"{entry.file}: could not be read ({exc.strerror or exc})") from None
    return data


def to_working(data: np.ndarray, dtype: str) -> np.ndarray:
    """Stored floating-point bytes as an array in working precision (float32, or float64 for F64)."""
    if dtype == "BF16":  # bfloat16 is the top half of a float32: widening is a shift, and exact
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    stored = data.view(_STORED_DTYPE[dtype])
    return stored.astype(_WORK_DTYPE[dtype], copy=False)


def from_working(values: np.ndarray, dtype: str) -> np.ndarray:
    """The inverse of :func:`to_working`, rounding to nearest-even as torch's ``.to(dtype)`` does."""
    if dtype != "BF16":
        return values.astype(_STORED_DTYPE[dtype], copy=False)
    bits = values.view(np.uint32)
    lowest_kept_bit = (bits >> 16) & 1
    rounded = ((bits + np.uint32(0x7FFF) + lowest_kept_bit) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0  # a quiet NaN (inputs are finite; only an overflowing merge gets here)
    return rounded


def _ensure_finite(values: np.ndarray, entry: TensorEntry, name: str) -> float:
    """Refuse NaN or Inf weights, as loading a task vector does: arithmetic on them poisons the merge.

    Returns the largest magnitude, which bounds what arithmetic on the values can reach.
    """
    if not values.size:
        return 0.0
    # min and max propagate NaN and show +-Inf, without the tensor-sized mask np.isfinite would allocate.
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise TaskArithError(f"{entry.file}: tensor '{name}' contains NaN or Inf")
    return max(-float(low), float(high))


def _check_weighted(delta: np.ndarray, bound: float, weight: float, entry: TensorEntry, name: str) -> None:
    """Refuse a weighted delta that overflowed working precision (TIES would turn its Inf into a finite 0).

    ``bound`` (|fine-tuned| + |base|, times |weight|) is an upper bound of every entry, so the exact check,
    a pass over the tensor, is needed only when it exceeds the largest finite value.
    """
    if bound * abs(weight) <= np.finfo(delta.dtype).max:
        return
    if delta.size and not (np.isfinite(delta.min()) and np.isfinite(delta.max())):
        raise TaskArithError(
            f"tensor '{name}' of {entry.file} times its weight {weight:g} overflows "
            f"{delta.dtype}; nothing was written: use a smaller weight"
        )


def _check_merged(merged: np.ndarray, dtype: str, name: str, method: str, params: Mapping[str, Any]) -> None:
    """Refuse a merged tensor that is not finite, in working precision or once rounded to ``dtype``.

    Rounding is monotonic, so the stored extremes are the rounded working extremes: two scalars to
    convert rather than the tensor.
    """
    if not merged.size:
        return
    extremes = np.array([merged.min(), merged.max()], dtype=merged.dtype)
    stored = to_working(from_working(extremes, dtype).reshape(-1).view(np.uint8), dtype)
    if not np.isfinite(extremes).all() or not np.isfinite(stored).all():
        settings = ", ".join(f"{key}={value:g}" for key, value in params.items())
        raise TaskArithError(
            f"merged tensor '{name}' ({method}, {settings}) is NaN or Inf in {dtype} "
            f"(extremes {extremes[0]:g}, {extremes[1]:g}); nothing was written: "
            "lower the weights or the scaling"
        )


def plan_shards(layout: Mapping[str, tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in sorted order, into shards of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name in sorted(layout):
        size = layout_bytes(*layout[name])
        if shards[-1] and filled + size > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def merged_array(
    name: str,
    deltas: Sequence[np.ndarray],
    method: str,
    params: Mapping[str, Any],
    seed: int,
    statistics: Sequence[Any] | None = None,
) -> np.ndarray:
    """One parameter's merged delta: in NumPy where the method allows, else through torch (zero-copy);
    ``statistics``: the tensor's :class:`~taskarith.merging.statistics.TensorStatistics`, one per model."""
    if method in _NUMPY_METHODS:
        return _NUMPY_METHODS[method](deltas, **params)
    import torch

    from taskarith.merging.methods import merged_delta

    tensors = [torch.from_numpy(delta) for delta in deltas]
    return merged_delta(name, tensors, method, params, seed, statistics).numpy()


def streamed_state_hash(index: CheckpointIndex, names: Mapping[str, str]) -> str:
    """:func:`taskarith.io.state_hash` of the checkpoint's tensors under other names (tensor -> name), read one
    at a time: the base model's identity as statistics record it (the encoder's own parameter names)."""
    digest = hashlib.sha256()
    for tensor, name in sorted(names.items(), key=lambda item: item[1]):
        entry = index.entries[tensor]
        if entry.dtype not in _TORCH_DTYPE_NAMES:
            continue
        digest.update(f"{name}|{_TORCH_DTYPE_NAMES[entry.dtype]}|{tuple(entry.shape)}\n".encode())
        digest.update(read_bytes(entry).data)
    return digest.hexdigest()[:16]


def merge_checkpoints(
    base: str | os.PathLike,
    finetuned: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    other_inputs: Sequence[tuple[str, str | os.PathLike]] = (),
    statistics: Sequence[str | os.PathLike] | None = None,
    **hyperparameters: Any,
) -> dict[str, Any]:
    """Merge ``finetuned`` checkpoints into ``base`` with ``method`` and write a Hugging Face folder to ``out_dir``.

    ``weights`` scale each model's delta before the merge. Only floating-point tensors are merged; integer
    buffers (position ids) are copied from the base; float8 tensors are refused (their values mean nothing
    without the scales stored beside them). Half-precision deltas are computed in float32 and the result
    rounded once, so rounding does not compound across N models. The result equals, bit for bit, applying
    :func:`~taskarith.merging.methods.merge_task_vectors` of the weighted task vectors to the base. The
    folder is built beside ``out_dir`` and renamed into place when complete, so a crash never leaves a
    half-written model behind; ``on_tensor`` is called with each name as it is merged (progress).
    ``out_dir`` must not be, lie inside or contain an input (the checkpoints, their weight files, and
    ``other_inputs``, ``(role, path)`` pairs such as the recipe file); with ``overwrite`` it may replace
    only a previous merge output, recognised by the :data:`~taskarith.outputs.MARKER` file the merge writes
    (see :func:`taskarith.outputs.check_output`). Statistics methods (``regmean``, ``fisher``) take
    ``statistics``, one file per fine-tuned checkpoint in the same order (`taskarith statistics`): their
    parameter names are mapped to the checkpoints' tensor names (:func:`~taskarith.merging.statistics.tensor_names`),
    their base model is checked against ``base`` (its tensors hashed one at a time), and each tensor is merged
    with its statistics, read from the files as it is merged. Returns a summary (method, hyper-parameters,
    tensors, bytes, shards).
    """
    if not finetuned:
        raise TaskArithError("nothing to merge: give at least one fine-tuned checkpoint")
    weights = [1.0] * len(finetuned) if weights is None else [float(w) for w in weights]
    if len(weights) != len(finetuned):
        raise TaskArithError(f"{len(weights)} weights for {len(finetuned)} fine-tuned checkpoints")
    for path, weight in zip(finetuned, weights, strict=True):
        if not math.isfinite(weight):
            raise TaskArithError(f"the weight of {path} is {weight}; weights must be finite numbers")
    if shard_bytes < 1:
        raise TaskArithError(f"shard_bytes={shard_bytes} must be positive")
    params = check_hyperparameters(method, hyperparameters, models=len(finetuned), statistics=statistics is not None)
    base_index = CheckpointIndex.open(base)
    others = [CheckpointIndex.open(path) for path in finetuned]
    for other in others:
        _check_compatible(base_index, other)
    stats: list[Any] = []
    stats_names: dict[str, str] = {}
    if statistics is not None:
        from taskarith.merging.statistics import check_base_hash, check_statistics, load_statistics, tensor_names

        stats = load_statistics(statistics)
        check_statistics(method, stats, len(finetuned))
        floating = [name for name, entry in base_index.entries.items() if entry.dtype in _WORK_DTYPE]
        layout = {name: entry.shape for name, entry in base_index.entries.items()}
        stats_names = tensor_names(stats[0], layout, floating, str(base_index.source))
        check_base_hash(stats, streamed_state_hash(base_index, stats_names), str(base_index.source))
    float8 = sorted(name for name, entry in base_index.entries.items() if entry.dtype.startswith("F8"))
    if float8:
        raise TaskArithError(
            f"{base_index.source}: tensor '{float8[0]}' is {base_index.entries[float8[0]].dtype}; "
            "dequantize float8 checkpoints before merging them"
        )
    inputs = [
        ("base model", base),
        *(("model", path) for path in finetuned),
        *other_inputs,
        *(("statistics file", path) for path in statistics or ()),
        *(
            ("weights file", file)
            for index in (base_index, *others)
            for file in sorted({entry.file for entry in index.entries.values()})
        ),
    ]
    companions = companion_files(base_index.folder)
    target = Path(out_dir)
    check_output(out_dir, inputs, overwrite=overwrite, format=MERGED_MODEL_FORMAT, folder=True)  # before any reading

    shards = plan_shards(base_index.layout, shard_bytes)
    metadata = {
        "format": "pt",
        "merged_by": "taskarith",
        "method": method,
        "hyperparameters": json.dumps(params, sort_keys=True),
        "seed": str(seed),
    }

    # One read buffer per model, reused from tensor to tensor: a fresh array per read would page-fault its
    # way through every byte again, which made reading three times slower. A result that lives in a read
    # buffer (an integer tensor, an in-place sum) is still being written while the next tensor is read
    # (see stream_safetensors), so that buffer trades places with a spare, free by then.
    largest = max((entry.end - entry.start for entry in base_index.entries.values()), default=0)
    buffers = [np.empty(largest, dtype=np.uint8) for _ in range(len(others) + 1)]
    spare = [np.empty(largest, dtype=np.uint8)]

    def hand_over(result: np.ndarray) -> np.ndarray:
        for i, buffer in enumerate(buffers):
            if np.may_share_memory(result, buffer):
                buffers[i], spare[0] = spare[0], buffer
        return result

    def produce(name: str) -> np.ndarray:
        if on_tensor is not None:
            on_tensor(name)
        # Overflow is checked explicitly (below), with a message naming the tensor, not by NumPy's warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            return merged_bytes(name)

    def merged_bytes(name: str) -> np.ndarray:
        entry = base_index.entries[name]
        stored = read_bytes(entry, buffers[0])
        if entry.dtype not in _WORK_DTYPE:
            return hand_over(stored)
        base_values = to_working(stored, entry.dtype).reshape(entry.shape)
        base_bound = _ensure_finite(base_values, entry, name)
        deltas = []
        for other, weight, buffer in zip(others, weights, buffers[1:], strict=True):
            delta = to_working(read_bytes(other.entries[name], buffer), entry.dtype).reshape(entry.shape)
            bound = _ensure_finite(delta, other.entries[name], name) + base_bound
            delta -= base_values  # in place: the array is this loop's own
            if weight != 1.0:  # the same product as scaling a TaskVector, so both merges agree bit for bit
                delta *= weight
            _check_weighted(delta, bound, weight, other.entries[name], name)
            deltas.append(delta)
        tensor_stats = [s.for_tensor(stats_names[name]) for s in stats] if stats else None
        merged = merged_array(name, deltas, method, params, seed, tensor_stats)
        merged += base_values  # merged is a fresh result or one of the deltas; addition commutes exactly
        _check_merged(merged, entry.dtype, name, method, params)
        return hand_over(from_working(merged, entry.dtype).reshape(-1).view(np.uint8))

    file_names = (
        [SAFETENSORS_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(layout_bytes(dtype, shape) for dtype, shape in base_index.layout.values())
    # Built beside the output and decided again at the rename (outputs.output_folder): the merge may have
    # taken hours, and something may have appeared at the output meanwhile.
    marker = {"method": method, "hyperparameters": params, "seed": seed, "weights": weights}
    if statistics is not None:
        marker["statistics"] = [str(path) for path in statistics]
    with output_folder(
        out_dir, inputs, overwrite=overwrite, format=MERGED_MODEL_FORMAT, what="the merged model", **marker
    ) as building:
        for file_name, shard in zip(file_names, shards, strict=True):
            with open(building / file_name, "wb") as fh:
                stream_safetensors(fh, {name: base_index.layout[name] for name in shard}, produce, metadata)
                fh.flush()
                os.fsync(fh.fileno())
        if len(shards) > 1:
            weight_map = {
                name: file_name for file_name, shard in zip(file_names, shards, strict=True) for name in shard
            }
            write_json(building / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        for companion in companions:
            shutil.copy2(companion, building / companion.name)
        # A file renamed over an input after its last tensor was read, or rewritten in place during that
        # read, is caught only here.
        for index in (base_index, *others):
            index.check_unchanged()
    return {
        "method": method,
        "hyperparameters": params,
        "seed": seed,
        "tensors": len(base_index.entries),
        "bytes": total,
        "shards": len(shards),
        "out": str(target),
        "models": len(others),
    }


def companion_files(folder: Path | None) -> list[Path]:
    """Config, tokenizer and generation files of a model folder, which travel with the merged weights.

    Each is copied by content into the merged model, which users then publish; a link to a file outside
    the folder (``tokenizer_config.json -> ~/.netrc``) is refused, naming it, before anything is merged.
    Links into the Hugging Face cache's ``blobs`` folder of the same model are how every file of a
    downloaded snapshot is stored, and are followed.
    """
    if folder is None:
        return []
    real = Path(os.path.realpath(folder))
    allowed = [real]
    if (
        real.parent.name == "snapshots"
    ):  # <cache>/models--org--name/snapshots/<revision>/config.json -> ../../blobs/<hash>
        allowed.append(real.parent.parent / "blobs")
    found = []
    for path in sorted(folder.iterdir()):
        if (
            not path.is_file()
            or path.name.endswith(_WEIGHT_SUFFIXES)
            or path.name in _WEIGHT_INDEXES
            or path.name == MARKER
        ):  # a base that is itself a merge: the new marker is the merge's own
            continue
        target = Path(os.path.realpath(path))
        if not any(target.is_relative_to(place) for place in allowed):
            raise TaskArithError(
                f"{shown(path)} is a link to {shown(target)}, outside the model folder; it would be "
                "copied into the merged model: copy the file into the folder, or remove the link"
            )
        found.append(path)
    return found
