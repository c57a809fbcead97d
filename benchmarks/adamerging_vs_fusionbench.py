"""taskarith's AdaMerging against FusionBench 0.2.33's, side by side on the same tiny models, offline.

The case: a random tiny BERT (hidden 32, two layers, dropout 0; the test suite's vocabulary), two
sentence tasks of the test suite's kind (colour vs animal, two seeds and templates), each fine-tuned with
taskarith for 30 steps (standard mode). Both tools learn task-wise and layer-wise coefficients on the same
batches: taskarith draws them (seed 0, one batch of 16 test inputs per task per step, as FusionBench's loop
takes one) and exports them tokenized with the weights and heads; FusionBench's ``LayerWiseMergedModel``,
``TaskWiseMergedModel`` and ``entropy_loss`` run in its own venv, in the loop of its
``test_time_adaptation`` (benchmarks/peers/fusionbench_adamerging.py says exactly what is and is not
FusionBench code: its AdaMerging *algorithm classes* need CLIP model pools and hub datasets, so they
cannot run on this model). Paper settings otherwise: init 0.3, clamp [0, 1], Adam lr 1e-3, ``--steps``.

Recorded per granularity and tool: the learned coefficients (and their largest difference), the test
accuracy of each merged model, the entropy curve's ends, wall seconds of the adaptation and its peak
resident memory above its start (each tool in its own process).

    python benchmarks/adamerging_vs_fusionbench.py    # -> benchmarks/results/adamerging_vs_fusionbench.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from environment import machine
from merge_vs_peers import PEER_TOOLS, child_env, ensure_venv
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import write_tiny_bert, write_tiny_csv  # noqa: E402  # the test suite's tiny model and tasks

from taskarith.data import task_from_file  # noqa: E402
from taskarith.evaluate import accuracy  # noqa: E402
from taskarith.finetune import FinetuneConfig, finetune_cached  # noqa: E402
from taskarith.io import write_json  # noqa: E402
from taskarith.merging.adamerging import AdaMergingConfig, _draws, adamerge_tasks  # noqa: E402
from taskarith.models import load_pretrained  # noqa: E402
from taskarith.outputs import output_file  # noqa: E402

WORK = HERE / ".peers" / "adamerging-vs-fusionbench"
RESULTS = HERE / "results" / "adamerging_vs_fusionbench.json"
FORMAT = "taskarith.benchmark.adamerging_vs_fusionbench/1"
HELPER = HERE / "peers" / "fusionbench_adamerging.py"


def build_case() -> tuple[Any, list[Any], list[Any]]:
    base = WORK / "base"
    if not (base / "config.json").is_file():
        write_tiny_bert(base)
        config = json.loads((base / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # FusionBench's loop runs train()
        (base / "config.json").write_text(json.dumps(config))
    pretrained = load_pretrained(base, max_length=16, device="cpu")
    tasks = [
        task_from_file(write_tiny_csv(WORK / "colours.csv"), name="colours", templates=("this is about {}.",)),
        task_from_file(
            write_tiny_csv(WORK / "kinds.csv", n_per_class=40, seed=3), name="kinds", templates=("it is {}.",)
        ),
    ]
    vectors = []
    for task in tasks:
        config = FinetuneConfig(task=task.name, model=str(base), steps=30, batch_size=16, lr=1e-3, max_length=16)
        vectors.append(finetune_cached(config, pretrained, task, WORK / "runs", progress=False).task_vector)
    return pretrained, tasks, vectors


def export(pretrained: Any, tasks: list[Any], vectors: list[Any], config: AdaMergingConfig, case: Path) -> None:
    case.mkdir(parents=True, exist_ok=True)
    pretrained.encoder.save_pretrained(case / "base")
    for i, tau in enumerate(vectors):
        save_file(
            {k: v.contiguous() for k, v in tau.apply_to(pretrained.encoder.state_dict()).items()},
            str(case / f"finetuned_{i}.safetensors"),
        )
    unlabeled = {t.name: t.test.inputs for t in tasks}
    draw = _draws(unlabeled, config)
    fields = sorted(pretrained.tokenize(["a"]).keys())
    batches = {}
    for step in range(config.steps):
        for task, chunks in draw().items():
            (chunk,) = chunks
            batch = pretrained.tokenize([unlabeled[task][int(i)] for i in chunk])
            batches.update({f"{step}/{task}/{k}": v.contiguous() for k, v in batch.items()})
    tests, chunks_of = {}, {}
    for task in tasks:
        inputs, labels = task.test.inputs, task.test.labels
        chunks_of[task.name] = 0
        for chunk, start in enumerate(range(0, len(inputs), 64)):
            batch = pretrained.tokenize(list(inputs[start : start + 64]))
            tests.update({f"{task.name}/{chunk}/{k}": v.contiguous() for k, v in batch.items()})
            tests[f"{task.name}/{chunk}/labels"] = torch.tensor(labels[start : start + 64])
            chunks_of[task.name] = chunk + 1
    save_file(batches, str(case / "batches.safetensors"))
    save_file(tests, str(case / "test.safetensors"))
    save_file({t.name: pretrained.head(t).contiguous() for t in tasks}, str(case / "heads.safetensors"))
    meta = {
        "tasks": [t.name for t in tasks],
        "vectors": len(vectors),
        "steps": config.steps,
        "lr": config.lr,
        "init": config.init,
        "granularity": config.granularity,
        "logit_scale": pretrained.logit_scale,
        "fields": fields,
        "test_chunks": chunks_of,
        "threads": torch.get_num_threads(),
    }
    (case / "meta.json").write_text(json.dumps(meta))


def taskarith_side(case: Path, out: Path) -> None:
    """The same adaptation with taskarith, in its own process (for its wall time and memory)."""
    from adamerging_cost import PeakRSS

    meta = json.loads((case / "meta.json").read_text())
    pretrained, tasks, vectors = build_case()
    config = AdaMergingConfig(granularity=meta["granularity"], steps=meta["steps"], batches_per_step=1)
    with PeakRSS() as memory:
        result = adamerge_tasks(vectors, pretrained, tasks, "test", config)
    encoder = result.vector.apply_to(pretrained.encoder)
    record = result.record()
    names = [f"vector{i}" for i in range(len(vectors))]
    table = {
        alias: dict(zip(record["groups"], record["coefficients"][name], strict=True))
        for alias, name in zip(names, result.vector_names, strict=True)
    }
    out.write_text(
        json.dumps(
            {
                "coefficients": table,
                "accuracy": {t.name: accuracy(pretrained, t, "test", encoder) for t in tasks},
                "history": result.history,
                "seconds": result.optimize_seconds,
                "peak_rss_above_start_mib": memory.mib,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: taskarith's own process
    parser.add_argument("--case", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--side-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "taskarith":
        taskarith_side(args.case, args.side_out)
        return
    versions = ensure_venv(PEER_TOOLS["fusionbench"])
    pretrained, tasks, vectors = build_case()
    comparison: dict[str, Any] = {}
    for granularity in ("taskwise", "layerwise"):
        config = AdaMergingConfig(granularity=granularity, steps=args.steps, batches_per_step=1)
        case = WORK / granularity
        export(pretrained, tasks, vectors, config, case)
        sides = {}
        for tool, command in (
            ("fusionbench", [str(PEER_TOOLS["fusionbench"].python), str(HELPER), str(case), str(case / "fb.json")]),
            (
                "taskarith",
                [
                    sys.executable,
                    __file__,
                    "--side",
                    "taskarith",
                    "--case",
                    str(case),
                    "--side-out",
                    str(case / "ta.json"),
                ],
            ),
        ):
            env = child_env()
            if tool == "taskarith":
                env["PYTHONPATH"] = str(HERE.parent / "src")
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{tool} failed:\n{done.stderr[-3000:]}")
            sides[tool] = json.loads((case / ("fb.json" if tool == "fusionbench" else "ta.json")).read_text())
        ta, fb = sides["taskarith"], sides["fusionbench"]
        difference = max(
            abs(value - fb["coefficients"][vector][group])
            for vector, row in ta["coefficients"].items()
            for group, value in row.items()
        )
        comparison[granularity] = {
            "max_coefficient_difference": difference,
            "max_accuracy_difference": max(abs(ta["accuracy"][t] - fb["accuracy"][t]) for t in ta["accuracy"]),
            "max_entropy_difference": max(abs(a - b) for a, b in zip(ta["history"], fb["history"], strict=True)),
            **{
                tool: {
                    "accuracy": side["accuracy"],
                    "entropy_first_last": [side["history"][0], side["history"][-1]],
                    "adaptation_seconds": side["seconds"],
                    "peak_rss_above_start_mib": side["peak_rss_above_start_mib"],
                    "coefficients": side["coefficients"],
                }
                for tool, side in sides.items()
            },
        }
        print(
            f"{granularity}: max |coefficient difference| {difference:.2e}, accuracies {ta['accuracy']} vs {fb['accuracy']}"
        )
    document = {
        "format": FORMAT,
        "what": __doc__.split("\n\n")[0],
        "compared": "FusionBench's LayerWiseMergedModel / TaskWiseMergedModel, entropy_loss and test_time_adaptation's "
        "loop (not its CLIP algorithm classes, which need hub models and datasets); same batches, same init/clamp/lr",
        "machine": machine(),
        "versions": versions,
        "settings": {
            "steps": args.steps,
            "batch_size": 16,
            "batches_per_step": 1,
            "init": 0.3,
            "clamp": [0, 1],
            "lr": 1e-3,
        },
        "results": comparison,
    }
    with output_file(args.out, (), overwrite=True, format=FORMAT) as tmp:
        write_json(tmp, document)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
