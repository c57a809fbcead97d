"""PEFT LoRA adapters as task vectors, and task vectors as LoRA adapters.

Reading (:func:`read_lora_adapter`, used by ``TaskVector.from_peft``): a LoRA adapter folder written by
peft's ``save_pretrained`` (``adapter_config.json`` and ``adapter_model.safetensors``) becomes, per target
module, the weight change it makes, ``Delta W = scaling * B @ A`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``lora_alpha`` per module from ``rank_pattern`` and
``alpha_pattern`` matched as peft matches them, transposed for GPT-2's ``Conv1D`` (whose weight is stored
``(in, out)``), keyed by the base model's parameter names. Anything an adapter can hold that is not such a
change (DoRA, ``modules_to_save``, embedding or convolution LoRA, trained biases, other peft types, a
base modified at initialisation) is refused by name; the weights are read from safetensors only.

Writing (:func:`save_lora_adapter`, used by ``TaskVector.save_peft``): every delta of a ``Linear`` or
``Conv1D`` weight is cut to rank ``r`` by truncated SVD, ``Delta ~= U_r S_r V_r^T``, stored as
``B = U_r sqrt(S_r)`` and ``A = sqrt(S_r) V_r^T`` with ``lora_alpha = r`` (scaling 1), in a folder
``peft.PeftModel.from_pretrained`` loads; the relative Frobenius error of each module and of the whole is
returned and written beside it (:data:`EXPORT_REPORT`).

The module imports :mod:`taskarith.vectors` only for type checking: ``TaskVector`` imports this module
inside its methods, and the import graph stays acyclic.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError
from taskarith.io import ensure_finite, load_tensors, read_json, save_tensors, state_hash, write_json
from taskarith.outputs import check_output, output_folder
from taskarith.patterns import MatchBudget, Pattern

if TYPE_CHECKING:
    from taskarith.vectors import TaskVector

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FOLDER_FORMAT",
    "ADAPTER_WEIGHTS",
    "EXPORT_REPORT",
    "AdapterDeltas",
    "LoraExport",
    "read_lora_adapter",
    "save_lora_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
EXPORT_REPORT = "lora_export.json"
ADAPTER_FOLDER_FORMAT = "taskarith.lora_adapter/1"
EXPORT_REPORT_FORMAT = "taskarith.lora_export/1"
# peft saves every adapter tensor under the wrapper it puts around the model it adapts.
PREFIX = "base_model.model."
# Bounds that no real adapter comes near: a config claiming more is damaged or hostile.
MAX_RANK = 1 << 16
MAX_ALPHA = 1e9
MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERNS = 10_000
MAX_PATTERN_CHARS = 1000
_FACTOR_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

# Options whose adapter does not change weights by scaling * B @ A alone: refused when set (truthy).
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each weight by a learned magnitude, so its change is not scaling * B @ A",
    "modules_to_save": "modules_to_save trains full copies of modules beside the LoRA pairs",
    "lora_bias": "lora_bias trains a bias of lora_B",
    "trainable_token_indices": "trainable_token_indices trains rows of the embeddings",
    "target_parameters": "target_parameters puts LoRA on bare parameters (expert weights), not on layers",
    "layer_replication": "layer_replication duplicates layers of the base",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens",
    "use_qalora": "QA-LoRA (use_qalora) feeds A pooled inputs",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token",
    "kasa_config": "KaSA (kasa_config) adds singular-value terms",
    "velora_config": "VeLoRA (velora_config) changes the training computation",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples its factors",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) stores sharded layers",
}
# Initialisations that leave the base untouched; the others (pissa, olora, corda, loftq, lora_ga, orthogonal,
# mica) subtract their start from the base weights, so the saved pair is relative to a modified base.
_PLAIN_INITS = (True, False, "gaussian", "eva")


@dataclass(frozen=True)
class AdapterConfig:
    """What in ``adapter_config.json`` decides the deltas."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    source: str = ADAPTER_CONFIG  # the file, for messages
    # Every pattern compiled once; all matches of this config share one time budget.
    compiled: dict[str, Pattern] = field(default_factory=dict, compare=False, repr=False)
    budget: MatchBudget = field(default_factory=MatchBudget, compare=False, repr=False)

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``module``'s rank and alpha, its name matched against the patterns as peft matches them."""
        rank_key = self._pattern_key("rank_pattern", self.rank_pattern, module)
        alpha_key = self._pattern_key("alpha_pattern", self.alpha_pattern, module)
        r = self.rank_pattern[rank_key] if rank_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha
        return r, alpha

    def _pattern_key(self, key: str, patterns: Mapping[str, Any], module: str) -> str | None:
        """The first pattern that matches the end of ``module`` at a name boundary (peft's get_pattern_key)."""
        for pattern in patterns:
            name = f"{key}\0{pattern}"
            if name not in self.compiled:
                self.compiled[name] = Pattern(pattern, f"{self.source}: {key} pattern", within=_NAME_END)
            if self.compiled[name].fullmatch(module, self.budget):
                return pattern
        return None

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class AdapterDeltas:
    """The task vector an adapter makes, before it is a :class:`~taskarith.vectors.TaskVector`."""

    deltas: dict[str, torch.Tensor]
    base_hash: str
    task: str
    config: dict[str, Any]


