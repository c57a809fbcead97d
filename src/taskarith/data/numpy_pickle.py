"""Read a numpy array out of a pickle file without unpickling it (no code in the file is ever run)."""

from __future__ import annotations

import math
import os
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskarith.data.pixels import _read_bytes
from taskarith.errors import TaskArithError

__all__ = ["read_numpy_pickle"]

# Only these globals may appear in a numpy pickle; they are recognised, never looked up or called.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "frombuffer",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
}
_NUMPY_CODES = frozenset({"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"})
_PUSH_ARG_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "SHORT_BINBYTES",
        "BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
    }
)
_CONSTANT_OPS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}


@dataclass(frozen=True)
class _Global:
    role: str


@dataclass(frozen=True)
class _Call:
    func: Any
    args: Any


@dataclass(frozen=True)
class _Built:
    obj: Any
    state: Any


_MARK = object()


def read_numpy_pickle(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one numpy array from a (gzipped) pickle file WITHOUT unpickling it.

    The opcode stream is replayed symbolically: strings, ints, bytes and tuples are kept as values,
    the only globals allowed are numpy's array reconstructors (never imported or called), and the
    result must have the exact shape of a pickled plain array. The pixels are then read from the
    payload with :func:`numpy.frombuffer`. Anything else raises :class:`TaskArithError` naming the file.
    """
    p = Path(path)
    return _numpy_from_pickle(_read_bytes(p), str(p))


def _numpy_from_pickle(data: bytes, where: str) -> np.ndarray:
    def bad(why: str) -> TaskArithError:
        return TaskArithError(f"{where} is not a plain numpy array pickle ({why}); refusing to read it.")

    stack: list[Any] = []
    memo: dict[int, Any] = {}
    result: Any = _MARK
    try:
        for opcode, arg, at in pickletools.genops(data):
            name, pos = opcode.name, int(at or 0)  # genops gives every opcode of a bytes input its offset
            if name in ("PROTO", "FRAME"):
                continue
            if name in _PUSH_ARG_OPS:
                stack.append(bytes(arg) if isinstance(arg, bytearray) else arg)
            elif name in _CONSTANT_OPS:
                stack.append(_CONSTANT_OPS[name])
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINPUT", "LONG_BINPUT"):
                memo[int(arg or 0)] = stack[-1]  # BINPUT always carries its slot
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise bad(f"{name} of unknown memo slot {arg} at byte {pos}")
                stack.append(memo[arg])
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n or any(v is _MARK for v in stack[-n:]):
                    raise bad(f"{name} on a short stack at byte {pos}")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "TUPLE":
                if _MARK not in stack:
                    raise bad(f"TUPLE without MARK at byte {pos}")
                k = len(stack) - 1 - stack[::-1].index(_MARK)
                items = tuple(stack[k + 1 :])
                del stack[k:]
                stack.append(items)
            elif name in ("STACK_GLOBAL", "GLOBAL"):
                if name == "GLOBAL":
                    module, _, qualname = str(arg).partition(" ")
                else:
                    if len(stack) < 2:
                        raise bad(f"STACK_GLOBAL on a short stack at byte {pos}")
                    module, qualname = stack.pop(-2), stack.pop()
                role = _NUMPY_GLOBALS.get((module, qualname)) if isinstance(module, str) else None
                if role is None:
                    raise bad(f"it refers to {module}.{qualname} at byte {pos}")
                stack.append(_Global(role))
            elif name == "REDUCE":
                if len(stack) < 2 or not isinstance(stack[-2], _Global) or not isinstance(stack[-1], tuple):
                    raise bad(f"REDUCE of something other than a numpy global at byte {pos}")
                args = stack.pop()
                stack.append(_Call(stack.pop(), args))
            elif name == "BUILD":
                if len(stack) < 2 or not isinstance(stack[-2], _Call):
                    raise bad(f"BUILD on something other than a numpy object at byte {pos}")
                state = stack.pop()
                stack.append(_Built(stack.pop(), state))
            elif name == "STOP":
                if len(stack) != 1:
                    raise bad(f"{len(stack)} values left on the stack at STOP")
                # genops stops reading at STOP, so anything after it would go unseen.
                if pos + 1 != len(data):
                    raise bad(f"{len(data) - pos - 1} bytes after STOP")
                result = stack.pop()
            else:
                raise bad(f"opcode {name} at byte {pos}")
    except (ValueError, IndexError) as err:  # genops on a truncated or garbled stream
        raise bad(f"malformed pickle: {err}") from err
    if result is _MARK:
        raise bad("no STOP opcode")

    if (
        isinstance(result, _Built)
        and result.obj.func == _Global("reconstruct")
        and result.obj.args == (_Global("ndarray"), (0,), b"b")
    ):
        state = result.state
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise bad(f"unexpected array state {_short(state)}")
        _, shape, dtype_desc, fortran, payload = state
        order = "F" if fortran is True else "C"
        if fortran not in (True, False):
            raise bad(f"unexpected Fortran flag {fortran!r}")
    elif isinstance(result, _Call) and result.func == _Global("frombuffer"):
        if not (isinstance(result.args, tuple) and len(result.args) == 4):
            raise bad(f"unexpected _frombuffer arguments {_short(result.args)}")
        payload, dtype_desc, shape, order = result.args
        if order not in ("C", "F"):
            raise bad(f"unexpected order {order!r}")
    else:
        raise bad(f"unexpected object {_short(result)}")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise bad(f"shape {_short(shape)} is not a tuple of sizes")
    if not isinstance(payload, bytes):
        raise bad("no raw byte payload (object arrays are not supported)")
    dtype = _numpy_dtype(dtype_desc, bad)
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) != expected:
        raise bad(f"shape {shape} of {dtype} needs {expected} bytes, payload has {len(payload)}")
    array = np.frombuffer(payload, dtype=dtype).reshape(tuple(shape), order="F" if order == "F" else "C")
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
        array.setflags(write=False)
    return array


def _numpy_dtype(desc: Any, bad: Any) -> np.dtype:
    """Check a pickled ``numpy.dtype(code, False, True)`` plus its state, and build the dtype."""
    if not (isinstance(desc, _Built) and desc.obj.func == _Global("dtype")):
        raise bad(f"dtype {_short(desc)} is not a numpy dtype")
    args, state = desc.obj.args, desc.state
    if not (isinstance(args, tuple) and len(args) == 3 and args[0] in _NUMPY_CODES and args[1:] == (False, True)):
        raise bad(f"dtype arguments {_short(args)} are not a plain numeric type")
    # State: (version, byte order, subarray, names, fields, itemsize, alignment, flags[, metadata]).
    if not (
        isinstance(state, tuple)
        and len(state) in (8, 9)
        and state[0] in (3, 4)
        and state[1] in ("<", ">", "|", "=")
        and state[2:5] == (None, None, None)
    ):
        raise bad(f"dtype state {_short(state)} is not a plain numeric type")
    dtype = np.dtype(args[0])
    return dtype.newbyteorder(state[1]) if state[1] in "<>" else dtype


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, bytes) else f"<{len(value)} bytes>"
    return text if len(text) <= 80 else text[:77] + "..."
