"""Guarantees of docs/reliability.md that cut across modules: crashes, full disks, fuzzed files, determinism.

The kill tests run real subprocesses and SIGKILL them, so they carry the ``slow`` marker.
"""

from __future__ import annotations

import io as io_module
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from taskarith.data import task_from_file
from taskarith.errors import TaskArithError
from taskarith.finetune import CHECKPOINT_FILE, RECORD_FILE, TASK_VECTOR_FILE
from taskarith.io import load_tensors, read_json, read_state_dict, save_tensors, write_json, write_safetensors
from taskarith.kfac import KFACFactors
from taskarith.vectors import TaskVector

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_vector(n: int, value: float) -> TaskVector:
    return TaskVector(deltas={"w": torch.full((n,), value)}, base_hash="0123456789abcdef", task="t")


def leftover_temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


# -------------------------------------------------------------------------------------------------
# Loading never runs code

SOURCE = Path(__file__).resolve().parents[1] / "src" / "taskarith"


def test_no_unsafe_deserialisation_anywhere_in_the_package():
    # pickletools is allowed: it parses opcodes and never executes them (data/numpy_pickle.py reads arrays that way).
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            unsafe_load = "torch.load(" in code and "weights_only=True" not in code
            if unsafe_load or re.search(
                r"\b(import pickle\b|pickle\.loads?\(|from_pretrained\([^)]*weights_only=False)", code
            ):
                offenders.append(f"{path.relative_to(SOURCE)}:{number}: {line.strip()}")
    assert offenders == []


# -------------------------------------------------------------------------------------------------
# Nothing already saved is lost


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A real 64 KiB tmpfs, so the disk really fills up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "tiny-fs"
    mount_point.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        == 0
        if os.geteuid() == 0
        else False
    )
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full-disk test still runs")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_full_disk_fails_cleanly_and_keeps_the_previous_file(tiny_filesystem):
    path = tiny_filesystem / "tau.safetensors"
    small_vector(100, 1.0).save(path)
    with pytest.raises(TaskArithError, match="No space left on device") as info:
        small_vector(100_000, 2.0).save(path)
    assert str(path) in str(info.value)
    assert TaskVector.load(path).allclose(small_vector(100, 1.0), atol=0, rtol=0)
    record = tiny_filesystem / "run.json"
    write_json(record, {"ok": True})
    with pytest.raises(TaskArithError, match="No space left on device"):
        write_json(record, {"history": ["x" * 1000] * 100})
    assert read_json(record) == {"ok": True}
    assert leftover_temporaries(tiny_filesystem) == []


def test_simulated_full_disk_fails_cleanly_and_keeps_the_previous_file(tmp_path, monkeypatch):
    from taskarith import io

    path = tmp_path / "tau.safetensors"
    small_vector(10, 1.0).save(path)

    def fill_the_disk(fh, tensors, metadata):
        fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "write_safetensors", fill_the_disk)
    with pytest.raises(TaskArithError, match=f"could not write {path}.*No space left on device"):
        small_vector(10, 2.0).save(path)
    monkeypatch.undo()
    assert TaskVector.load(path).allclose(small_vector(10, 1.0), atol=0, rtol=0)
    assert leftover_temporaries(tmp_path) == []