@dataclass(frozen=True)
class LoraExport:
    """What :func:`save_lora_adapter` wrote and how much of the vector it kept.

    ``errors`` holds ``||Delta - Delta_r||_F / ||Delta||_F`` per base parameter and ``error`` the same over
    all the written modules together (0 where a delta is zero). ``dropped`` names the deltas left out
    (``drop_non_matrix``) and ``dropped_norm_fraction`` is ``||dropped||_F / ||vector||_F``.
    """

    folder: Path
    rank: int
    errors: dict[str, float]
    error: float
    dropped: tuple[str, ...] = ()
    dropped_norm_fraction: float = 0.0
    target_modules: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EXPORT_REPORT_FORMAT,
            "rank": self.rank,
            "relative_error": self.error,
            "relative_error_per_parameter": dict(self.errors),
            "dropped": list(self.dropped),
            "dropped_norm_fraction": self.dropped_norm_fraction,
        }


# reading --------------------------------------------------------------------------------------------


def read_lora_adapter(
    folder: str | os.PathLike,
    base: nn.Module,
    *,
    base_name: str | None = None,
    ignore_base_name: bool = False,
    task: str | None = None,
) -> AdapterDeltas:
    """The weight changes of the LoRA adapter in ``folder`` on ``base``, keyed by ``base``'s parameter names.

    ``base_name``, when given, is compared with the adapter's ``base_model_name_or_path`` (when it records
    one); a mismatch is refused unless ``ignore_base_name``. Names and shapes are checked against ``base``
    itself; the adapter carries no hash of the weights it was trained on, so a different checkpoint of the
    same architecture under the same name cannot be told apart. The returned ``base_hash`` is the hash of
    the base parameters the adapter changes, so the vector is later refused on any other base.
    """
    _check_model(base)
    where = Path(folder)
    config = read_adapter_config(where)
    _check_base_name(where, config.base_model_name_or_path, base_name, ignore_base_name)
    pairs = _read_pairs(where)
    state = base.state_dict()
    _refuse_adapted_base(state)
    names, rule = _match_names(where, sorted(pairs), set(state))
    deltas = {}
    for module, (lora_a, lora_b) in sorted(pairs.items()):
        param = names[module]
        deltas[param] = _delta(where, config, module, lora_a, lora_b, base, param, state[param])
    record = {
        "source": "peft-lora",
        "adapter": str(where),
        "base_model_name_or_path": config.base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "use_rslora": config.use_rslora,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "module_names": rule,
    }
    base_hash = state_hash({param: state[param] for param in deltas})
    return AdapterDeltas(deltas=deltas, base_hash=base_hash, task=task or where.resolve().name, config=record)


