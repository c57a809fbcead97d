"""Reading and writing weights and records safely.

Weights are read from safetensors (never unpickled); legacy ``.bin``/``.pt`` files go through
``torch.load(weights_only=True)``, which refuses arbitrary objects. Every write goes to a temporary
file in the destination folder and is renamed into place, so a crash mid-save leaves the previous
file intact.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from safetensors import SafetensorError, safe_open

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError

if TYPE_CHECKING:
    import torch

# torch is imported by the functions that handle tensors, not here: the streaming merge writes safetensors
# through this module without torch, whose import alone costs about two seconds.
StateDict = dict[str, "torch.Tensor"]

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_SINGLE = "model.safetensors"
_PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_SINGLE = "pytorch_model.bin"


def _replace(tmp: Path, target: Path) -> None:
    os.replace(tmp, target)
    sync_folder(target.parent)


@contextmanager
def atomic_path(
    path: str | os.PathLike,
    place: Callable[[Path, Path], None] = _replace,
    kept: str = "the previous file, if any, is untouched",
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block succeeds, sync it and ``place(tmp, target)``
    (by default a plain rename over ``path``). ``kept`` says in an error what was left as it was."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(target)
    except OSError as exc:
        raise TaskArithError(f"could not write {target}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        place(tmp, target)
    except OSError as exc:
        raise TaskArithError(f"could not write {target} ({kept}): {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def temporary_beside(target: Path, suffix: str = ".tmp", folder: bool = False) -> Path:
    """A new hidden file (or folder) beside ``target``, with the permissions a new file or folder gets.

    Its name keeps only the start of ``target``'s: a legal 250-character name plus the random part and
    the suffix would pass the file system's 255-byte limit.
    """
    prefix = f".{target.name.encode('utf-8')[:120].decode('utf-8', 'ignore')}."
    if folder:
        made = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=target.parent))
        made.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would make the output private
        return made
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~current_umask())  # mkstemp's 0600 likewise
    return Path(name)


def sync_folder(folder: str | os.PathLike) -> None:
    """Make the renames and new entries in ``folder`` durable: a rename is on disk only once its folder is.

    File systems that cannot sync a folder (some network and FUSE ones) say so with EINVAL; there is
    nothing more to do on them.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows cannot open folders; its renames are durable with the file's own flush
    try:
        os.fsync(fd)
    except OSError as exc:
        # Not an OSError: the callers' "nothing was replaced" handlers must not claim it, the rename is done.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise TaskArithError(
                f"{folder}: a file was renamed into it, but the folder could not be synced "
                f"({exc.strerror or exc}); it may not survive a power cut"
            ) from exc
    finally:
        os.close(fd)


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """Linux's renameat2 from the C library, or None where there is none (macOS, old glibc, Windows)."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, ImportError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def rename_no_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename ``source`` to ``target``, raising FileExistsError if anything is at ``target``.

    The kernel decides at the rename itself (renameat2 with RENAME_NOREPLACE), so nothing that appears
    at the target an instant earlier is replaced. Where that call is missing or the file system refuses
    it, a file is linked into place (a link never replaces either) and a folder is renamed after a last
    check: rename(2) replaces only an empty folder, so all such a late newcomer can lose is its emptiness.
    """
    function = _renameat2()
    if function is not None:
        import ctypes

        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), os.fspath(target))
    if os.path.isdir(source) and not os.path.islink(source):
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(target))
        os.rename(source, target)
        return
    os.link(source, target, follow_symlinks=False)
    os.unlink(source)


def current_umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask alone must set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TaskArithError(f"{path}: file not found") from None
    except OSError as exc:
        raise TaskArithError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    # ValueError: also a number of more than 4300 digits, which Python refuses to convert; RecursionError:
    # arrays nested some thousands deep.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TaskArithError(f"{path}: not valid JSON ({shown(exc)})") from None


# Written data are synced to disk in steps of this size while a long file is being written.
SYNC_BYTES = 256 * 1024**2

# Bytes per element of each safetensors dtype.
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

