"""Streamed (out-of-core) merges equal in-memory ones bit for bit, stay small in memory, and YAML recipes drive them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer, BertModel

from taskarith.errors import TaskArithError
from taskarith.io import current_umask, read_state_dict
from taskarith.merging import MERGE_METHODS, load_recipe, merge_checkpoints, merge_task_vectors, run_recipe
from taskarith.merging.recipe import parse_size
from taskarith.merging.streaming import plan_shards
from taskarith.vectors import TaskVector

HYPERPARAMETERS = {
    "ties": {"density": 0.3},
    "dare": {"density": 0.6},
    "dare_ties": {"density": 0.6},
    "breadcrumbs": {"density": 0.5, "gamma": 0.05},
    "consensus": {"k": 1},
    "tsv": {"scaling": 0.5},
}


def fine_tuned_copy(base_dir: Path, folder: Path, seed: int, shard: str | None = None) -> Path:
    """A 'fine-tuned' copy of the base: seeded perturbations, saved like any Hugging Face model."""
    model = BertModel.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("finetuned")
    return [
        fine_tuned_copy(tiny_model_dir, root / f"ft{i}", seed=i, shard="20KB" if i == 1 else None) for i in range(3)
    ]


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_streamed_merge_equals_in_memory_merge_bit_for_bit(tmp_path, tiny_model_dir, finetuned, method):
    params = HYPERPARAMETERS.get(method, {})
    weights = [1.0, 0.5, 2.0]
    summary = merge_checkpoints(
        tiny_model_dir, finetuned, tmp_path / "merged", method, weights=weights, seed=3, **params
    )
    streamed = read_state_dict(tmp_path / "merged")

    vectors = [w * TaskVector.from_checkpoints(tiny_model_dir, ft) for ft, w in zip(finetuned, weights, strict=True)]
    in_memory = merge_task_vectors(vectors, method, seed=3, **params).apply_to(read_state_dict(tiny_model_dir))
    assert streamed.keys() == in_memory.keys() and summary["tensors"] == len(streamed)
    different = [k for k in streamed if not torch.equal(streamed[k], in_memory[k])]
    assert different == []


def test_output_is_a_loadable_model_folder_with_shards_and_tokenizer(tmp_path, tiny_model_dir, finetuned):
    summary = merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "merged", "ties", shard_bytes=30_000)
    folder = tmp_path / "merged"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert summary["shards"] == len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == summary["bytes"]
    model = AutoModel.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    loaded = {k: v for k, v in model.state_dict().items()}
    merged = read_state_dict(folder)
    assert all(torch.equal(loaded[k], merged[k]) for k in merged if k in loaded)
    assert not list(tmp_path.glob(".*partial"))
    assert folder.stat().st_mode & 0o777 == 0o777 & ~current_umask()  # not mkdtemp's private 0700


def test_integer_buffers_are_copied_and_half_precision_is_merged_in_float32(tmp_path):
    base = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), "ids": torch.arange(3)}
    ft = {"w": torch.tensor([1.0009765625, 2.0, 2.998046875], dtype=torch.float16), "ids": torch.arange(3) + 7}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    merge_checkpoints(tmp_path / "base.safetensors", [tmp_path / "ft.safetensors"] * 2, tmp_path / "out")
    merged = read_state_dict(tmp_path / "out")
    assert torch.equal(merged["ids"], torch.arange(3))
    # 2 * (ft - base) added in float32 and rounded once: 1 + 2 * 2**-10 = 1.001953125 exactly.
    assert merged["w"].dtype == torch.float16
    assert merged["w"].tolist() == [1.001953125, 2.0, 2.99609375]


def test_bad_inputs_are_named(tmp_path, tiny_model_dir, finetuned):
    with pytest.raises(TaskArithError, match="nothing to merge"):
        merge_checkpoints(tiny_model_dir, [], tmp_path / "a")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(TaskArithError, match="other.safetensors does not have the tensors"):
        merge_checkpoints(tiny_model_dir, [tmp_path / "other.safetensors"], tmp_path / "a")
    save_file({"w": torch.zeros(3)}, tmp_path / "w3.safetensors")
    with pytest.raises(TaskArithError, match=r"tensor 'w' is F32 \[2\]"):
        merge_checkpoints(tmp_path / "other.safetensors", [tmp_path / "w3.safetensors"], tmp_path / "a")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TaskArithError, match="reads safetensors only"):
        merge_checkpoints(tmp_path / "pickled", finetuned, tmp_path / "a")
    with pytest.raises(TaskArithError, match="unknown hyper-parameter 'densty'"):
        merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "a", "ties", densty=0.1)
    with pytest.raises(TaskArithError, match="2 weights for 3"):
        merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "a", weights=[1, 2])
    merge_checkpoints(tiny_model_dir, finetuned[:1], tmp_path / "done")
    with pytest.raises(TaskArithError, match="already exists"):
        merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "done")
    assert not (tmp_path / "a").exists()


def test_overwrite_replaces_the_folder_whole(tmp_path, tiny_model_dir, finetuned):
    merge_checkpoints(tiny_model_dir, finetuned, tmp_path / "out", shard_bytes=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    merge_checkpoints(tiny_model_dir, finetuned[:1], tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    expected = (TaskVector.from_checkpoints(tiny_model_dir, finetuned[0])).apply_to(read_state_dict(tiny_model_dir))
    assert all(torch.equal(v, expected[k]) for k, v in read_state_dict(tmp_path / "out").items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shard_plan_keeps_order_and_bound():
    layout = {f"t{i}": ("F32", (100,)) for i in range(10)} | {"big": ("F32", (1000,))}
    shards = plan_shards(layout, shard_bytes=1000)
    assert [name for shard in shards for name in shard] == sorted(layout)
    assert ["big"] in shards and all(len(s) <= 2 for s in shards)


_MERGE_IN_A_CHILD = """
import json, sys
from taskarith.merging import merge_checkpoints