def read_adapter_config(folder: Path) -> AdapterConfig:
    """``folder``'s ``adapter_config.json``, checked field by field; one error line naming the field at fault."""
    if not folder.is_dir():
        raise TaskArithError(f"{shown(folder)}: not a folder (a PEFT adapter is a folder holding {ADAPTER_CONFIG})")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise TaskArithError(f"{shown(folder)}: no {ADAPTER_CONFIG} (is it a PEFT adapter folder?)")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise TaskArithError(f"{shown(path)}: {path.stat().st_size} bytes, more than any adapter config holds")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise TaskArithError(f"{shown(path)}: expected a JSON object, found {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise TaskArithError(
            f"{shown(path)}: peft_type is {quoted(peft_type)}; taskarith reads LoRA adapters (peft_type 'LORA')"
        )
    for option, why in _REFUSED_OPTIONS.items():
        if raw.get(option):
            raise TaskArithError(
                f"{shown(path)}: {option} is set ({quoted(raw[option])}): {why}; taskarith reads plain LoRA"
            )
    if raw.get("bias", "none") != "none":
        raise TaskArithError(
            f"{shown(path)}: bias is {quoted(raw.get('bias'))}: the adapter trained biases, which a LoRA "
            "task vector does not carry; taskarith reads adapters with bias 'none'"
        )
    init = raw.get("init_lora_weights", True)
    if not any(init is plain if isinstance(plain, bool) else init == plain for plain in _PLAIN_INITS):
        raise TaskArithError(
            f"{shown(path)}: init_lora_weights is {quoted(init)}, which changes the base weights when training "
            "starts, so the saved pair is relative to a modified base; convert it to plain LoRA first (peft's "
            "save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    target_modules = raw.get("target_modules")
    if not (
        target_modules is None
        or isinstance(target_modules, str)
        or (isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules))
    ):
        raise TaskArithError(f"{shown(path)}: target_modules must be a string or a list of strings")
    for flag in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(raw.get(flag, False), bool):
            raise TaskArithError(f"{shown(path)}: {flag} must be true or false, found {quoted(raw.get(flag))}")
    name = raw.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise TaskArithError(f"{shown(path)}: base_model_name_or_path must be a string, found {quoted(name)}")
    return AdapterConfig(
        r=_rank(path, "r", raw.get("r")),
        lora_alpha=_alpha(path, "lora_alpha", raw.get("lora_alpha", 8)),
        use_rslora=raw.get("use_rslora", False),
        rank_pattern=_patterns(path, "rank_pattern", raw.get("rank_pattern"), _rank),
        alpha_pattern=_patterns(path, "alpha_pattern", raw.get("alpha_pattern"), _alpha),
        base_model_name_or_path=name or None,
        source=shown(path),
    )


