"""Pieces for fine-tuning in any training loop: what to train, the linearized model, the vector at the end.

``taskarith finetune`` is built from these same pieces, so a loop of your own that uses them with the same
configuration and data order gives the same task vector (docs/training-loops.md)::

    names = trainable_parameters(encoder, "attention")        # or a regular expression, or None: all
    model = Linearized(encoder, trainable=True, params=names)  # tangent-space fine-tuning: only delta trains
    penalty = TauJp(encoder, other_inputs, collate=tokenize)   # or KFACPenalty(factors), OrthoReg()
    ...                                                        # your loop: loss + lam * penalty(delta, step)
    tau = task_vector(model, encoder, task="sst2")

The penalties live in :mod:`taskarith.regularizers`, the data order in :mod:`taskarith.sampling`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from taskarith.display import shown
from taskarith.errors import TaskArithError
from taskarith.io import state_hash
from taskarith.linearize import Linearized
from taskarith.patterns import Pattern
from taskarith.vectors import TaskVector

# The attention projections' weights per model family, as the papers fine-tune them (Jin et al., ICLR 2025:
# the query, key, value and output projections of every attention block; their biases stay frozen, as in
# OrthoReg's released attention-only code). One regular expression per projection (re.search on parameter
# names); a family counts only when every one of its projections is found equally often (whole blocks).
ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "bert": (
        r"attention\.self\.query\.weight$",
        r"attention\.self\.key\.weight$",
        r"attention\.self\.value\.weight$",
        r"attention\.output\.dense\.weight$",
    ),
    "deberta": (
        r"attention\.self\.query_proj\.weight$",
        r"attention\.self\.key_proj\.weight$",
        r"attention\.self\.value_proj\.weight$",
        r"attention\.output\.dense\.weight$",
    ),
    "vit": (
        r"attention\.attention\.query\.weight$",
        r"attention\.attention\.key\.weight$",
        r"attention\.attention\.value\.weight$",
        r"attention\.output\.dense\.weight$",
    ),
    "distilbert": (
        r"attention\.q_lin\.weight$",
        r"attention\.k_lin\.weight$",
        r"attention\.v_lin\.weight$",
        r"attention\.out_lin\.weight$",
    ),
    "mpnet": (
        r"attention\.attn\.q\.weight$",
        r"attention\.attn\.k\.weight$",
        r"attention\.attn\.v\.weight$",
        r"attention\.attn\.o\.weight$",
    ),
    "clip": (
        r"self_attn\.q_proj\.weight$",
        r"self_attn\.k_proj\.weight$",
        r"self_attn\.v_proj\.weight$",
        r"self_attn\.out_proj\.weight$",
    ),
    "llama": (
        r"self_attn\.q_proj\.weight$",
        r"self_attn\.k_proj\.weight$",
        r"self_attn\.v_proj\.weight$",
        r"self_attn\.o_proj\.weight$",
    ),
    "open_clip": (r"attn\.in_proj_weight$", r"attn\.out_proj\.weight$"),
    "timm": (r"attn\.qkv\.weight$", r"attn\.proj\.weight$"),
    "gpt2": (r"attn\.c_attn\.weight$", r"attn\.c_proj\.weight$"),
}
PRESETS = ("attention",)


def attention_parameters(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the attention projections' weights among ``names``, the families found only in part)."""
    chosen: set[str] = set()
    partial: list[str] = []
    for family, projections in ATTENTION_PROJECTIONS.items():
        found = [[n for n in names if re.search(pattern, n)] for pattern in projections]
        counts = {len(group) for group in found}
        if counts == {0}:
            continue
        if len(counts) == 1:
            chosen.update(n for group in found for n in group)
        else:
            partial.append(family)
    # A family seen in part is one whose complete sibling explains it (DeBERTa's output is BERT's): only
    # when nothing complete was found is it a model the preset does not know.
    return [n for n in names if n in chosen], partial if not chosen else []