_SAVE_FOREVER = """
import sys, torch
from taskarith.vectors import TaskVector
path = sys.argv[1]
for i in range(10**6):
    TaskVector(deltas={"w": torch.full((25_000_000,), float(i % 2))}, base_hash="0123456789abcdef", task="t").save(path)
    print("saved", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_file_loadable(tmp_path):
    path = tmp_path / "tau.safetensors"
    small_vector(1000, 7.0).save(path)
    for attempt in range(3):
        child = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(path)], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not leftover_temporaries(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert leftover_temporaries(tmp_path), "the child never started a save"
        time.sleep(0.02 * attempt)  # kill at different depths into the write
        child.send_signal(signal.SIGKILL)
        child.wait()
        survivor = TaskVector.load(path)  # raises if the file were truncated or mixed
        values = set(torch.unique(survivor.deltas["w"]).tolist())
        assert values in ({7.0}, {0.0}, {1.0}), values
        for stale in leftover_temporaries(tmp_path):
            stale.unlink()


# -------------------------------------------------------------------------------------------------
# Resume and training faults


def _cli_finetune(model_dir: Path, csv: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "taskarith",
        "finetune",
        str(csv),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--max-length",
        "16",
        "--checkpoint-every",
        "5",
        "--device",
        "cpu",
    ]


@pytest.mark.slow
def test_sigkilled_finetuning_resumes_to_a_byte_identical_task_vector(tmp_path, tiny_model_dir, tiny_csv):
    steps = 600
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _cli_finetune(tiny_model_dir, tiny_csv, tmp_path / "whole", steps), check=True, env=env, capture_output=True
    )

    interrupted = tmp_path / "interrupted"
    child = subprocess.Popen(
        _cli_finetune(tiny_model_dir, tiny_csv, interrupted, steps),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not (interrupted / CHECKPOINT_FILE).exists() and child.poll() is None:
        time.sleep(0.01)
    time.sleep(0.5)  # let it get a few checkpoints further, so the kill may land mid-save
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (interrupted / TASK_VECTOR_FILE).exists(), "the run finished before it could be killed"

    subprocess.run(
        _cli_finetune(tiny_model_dir, tiny_csv, interrupted, steps), check=True, env=env, capture_output=True
    )
    assert read_json(interrupted / RECORD_FILE)["resumed_from_step"] > 0
    assert (interrupted / TASK_VECTOR_FILE).read_bytes() == (tmp_path / "whole" / TASK_VECTOR_FILE).read_bytes()


# -------------------------------------------------------------------------------------------------
# Determinism and reproducibility


def test_task_fingerprint_follows_the_data(tmp_path, tiny_csv):
    text = tiny_csv.read_text(encoding="utf-8")
    same = tmp_path / "same.csv"
    same.write_text(text, encoding="utf-8")
    edited = tmp_path / "edited.csv"
    edited.write_text(text.replace("red", "crimson", 1), encoding="utf-8")
    assert task_from_file(same).fingerprint == task_from_file(tiny_csv).fingerprint
    assert task_from_file(edited).fingerprint != task_from_file(tiny_csv).fingerprint


# -------------------------------------------------------------------------------------------------
# Validated inputs


def test_saved_files_get_the_usual_permissions_not_the_temporary_files_private_ones(tmp_path):
    previous = os.umask(0o022)
    try:
        small_vector(10, 1.0).save(tmp_path / "tau.safetensors")
        write_json(tmp_path / "run.json", {"ok": True})
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o644)}


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "tau.safetensors"
    small_vector(1000, 1.0).save(path)
    data = path.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(TaskArithError, match=f"cut{cut}.safetensors"):
            TaskVector.load(broken)


def test_dtype_mismatch_names_the_parameter():
    pre = {"layer.weight": torch.zeros(3), "layer.bias": torch.zeros(2)}
    ft_state = {"layer.weight": torch.zeros(3, dtype=torch.float16), "layer.bias": torch.zeros(2)}
    with pytest.raises(TaskArithError, match="'layer.weight' is torch.float32 .* but torch.float16"):
        TaskVector.from_state_dicts(pre, ft_state)


def test_label_seen_only_outside_train_is_refused(tmp_path):
    rows = (
        ["text,label,split"]
        + [f"train text {i},a,train" for i in range(3)]
        + [f"train b {i},b,train" for i in range(3)]
    )
    rows += ["val text,a,val", "test text,a,test", "test new,c,test"]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(TaskArithError, match=r"\['c'\] appear only outside the train split"):
        task_from_file(path)


# -------------------------------------------------------------------------------------------------
# Fuzzing the weight loaders: anything but TaskArithError is a bug


def _load_everything(path: Path) -> None:
    for loader in (TaskVector.load, KFACFactors.load, read_state_dict, load_tensors):
        try:
            loader(path)
        except TaskArithError:
            pass


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_as_safetensors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(data)
    _load_everything(path)


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "XYZ", "", 7]
_tensor_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(_DTYPES),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | st.just("oops"),
        "data_offsets": st.lists(st.integers(-5, 2**40), min_size=0, max_size=3),
    }
)
_header = st.dictionaries(st.text(max_size=12), _tensor_entry, max_size=4) | st.builds(
    lambda tensors, meta: {**tensors, "__metadata__": meta},
    st.dictionaries(st.text(max_size=12), _tensor_entry, max_size=3),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=3),
)


@FUZZ
@given(_header, st.binary(max_size=256), st.integers(-8, 8))
def test_fuzz_safetensors_headers(tmp_path_factory, header, body, length_error):
    raw = json.dumps(header).encode()
    length = max(0, len(raw) + length_error)
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + body)
    _load_everything(path)


@FUZZ
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=10),
        st.tuples(
            st.sampled_from(
                [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]
            ),
            st.lists(st.integers(0, 3), max_size=3),
        ),
        max_size=5,
    ),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_our_writer_is_read_back_exactly_by_the_safetensors_library(tmp_path_factory, specs, metadata):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: (torch.randn(shape, generator=generator, dtype=torch.float64) * 100).to(dtype)
        for name, (dtype, shape) in specs.items()
    }
    path = tmp_path_factory.mktemp("writer") / "x.safetensors"
    save_tensors(path, tensors, metadata)
    loaded, loaded_metadata = load_tensors(path)
    assert loaded.keys() == tensors.keys() and loaded_metadata == metadata
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in tensors.items())
    assert path.read_bytes() == written_in_reverse_order(tensors, metadata)


def written_in_reverse_order(tensors: dict, metadata: dict) -> bytes:
    """Insertion order must not reach the file: same content, same bytes."""
    buffer = io_module.BytesIO()
    write_safetensors(buffer, dict(reversed(list(tensors.items()))), dict(reversed(list(metadata.items()))))
    return buffer.getvalue()


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.recursive(
            st.none() | st.integers() | st.text(max_size=10),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
            max_leaves=8,
        ).map(json.dumps),
    )
)
def test_fuzz_sharded_index(tmp_path_factory, index_text):
    folder = tmp_path_factory.mktemp("sharded")
    (folder / "model.safetensors.index.json").write_text(index_text, encoding="utf-8")
    (folder / "shard.safetensors").write_bytes(safetensors_bytes({"w": torch.ones(2)}))
    try:
        read_state_dict(folder)
    except TaskArithError:
        pass