def _rank(path: Path, key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise TaskArithError(f"{shown(path)}: {key} must be an integer from 1 to {MAX_RANK}, found {quoted(value)}")
    return value


def _alpha(path: Path, key: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or abs(value) > MAX_ALPHA
    ):
        raise TaskArithError(f"{shown(path)}: {key} must be a finite number up to {MAX_ALPHA:g}, found {quoted(value)}")
    return float(value)


def _patterns(path: Path, key: str, value: object, check: Callable[[Path, str, object], Any]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PATTERNS:
        raise TaskArithError(f"{shown(path)}: {key} must be an object of at most {MAX_PATTERNS} patterns")
    checked = {}
    for pattern, entry in value.items():
        if len(pattern) > MAX_PATTERN_CHARS:
            raise TaskArithError(f"{shown(path)}: {key} has a pattern of {len(pattern)} characters")
        Pattern(pattern, f"{shown(path)}: {key} pattern")
        checked[pattern] = check(path, f"{key}[{quoted(pattern)}]", entry)
    return checked


# peft's get_pattern_key: a pattern matches the end of a module's name, at a name boundary.
_NAME_END = (r"(.*\.)?(", ")")


def _check_base_name(folder: Path, recorded: str | None, given: str | None, ignore: bool) -> None:
    if ignore or not recorded or not given or _same_name(recorded, given):
        return
    raise TaskArithError(
        f"{shown(folder)}: the adapter was trained on base model {quoted(recorded)}, but the base given is "
        f"{quoted(given)}; pass the base it was trained on, or, if both name the same weights, ignore the "
        "recorded name (ignore_base_name=True, --ignore-base-name)"
    )


def _same_name(recorded: str, given: str) -> bool:
    """The same string (trailing slashes aside), or two paths to one existing folder or file."""
    if recorded.rstrip("/") == given.rstrip("/"):
        return True
    try:
        return os.path.samefile(Path(recorded).expanduser(), Path(given).expanduser())
    except (OSError, ValueError):  # not both existing paths; ValueError: a name holding a NUL byte
        return False


def _read_pairs(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The ``(lora_A, lora_B)`` weights of each module, by the module's name in the adapted model."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        if (folder / PICKLED_WEIGHTS).exists():
            raise TaskArithError(
                f"{shown(folder)}: the weights are {PICKLED_WEIGHTS}, a pickle, which taskarith never loads (it "
                f"can run code); save the adapter with safe_serialization=True to get {ADAPTER_WEIGHTS}"
            )
        raise TaskArithError(f"{shown(folder)}: no {ADAPTER_WEIGHTS}")
    tensors, _ = load_tensors(path)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = _lora_key(path, key)
        found.setdefault(module, {})[part] = tensor
    if not found:
        raise TaskArithError(f"{shown(path)}: holds no LoRA weights")
    ensure_finite(tensors, shown(path))
    pairs = {}
    for module, parts in sorted(found.items()):
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise TaskArithError(f"{shown(path)}: module {quoted(module)} has no {part}.weight")
        lora_a, lora_b = parts["lora_A"], parts["lora_B"]
        for part, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            if tensor.dtype not in _FACTOR_DTYPES:
                raise TaskArithError(f"{shown(path)}: {quoted(module)}.{part} is {tensor.dtype}, not a float")
            if tensor.ndim != 2:
                raise TaskArithError(
                    f"{shown(path)}: {quoted(module)}.{part} has shape {tuple(tensor.shape)}: convolution LoRA "
                    "is not supported (taskarith reads LoRA on Linear and Conv1D layers)"
                )
        pairs[module] = (lora_a, lora_b)
    return pairs


def _lora_key(path: Path, key: str) -> tuple[str, str]:
    """``base_model.model.<module>.lora_A.weight`` -> (module, "lora_A"); every other key refused by kind."""
    refusals = (
        ("lora_embedding_", "embedding LoRA is not supported"),
        ("lora_magnitude_vector", "DoRA (a magnitude vector) is not supported"),
        ("modules_to_save", "modules_to_save (full copies of modules) is not supported"),
        ("lora_B.bias", "a trained lora_B bias (lora_bias) is not supported"),
    )
    for marker, why in refusals:
        if marker in key:
            raise TaskArithError(f"{shown(path)}: tensor {quoted(key)}: {why}")
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.startswith(PREFIX) and key.endswith(suffix) and len(key) > len(PREFIX) + len(suffix):
            return key[len(PREFIX) : -len(suffix)], part
    why = "a trained bias" if key.endswith(".bias") else "not a LoRA factor"
    raise TaskArithError(
        f"{shown(path)}: tensor {quoted(key)} is {why}; taskarith reads only {PREFIX}<module>.lora_A/lora_B.weight"
    )


def _check_model(base: object) -> None:
    if not isinstance(base, nn.Module):
        hint = " (for a taskarith Pretrained, its .encoder)" if hasattr(base, "encoder") else ""
        raise TaskArithError(f"the base must be a torch model{hint}, not a {type(base).__name__}")


def _refuse_adapted_base(state: Mapping[str, torch.Tensor]) -> None:
    adapted = next((name for name in state if ".lora_A." in name or ".lora_B." in name), None)
    if adapted is not None:
        raise TaskArithError(
            f"the base model already holds LoRA layers (parameter {quoted(adapted)}); pass the model without adapters"
        )


def _match_names(folder: Path, modules: Sequence[str], params: set[str]) -> tuple[dict[str, str], str]:
    """Each adapter module -> the base parameter of its weight, by ONE rule for every module, and the rule.

    peft names a module by its path in the model it adapted, which may be a wrapper of the given base
    (``transformer.h.0...`` for GPT2LMHeadModel against GPT2Model) or wrapped by it. Tried in order: the
    names as they are; without a first component shared by every module; under one prefix of the base's
    names. A rule that fits is taken only if no other of its kind fits too.
    """

    def fits(strip: str, add: str) -> dict[str, str] | None:
        mapped = {module: add + module[len(strip) :] + ".weight" for module in modules}
        return mapped if all(name in params for name in mapped.values()) else None

    exact = fits("", "")
    if exact is not None:
        return exact, "as recorded"
    candidates: list[tuple[str, str, str]] = []  # (rule, leading text removed, prefix added)
    heads = {module.split(".", 1)[0] for module in modules}
    if len(heads) == 1 and all("." in module for module in modules):
        head = heads.pop() + "."
        candidates.append((f"without the leading {quoted(head)}", head, ""))
    tail = "." + modules[0] + ".weight"
    for prefix in sorted({name[: -len(tail) + 1] for name in params if name.endswith(tail)}):
        candidates.append((f"under {quoted(prefix)}", "", prefix))
    fitting = [(rule, mapped) for rule, strip, add in candidates if (mapped := fits(strip, add)) is not None]
    if len(fitting) == 1:
        return fitting[0][1], fitting[0][0]
    if len(fitting) > 1:
        raise TaskArithError(
            f"{shown(folder)}: the adapter's module names fit the base in {len(fitting)} ways "
            f"({', '.join(rule for rule, _ in fitting)}); pass the model the adapter was trained on"
        )
    missing = next(module for module in modules if module + ".weight" not in params)
    raise TaskArithError(
        f"{shown(folder)}: target module {quoted(missing)} is not in the base model (no parameter "
        f"{quoted(missing + '.weight')}, nor under a common prefix); is this the base the adapter was trained on?"
    )


def _delta(
    folder: Path,
    config: AdapterConfig,
    module: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: nn.Module,
    param: str,
    weight: torch.Tensor,
) -> torch.Tensor:
    """scaling * B @ A for one module, in the layout and dtype of the base's weight."""
    r, alpha = config.rank_and_alpha(module)
    if lora_a.shape[0] != r or lora_b.shape[1] != r:
        raise TaskArithError(
            f"{shown(folder)}: module {quoted(module)} has lora_A {tuple(lora_a.shape)} and lora_B "
            f"{tuple(lora_b.shape)}, but its configured rank is {r}"
        )
    try:
        transposed = _layer_kind(base, param) == "Conv1D"
    except TaskArithError as exc:
        raise TaskArithError(f"{shown(folder)}: module {quoted(module)}: {exc}") from None
    out_features, in_features = lora_b.shape[0], lora_a.shape[1]
    expected = (in_features, out_features) if transposed else (out_features, in_features)
    if tuple(weight.shape) != expected:
        raise TaskArithError(
            f"{shown(folder)}: module {quoted(module)} changes a weight of shape {expected}, but the base's "
            f"{quoted(param)} has shape {tuple(weight.shape)}"
        )
    delta = config.scaling(r, alpha) * (lora_b.double() @ lora_a.double())
    return (delta.T if transposed else delta).contiguous().to(weight.dtype)


def _layer_kind(base: nn.Module, param: str) -> str:
    """ "Linear" or "Conv1D" for the layer owning ``param``; any other layer refused by its type."""
    from transformers.pytorch_utils import Conv1D

    owner, _, leaf = param.rpartition(".")
    layer = base.get_submodule(owner) if owner else base
    if isinstance(layer, Conv1D) and leaf == "weight":
        return "Conv1D"
    if isinstance(layer, nn.Linear) and leaf == "weight":
        return "Linear"
    kind = type(layer).__name__
    what = {"Embedding": "embedding", "Conv1d": "convolution", "Conv2d": "convolution", "Conv3d": "convolution"}
    raise TaskArithError(
        f"{quoted(param)} belongs to a layer of type {kind}: {what.get(kind, 'that')} LoRA is not supported "
        "(taskarith handles LoRA on Linear and Conv1D layers)"
    )


# writing --------------------------------------------------------------------------------------------


def save_lora_adapter(
    vector: TaskVector,
    folder: str | os.PathLike,
    base: nn.Module,
    *,
    rank: int,
    base_model_name_or_path: str | None = None,
    drop_non_matrix: bool = False,
    allow_linear: bool = False,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str]] = (),
) -> LoraExport:
    """Write ``vector`` as a rank-``rank`` LoRA adapter folder for ``base`` (loadable by
    ``peft.PeftModel.from_pretrained(base, folder)``) and return the reconstruction error.

    Every delta must be the weight of a Linear or Conv1D layer of ``base``; others (biases, LayerNorms,
    embeddings) are refused unless ``drop_non_matrix`` leaves them out. A linear-mode vector edits the
    linearized model, not the weights, so it is refused unless ``allow_linear``. ``inputs`` are
    ``(role, path)`` pairs the folder must not touch (taskarith.outputs).
    """
    _check_model(base)
    inputs = list(inputs)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise TaskArithError(f"rank {quoted(rank)}: must be an integer from 1 to {MAX_RANK}")
    name = shown(vector.task or "?")
    if vector.mode == "linear" and not allow_linear:
        raise TaskArithError(
            f"task vector {name} is linear-mode: it edits the linearized model f(x; theta0) + J(x) tau, and a "
            "LoRA adapter adds it to the weights, which computes another function; pass allow_linear=True "
            "(--allow-linear) to write it anyway"
        )
    vector.check_finite(folder)
    state = base.state_dict()
    unknown = sorted(key for key in vector.deltas if key not in state)
    if unknown:
        raise TaskArithError(
            f"task vector {name} changes {quoted(unknown[0])}, which is not a parameter of the base model "
            f"({len(unknown)} such); pass the model the vector was built on"
        )
    vector.check_base(state)
    kinds, others = _classify(vector, base)
    if others and not drop_non_matrix:
        raise TaskArithError(
            f"task vector {name}: {len(others)} deltas are not weights of Linear or Conv1D layers, which LoRA cannot "
            f"hold, e.g. {quoted(others[0])}; pass drop_non_matrix=True (--drop-others) to leave them out"
        )
    if not kinds:
        raise TaskArithError(f"task vector {name} changes no Linear or Conv1D weight: there is nothing to write")
    for param in kinds:
        shape = tuple(vector.deltas[param].shape)
        if rank > min(shape):
            raise TaskArithError(f"rank {rank} is larger than {quoted(param)} of shape {shape} allows ({min(shape)})")
    check_output(folder, inputs, overwrite=overwrite, format=ADAPTER_FOLDER_FORMAT, folder=True)
    tensors, errors, error = _factorize(vector.deltas, kinds, rank)
    modules = tuple(param.rpartition(".")[0] for param in kinds)
    total = vector.norm()
    dropped = math.sqrt(sum(float(vector.deltas[key].double().square().sum()) for key in others))
    report = LoraExport(
        folder=Path(folder),
        rank=rank,
        errors=errors,
        error=error,
        dropped=tuple(others),
        dropped_norm_fraction=dropped / total if total > 0 else 0.0,
        target_modules=modules,
    )
    config = _adapter_config(base, modules, rank, "Conv1D" in kinds.values(), base_model_name_or_path)
    with output_folder(
        folder, inputs, overwrite=overwrite, format=ADAPTER_FOLDER_FORMAT, what="the LoRA adapter"
    ) as at:
        write_json(at / ADAPTER_CONFIG, config)
        save_tensors(at / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        write_json(at / EXPORT_REPORT, report.to_json())
    return report


def _classify(vector: TaskVector, base: nn.Module) -> tuple[dict[str, str], list[str]]:
    """The deltas LoRA can hold (parameter -> "Linear" or "Conv1D") and the others, by name."""
    kinds, others = {}, []
    for key in sorted(vector.deltas):
        try:
            kinds[key] = _layer_kind(base, key)
        except TaskArithError:
            others.append(key)
    return kinds, others


def _factorize(
    deltas: Mapping[str, torch.Tensor], kinds: Mapping[str, str], rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, float], float]:
    """The peft tensors of the rank-``rank`` truncated SVD of each delta, each one's relative error, and the
    error over all of them; the errors are measured on the factors as stored (in the delta's dtype)."""
    tensors, errors = {}, {}
    residual = norm = 0.0
    for param, kind in kinds.items():
        delta = deltas[param]
        matrix = delta.double().T if kind == "Conv1D" else delta.double()  # peft's layout: (out, in)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:rank].sqrt()
        lora_b = (u[:, :rank] * root).to(delta.dtype).contiguous()
        lora_a = (root[:, None] * vh[:rank]).to(delta.dtype).contiguous()
        module = param.rpartition(".")[0]
        tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b
        gap = float(torch.linalg.matrix_norm(matrix - lora_b.double() @ lora_a.double()))
        size = float(torch.linalg.matrix_norm(matrix))
        errors[param] = gap / size if size > 0 else 0.0
        residual, norm = residual + gap**2, norm + size**2
    return tensors, errors, math.sqrt(residual / norm) if norm > 0 else 0.0


def _adapter_config(
    base: nn.Module, modules: Sequence[str], rank: int, fan_in_fan_out: bool, base_name: str | None
) -> dict[str, Any]:
    """peft's adapter_config.json for ``modules``; lora_alpha = r makes the scaling 1, as the factors assume."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": _target_modules(base, modules),
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": base_name,
        "revision": None,
    }


def _target_modules(base: nn.Module, modules: Sequence[str]) -> list[str] | str:
    """The modules as peft's target_modules: a list, which peft matches by suffix, unless a suffix would
    also catch a module not meant (``h.0.attn`` in ``x.h.0.attn``); then one regex peft matches in full."""
    chosen = set(modules)
    caught = any(
        name not in chosen and any(name.endswith("." + module) for module in chosen) for name, _ in base.named_modules()
    )
    if caught:
        return "(" + "|".join(re.escape(module) for module in sorted(chosen)) + ")"
    return sorted(chosen)