def rss_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024

before = rss_mb("VmRSS:")
merge_checkpoints(sys.argv[1], sys.argv[2:5], sys.argv[5], "ties", density=0.2, shard_bytes=64 * 2**20)
print(json.dumps({"before": before, "peak": rss_mb("VmHWM:")}))
"""


@pytest.mark.slow
def test_streamed_merge_memory_stays_near_a_few_tensors(tmp_path):
    # 96 tensors of 1 MiB: 96 MiB per model, 384 MiB read in all, against a bound of 64 MiB above start-up
    # (TIES on three deltas makes a dozen tensor-sized temporaries; the allocator keeps some of them).
    tensor_mb, count = 1, 96
    numel = tensor_mb * 2**20 // 4
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(numel, generator=generator) for i in range(count)}
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(base, base_dir / "model.safetensors")
    models = []
    for seed in range(3):
        folder = tmp_path / f"ft{seed}"
        folder.mkdir()
        half = count // 2  # two shards per fine-tuned model, like a sharded checkpoint
        for part, names in enumerate((list(base)[:half], list(base)[half:])):
            save_file(
                {k: base[k] + 0.01 * torch.randn(numel, generator=generator) for k in names},
                folder / f"model-0000{part + 1}-of-00002.safetensors",
            )
        (folder / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(base)
                    }
                }
            )
        )
        models.append(folder)
    del base
    done = subprocess.run(
        [sys.executable, "-c", _MERGE_IN_A_CHILD, str(base_dir), *map(str, models), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        check=True,
    )
    memory = json.loads(done.stdout.strip().splitlines()[-1])
    total_read_mb = 4 * tensor_mb * count
    assert memory["peak"] - memory["before"] < 64, (memory, total_read_mb)
    assert len(list((tmp_path / "merged").glob("model-*.safetensors"))) == 2


# -------------------------------------------------------------------------------------------------
# Recipes and the command line


def test_parse_size():
    assert parse_size("2GB") == 2 * 1000**3 and parse_size("500MiB") == 500 * 2**20 and parse_size(1234) == 1234
    with pytest.raises(TaskArithError, match="shard_size"):
        parse_size("lots")


def test_recipe_with_relative_paths_and_weights(tmp_path, tiny_model_dir, finetuned):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(f"""
        merge_method: ties
        base_model: {tiny_model_dir}
        models:
          - model: {finetuned[0]}
            parameters: {{weight: 0.5}}
          - {finetuned[1]}
        parameters: {{density: 0.3}}
        seed: 1
        out: merged
        shard_size: 1MB
    """)
    )
    plan = load_recipe(recipe)
    assert plan.out == str(tmp_path / "merged") and [m.weight for m in plan.models] == [0.5, 1.0]
    run_recipe(plan)
    vectors = [
        0.5 * TaskVector.from_checkpoints(tiny_model_dir, finetuned[0]),
        TaskVector.from_checkpoints(tiny_model_dir, finetuned[1]),
    ]
    expected = merge_task_vectors(vectors, "ties", seed=1, density=0.3).apply_to(read_state_dict(tiny_model_dir))
    assert all(torch.equal(v, expected[k]) for k, v in read_state_dict(tmp_path / "merged").items())


@pytest.mark.parametrize(
    "text,expected",
    [
        ("merge_method: ties\nbase: x\n", "unknown key(s) ['base']"),
        ("- a\n- b\n", "a recipe is a mapping"),
        ("merge_method: ties\ntask_vectors: [a.safetensors]\n", "no 'out'"),
        ("merge_method: ties\nmodels: [a]\nout: o\n", "need a 'base_model'"),
        ("merge_method: nope\ntask_vectors: [a.safetensors]\nout: o\n", "unknown merging method 'nope'"),
        ("merge_method: ties\ntask_vectors: [a.safetensors]\nout: o\nparameters: {density: 2}\n", "'density' = 2"),
        (
            "merge_method: ties\nmodels: [{model: a, parameters: {weight: x}}]\nbase_model: b\nout: o\n",
            "weight must be a finite number",
        ),
        ("key: [unclosed\n", "not a readable YAML recipe"),
    ],
)
def test_bad_recipes_are_named(tmp_path, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(TaskArithError) as info:
        load_recipe(recipe)
    assert expected in str(info.value) and "bad.yaml" in str(info.value)


def test_cli_merges_models_and_vectors_with_overrides(cli, tmp_path, tiny_model_dir, finetuned):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {tiny_model_dir}\nmodels: [{finetuned[0]}, {finetuned[1]}]\n"
        f"parameters: {{density: 0.3}}\nout: from-recipe\n"
    )
    code, out, err = cli("merge", recipe, "--set", "density=0.5", "--out", tmp_path / "cli")
    assert code == 0, err
    assert '"density": 0.5' in out and not (tmp_path / "from-recipe").exists()
    vectors = [TaskVector.from_checkpoints(tiny_model_dir, ft) for ft in finetuned[:2]]
    expected = merge_task_vectors(vectors, "ties", density=0.5).apply_to(read_state_dict(tiny_model_dir))
    assert all(torch.equal(v, expected[k]) for k, v in read_state_dict(tmp_path / "cli").items())

    for i, vector in enumerate(vectors):
        vector.save(tmp_path / f"tau{i}.safetensors")
    code, _, err = cli(
        "merge",
        "--method",
        "task_arithmetic",
        "--vector",
        f"{tmp_path / 'tau0.safetensors'}:0.5",
        "--vector",
        tmp_path / "tau1.safetensors",
        "--out",
        tmp_path / "merged.safetensors",
    )
    assert code == 0, err
    merged = TaskVector.load(tmp_path / "merged.safetensors")
    assert merged.allclose(0.5 * vectors[0] + vectors[1], atol=1e-7)

    code, _, err = cli(
        "merge",
        "--method",
        "ties",
        "--vector",
        tmp_path / "tau0.safetensors",
        "--set",
        "density",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and "expected KEY=VALUE" in err and "Traceback" not in err