# A tensor's safetensors dtype name and shape, by tensor name: all a header needs.
TensorLayout = Mapping[str, tuple[str, tuple[int, ...]]]


@functools.cache
def _torch_dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name, built once (on first use, so that importing io needs no torch)."""
    import torch

    return {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }


def safetensors_dtype(dtype: torch.dtype, name: str) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` -> ``"F32"``)."""
    names = _torch_dtype_names()
    if dtype not in names:
        raise TaskArithError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
    return names[dtype]


def layout_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this safetensors dtype and shape occupies."""
    return math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]


def stream_safetensors(
    fh: BinaryIO, layout: TensorLayout, produce: Callable[[str], Any], metadata: Mapping[str, str]
) -> None:
    """Write the safetensors format with a canonical header (sorted keys), producing one tensor at a time.

    The header needs every tensor's dtype name and shape first (``layout``); the data follow in sorted name
    order, each from ``produce(name)`` as any C-contiguous buffer (a NumPy array, bytes) of the announced
    size, so a merge of models far larger than memory holds one tensor at a time. A buffer is written
    while the next one is produced, so ``produce`` must leave the buffer it returned untouched until its
    next call has returned. The library's own writer wants every tensor in memory at once, and orders the
    metadata by a per-process hash (identical task vectors saved by two processes would differ byte for
    byte). Reading stays with the library, which validates what it reads (the streaming merge has it
    validate each header before reading the announced byte ranges itself).
    """
    header: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    names = sorted(layout)
    for name in names:
        dtype, shape = layout[name]
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise TaskArithError(f"tensor '{name}' has dtype {dtype}, which safetensors cannot store")
        size = layout_bytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # keeps the data 8-byte aligned for memory-mapped readers
    fh.write(struct.pack("<Q", len(encoded)))
    fh.write(encoded)
    # A helper thread writes tensor k while tensor k+1 is produced (both release the GIL), and syncs every
    # SYNC_BYTES so that the disk works during the merge rather than in one long fsync at the end. At most
    # one tensor is in flight: produce() may reuse a buffer once the tensor after it has been produced.
    unsynced = 0
    try:
        file_number: int | None = fh.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory buffer has nothing to sync
        file_number = None

    def write(data: memoryview) -> None:
        nonlocal unsynced
        fh.write(data)
        unsynced += data.nbytes
        if unsynced >= SYNC_BYTES and file_number is not None:
            fh.flush()
            getattr(os, "fdatasync", os.fsync)(file_number)  # fdatasync is POSIX-only (not macOS, Windows)
            unsynced = 0

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer") as writer:
        in_flight: Future[None] | None = None
        for name in names:
            data = memoryview(produce(name))
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if data.nbytes != expected or not data.c_contiguous:
                raise TaskArithError(
                    f"tensor '{name}' came out as {data.nbytes} bytes, not the {expected} contiguous "
                    f"bytes of the {layout[name][0]} {list(layout[name][1])} its header announced"
                )
            if in_flight is not None:
                in_flight.result()
            in_flight = writer.submit(write, data.cast("B")) if data.nbytes else None
        if in_flight is not None:
            in_flight.result()


def tensor_buffer(tensor: torch.Tensor) -> Any:
    """A tensor's bytes as a NumPy uint8 view (a copy only if it lives off the CPU or is not contiguous)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


