"""FusionBench 0.2.33's AdaMerging pieces on an exported tiny case (run in FusionBench's own venv).

Called by benchmarks/adamerging_vs_fusionbench.py as ``python fusionbench_adamerging.py CASE_DIR OUT_JSON``.
FusionBench's AdaMerging algorithms need CLIP model pools and their datasets from the hub, so what runs here
is their core, unchanged: ``LayerWiseMergedModel`` / ``TaskWiseMergedModel`` (the merged model as
``functional_call`` on theta0 + sum w * tau, weights clamped to [0, 1]), ``entropy_loss`` and the loop of
``LayerWiseAdaMergingAlgorithm.test_time_adaptation`` (per task: logits, entropy, backward with
retain_graph; then one Adam step and ``merge_weights``), replayed on the very batches taskarith drew. The
zero-shot text head (mean pooling, normalization, cosine times the logit scale) is written out here: a
FusionBench CLIP head is the same cosine on an image embedding.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fusion_bench.method.adamerging.entropy_loss import entropy_loss
from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights
from fusion_bench.models.wrappers.task_wise_fusion import TaskWiseMergedModel, get_task_wise_weights
from safetensors.torch import load_file
from transformers import BertModel


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    case, out = Path(sys.argv[1]), Path(sys.argv[2])
    meta = json.loads((case / "meta.json").read_text())
    torch.set_num_threads(meta["threads"])
    batches = load_file(str(case / "batches.safetensors"))
    tests = load_file(str(case / "test.safetensors"))
    heads = load_file(str(case / "heads.safetensors"))

    def model() -> BertModel:
        return BertModel.from_pretrained(str(case / "base"), attn_implementation="eager").eval()

    pretrained = model()
    finetuned = []
    for i in range(meta["vectors"]):
        m = model()
        m.load_state_dict(load_file(str(case / f"finetuned_{i}.safetensors")), strict=False)
        finetuned.append(m)
    names = [name for name, p in pretrained.named_parameters() if p.requires_grad]
    start = peak = rss()
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, rss())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.perf_counter()
    if meta["granularity"] == "layerwise":
        weights = get_layer_wise_weights(meta["vectors"], len(names), init_values=meta["init"])
        module = LayerWiseMergedModel(
            weights, pretrained, finetuned, clamp_weights=True, tie_weights=True, strict=False
        )
    else:
        weights = get_task_wise_weights(meta["vectors"], init_values=meta["init"])
        module = TaskWiseMergedModel(weights, pretrained, finetuned, clamp_weights=True, tie_weights=True, strict=False)

    def logits(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        hidden = module(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return meta["logit_scale"] * F.normalize(pooled, dim=-1) @ heads[task].T

    def batch_of(source: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
        return {field: source[f"{key}/{field}"] for field in meta["fields"]}

    optimizer = torch.optim.Adam([module.merge_weight], lr=meta["lr"])
    module.train()
    module.merge_weights()
    history = []
    for step in range(meta["steps"]):
        total = 0.0
        for task in meta["tasks"]:
            loss = entropy_loss(logits(batch_of(batches, f"{step}/{task}"), task))
            loss.backward(retain_graph=True)
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
        module.merge_weights()
        history.append(total)
    seconds = time.perf_counter() - began
    stop.set()
    watcher.join()
    coefficients = module.merge_weight.detach().clamp(0, 1)
    accuracy = {}
    with torch.no_grad():
        for task in meta["tasks"]:
            right = seen = 0
            for chunk in range(meta["test_chunks"][task]):
                key = f"{task}/{chunk}"
                predicted = logits(batch_of(tests, key), task).argmax(dim=-1)
                right += int((predicted == tests[f"{key}/labels"]).sum())
                seen += len(predicted)
            accuracy[task] = right / seen
    if meta["granularity"] == "layerwise":
        table = {f"vector{i}": dict(zip(names, map(float, row), strict=True)) for i, row in enumerate(coefficients)}
    else:
        table = {f"vector{i}": {"all": float(c)} for i, c in enumerate(coefficients)}
    out.write_text(
        json.dumps(
            {
                "coefficients": table,
                "accuracy": accuracy,
                "history": history,
                "seconds": seconds,
                "peak_rss_above_start_mib": (max(peak, rss()) - start) / 2**20,
            }
        )
    )


if __name__ == "__main__":
    main()