def trainable_parameters(module: nn.Module, spec: str | None, *, model_name: str = "the model") -> list[str]:
    """The parameter names fine-tuning trains: all (``spec`` None), a named preset, or a regular expression.

    The ``attention`` preset takes the attention projections' weights of whichever family the module
    belongs to (:data:`ATTENTION_PROJECTIONS`), whole blocks only; a model without attention (the embedded
    EfficientNet), or whose attention the preset knows only in part, is refused, as is a pattern matching
    no parameter.
    """
    names = [name for name, _ in module.named_parameters()]
    if spec is None:
        return names
    if spec == "attention":
        chosen, partial = attention_parameters(names)
        if partial:
            raise TaskArithError(
                f"--trainable attention: {shown(model_name)} has attention projections that taskarith knows only "
                f"in part ({', '.join(partial)} names): name its parameters with a regular expression instead"
            )
        if not chosen:
            raise TaskArithError(
                f"--trainable attention: {shown(model_name)} has no attention projections that taskarith knows "
                f"(families: {', '.join(ATTENTION_PROJECTIONS)}); it may have no attention at all (a CNN such as "
                "efficientnet-lite0): name the parameters with a regular expression instead"
            )
        return chosen
    pattern = Pattern(spec, "--trainable")
    chosen = [name for name in names if pattern.search(name)]
    if not chosen:
        raise TaskArithError(
            f"--trainable {shown(spec)} matches none of the {len(names)} parameters of {shown(model_name)} "
            f"(e.g. {', '.join(shown(n) for n in names[:3])})"
        )
    return chosen


def _aligned(trained: nn.Module, theta0: Mapping[str, torch.Tensor]) -> nn.Module:
    """The part of ``trained`` whose parameter names are the base's: itself or its ``.encoder``."""
    base_names = set(theta0)
    for candidate in (trained, getattr(trained, "encoder", None)):
        if isinstance(candidate, nn.Module) and base_names <= {n for n, _ in candidate.named_parameters()}:
            return candidate
    raise TaskArithError(
        "the trained model's parameter names are not the base model's (nor are its .encoder's): "
        "was it copied from this base?"
    )


def task_vector(
    trained: nn.Module,
    base: nn.Module | Mapping[str, torch.Tensor],
    *,
    task: str | None = None,
    config: Any = None,
    params: Sequence[str] | None = None,
) -> TaskVector:
    """The task vector of a trained model against the base it was trained from, with full metadata.

    ``base`` is the pre-trained module or its parameters (a snapshot taken before training in place).
    ``trained`` is a :class:`~taskarith.linearize.Linearized` of ``base`` (a linear-mode vector: its delta),
    or a fine-tuned copy of ``base`` (or a module holding one as ``.encoder``): a standard vector
    theta - theta0 over the parameters that were trained (``requires_grad``; ``params`` names them
    instead). ``config`` (a :class:`~taskarith.finetune.FinetuneConfig` or a dict) is recorded, so the
    vector says how it was made; the base hash covers the parameters the vector changes.
    """
    theta0 = dict(base.named_parameters()) if isinstance(base, nn.Module) else dict(base)
    if isinstance(trained, Linearized):
        if trained.base is not base and state_hash(
            {k: v for k, v in trained.theta0().items() if k in theta0}
        ) != state_hash(theta0):
            raise TaskArithError("the linearized model was built on another base model than the one given")
        with torch.no_grad():
            deltas = {name: value.detach().cpu() for name, value in sorted(trained.deltas().items())}
        if params is not None:
            deltas = {name: deltas[name] for name in params}
        mode = "linear"
    else:
        source = dict(_aligned(trained, theta0).named_parameters())
        chosen = list(params) if params is not None else [name for name in theta0 if source[name].requires_grad]
        if not chosen:
            raise TaskArithError("the trained model has no trainable parameter: nothing was fine-tuned")
        with torch.no_grad():
            # On the CPU both: the trained model may be on a GPU and theta0 a CPU snapshot.
            deltas = {name: source[name].detach().cpu() - theta0[name].detach().cpu() for name in sorted(chosen)}
        mode = "standard"
    recorded = config.to_json() if hasattr(config, "to_json") else dict(config) if config is not None else {}
    return TaskVector(
        deltas=deltas,
        base_hash=state_hash({name: theta0[name] for name in deltas}),
        task=task,
        mode=mode,
        config=recorded,
    )


# What AdamW's decoupled decay pulls towards 0 while delta trains: theta = theta0 + delta (the tangent and
# tau-Jp papers, which train a copy of theta) or delta itself (TAK).
DECAY_TARGETS = ("theta", "delta")


def decay_theta_(
    deltas: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], lr: float, decay: float
) -> None:
    """AdamW's decoupled weight decay of theta = theta0 + delta while delta is what trains (in place).

    The tangent and tau-Jp papers train a copy of theta, so their decay pulls theta, not delta, towards 0:
    delta -= lr * decay * (theta0 + delta). Call it just before ``optimizer.step()`` with the optimizer's own
    weight decay set to 0 (``taskarith finetune`` does so in linear mode with ``weight_decay_on="theta"``).
    """
    with torch.no_grad():
        for name, delta in deltas.items():
            delta.add_(theta0[name] + delta, alpha=-lr * decay)
