"""Per-layer statistics for the merging methods that need more than the deltas: RegMean's Gram matrices and
Fisher merging's diagonal Fisher, computed once per fine-tuned model and task, saved, and read one tensor at a
time by the merge.

* **Gram** (RegMean, Jin et al., ICLR 2023): for every linear layer y = x Wᵀ (+ b) of the encoder, G = Σ x xᵀ
  over every real token of every example (padding excluded; an image's tokens all count), accumulated in
  float64, with the number of rows it sums over. By default the inputs are those of *the fine-tuned model*
  on its task's training inputs, as the paper and its code compute them; ``activations="pretrained"`` takes
  the pre-trained encoder's instead (a named variant: one pass of the base model serves every task). Linear
  layers are every ``F.linear`` call whose weight is an encoder parameter (``nn.Linear`` and functional
  uses), every ``x @ P`` with a parameter matrix P (stored as ``transposed``), and ``nn.MultiheadAttention``'s
  in_proj and out_proj (run through K-FAC's explicit attention forward, :func:`taskarith.kfac._explicit_attention`);
  convolutions are not linear layers here (FusionBench and the official code treat ``nn.Linear`` only).
* **Fisher** (Matena & Raffel, NeurIPS 2022): the diagonal E_x[(∇θ log p(y|x))²] of the fine-tuned model's
  classifier (its encoder and the task's fixed head), one gradient per example (batch size 1, so the
  square is of a per-example gradient, as the paper defines it): ``"sampled"`` draws y ~ p(y|x) once per
  example (seeded), ``"expected"`` averages over every class weighted by p(y|x) (exact, one backward pass
  per class), ``"empirical"`` uses the true label.

**Linear-mode vectors** (taskarith's extension; neither paper has them): the fine-tuned model is f_lin, and
the statistics are those of its parameters, delta = theta - theta0. In f_lin a linear layer's weight delta
multiplies the *pre-trained* model's layer input (``J(x) . dW`` holds ``dW x0``; the ``dW dx`` term is second
order and dropped), so RegMean's objective ``sum_t ||X W - X W_t||^2`` for that delta is over the pre-trained
inputs: the Gram of a linear-mode vector is the pre-trained model's (recorded as ``activations
"pretrained"``). Its Fisher is that of f_lin's classifier at delta = tau, one gradient of log p(y|x) in delta
per example, through f_lin (a JVP and its backward pass). Files record the ``mode`` they describe, and a
merge refuses statistics of the other mode.

Files: safetensors with ``gram/<weight name>`` and ``fisher/<parameter name>`` tensors keyed by the encoder's
parameter names, and metadata in the conventions of K-FAC factor files (``format``, ``tasks``, ``examples``,
``base_hash``) plus the parameter shapes, the per-layer token counts, the transposed layers, the
activations, the Fisher kind and the Fisher's L2 norm over the whole model (FusionBench's
``normalize_fisher_weight`` needs it, and storing it lets a streamed merge normalise without a pass over
every Fisher first). K-FAC's input factors are token means on the pre-trained model, with a bias column, so
they are not RegMean's Gram; the two kinds of file share their container and metadata keys, not their
tensors. A merge maps the parameter names to checkpoint tensor names (``bert.`` + name) with
:func:`tensor_names`, and refuses what it cannot map.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from taskarith.display import quoted, shown
from taskarith.errors import TaskArithError
from taskarith.io import save_tensors

if TYPE_CHECKING:
    from taskarith.data import Task
    from taskarith.models import Pretrained
    from taskarith.vectors import TaskVector

__all__ = [
    "ACTIVATIONS",
    "FISHER_KINDS",
    "FORMAT",
    "MergeStatistics",
    "TensorStatistics",
    "check_statistics",
    "compute_merge_statistics",
    "load_statistics",
    "tensor_names",
]

FORMAT = "taskarith.merge_statistics/1"
# Bumped when the computation changes what a file of the same format holds (caches key on it); 2: linear mode.
COMPUTATION = 2
ACTIVATIONS = ("finetuned", "pretrained")
MODES = ("standard", "linear")  # the vectors' modes statistics can describe
FISHER_KINDS = ("sampled", "expected", "empirical")
# FusionBench's CLIP configurations (num_regmean_examples, num_fisher_examples); see docs/protocol.md.
DEFAULT_EXAMPLES = 256
_REQUIRED_METADATA = ("format", "tasks", "examples", "base_hash", "parameters")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class TensorStatistics:
    """What one model's statistics say about one tensor: the input of a statistics method for that tensor.

    ``gram`` is Σ x xᵀ over ``tokens`` input rows of the linear layer whose weight the tensor is (None for
    other tensors); ``transposed`` says the layer computes x @ W rather than x Wᵀ. ``fisher`` has the
    tensor's shape; ``fisher_norm`` is the L2 norm of the model's whole Fisher.
    """

    gram: torch.Tensor | None = None
    tokens: int = 0
    transposed: bool = False
    fisher: torch.Tensor | None = None
    fisher_norm: float = 0.0


class _FileTensors(Mapping[str, torch.Tensor]):
    """Tensors of one table of a statistics file, read (and checked) when asked for, so that a streamed
    merge holds one tensor per model, not the file."""

    def __init__(self, path: Path, table: str, names: Collection[str], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.path, self.table, self.names, self.shapes = path, table, sorted(names), dict(shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        key = f"{self.table}/{name}"
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                value = fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise TaskArithError(f"{shown(self.path)}: tensor {quoted(key)} cannot be read ({shown(exc)})") from None
        return _checked(self.path, key, value, self.shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _checked(path: Path | str, key: str, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if value.dtype not in _FLOATS:
        raise TaskArithError(f"{shown(path)}: statistic {quoted(key)} is {value.dtype}, not a float tensor")
    if tuple(value.shape) != tuple(shape):
        raise TaskArithError(
            f"{shown(path)}: statistic {quoted(key)} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        raise TaskArithError(f"{shown(path)}: statistic {quoted(key)} contains NaN or Inf")
    return value


@dataclass(frozen=True, eq=False)
class MergeStatistics:
    """One fine-tuned model's statistics on its task, keyed by the encoder's parameter names.

    ``parameters`` holds the shape of every encoder parameter (the names a merge maps to checkpoint tensors);
    ``gram[weight]`` is Σ x xᵀ of that linear layer's inputs over ``tokens[weight]`` rows; ``fisher[param]`` the
    diagonal Fisher (mean over ``examples``). ``source`` is the file it was read from (for messages).
    """

    task: str
    base_hash: str
    parameters: dict[str, tuple[int, ...]]
    examples: int
    gram: Mapping[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)
    fisher: Mapping[str, torch.Tensor] = field(default_factory=dict)
    activations: str = "finetuned"
    fisher_kind: str = ""
    fisher_norm: float = 0.0
    mode: str = "standard"  # of the fine-tuned model: weights (standard) or f_lin's delta (linear)
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or f"statistics of {self.task!r}"
        if self.activations not in ACTIVATIONS:
            raise TaskArithError(f"{shown(where)}: activations {quoted(self.activations)} is not one of {ACTIVATIONS}")
        if self.mode not in MODES:
            raise TaskArithError(f"{shown(where)}: mode {quoted(self.mode)} is not one of {MODES}")
        if self.mode == "linear" and self.gram and self.activations != "pretrained":
            raise TaskArithError(
                f"{shown(where)}: Grams of a linear-mode model with activations {quoted(self.activations)}; "
                "f_lin's are the pre-trained ones"
            )
        if self.fisher and self.fisher_kind not in FISHER_KINDS:
            raise TaskArithError(f"{shown(where)}: Fisher kind {quoted(self.fisher_kind)} is not one of {FISHER_KINDS}")
        if not self.gram and not self.fisher:
            raise TaskArithError(f"{shown(where)}: holds neither Gram matrices nor a Fisher")
        if self.examples < 1:
            raise TaskArithError(f"{shown(where)}: needs at least one example, not {self.examples}")
        for name in [*self.gram, *self.fisher]:
            if name not in self.parameters:
                raise TaskArithError(f"{shown(where)}: statistic of {quoted(name)}, which is not a parameter it lists")
        for name in self.gram:
            if self.tokens.get(name, 0) < 1 or len(self.parameters[name]) != 2:
                raise TaskArithError(f"{shown(where)}: Gram of {quoted(name)} has no token count or no 2-D weight")

    def gram_shape(self, name: str) -> tuple[int, int]:
        rows, cols = self.parameters[name]
        size = rows if self.transposed.get(name, False) else cols
        return (size, size)

    def for_tensor(self, name: str) -> TensorStatistics:
        """The statistics of parameter ``name`` (a statistics name, see :func:`tensor_names`)."""
        return TensorStatistics(
            gram=self.gram[name] if name in self.gram else None,
            tokens=self.tokens.get(name, 0),
            transposed=self.transposed.get(name, False),
            fisher=self.fisher[name] if name in self.fisher else None,
            fisher_norm=self.fisher_norm,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomically): call it through :func:`taskarith.outputs.output_file`."""
        tensors = {f"gram/{k}": v.float().contiguous() for k, v in self.gram.items()}
        tensors.update({f"fisher/{k}": v.float().contiguous() for k, v in self.fisher.items()})
        metadata = {
            "format": FORMAT,
            "tasks": json.dumps([self.task]),
            "examples": json.dumps({self.task: self.examples}),
            "base_hash": self.base_hash,
            "parameters": json.dumps({k: list(v) for k, v in self.parameters.items()}),
            "tokens": json.dumps(self.tokens),
            "transposed": json.dumps(sorted(k for k, v in self.transposed.items() if v)),
            "activations": self.activations,
            "fisher_kind": self.fisher_kind,
            "fisher_norm": repr(float(self.fisher_norm)),
            "mode": self.mode,
        }
        save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MergeStatistics:
        """Read a statistics file's metadata now and its tensors when they are used (each checked then)."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                keys = list(fh.keys())
        except FileNotFoundError:
            raise TaskArithError(f"{shown(path)}: statistics file not found") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise TaskArithError(f"{shown(path)}: not a readable safetensors file ({shown(exc)})") from None
        if metadata.get("format") != FORMAT:
            raise TaskArithError(
                f"{shown(path)}: not a merge statistics file (format {quoted(metadata.get('format'))}, "
                f"expected {FORMAT!r}); make one with `taskarith statistics`"
            )
        missing = [key for key in _REQUIRED_METADATA if key not in metadata]
        if missing:
            raise TaskArithError(f"{shown(path)}: merge statistics file lacks metadata {missing}")
        try:
            tasks = [str(t) for t in json.loads(metadata["tasks"])]
            examples = {str(k): int(v) for k, v in json.loads(metadata["examples"]).items()}
            parameters = {str(k): tuple(int(d) for d in v) for k, v in json.loads(metadata["parameters"]).items()}
            tokens = {str(k): int(v) for k, v in json.loads(metadata.get("tokens", "{}")).items()}
            transposed = {str(k): True for k in json.loads(metadata.get("transposed", "[]"))}
            fisher_norm = float(metadata.get("fisher_norm", "0"))
        except (ValueError, TypeError, AttributeError, RecursionError):
            raise TaskArithError(
                f"{shown(path)}: unreadable merge statistics metadata (tasks, examples, parameters, tokens, "
                "transposed or fisher_norm)"
            ) from None
        if len(tasks) != 1 or list(examples) != tasks or not math.isfinite(fisher_norm) or fisher_norm < 0:
            raise TaskArithError(
                f"{shown(path)}: merge statistics metadata describe tasks {quoted(tasks)} with examples "
                f"{quoted(examples)} and Fisher norm {quoted(metadata.get('fisher_norm'))}; one task, a "
                "non-negative norm expected"
            )
        tables: dict[str, set[str]] = {"gram": set(), "fisher": set()}
        for key in keys:
            table, sep, name = key.partition("/")
            if table not in tables or not sep:
                raise TaskArithError(f"{shown(path)}: unexpected tensor {quoted(key)} in a merge statistics file")
            if name not in parameters:
                raise TaskArithError(f"{shown(path)}: tensor {quoted(key)} is not of a parameter the file lists")
            tables[table].add(name)
        where = str(path)
        probe = cls(
            task=tasks[0],
            base_hash=metadata["base_hash"],
            parameters=parameters,
            examples=examples[tasks[0]],
            gram=dict.fromkeys(tables["gram"], torch.empty(0)),
            tokens=tokens,
            transposed=transposed,
            fisher=dict.fromkeys(tables["fisher"], torch.empty(0)),
            activations=metadata.get("activations", "finetuned"),
            fisher_kind=metadata.get("fisher_kind", ""),
            fisher_norm=fisher_norm,
            mode=metadata.get("mode", "standard"),  # files written before linear-mode statistics existed
            source=where,
        )
        gram_shapes = {name: probe.gram_shape(name) for name in tables["gram"]}
        fisher_shapes = {name: parameters[name] for name in tables["fisher"]}
        return cls(
            **{
                **{f: getattr(probe, f) for f in probe.__dataclass_fields__},
                "gram": _FileTensors(path, "gram", tables["gram"], gram_shapes),
                "fisher": _FileTensors(path, "fisher", tables["fisher"], fisher_shapes),
            }
        )


def load_statistics(paths: Sequence[str | os.PathLike | MergeStatistics]) -> list[MergeStatistics]:
    """Statistics objects as they are, paths through :meth:`MergeStatistics.load`."""
    return [p if isinstance(p, MergeStatistics) else MergeStatistics.load(p) for p in paths]


# -------------------------------------------------------------------------------------------------
# Checks shared by the in-memory and the streamed merge


def _label(stats: MergeStatistics, index: int) -> str:
    return shown(stats.source) if stats.source else f"statistics {index} ({shown(stats.task)})"


def check_statistics(method: str, statistics: Sequence[MergeStatistics], models: int, mode: str = "standard") -> None:
    """Refuse statistics that cannot serve ``method`` on ``models`` models of ``mode``: not one per model, of
    the other mode, of different base models or architectures, or lacking a table or a layer another file
    has (each refusal names the file and key)."""
    if len(statistics) != models:
        raise TaskArithError(f"{method} needs one statistics file per model: got {len(statistics)} for {models} models")
    first = statistics[0]
    table = "gram" if method == "regmean" else "fisher"
    for i, stats in enumerate(statistics):
        # Grams of the pre-trained inputs do not depend on the fine-tuned model: they serve either mode.
        serves = stats.mode == mode or (table == "gram" and stats.activations == "pretrained")
        if not serves:
            raise TaskArithError(
                f"{_label(stats, i)} holds statistics of a {stats.mode}-mode model, but the merge is of "
                f"{mode}-mode {'task vectors' if mode == 'linear' else 'weights'}: compute them from a "
                f"{mode}-mode task vector (`taskarith statistics --vector`)"
            )
        if stats.base_hash != first.base_hash:
            raise TaskArithError(
                f"{_label(stats, i)} was computed on base model {stats.base_hash}, {_label(first, 0)} on "
                f"{first.base_hash}: statistics of one merge come from one base"
            )
        if stats.parameters != first.parameters:
            extra = sorted(set(stats.parameters) ^ set(first.parameters)) or sorted(
                k for k in stats.parameters if stats.parameters[k] != first.parameters[k]
            )
            raise TaskArithError(
                f"{_label(stats, i)} and {_label(first, 0)} describe different parameters "
                f"(e.g. {quoted(extra[:3])}): were they computed on the same encoder?"
            )
        entries = getattr(stats, table)
        if not entries:
            kind = (
                "Gram matrices (computed with --no-gram?)" if table == "gram" else "Fisher (computed with --no-fisher?)"
            )
            raise TaskArithError(f"{_label(stats, i)} holds no {kind}, which {method} needs")
        if table == "fisher":
            lacking = sorted(set(stats.parameters) - set(entries))
            if lacking:
                raise TaskArithError(f"{_label(stats, i)} lacks the Fisher of parameter {quoted(lacking[0])}")
    if table == "gram":
        union = sorted({name for stats in statistics for name in stats.gram})
        for i, stats in enumerate(statistics):
            lacking = [name for name in union if name not in stats.gram]
            if lacking:
                other = next(s for s in statistics if lacking[0] in s.gram)
                raise TaskArithError(
                    f"{_label(stats, i)} lacks the Gram of layer {quoted(lacking[0])} that "
                    f"{_label(other, statistics.index(other))} has: compute both on the same encoder"
                )
            flipped = [name for name in union if stats.transposed.get(name, False) != first.transposed.get(name, False)]
            if flipped:
                raise TaskArithError(
                    f"{_label(stats, i)} sees layer {quoted(flipped[0])} transposed, unlike the others"
                )


def tensor_names(
    stats: MergeStatistics,
    layout: Mapping[str, tuple[int, ...]],
    floating: Collection[str],
    where: str,
    *,
    subset: bool = False,
) -> dict[str, str]:
    """Tensor name -> statistics name for the tensors of ``layout`` (name -> shape) that ``where`` holds.

    Task models wrap the encoder under a prefix (``bert.``, ``roberta.``); the prefix is the one under which
    the most of the statistics' parameters are found. Refused, by name: a parameter of the statistics with
    no tensor of its shape (unless ``subset``: task vectors of a parameter subset, attention-only or LoRA,
    hold only some of the model's parameters), and a ``floating`` tensor (one the merge changes) with no
    statistics.
    """
    names = set(layout)
    prefixes = [""] + sorted({n.split(".", 1)[0] + "." for n in names if "." in n})
    prefix = max(prefixes, key=lambda p: sum(p + k in names for k in stats.parameters))
    label = shown(stats.source) if stats.source else "the statistics"
    for name, shape in stats.parameters.items():
        tensor = prefix + name
        if tensor not in names and subset:
            continue
        if tensor not in names:
            raise TaskArithError(
                f"{label}: parameter {quoted(name)} has no tensor {quoted(tensor)} in {shown(where)} "
                f"(statistics of another architecture?)"
            )
        if tuple(layout[tensor]) != tuple(shape):
            raise TaskArithError(
                f"{label}: parameter {quoted(name)} is {list(shape)}, tensor {quoted(tensor)} of {shown(where)} "
                f"is {list(layout[tensor])}"
            )
    mapping = {prefix + name: name for name in stats.parameters if prefix + name in names}
    unmapped = sorted(n for n in floating if n not in mapping)
    if unmapped:
        raise TaskArithError(
            f"{label} has no statistics for tensor {quoted(unmapped[0])} of {shown(where)}"
            f"{f' (nor for {len(unmapped) - 1} more)' if len(unmapped) > 1 else ''}; they cover the encoder "
            f"under the prefix {prefix!r}: merge the encoder alone, or compute statistics on the whole model"
        )
    return mapping


def check_base_hash(statistics: Sequence[MergeStatistics], base_hash: str | None, base: str) -> None:
    """Refuse statistics computed on another base model than the merge's (``base`` names it)."""
    if not base_hash:
        return
    for i, stats in enumerate(statistics):
        if stats.base_hash and stats.base_hash != base_hash:
            raise TaskArithError(
                f"{_label(stats, i)} was computed on base model {stats.base_hash}, but the merge's base "
                f"{shown(base)} is {base_hash}: compute statistics on the base being merged"
            )


# -------------------------------------------------------------------------------------------------
# Computing statistics


class _GramCollector:
    """Σ x xᵀ of the input rows of every linear call whose weight is an encoder parameter (through
    :class:`taskarith.kfac._FunctionalLinear`, which calls :meth:`linear_call`)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.params = {id(p): (name, p) for name, p in encoder.named_parameters()}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.transposed: dict[str, bool] = {}
        self.mask: torch.Tensor | None = None

    def _name(self, param: Any) -> str | None:
        entry = self.params.get(id(param))
        return entry[0] if entry is not None and entry[1] is param else None

    def linear_call(self, x: Any, weight: Any, bias: Any, out: Any, *, transposed: bool) -> Any:
        name = self._name(weight)
        if name is None or not isinstance(x, torch.Tensor) or weight.dim() != 2:
            return out
        width = weight.shape[0] if transposed else weight.shape[1]
        if x.shape[-1] != width:
            return out
        with torch.no_grad():
            rows = self._real_rows(x.detach().double())
            gram = rows.T @ rows
            if name in self.sums:
                self.sums[name] += gram
                self.tokens[name] += rows.shape[0]
            else:
                self.sums[name], self.tokens[name] = gram, rows.shape[0]
        self.transposed[name] = transposed
        return out

    def _real_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input's rows, without padding: the batch's mask applies where x is (batch, tokens, d) or
        (tokens, batch, d) (sequence-first attention); other inputs count every row."""
        mask = self.mask
        if mask is not None and x.dim() == 3:
            if tuple(x.shape[:2]) == tuple(mask.shape):
                return x[mask.bool()]
            if tuple(x.shape[:2]) == tuple(mask.shape[::-1]):
                return x.transpose(0, 1)[mask.bool()]
        return x.reshape(-1, x.shape[-1])


def _gram(encoder: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> _GramCollector:
    from taskarith.kfac import _explicit_attention, _FunctionalLinear

    collector = _GramCollector(encoder)
    patched = []
    for module in encoder.modules():
        # nn.MultiheadAttention's own forward hides its projections from a TorchFunctionMode; K-FAC's explicit
        # forward computes the same function with them as F.linear calls (self-attention, packed weights).
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim and module.bias_k is None:
            module.forward = _explicit_attention(module, module.forward)  # type: ignore[method-assign]  # restored below
            patched.append(module)
    try:
        with torch.no_grad():
            for batch in batches:
                collector.mask = batch.get("attention_mask")
                with _FunctionalLinear(collector):  # type: ignore[arg-type]  # duck-typed: it needs linear_call only
                    encoder(**batch)
    finally:
        for module in patched:
            del module.forward
    if not collector.sums:
        raise TaskArithError("the encoder made no linear call with one of its parameters: no Gram to compute")
    return collector


def _fisher(
    classifier: nn.Module,
    params: Mapping[str, torch.Tensor],
    batches: Iterator[tuple[dict[str, torch.Tensor], int]],
    kind: str,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], int]:
    sums = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in params.items()}
    names, tensors = list(params), list(params.values())
    count = 0
    for batch, label in batches:  # one example per batch: per-example gradients
        log_probs = F.log_softmax(classifier(**batch).double(), dim=-1)[0]
        probs = log_probs.exp().detach().cpu()
        if kind == "expected":
            targets = [(c, float(probs[c])) for c in range(probs.shape[0])]
        elif kind == "sampled":
            targets = [(int(torch.multinomial(probs.float(), 1, generator=generator)), 1.0)]
        else:
            targets = [(label, 1.0)]
        for i, (target, weight) in enumerate(targets):
            if weight == 0.0:
                continue
            grads = torch.autograd.grad(
                log_probs[target], tensors, retain_graph=i < len(targets) - 1, allow_unused=True
            )
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:
                    sums[name] += weight * grad.detach().double().cpu().pow(2)
        count += 1
    return {name: (value / count).float() for name, value in sums.items()}, count


