"""Data-parallel fine-tuning: the sharded loss is the full-batch loss, and 2 gloo processes match 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from taskarith.distributed import Cluster
from taskarith.finetune import RECORD_FILE, TASK_VECTOR_FILE
from taskarith.io import read_json
from taskarith.outputs import LOCK
from taskarith.training_log import LOG_FILE, TENSORBOARD_DIR, tensorboard_available
from taskarith.vectors import TaskVector


def test_one_process_changes_nothing():
    single = Cluster()
    assert single.is_main and single.shard([3, 1, 2]) == [3, 1, 2] and single.share(5, 5) == 1.0
    tensor = torch.tensor([1.5])
    assert single.sum_(tensor) is tensor and tensor.item() == 1.5


@pytest.mark.parametrize("world,batch", [(2, 8), (3, 7), (4, 5)])
def test_sharded_losses_and_gradients_sum_to_the_full_batch(world, batch):
    generator = torch.Generator().manual_seed(world)
    weight = torch.randn(4, 3, generator=generator, requires_grad=True)
    inputs, labels = torch.randn(batch, 4, generator=generator), torch.randint(3, (batch,), generator=generator)
    full = F.cross_entropy(inputs @ weight, labels)
    (full_grad,) = torch.autograd.grad(full, weight)

    total, grads = torch.zeros(()), torch.zeros_like(weight)
    indices = list(range(batch))
    for rank in range(world):
        cluster = Cluster(rank=rank, world=world)
        mine = cluster.shard(indices)
        part = F.cross_entropy(inputs[mine] @ weight, labels[mine]) * cluster.share(len(mine), batch)
        total = total + part.detach()
        grads += torch.autograd.grad(part, weight)[0]
    assert sorted(i for r in range(world) for i in Cluster(r, world).shard(indices)) == indices
    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(grads, full_grad)


def _finetune_command(model_dir, csv, out, launcher: list[str]) -> list[str]:
    return [
        *launcher,
        "-m",
        "taskarith",
        "finetune",
        str(csv),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--steps",
        "8",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--max-length",
        "16",
        "--device",
        "cpu",
        "--checkpoint-every",
        "4",
    ]


@pytest.mark.slow
def test_two_gloo_processes_under_torchrun_match_one_process(tmp_path, tiny_model_dir, tiny_csv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        _finetune_command(tiny_model_dir, tiny_csv, tmp_path / "one", [sys.executable]),
        check=True,
        env=env,
        capture_output=True,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        _finetune_command(tiny_model_dir, tiny_csv, tmp_path / "two", torchrun), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (
        TaskVector.load(tmp_path / "one" / TASK_VECTOR_FILE),
        TaskVector.load(tmp_path / "two" / TASK_VECTOR_FILE),
    )
    assert two.norm() > 0 and one.allclose(two, atol=1e-5, rtol=1e-4)
    record = read_json(tmp_path / "two" / RECORD_FILE)
    assert record["processes"] == 2
    # Only rank 0 wrote: the vector, the record, the training log (and TensorBoard's events, when installed)
    # and the run folder's lock (kept by design, see outputs.RunLock).
    written = [TASK_VECTOR_FILE, RECORD_FILE, LOG_FILE, LOCK] + ([TENSORBOARD_DIR] if tensorboard_available() else [])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(written)
    if tensorboard_available():
        assert len(list((tmp_path / "two" / TENSORBOARD_DIR).iterdir())) == 1  # one writer: rank 0's