def write_safetensors(fh: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write tensors already in memory (see :func:`stream_safetensors`)."""
    layout = {name: (safetensors_dtype(tensor.dtype, name), tuple(tensor.shape)) for name, tensor in tensors.items()}
    stream_safetensors(fh, layout, lambda name: tensor_buffer(tensors[name]), metadata)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Save tensors as safetensors, atomically, with the same bytes for the same content."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write_safetensors(fh, tensors, metadata)


def load_tensors(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Load every tensor of a safetensors file plus its string metadata."""
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as exc:  # is_file() answers False for a missing file, but raises for a name too long
        raise TaskArithError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not found:
        raise TaskArithError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TaskArithError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def _load_pickle_weights(path: Path) -> StateDict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here; all mean "refused or unreadable"
        # Only what torch's unpickler objected to is relayed: its message also advises loading the file with
        # weights_only=False, which for a file refused this way means running whatever code it carries.
        text = str(exc)
        marker = "WeightsUnpickler error:"
        detail = text[text.index(marker) + len(marker) :] if marker in text else text
        raise TaskArithError(
            f"{path}: refused to load: only plain tensors are read from pickle files (torch.load with "
            f"weights_only=True), and this one holds something else ({shown(detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__, 120)}); "
            "get the weights as safetensors"
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TaskArithError(f"{path}: expected a mapping from names to tensors")
    return dict(obj)


def _load_weight_file(path: Path) -> StateDict:
    if path.suffix in {".bin", ".pt", ".pth"}:
        return _load_pickle_weights(path)
    return load_tensors(path)[0]


def shard_files(index_path: Path, index: Any) -> list[Path]:
    """The weight files a Hugging Face shard index names, checked to be plain file names in its folder.

    An index is data from whoever published the model; a name such as ``../../home/me/key.safetensors`` or
    an absolute path would read, and merge into the output, a file outside the model folder.
    """
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise TaskArithError(f"{index_path}: missing 'weight_map' (a mapping from tensor names to shard files)")
    names: set[str] = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise TaskArithError(f"{index_path}: weight_map[{quoted(tensor)}] is {quoted(name)}, not a file name")
        if not plain_file_name(name):
            raise TaskArithError(
                f"{index_path}: weight_map[{quoted(tensor)}] is {quoted(name)}; a shard must be a "
                f"plain file name in {shown(index_path.parent)} (no folders, '..' or absolute paths)"
            )
        names.add(name)
    return [index_path.parent / name for name in sorted(names)]


def plain_file_name(name: str) -> bool:
    """Whether ``name`` names a file directly inside a folder: no separator, not '.' or '..', no NUL."""
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and os.path.basename(name) == name
        and not os.path.isabs(name)
    )


def _load_sharded(directory: Path, index_name: str) -> StateDict:
    index_path = directory / index_name
    index = read_json(index_path)
    state: StateDict = {}
    for shard in shard_files(index_path, index):
        state.update(_load_weight_file(shard))
    missing = sorted(set(index["weight_map"]) - set(state))
    if missing:
        raise TaskArithError(f"{index_path}: tensors listed but absent from shards: {quoted(missing[:5])}")
    return state


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read weights from a safetensors file, a weights_only pickle, or a Hugging Face model folder (sharded or not)."""
    path = Path(path)
    if path.is_dir():
        for name, loader in (
            (_SAFETENSORS_INDEX, lambda: _load_sharded(path, _SAFETENSORS_INDEX)),
            (_SAFETENSORS_SINGLE, lambda: load_tensors(path / _SAFETENSORS_SINGLE)[0]),
            (_PICKLE_INDEX, lambda: _load_sharded(path, _PICKLE_INDEX)),
            (_PICKLE_SINGLE, lambda: _load_pickle_weights(path / _PICKLE_SINGLE)),
        ):
            if (path / name).is_file():
                return loader()
        raise TaskArithError(
            f"{path}: no weights found (looked for {_SAFETENSORS_SINGLE}, {_SAFETENSORS_INDEX}, {_PICKLE_SINGLE})"
        )
    if not path.exists():
        raise TaskArithError(f"{path}: file not found")
    return _load_weight_file(path)


def floating_only(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Keep the tensors that fine-tuning can change: integer buffers and position ids take no part."""
    return {k: v for k, v in state.items() if v.is_floating_point()}


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of the floating-point tensors: the identity of a base model, independent of file layout."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def ensure_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights with NaN or Inf: arithmetic on them silently poisons every merged model."""
    import torch

    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise TaskArithError(f"{source}: tensor '{name}' contains NaN or Inf")


def package_dir(module: str, install: str) -> Path:
    """Folder of an installed package that carries data or weights, found without importing it (imports
    can pull heavy dependencies); a clear error with the install command when it is missing."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TaskArithError(
            f"the package {module} is not installed; it carries files taskarith reads. Install it with: {install}"
        )
    return Path(locations[0])
