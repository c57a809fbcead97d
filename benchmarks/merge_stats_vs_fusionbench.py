"""RegMean and Fisher merging side by side with FusionBench 0.2.33, on the same tiny models and statistics.

A tiny random-weight BERT (from a transformers config) and three seeded "fine-tuned" copies, each with its own
small text task; `taskarith statistics` computes each copy's Gram matrices and Fisher on its task. Then each
merge runs twice, as separate processes timed by GNU time: `taskarith merge --method ... --statistics ...`
(streamed), and FusionBench's own merge functions fed the same statistics in FusionBench's virtualenv
(benchmarks/peers/fusionbench_stats_merge.py; the venv machinery of merge_vs_peers.py). The merged weights
are compared tensor by tensor (max |difference|). Offline; about two minutes on two cores once the venv exists.

    .venv/bin/python benchmarks/merge_stats_vs_fusionbench.py     # writes benchmarks/results/merge_stats_vs_fusionbench.json
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertModel, BertTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_peers import (
    HELPERS,
    PEER_TOOLS,
    PEERS,
    ROOT,
    compare,
    ensure_venv,
    machine_info,
    perturbation,
    run_measured,
)

from taskarith.io import write_json
from taskarith.outputs import output_file
from taskarith.vectors import FORMAT as VECTOR_FORMAT
from taskarith.vectors import TaskVector

WORK = PEERS / "merge-stats"
RESULTS = ROOT / "benchmarks" / "results" / "merge_stats_vs_fusionbench.json"
WORDS = {
    "colours": ["red", "green", "blue", "yellow"],
    "animals": ["cat", "dog", "horse", "bird"],
    "food": ["bread", "apple", "rice", "soup"],
}
FILLER = ["the", "a", "is", "very", "my", "this", "that", "big", "small"]
# (name, method, taskarith --set, FusionBench options): each paper default, and FusionBench's CLIP option.
MERGES = (
    ("regmean", "regmean", {}, ["--alpha", "0.95"]),
    ("regmean_alpha_0.5", "regmean", {"alpha": 0.5}, ["--alpha", "0.5"]),
    ("fisher", "fisher", {}, ["--epsilon", "1e-6", "--normalize", "0"]),
    ("fisher_normalized", "fisher", {"normalize": 1}, ["--epsilon", "1e-6", "--normalize", "1"]),
)
EXAMPLES = 64


def build(folder: Path) -> tuple[Path, list[Path], list[Path], list[Path]]:
    """The base model, three fine-tuned copies, their task files and their task vectors."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for ws in WORDS.values() for w in ws)]
    base_dir, fts, tasks, vectors = folder / "base", [], [], []
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    base = BertModel(config)
    base.save_pretrained(base_dir)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(base_dir)
    generator = torch.Generator().manual_seed(0)
    for i, (name, words) in enumerate(WORDS.items()):
        ft = BertModel(config)
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for j, param in enumerate(ft.parameters()):
                param.add_(perturbation(param, seed=1000 * i + j))
        fts.append(folder / f"ft-{name}")
        ft.save_pretrained(fts[-1])
        tasks.append(folder / f"{name}.csv")
        with open(tasks[-1], "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for k in range(2 * EXAMPLES):
                pick = [FILLER[int(torch.randint(len(FILLER), (1,), generator=generator))] for _ in range(3)]
                word = words[k % 2 * 2 + int(torch.randint(2, (1,), generator=generator))]
                writer.writerow([f"{pick[0]} {pick[1]} {word} {pick[2]}", f"{name}{k % 2}"])
        vectors.append(folder / f"ft-{name}.vector.safetensors")
        with output_file(vectors[-1], [("model", str(fts[-1]))], overwrite=True, format=VECTOR_FORMAT) as tmp:
            TaskVector.from_checkpoints(base_dir, fts[-1], task=name).save(tmp)
    return base_dir, fts, tasks, vectors


def float64_regmean(base: Path, fts: list[Path], stats: list[Path], alpha: float) -> dict[str, torch.Tensor]:
    """The textbook formula on the weights, W* = (Σ G̃_t)⁻¹ Σ G̃_t W_tᵀ with torch.linalg.solve in float64: the
    reference both tools' float32 results are measured against (no taskarith code)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = [load_file(ft / "model.safetensors") for ft in fts]
    grams = []
    for path in stats:
        with safe_open(str(path), framework="pt") as fh:
            tokens = json.loads(fh.metadata()["tokens"])
            grams.append({k[5:]: fh.get_tensor(k).double() / tokens[k[5:]] for k in fh.keys() if k.startswith("gram/")})
    out = {}
    for name in weights[0]:
        stacked = torch.stack([w[name].double() for w in weights])
        if name not in grams[0]:
            out[name] = stacked.mean(0)
            continue
        shrunk = [alpha * g[name] + (1 - alpha) * torch.diag(torch.diagonal(g[name])) for g in grams]
        rhs = sum(g @ w.T for g, w in zip(shrunk, stacked, strict=True))
        out[name] = torch.linalg.solve(sum(shrunk), rhs).T
    return out


def max_diff_to(reference: dict[str, torch.Tensor], folder: Path) -> float:
    from safetensors.torch import load_file

    merged = load_file(folder / "model.safetensors")
    return max(float((merged[k].double() - v).abs().max()) for k, v in reference.items() if k in merged)


def taskarith(*args: object) -> list[str]:
    # run_measured's environment drops PYTHONPATH (for the peers); this worktree's sources go back in here.
    return ["/usr/bin/env", f"PYTHONPATH={ROOT / 'src'}", sys.executable, "-m", "taskarith", *map(str, args)]


def summary(run: Any) -> dict[str, Any]:
    return {
        "wall_s": round(run.wall_s, 3),
        "peak_rss_mb": round(run.peak_rss_mb, 1),
        "returncode": run.returncode,
        "error": run.error,
        "phases": run.phases,
    }


def main() -> None:
    started = time.time()
    versions = ensure_venv(PEER_TOOLS["fusionbench"])
    WORK.mkdir(parents=True, exist_ok=True)
    base, fts, tasks, vectors = build(WORK)
    stats = []
    for task, vector, ft in zip(tasks, vectors, fts, strict=True):
        stats.append(WORK / f"{ft.name}.stats.safetensors")
        made = run_measured(
            taskarith(
                "statistics",
                task,
                "--vector",
                vector,
                "--model",
                base,
                "--num-examples",
                EXAMPLES,
                "--out",
                stats[-1],
                "--overwrite",
                "--device",
                "cpu",
            ),
            WORK / "logs" / f"statistics-{ft.name}.log",
            600,
        )
        if made.returncode != 0:
            raise SystemExit(f"taskarith statistics failed: {made.error}; see {made.log}")
    results: dict[str, Any] = {}
    for name, method, params, peer_options in MERGES:
        ours, theirs = WORK / "out" / f"taskarith-{name}", WORK / "out" / f"fusionbench-{name}"
        merge = ["merge", "--method", method, "--base", base, "--out", ours, "--overwrite"]
        for ft, s in zip(fts, stats, strict=True):
            merge += ["--model", ft, "--statistics", s]
        for key, value in params.items():
            merge += ["--set", f"{key}={value}"]
        mine = run_measured(taskarith(*merge), WORK / "logs" / f"taskarith-{name}.log", 600)
        peer = [str(PEER_TOOLS["fusionbench"].python), str(HELPERS / "fusionbench_stats_merge.py")]
        peer += ["--method", method, "--base", str(base), "--out", str(theirs), *peer_options]
        for ft, s in zip(fts, stats, strict=True):
            peer += ["--model", str(ft), "--statistics", str(s)]
        other = run_measured(peer, WORK / "logs" / f"fusionbench-{name}.log", 600)
        entry: dict[str, Any] = {"taskarith": summary(mine), "fusionbench": summary(other)}
        if mine.returncode == 0 and other.returncode == 0:
            entry["agreement"] = compare(theirs, ours)
            if method == "regmean":
                reference = float64_regmean(base, fts, stats, float(params.get("alpha", 0.95)))
                entry["max_abs_diff_to_float64_reference"] = {
                    "taskarith": max_diff_to(reference, ours),
                    "fusionbench": max_diff_to(reference, theirs),
                }
        results[name] = entry
        agreement = entry.get("agreement", {}).get("max_abs_diff")
        print(
            f"{name}: taskarith {mine.wall_s:.2f} s, FusionBench {other.wall_s:.2f} s, max |diff| {agreement}, "
            f"to float64 {entry.get('max_abs_diff_to_float64_reference')}"
        )
    doc = {
        "what": "RegMean and Fisher merges of a tiny BERT (hidden 64, 2 layers) and 3 fine-tuned copies, on the "
        "same statistics (taskarith statistics, 64 examples per task), by taskarith (streamed, CLI) and by "
        "FusionBench's merging_with_regmean_weights / merging_with_fisher_weights",
        "fusionbench": versions,
        "machine": machine_info({"fusionbench": versions}),
        "merges": results,
        "seconds": round(time.time() - started, 1),
        "pid": os.getpid(),
    }
    write_json(RESULTS, doc)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