def compute_merge_statistics(
    pretrained: Pretrained,
    task: Task,
    vector: TaskVector | None = None,
    *,
    gram: bool = True,
    fisher: bool = True,
    num_examples: int = DEFAULT_EXAMPLES,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "train",
    activations: str | None = None,
    fisher_kind: str = "sampled",
) -> MergeStatistics:
    """RegMean's Gram matrices and/or the diagonal Fisher of the model ``pretrained + vector`` on up to
    ``num_examples`` of ``task``'s ``split`` inputs (a seeded subset, the same for both statistics).

    ``vector`` None: the pre-trained model itself. ``activations`` ``"finetuned"`` (the default for a
    standard-mode vector, as the paper) or ``"pretrained"``: whose layer inputs the Grams sum (the Fisher is
    always the fine-tuned model's). A linear-mode vector's model is f_lin at delta = tau: its Grams are the
    pre-trained inputs (the only choice; ``"finetuned"`` is refused) and its Fisher is in delta (see the
    module's docstring). Labels are used only by ``fisher_kind="empirical"``. Deterministic for a seed; the
    pre-trained encoder is left untouched.
    """
    if not gram and not fisher:
        raise TaskArithError("nothing to compute: ask for the Gram matrices, the Fisher, or both")
    mode = vector.mode if vector is not None else "standard"  # TaskVector admits no other mode
    if activations is None:
        activations = "pretrained" if mode == "linear" else "finetuned"
    if activations not in ACTIVATIONS:
        raise TaskArithError(f"activations {quoted(activations)} is not one of {', '.join(ACTIVATIONS)}")
    if mode == "linear" and activations != "pretrained":
        raise TaskArithError(
            "a linear-mode vector's weight deltas multiply the pre-trained model's layer inputs in f_lin: its "
            "Grams are the pre-trained activations (activations 'pretrained'), there are no others"
        )
    if mode == "linear":
        assert vector is not None
        _check_linear_vector(pretrained, vector)
    if fisher_kind not in FISHER_KINDS:
        raise TaskArithError(f"Fisher kind {quoted(fisher_kind)} is not one of {', '.join(FISHER_KINDS)}")
    if num_examples < 1 or batch_size < 1:
        raise TaskArithError(f"num_examples and batch_size must be >= 1, not {num_examples} and {batch_size}")
    examples = task.split(split)
    order = list(range(len(examples.inputs)))
    if not order:
        raise TaskArithError(f"task {task.name!r} has no {split} inputs to compute statistics from")
    if len(order) > num_examples:
        chosen = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed))[:num_examples]
        order = sorted(chosen.tolist())
    inputs = [examples.inputs[i] for i in order]
    labels = [examples.labels[i] for i in order]
    parameters = {name: tuple(p.shape) for name, p in pretrained.encoder.named_parameters()}
    result: dict[str, Any] = {}
    # The standard fine-tuned model is one copy, shared by both statistics; f_lin references the base.
    finetuned = (
        _finetuned(pretrained, vector) if mode == "standard" and (fisher or activations == "finetuned") else None
    )
    base = pretrained.encoder
    flags, was_training = [p.requires_grad for p in base.parameters()], base.training
    try:
        if gram:
            encoder = base if activations == "pretrained" else finetuned
            assert encoder is not None
            encoder.eval()
            collector = _gram(encoder, (b for _, b in pretrained.batches(inputs, batch_size)))
            result.update(
                gram={k: v.float() for k, v in sorted(collector.sums.items())},
                tokens=dict(sorted(collector.tokens.items())),
                transposed={k: v for k, v in collector.transposed.items() if v},
            )
        if fisher:
            if finetuned is None:
                assert vector is not None
                classifier, params = _linearized_classifier(pretrained, task, vector)
            else:
                params = dict(finetuned.named_parameters())
                for p in params.values():
                    p.requires_grad_(True)
                classifier = pretrained.classifier(task, finetuned)
            generator = torch.Generator().manual_seed(seed)

            def one_by_one() -> Iterator[tuple[dict[str, torch.Tensor], int]]:
                for i, item in enumerate(inputs):
                    yield pretrained.tokenize([item]), labels[i]

            with torch.enable_grad():
                diagonal, _ = _fisher(classifier, params, one_by_one(), fisher_kind, generator)
            norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in diagonal.values()))
            result.update(fisher=diagonal, fisher_kind=fisher_kind, fisher_norm=norm)
    finally:  # f_lin (and eval()) change the base's flags; the caller's encoder is left as it was
        for p, flag in zip(base.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        base.train(was_training)
    return MergeStatistics(
        task=task.name,
        base_hash=pretrained.base_hash,
        parameters=parameters,
        examples=len(inputs),
        activations=activations,
        mode=mode,
        **result,
    )


def _finetuned(pretrained: Pretrained, vector: TaskVector | None) -> nn.Module:
    """The fine-tuned encoder in eval mode, a copy (``apply_to`` refuses a vector of another base)."""
    model = pretrained.trainable_copy() if vector is None else vector.apply_to(pretrained.encoder)
    return model.eval()


def _check_linear_vector(pretrained: Pretrained, vector: TaskVector) -> None:
    """A linear-mode vector's statistics are keyed by the encoder's own names and need its base model."""
    from taskarith.vectors import _target_module

    if _target_module(pretrained.encoder, vector.deltas) is not pretrained.encoder:
        raise TaskArithError(
            f"task vector {shown(vector.task or '?')} is keyed by the names of a part of the encoder; its "
            "linear-mode statistics need the encoder's own parameter names"
        )
    vector.check_base(pretrained.encoder.state_dict())


def _linearized_classifier(
    pretrained: Pretrained, task: Task, vector: TaskVector
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The task's classifier on f_lin at delta = tau, and its delta parameters (keyed by the encoder's names)
    set to require gradients. f_lin references the pre-trained weights and turns their requires_grad off
    (and eval() their training flag): the caller restores both."""
    from taskarith.linearize import Linearized

    linearized = Linearized(pretrained.encoder, dict(vector.deltas)).eval()
    params = {name: delta.requires_grad_(True) for name, delta in linearized.deltas().items()}
    return pretrained.classifier(task, linearized), params
