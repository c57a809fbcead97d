"""Dataless interference regularization: TAK, Kronecker-factored curvature of other tasks' embeddings.

The tau-Jp penalty E_{x~task j} ||J_theta0 f(x) . delta||^2 needs task j's inputs at every step. It is the
quadratic form delta^T G_j delta of the Gauss-Newton matrix G_j = E_x[J^T J] of task j's embeddings f
(squared loss, identity output Hessian). TAK (Porrello et al., ICLR 2026, arXiv 2602.17385; official code
aimagelab/mammoth ``models/tak.py``, ``models/tak_utils/{fisher_kfac,hooks}.py``) has whoever holds task j's
data approximate G_j once, layer by layer, and ship only that. By default this module computes what TAK
publishes; each departure from it that taskarith used before is kept as a named option.

**Function** (``function``). ``"normalized"`` (TAK): the L2-normalized embedding f/||f|| of the pooled
output ``mean_pool(encoder(**batch).last_hidden_state, mask)``, whose Jacobian (I - f^ f^T) J / ||f|| ignores
radial changes, which the cosine head ignores too. ``"unnormalized"``: the pooled output itself. Only the
factors' function changes: the linearized model that fine-tuning trains stays as in the tangent paper.

**Directions.** Each example backpropagates ``mc_samples`` random directions v ~ N(0, I) (TAK's MC-1 by
default: E[v v^T] = I, so the outer products average to J^T J); ``mc_samples=None`` backpropagates every
output coordinate instead (exact, ``hidden`` backward passes). Unlike mammoth, which adds the M samples'
outer products up, they are averaged, so the factors' scale does not depend on M.

**Blocks.** Each trainable tensor gets one block of a block-diagonal G_j:

* Linear layers: a Kronecker product A (input side, with a constant 1 appended when there is a bias) x S
  (output side; TAK's B). This covers every ``nn.Linear`` and every other ``F.linear`` call whose weight is
  one of the encoder's parameters (an ``in_proj_weight`` used functionally, as open_clip's attention does),
  every ``x @ P`` with a parameter matrix P (open_clip's ``visual.proj``: a Linear without bias whose weight
  is P^T), and ``nn.MultiheadAttention``, whose own forward uses the functional path that module hooks never
  see: while factors are computed it runs an equivalent explicit forward (self-attention only), so its
  ``in_proj`` is one Linear with q, k, v rows (TAK rebuilds it as one ``qkv`` Linear too) and ``out_proj`` a
  Linear. Tokens (``tokens``): ``"expand"`` (TAK's hooks): per example, the mean over its real tokens
  (padding excluded; all R tokens of an image) of a a^T, and likewise of g g^T, then the mean over examples:
  mammoth scales both sides by 1/R. It is exact when each example has one token; with R aligned tokens
  before mean pooling a block is about 1/R^2 of the exact one (1/R for unrelated tokens), a scale TAK's
  beta = 500 was tuned with. ``"reduce"`` (Eschenhagen et al., NeurIPS 2023; taskarith before): the token mean
  of a, the token sum of g; exact for a Linear layer followed directly by mean pooling.
* Conv2d layers (``conv``): a Linear layer over output positions, its input the patches ``F.unfold`` would
  extract (channels, then kernel rows and columns: the order of ``weight.reshape(out, -1)``), with the
  module's own padding, or TensorFlow-style "same" padding for subclasses that pad inside ``forward``
  (EfficientNet's ``Conv2dStaticSamePadding``). ``"reduce"`` (the default) as above: exact for a conv
  followed by global pooling. ``"expand"``: TAK's token rule over positions, which is Grosse & Martens' KFC
  (2016) divided by the number of positions P. TAK has no conv layer (its patch conv is not fine-tuned); on
  a CNN, P runs from 12544 to 49 across EfficientNet-Lite0's layers at 224 px, so expand would scale early
  layers' blocks down by up to P^2 against late ones: reduce is the default. A grouped or depthwise conv
  gets one A x S pair per group, stored stacked (groups x k x k, groups x out/groups x out/groups).
* LayerNorm weight and bias, and a vision transformer's class token (``norm_blocks``): ``"full"`` (TAK's
  ffT): the D x D Gram matrix of the exact per-example gradient (summed over tokens), one block for the
  weight and one for the bias, as mammoth does; ``"diagonal"``: its diagonal. The class token is found
  where [class; patches] + positions are summed: the input of ``ln_pre`` (open_clip), of ``norm_pre``
  (timm), or the output of Hugging Face's ``CLIPVisionEmbeddings``.
* Diagonals of exact per-example gradients: BatchNorm (on its running statistics: the encoder runs in
  eval mode), a bare positional embedding (open_clip's ``positional_embedding``, timm's ``pos_embed``:
  tokens x width, too large for a full block) and ``nn.Embedding`` tables, which keep only the rows the
  task's inputs touched (so the 30522 x 384 word table costs a few MB, not 47).

Parameters that a hooked forward reached but the output does not depend on (a BERT pooler under mean
pooling) have zero curvature and are recorded as such; anything else is not penalized:
:func:`uncovered_parameters` names it, and computing factors warns.

**Penalty** (:func:`kfac_penalty`), as mammoth's ``penalty_weight``: per Linear or conv block
tr(S dW A dW^T), per full block d^T F d, per diagonal sum(D d^2), with TAK's scalers: x ``norm_scale``
(10) on the LayerNorm and class-token blocks and x ``projection_scale`` (0.1) on the final projection
(:data:`PROJECTIONS`). The published strength beta = 500 multiplies all of it (the caller's lambda).

**Merging** (:func:`merge_factors`), TAK's Eq. 8, O(1) in the number of tasks: the tasks' output sides
are summed unweighted and their input sides averaged with weights lambda_t = n_t / N (examples), i.e.
G ~ (sum_t S_t) x (sum_t lambda_t A_t), as mammoth's ``begin_task`` does; mammoth pools ffT (full blocks)
as a lambda_t-weighted mean (the Gram of the pooled examples), and so are all full and diagonal blocks
here. A merged penalty thus grows with the number of tasks. ``rule="average"`` averages the output sides
too (taskarith before: the penalty is then about 1/T of TAK's). Files keep per-task example counts, so
merging merged files gives what merging their tasks at once gives.

**Compression** (:func:`compress_factors`, TAK's storage study): block-diagonal factors ("block-k") or
truncated eigendecompositions, saved as ordinary factor files.

Files (format ``taskarith.kfac/2``) hold A/<layer>, S/<layer>, gram/<parameter>, diag/<parameter> and
rows/<parameter> (compressed factors as <key>:blocks and <key>:size, or <key>:values and <key>:vectors),
with the recipe, the merge rule, the compression and per-task example counts and directions in the
metadata. Files of format ``taskarith.kfac/1`` (unnormalized, reduce, diagonal, averaged) are refused.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from taskarith.display import quoted
from taskarith.errors import TaskArithError
from taskarith.io import load_tensors, save_tensors
from taskarith.models.zero_shot import mean_pool

if TYPE_CHECKING:
    from taskarith.data import Task
    from taskarith.models import Pretrained

FORMAT = "taskarith.kfac/2"
_OLD_FORMATS = ("taskarith.kfac/1",)
EXACT = "exact"

FUNCTIONS = ("normalized", "unnormalized")
TOKEN_RULES = ("expand", "reduce")
CONV_RULES = ("reduce", "expand")
NORM_BLOCKS = ("full", "diagonal")
MERGE_RULES = ("sum", "average")
COMPRESSIONS = ("block", "eigen")

# What counts as the final projection (TAK's lin_proj, scaled by kfac_penalty's projection_scale), per
# model family; text encoders (BERT, MiniLM) and CNNs (EfficientNet, timm) have none.
PROJECTIONS = {
    "Hugging Face CLIP": "the Linear layer named visual_projection (ClipImageEncoder.visual_projection)",
    "open_clip": "the bare proj matrix of the vision tower (visual.proj, used as pooled @ proj)",
}
# Kinds of blocks that kfac_penalty's scalers apply to.
_NORM_KINDS = frozenset({"layer-norm", "class-token"})
_PROJECTION_KIND = "projection"

# (class token, positional embedding, module whose input is [class; patches] + positions; None: the
# owner's own output), for the vision transformers whose class token is a bare nn.Parameter.
_TOKEN_SITES: tuple[tuple[str, str | None, str | None], ...] = (
    ("class_embedding", "positional_embedding", "ln_pre"),  # open_clip VisionTransformer
    ("cls_token", "pos_embed", "norm_pre"),  # timm VisionTransformer
    ("class_embedding", None, None),  # Hugging Face CLIPVisionEmbeddings (positions: an nn.Embedding)
)

_TABLES = ("A", "S", "gram", "diag", "rows")
_REQUIRED_METADATA = ("format", "tasks", "examples", "base_hash")

Tensors = dict[str, torch.Tensor]


# -------------------------------------------------------------------------------------------------
# Compressed symmetric factors


@dataclass(frozen=True, eq=False)
class BlockDiagonal:
    """A symmetric ``size`` x ``size`` matrix that is zero outside ``blocks.shape[0]`` diagonal blocks of
    ``blocks.shape[1]`` rows (the last one zero-padded where they do not divide ``size``)."""

    blocks: torch.Tensor
    size: int

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """x @ M for x of shape (..., size)."""
        count, width = self.blocks.shape[:2]
        padded = F.pad(x, (0, count * width - self.size)).reshape(*x.shape[:-1], count, width)
        return torch.einsum("...kb,kbc->...kc", padded, self.blocks).reshape(*x.shape[:-1], -1)[..., : self.size]

    def dense(self) -> torch.Tensor:
        return torch.block_diag(*self.blocks.unbind(0))[: self.size, : self.size]


@dataclass(frozen=True, eq=False)
class LowRank:
    """vectors @ diag(values) @ vectors^T: a truncated eigendecomposition (a weighted concatenation of
    several after merging: the vectors need not be orthonormal)."""

    values: torch.Tensor  # (rank,)
    vectors: torch.Tensor  # (size, rank)

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    def times(self, x: torch.Tensor) -> torch.Tensor:
        return ((x @ self.vectors) * self.values) @ self.vectors.T

    def dense(self) -> torch.Tensor:
        return (self.vectors * self.values) @ self.vectors.T


Factor = torch.Tensor | BlockDiagonal | LowRank


def _times(x: torch.Tensor, factor: Factor) -> torch.Tensor:
    return x @ factor if isinstance(factor, torch.Tensor) else factor.times(x)


def _convert(factor: Factor, fn: Callable[[torch.Tensor], torch.Tensor]) -> Factor:
    if isinstance(factor, BlockDiagonal):
        return BlockDiagonal(fn(factor.blocks), factor.size)
    if isinstance(factor, LowRank):
        return LowRank(fn(factor.values), fn(factor.vectors))
    return fn(factor)


def _nbytes(factor: Factor) -> int:
    tensors = {BlockDiagonal: lambda f: [f.blocks], LowRank: lambda f: [f.values, f.vectors]}.get(
        type(factor), lambda f: [f]
    )(factor)
    return sum(t.numel() * t.element_size() for t in tensors)


def _size(factor: Factor) -> int:
    return factor.shape[-1] if isinstance(factor, torch.Tensor) else factor.size


def _layer_entry(value: Any) -> tuple[str, str | None, bool]:
    """A factor file's ``layers`` entry: [weight name, bias name or null, transposed]; anything else is refused."""
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str)):
        raise ValueError("a layers entry must be [weight, bias, transposed]")
    if not (value[1] is None or isinstance(value[1], str)) or not isinstance(value[2], bool):
        raise ValueError("a layers entry must be [weight, bias, transposed]")
    return value[0], value[1], value[2]


def _weighted_sum(parts: Sequence[tuple[float, Factor]], name: str) -> Factor:
    """sum_i w_i M_i for factors of one form (dense, block diagonal alike, or low rank)."""
    first = parts[0][1]
    if isinstance(first, BlockDiagonal):
        blocks = [(w, f) for w, f in parts if isinstance(f, BlockDiagonal)]
        if len(blocks) != len(parts) or any(
            f.blocks.shape != first.blocks.shape or f.size != first.size for _, f in blocks
        ):
            raise TaskArithError(f"K-FAC factors of '{name}' are block diagonal with different blocks")
        return BlockDiagonal(_added([w * f.blocks.float() for w, f in blocks]), first.size)
    if isinstance(first, LowRank):
        ranks = [(w, f) for w, f in parts if isinstance(f, LowRank)]
        if len(ranks) != len(parts) or any(f.size != first.size for _, f in ranks):
            raise TaskArithError(f"K-FAC factors of '{name}' are low rank of different sizes")
        values = torch.cat([w * f.values.float() for w, f in ranks])
        vectors = torch.cat([f.vectors.float() for _, f in ranks], dim=1)
        merged = LowRank(values, vectors)
        # As exact, and no larger, once the ranks add up to the size.
        return merged.dense() if values.numel() >= merged.size else merged
    dense = [(w, f) for w, f in parts if isinstance(f, torch.Tensor)]
    shapes = {tuple(f.shape) if isinstance(f, torch.Tensor) else None for _, f in parts}
    if len(dense) != len(parts) or len(shapes) > 1:
        raise TaskArithError(f"K-FAC factors of '{name}' have different shapes or forms {sorted(map(str, shapes))}")
    return _added([w * f.float() for w, f in dense])


def _added(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """The terms added in order, one at a time (no stacked copy of all of them)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


# -------------------------------------------------------------------------------------------------
# Factors


@dataclass(frozen=True, eq=False)
class KFACFactors:
    """Per-block curvature of some tasks' embeddings at the pre-trained weights.

    ``A[layer]`` ((in + 1) x (in + 1) with a bias) and ``S[layer]`` (out x out) make the Kronecker block of
    a Linear or conv layer, whose parameters ``layers[layer]`` names: (weight, bias or None, transposed);
    a grouped conv has one block per group, stacked: A (groups x k x k), S (groups x out/g x out/g).
    ``gram[param]`` is a full Gram block (LayerNorm, class token), ``diag[param]`` a Gauss-Newton diagonal,
    restricted to ``rows[param]`` (sorted row indices) for embedding tables. ``kinds`` says what each block
    is ("layer", "projection", "layer-norm", "class-token", "position", "batch-norm", "embedding") and
    ``zero`` lists parameters with zero curvature. ``examples`` and ``sampling`` hold, per task, the number
    of examples and how J's rows were sampled ("exact" or "mc:<samples per example>").
    """

    A: dict[str, Factor]
    S: dict[str, Factor]
    examples: dict[str, int]
    base_hash: str
    sampling: dict[str, str] = field(default_factory=dict)
    gram: dict[str, Factor] = field(default_factory=dict)
    diag: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: dict[str, tuple[str, str | None, bool]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    zero: tuple[str, ...] = ()
    function: str = "normalized"
    tokens: str = "expand"
    conv: str = "reduce"
    norm_blocks: str = "full"
    merge: str = "none"  # "none" (one task), or the rule that merged the tasks
    compression: str = "none"  # "none", "block:<blocks>" or "eigen:<rank>"

    def __post_init__(self) -> None:
        for name in ("A", "S", "gram", "diag", "rows", "kinds", "examples", "sampling"):
            object.__setattr__(self, name, dict(getattr(self, name)))
        object.__setattr__(self, "zero", tuple(self.zero))
        layers: dict[str, tuple[str, str | None, bool]] = {
            layer: (f"{layer}.weight", f"{layer}.bias", False) for layer in self.A
        }
        layers.update({k: (v[0], v[1], bool(v[2])) for k, v in self.layers.items()})
        object.__setattr__(self, "layers", layers)
        for option, value, allowed in (
            ("function", self.function, FUNCTIONS),
            ("tokens", self.tokens, TOKEN_RULES),
            ("conv", self.conv, CONV_RULES),
            ("norm_blocks", self.norm_blocks, NORM_BLOCKS),
            ("merge", self.merge, ("none", *MERGE_RULES)),
        ):
            if value not in allowed:
                raise TaskArithError(f"K-FAC option {option}={value!r} is not one of {', '.join(allowed)}")
        if set(self.A) != set(self.S):
            raise TaskArithError(
                f"K-FAC factors need both A and S for every layer; unpaired: {sorted(set(self.A) ^ set(self.S))[:5]}"
            )
        for layer in self.A:
            a, s = self.A[layer], self.S[layer]
            if isinstance(a, torch.Tensor) and isinstance(s, torch.Tensor):
                stacked = a.dim() == s.dim() and a.dim() in (2, 3) and a.shape[:-2] == s.shape[:-2]
                if not stacked or a.shape[-1] != a.shape[-2] or s.shape[-1] != s.shape[-2]:
                    raise TaskArithError(
                        f"K-FAC factors of layer '{layer}' are neither square matrices nor stacks "
                        f"of them, one per group (A {tuple(a.shape)}, S {tuple(s.shape)})"
                    )
        for name, block in self.gram.items():
            if isinstance(block, torch.Tensor) and (block.dim() != 2 or block.shape[0] != block.shape[1]):
                raise TaskArithError(f"K-FAC Gram block of '{name}' is not a square matrix ({tuple(block.shape)})")
        for name, index in self.rows.items():
            if name not in self.diag or index.dim() != 1 or self.diag[name].shape[0] != index.shape[0]:
                raise TaskArithError(f"K-FAC diagonal of '{name}' does not match its row index")
        if not self.examples or any(n < 1 for n in self.examples.values()):
            raise TaskArithError(f"K-FAC factors need at least one example per task, not {self.examples}")

    # -- what they describe ------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.examples)

    @property
    def num_examples(self) -> int:
        return sum(self.examples.values())

    @property
    def directions(self) -> str:
        """How J's rows were sampled: "exact", "mc:<samples per example>", or "mixed" across tasks."""
        kinds = set(self.sampling.values()) or {EXACT}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def covered_parameters(self) -> frozenset[str]:
        """Every parameter some block penalizes, or that has zero curvature."""
        names = {p for weight, bias, _ in self.layers.values() for p in (weight, bias) if p}
        return frozenset(names | set(self.gram) | set(self.diag) | set(self.zero))

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (atomically) with the factors and what made them."""
        tensors: Tensors = {}
        for table in _TABLES:
            for name, value in getattr(self, table).items():
                _store(tensors, f"{table}/{name}", value)
        metadata = {
            "format": FORMAT,
            "tasks": json.dumps(list(self.tasks)),
            "examples": json.dumps(self.examples),
            "sampling": json.dumps(self.sampling),
            "base_hash": self.base_hash,
            "num_examples": str(self.num_examples),
            "function": self.function,
            "tokens": self.tokens,
            "conv": self.conv,
            "norm_blocks": self.norm_blocks,
            "merge": self.merge,
            "compression": self.compression,
            "layers": json.dumps({k: list(v) for k, v in self.layers.items()}),
            "kinds": json.dumps(self.kinds),
            "zero": json.dumps(list(self.zero)),
        }
        save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> KFACFactors:
        """Read factors written by :meth:`save`; anything else is refused with the file named."""
        path = Path(path)
        tensors, metadata = load_tensors(path)
        found = metadata.get("format")
        if found in _OLD_FORMATS:
            raise TaskArithError(
                f"{path}: K-FAC factor file of format {found!r}, made before taskarith adopted "
                f"TAK's published factors (normalized embedding, KFAC-expand, full LayerNorm "
                f"blocks, Eq. 8 merging); recompute it with `taskarith kfac` (format {FORMAT!r})"
            )
        if found != FORMAT:
            raise TaskArithError(f"{path}: not a K-FAC factor file (format {found!r}, expected {FORMAT!r})")
        missing = [key for key in _REQUIRED_METADATA if key not in metadata]
        if missing:
            raise TaskArithError(f"{path}: K-FAC factor file lacks metadata {missing}")
        try:
            examples = {str(k): int(v) for k, v in json.loads(metadata["examples"]).items()}
            sampling = {str(k): str(v) for k, v in json.loads(metadata.get("sampling", "{}")).items()}
            layers = {str(k): _layer_entry(v) for k, v in json.loads(metadata.get("layers", "{}")).items()}
            kinds = {str(k): str(v) for k, v in json.loads(metadata.get("kinds", "{}")).items()}
            zero = [str(name) for name in json.loads(metadata.get("zero", "[]"))]
            tasks = json.loads(metadata["tasks"])
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError):
            raise TaskArithError(
                f"{path}: unreadable K-FAC metadata (examples, sampling, layers, kinds or zero)"
            ) from None
        if list(examples) != tasks:
            raise TaskArithError(
                f"{path}: K-FAC metadata 'tasks' {quoted(tasks)} does not match 'examples' {quoted(list(examples))}"
            )
        _check_loaded_tensors(path, tensors)
        tables: dict[str, dict[str, Any]] = {table: {} for table in _TABLES}
        for key, value in tensors.items():
            table, sep, rest = key.partition("/")
            if table not in tables or not sep:
                raise TaskArithError(f"{path}: unexpected tensor '{key}' in a K-FAC factor file")
            tables[table][rest] = value
        if not tables["A"] and not tables["diag"] and not tables["gram"]:
            raise TaskArithError(f"{path}: K-FAC factor file holds no factors")
        try:
            unpacked = {table: _unpack(tables[table], table) for table in ("A", "S", "gram")}
            return cls(
                A=unpacked["A"],
                S=unpacked["S"],
                gram=unpacked["gram"],
                diag=tables["diag"],
                rows=tables["rows"],
                examples=examples,
                sampling=sampling,
                base_hash=metadata["base_hash"],
                layers=layers,
                kinds=kinds,
                zero=tuple(zero),
                function=metadata.get("function", ""),
                tokens=metadata.get("tokens", ""),
                conv=metadata.get("conv", ""),
                norm_blocks=metadata.get("norm_blocks", ""),
                merge=metadata.get("merge", ""),
                compression=metadata.get("compression", "none"),
            )
        except TaskArithError as exc:
            raise TaskArithError(f"{path}: {exc}") from None
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise TaskArithError(f"{path}: malformed K-FAC factor tensors ({exc})") from None

    # -- helpers -------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> KFACFactors:
        """The same factors on ``device`` (the penalty then costs no transfer per step)."""

        def move(table: Mapping[str, Any]) -> dict[str, Any]:
            return {k: _convert(v, lambda t: t.to(device)) for k, v in table.items()}

        return replace(
            self, A=move(self.A), S=move(self.S), gram=move(self.gram), diag=move(self.diag), rows=move(self.rows)
        )

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per Kronecker-factored layer (A and S) and per full or diagonal block."""
        sizes = {layer: _nbytes(self.A[layer]) + _nbytes(self.S[layer]) for layer in self.A}
        sizes.update({name: _nbytes(value) for name, value in self.gram.items()})
        for name, value in self.diag.items():
            sizes[name] = _nbytes(value) + (_nbytes(self.rows[name]) if name in self.rows else 0)
        return sizes

    def __repr__(self) -> str:
        total = sum(self.memory_bytes().values()) / 2**20
        return (
            f"KFACFactors(tasks={self.tasks!r}, layers={len(self.A)}, full={len(self.gram)}, "
            f"diagonal={len(self.diag)}, examples={self.num_examples}, directions={self.directions!r}, "
            f"{self.function}/{self.tokens}/{self.norm_blocks}, merge={self.merge!r}, "
            f"compression={self.compression!r}, {total:.1f} MiB)"
        )


def _store(tensors: Tensors, key: str, value: Factor) -> None:
    if isinstance(value, BlockDiagonal):
        tensors[f"{key}:blocks"] = value.blocks
        tensors[f"{key}:size"] = torch.tensor(value.size, dtype=torch.int64)
    elif isinstance(value, LowRank):
        tensors[f"{key}:values"] = value.values
        tensors[f"{key}:vectors"] = value.vectors
    else:
        tensors[key] = value


def _check_loaded_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse factor files whose curvature is not finite or whose row indices are not valid table rows: a NaN
    factor poisons the penalty of every step, and a negative index silently picks rows from the table's end."""
    for key, value in tensors.items():
        if key.startswith("rows/"):
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.dim() != 1:
                raise TaskArithError(f"{path}: K-FAC row index {quoted(key)} is not a list of integers")
            if value.numel() and (int(value.min()) < 0 or not bool((value[1:] > value[:-1]).all())):
                raise TaskArithError(
                    f"{path}: K-FAC row index {quoted(key)} is not sorted, distinct, non-negative rows"
                )
        elif key.endswith(":size"):
            if value.numel() != 1 or value.is_floating_point() or int(value) < 1:
                raise TaskArithError(f"{path}: K-FAC block size {quoted(key)} is not a positive integer")
        elif not value.is_floating_point() or value.dtype not in (
            torch.float16,
            torch.bfloat16,
            torch.float32,
            torch.float64,
        ):
            raise TaskArithError(f"{path}: K-FAC factor {quoted(key)} is {value.dtype}, not a float tensor")
        elif not bool(torch.isfinite(value).all()):
            raise TaskArithError(f"{path}: K-FAC factor {quoted(key)} contains NaN or Inf")


def _unpack(table: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Factor]:
    """Dense tensors as they are; <name>:blocks + <name>:size and <name>:values + <name>:vectors rebuilt."""
    out: dict[str, Factor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in table.items():
        name, sep, suffix = key.rpartition(":")
        if sep and suffix in ("blocks", "size", "values", "vectors"):
            parts.setdefault(name, {})[suffix] = value
        else:
            out[key] = value
    for name, got in parts.items():
        if set(got) == {"blocks", "size"} and got["blocks"].dim() == 3:
            out[name] = BlockDiagonal(got["blocks"], int(got["size"]))
        elif set(got) == {"values", "vectors"} and got["vectors"].dim() == 2 and got["values"].dim() == 1:
            out[name] = LowRank(got["values"], got["vectors"])
        else:
            raise TaskArithError(f"compressed K-FAC factor '{prefix}/{name}' is incomplete ({sorted(got)})")
    return out


def uncovered_parameters(encoder: nn.Module, factors: KFACFactors) -> list[str]:
    """The encoder's parameters (``named_parameters`` order) that no block of ``factors`` penalizes and that
    are not known to have zero curvature: fine-tuning changes them freely. Empty when all are covered."""
    covered = factors.covered_parameters()
    return [name for name, _ in encoder.named_parameters() if name not in covered]


# -------------------------------------------------------------------------------------------------
# Computing factors


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _FunctionalLinear(TorchFunctionMode):
    """Sees every ``F.linear(x, W, b)`` and ``x @ W`` whose W is one of the encoder's parameters, so a weight
    used without its module (or with none) still gets a Kronecker block."""

    def __init__(self, collector: _Collector) -> None:
        super().__init__()
        self.collector = collector

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return self.collector.linear_call(x, weight, bias, out, transposed=False)
        if func in _MATMULS and len(args) == 2 and not kwargs:
            return self.collector.linear_call(args[0], args[1], None, out, transposed=True)
        return out


class _Collector:
    """Hooks that accumulate the factors during forward/backward passes of the encoder.

    The pre-trained weights never require grad. Instead the first hooked outputs on the path from the
    input (embedding lookups, or the first Linear/Conv2d layers of a model without embeddings, whose
    input is token states or pixels that need no grad) are replaced by detached copies that do ("roots");
    backpropagating to the roots reaches every hooked output and computes no weight gradient at all.
    """

    def __init__(self, encoder: nn.Module, *, tokens: str, conv: str, norm_blocks: str) -> None:
        self.encoder = encoder
        self.tokens, self.conv, self.norm_blocks = tokens, conv, norm_blocks
        self.params = {id(p): (name, p) for name, p in encoder.named_parameters()}
        self.roots: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.batch = 0
        self.weight = 1.0  # of the current backward pass (1 / directions per example)
        self.sums: Tensors = {}
        self.blocks: dict[str, list[str]] = {}  # block -> the parameters it covers
        self.layers: dict[str, tuple[str, str | None, bool]] = {}
        self.kinds: dict[str, str] = {}
        self.forwarded: set[str] = set()
        self.fired: set[str] = set()
        self.embeddings: set[str] = set()
        self.handles: list[Any] = []
        self.patched: list[nn.Module] = []
        # nn.MultiheadAttention defaults to (tokens, batch, width); the rest of such a model follows suit.
        self.sequence_first = any(isinstance(m, nn.MultiheadAttention) and not m.batch_first for m in encoder.modules())
        supported = False
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear):
                supported = True  # seen by _FunctionalLinear, through its F.linear
            elif isinstance(module, nn.MultiheadAttention):
                supported |= self._patch_attention(module)
            elif isinstance(module, nn.Conv2d):
                supported = True
                self.handles.append(module.register_forward_hook(self._conv_hook(name)))
            elif isinstance(module, nn.LayerNorm) and (module.weight is not None or module.bias is not None):
                supported = True
                self.handles.append(module.register_forward_hook(self._layer_norm_hook(name)))
            elif isinstance(module, _BATCH_NORMS) and module.weight is not None and _plain_batch_norm(module):
                if module.running_mean is None or module.running_var is None:
                    self.close()
                    raise TaskArithError(
                        f"BatchNorm layer '{name}' keeps no running statistics, so even in eval "
                        f"mode it normalizes with batch statistics and couples the examples; "
                        f"K-FAC needs per-example curvature (track_running_stats=True)"
                    )
                supported = True
                self.handles.append(module.register_forward_hook(self._batch_norm_hook(name)))
            elif isinstance(module, nn.Embedding):
                supported = True
                self.handles.append(module.register_forward_hook(self._embedding_hook(name)))
            self._token_site(name, module)
        if not supported:
            self.close()
            raise TaskArithError(
                "K-FAC needs an encoder with at least one supported layer (Linear, Conv2d, "
                "LayerNorm, BatchNorm, Embedding, MultiheadAttention); this one has none"
            )

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.patched:
            del module.forward
        self.patched.clear()

    @contextmanager
    def forward(self, batch: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """While the encoder runs on ``batch``: its size and mask known, functional Linear calls seen."""
        self.mask = batch.get("attention_mask")
        self.batch = next(iter(batch.values())).shape[0] if self.mask is None else self.mask.shape[0]
        self.roots = []
        with _FunctionalLinear(self):
            yield

    # -- bookkeeping ----------------------------------------------------------------------------

    def _add(self, key: str, value: torch.Tensor) -> None:
        if key not in self.sums:
            self.sums[key] = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        self.sums[key].add_(value.to(torch.float64))

    def _block(self, key: str, params: Sequence[str | None], kind: str) -> None:
        self.blocks[key] = [p for p in params if p]
        self.kinds[key] = kind
        self.forwarded.add(key)

    def _name(self, param: Any) -> str | None:
        entry = self.params.get(id(param))
        return entry[0] if entry is not None and entry[1] is param else None

    def _track(self, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:
            root = output.detach().requires_grad_(True)
            self.roots.append(root)
            # The model gets a copy, not the leaf itself: an in-place activation right after the layer
            # (conv -> ReLU(inplace=True)) is an error on a leaf that requires grad.
            output = root.clone()
        return output

    def _examples(self, name: str, x: torch.Tensor, features: int = 1) -> torch.Tensor:
        """``x`` as (batch, tokens, *feature dims): the batch first, any shared dimensions flattened."""
        batch, feature_shape = self.batch, x.shape[x.dim() - features :]
        lead = x.shape[: x.dim() - features]
        first = len(lead) >= 1 and lead[0] == batch
        second = len(lead) >= 2 and lead[1] == batch
        if first and second:
            if x.dim() - features == 2 and self.sequence_first:
                raise TaskArithError(
                    f"K-FAC cannot tell the batch dimension of the input {tuple(x.shape)} of '{name}': "
                    f"the batch is as long as the sequence; compute with another batch_size"
                )
            second = False
        if first:
            return x.reshape(batch, -1, *feature_shape)
        if second and len(lead) == 2:
            return x.transpose(0, 1).reshape(batch, -1, *feature_shape)
        raise TaskArithError(
            f"K-FAC expects the batch ({batch}) first (or second, after the tokens) in the input "
            f"of '{name}', got shape {tuple(x.shape)}"
        )

    def _token_weights(self, tokens: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, tokens): 1 / (real tokens) on each real token, 0 on padding; 1 / tokens without a mask."""
        mask = self.mask
        if mask is not None and tuple(mask.shape) == (self.batch, tokens):
            real = mask.to(like.dtype)
            return real / real.sum(dim=1, keepdim=True).clamp_min(1.0)
        return like.new_full((self.batch, tokens), 1.0 / tokens)

    def _add_outer(self, key: str, x: torch.Tensor, weights: torch.Tensor | None, scale: float = 1.0) -> None:
        """Adds sum_n [sum_t w_nt] x x^T for x of shape (batch, tokens, d) (or (batch, groups, d, positions) via
        _add_grouped); ``weights`` None: x is already one row per example."""
        if weights is not None:
            x = (x * weights.sqrt().unsqueeze(-1)).reshape(-1, x.shape[-1])
        self._add(key, (x.T @ x) * scale)

    # -- Linear layers, functional or not -------------------------------------------------------

    def linear_call(self, x: Any, weight: Any, bias: Any, out: Any, *, transposed: bool) -> Any:
        name = self._name(weight)
        if name is None or not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor) or weight.dim() != 2:
            return out
        if transposed and (x.dim() < 2 or x.shape[-1] != weight.shape[0]):
            return out
        bias_name = self._name(bias) if bias is not None else None
        if name.endswith(".weight"):
            key = name[: -len(".weight")]
        elif name.endswith("_weight"):
            key = name[: -len("_weight")]
        else:
            key = name
        self.layers[key] = (name, bias_name, transposed)
        kind = _PROJECTION_KIND if _is_projection(key) else "layer"
        self._block(key, (name, bias_name), kind)
        return self._linear_block(key, x, out, bias_name is not None)

    def _linear_block(self, key: str, x: torch.Tensor, output: torch.Tensor, bias: bool) -> torch.Tensor:
        with torch.no_grad():
            a = self._examples(key, x.detach().float())
            if bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            weights = self._token_weights(a.shape[1], a)
            if self.tokens == "reduce":
                self._add_outer(f"A/{key}", torch.einsum("nt,nti->ni", weights, a), None)
            else:
                self._add_outer(f"A/{key}", a, weights)
        output = self._track(output)

        def on_grad(grad: torch.Tensor) -> None:
            with torch.no_grad():
                g = self._examples(key, grad.detach().float())
                if self.tokens == "reduce":
                    self._add_outer(f"S/{key}", g.sum(dim=1), None, self.weight)
                else:
                    self._add_outer(f"S/{key}", g, weights, self.weight)
            self.fired.add(key)

        output.register_hook(on_grad)
        return output

    def _patch_attention(self, module: nn.MultiheadAttention) -> bool:
        """Runs ``module`` through an explicit forward whose projections are F.linear calls: in_proj (q, k, v
        rows of one Linear) and out_proj. Only self-attention with packed weights and no extra key/value."""
        if (
            not module._qkv_same_embed_dim
            or module.in_proj_weight is None
            or module.bias_k is not None
            or module.add_zero_attn
        ):
            return False
        module.forward = _explicit_attention(module, module.forward)  # type: ignore[method-assign]  # on purpose
        self.patched.append(module)
        return True

    # -- convolutions ---------------------------------------------------------------------------

    def _conv_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            groups, bias = module.groups, module.bias is not None
            x = inputs[0].detach().float()
            if x.dim() != 4 or x.shape[0] != self.batch:
                raise TaskArithError(
                    f"Conv2d layer '{name}' got input of shape {tuple(x.shape)}; K-FAC expects "
                    f"(batch, channels, height, width) for a batch of {self.batch}"
                )
            out_size = tuple(output.shape[-2:])
            positions = math.prod(out_size)
            with torch.no_grad():
                if self.conv == "reduce":
                    a = _mean_patches(name, module, x, out_size).reshape(x.shape[0], groups, -1)
                    if bias:
                        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
                    self._add(f"A/{name}", _squeeze(torch.einsum("bgi,bgj->gij", a, a), groups))
                else:
                    self._add(f"A/{name}", _squeeze(_patch_gram(name, module, x, out_size, bias), groups))
            self.layers[name] = (
                self._name(module.weight) or f"{name}.weight",
                (self._name(module.bias) or f"{name}.bias") if bias else None,
                False,
            )
            self._block(name, self.layers[name][:2], "layer")
            output = self._track(output)

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.detach().float().reshape(grad.shape[0], groups, -1, positions)
                    if self.conv == "reduce":
                        g = g.sum(dim=-1)
                        gram = torch.einsum("bgi,bgj->gij", g, g)
                    else:
                        gram = torch.einsum("bgip,bgjp->gij", g, g) / positions
                    self._add(f"S/{name}", _squeeze(gram, groups) * self.weight)
                self.fired.add(name)

            output.register_hook(on_grad)
            return output

        return hook

    # -- full and diagonal blocks ---------------------------------------------------------------

    def _per_example_block(self, key: str, per_example: torch.Tensor, full: bool) -> None:
        """Adds the Gram matrix (or its diagonal) of per-example gradients (batch, *shape) of one parameter."""
        flat = per_example.reshape(per_example.shape[0], -1)
        if full:
            self._add(f"gram/{key}", (flat.T @ flat) * self.weight)
        else:
            self._add(f"diag/{key}", flat.pow(2).sum(dim=0).reshape(per_example.shape[1:]) * self.weight)
        self.fired.add(key)

    def _layer_norm_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.LayerNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            shape = tuple(module.normalized_shape)
            with torch.no_grad():
                normalized = F.layer_norm(inputs[0].detach().float(), shape, eps=module.eps)
            weight, bias = self._name(module.weight), self._name(module.bias)
            full = self.norm_blocks == "full"
            for param in (weight, bias):
                if param:
                    self._block(param, (param,), "layer-norm")
            output = self._track(output)

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.detach().float()
                    # Per-example gradients: out = x_hat * weight + bias, summed over tokens.
                    if weight:
                        self._per_example_block(weight, self._examples(name, g * normalized, len(shape)).sum(1), full)
                    if bias:
                        self._per_example_block(bias, self._examples(name, g, len(shape)).sum(1), full)

            output.register_hook(on_grad)
            return output

        return hook

    def _batch_norm_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(
            module: nn.modules.batchnorm._BatchNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            x = inputs[0].detach().float()
            if x.dim() < 2 or x.shape[0] != self.batch:
                raise TaskArithError(
                    f"BatchNorm layer '{name}' sees input of shape {tuple(x.shape)} for a batch of "
                    f"{self.batch}; per-example curvature needs the batch dimension first"
                )
            assert module.running_mean is not None and module.running_var is not None
            channels = (1, -1) + (1,) * (x.dim() - 2)
            with torch.no_grad():
                # Eval mode: the running statistics, not the batch's, so each example is normalized on its own.
                mean = module.running_mean.float().view(channels)
                normalized = (x - mean) * torch.rsqrt(module.running_var.float().view(channels) + module.eps)
            weight, bias = self._name(module.weight), self._name(module.bias)
            for param in (weight, bias):
                if param:
                    self._block(param, (param,), "batch-norm")
            output = self._track(output)
            positions = tuple(range(2, x.dim()))

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.detach().float()
                    # Per-example gradients: out = x_hat * weight + bias per channel, summed over positions.
                    if weight:
                        per = (g * normalized).sum(dim=positions) if positions else g * normalized
                        self._per_example_block(weight, per, full=False)
                    if bias:
                        self._per_example_block(bias, g.sum(dim=positions) if positions else g, full=False)

            output.register_hook(on_grad)
            return output

        return hook

    def _embedding_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Embedding, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            ids = inputs[0]
            batch = self.batch
            if output.shape[0] == 1 and batch > 1:
                # Position ids come as one broadcast row; per-example gradients need the batch dimension.
                output = output.expand(batch, *output.shape[1:])
                ids = ids.expand(batch, *ids.shape[1:])
            param = self._name(module.weight) or f"{name}.weight"
            self._block(param, (param,), "embedding")
            self.embeddings.add(param)
            output = self._track(output)
            ids = ids.detach()

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.detach().float().reshape(-1, grad.shape[-1])
                    per_row = ids[0].numel()
                    example = torch.arange(ids.shape[0], device=g.device).repeat_interleave(per_row)
                    # A row's per-example gradient sums over the tokens of that example that used it.
                    keys = example * module.num_embeddings + ids.reshape(-1)
                    unique, inverse = torch.unique(keys, return_inverse=True)
                    per_example = torch.zeros(unique.shape[0], g.shape[1], device=g.device).index_add_(0, inverse, g)
                    key = f"diag/{param}"
                    if key not in self.sums:
                        # float32: a float64 word table would double the 47 MB this already takes on MiniLM.
                        self.sums[key] = torch.zeros(module.num_embeddings, g.shape[1], device=g.device)
                    self.sums[key].index_add_(0, unique % module.num_embeddings, per_example.pow(2) * self.weight)
                self.fired.add(param)

            output.register_hook(on_grad)
            return output

        return hook

    def _token_site(self, name: str, module: nn.Module) -> None:
        """A bare class token (and positional embedding) on ``module``: blocks from the gradient of the summed
        tokens [class; patches] + positions, where they enter the transformer (see _TOKEN_SITES)."""
        for cls_attr, pos_attr, site_attr in _TOKEN_SITES:
            cls = module._parameters.get(cls_attr)
            site = module if site_attr is None else getattr(module, site_attr, None)
            if cls is None or not isinstance(site, nn.Module):
                continue
            pos = module._parameters.get(pos_attr) if pos_attr else None
            prefix = f"{name}." if name else ""
            cls_name, pos_name = prefix + cls_attr, (prefix + pos_attr if pos is not None and pos_attr else None)

            def on_tokens(
                x: torch.Tensor,
                cls: torch.Tensor = cls,
                pos: torch.Tensor | None = pos,
                cls_name: str = cls_name,
                pos_name: str | None = pos_name,
            ) -> None:
                if x.dim() != 3 or x.shape[0] != self.batch or cls.numel() != x.shape[-1] or not x.requires_grad:
                    return
                width = x.shape[-1]
                tokens = pos.numel() // width if pos is not None and pos.numel() % width == 0 else 0
                if not 0 < tokens <= x.shape[1]:
                    tokens = 0
                self._block(cls_name, (cls_name,), "class-token")
                if tokens:
                    self._block(pos_name, (pos_name,), "position")  # type: ignore[arg-type]

                def on_grad(grad: torch.Tensor) -> None:
                    with torch.no_grad():
                        g = grad.detach().float()
                        self._per_example_block(cls_name, g[:, 0], self.norm_blocks == "full")
                        if tokens:  # in the parameter's own shape: timm's pos_embed is (1, tokens, width)
                            per_position = g[:, -tokens:].reshape(g.shape[0], *pos.shape)  # type: ignore[union-attr]
                            self._per_example_block(pos_name, per_position, full=False)  # type: ignore[arg-type]

                x.register_hook(on_grad)

            if site_attr is None:
                self.handles.append(site.register_forward_hook(lambda m, i, out, f=on_tokens: f(out)))
            else:
                self.handles.append(site.register_forward_pre_hook(lambda m, i, f=on_tokens: f(i[0])))
            return

    # -- results --------------------------------------------------------------------------------

    def factors(self, count: int) -> dict[str, Any]:
        """Means over ``count`` examples, as float32 on the CPU; blocks no gradient reached have zero curvature."""
        tables: dict[str, dict[str, torch.Tensor]] = {table: {} for table in _TABLES}
        for key in self.fired:
            for table in ("A", "S", "gram", "diag"):
                if f"{table}/{key}" in self.sums:
                    tables[table][key] = (self.sums[f"{table}/{key}"] / count).float().cpu()
            if key in self.embeddings:
                value = tables["diag"][key]
                touched = value.abs().sum(dim=1).nonzero().flatten()
                tables["rows"][key], tables["diag"][key] = touched, value[touched]
        zero = sorted({p for key in self.forwarded - self.fired for p in self.blocks[key]})
        layers = {key: value for key, value in self.layers.items() if key in tables["A"]}
        kinds = {key: kind for key, kind in self.kinds.items() if key in self.fired}
        return dict(
            A=tables["A"],
            S=tables["S"],
            gram=tables["gram"],
            diag=tables["diag"],
            rows=tables["rows"],
            layers=layers,
            kinds=kinds,
            zero=tuple(zero),
        )


def _is_projection(key: str) -> bool:
    """The final projection per model family (:data:`PROJECTIONS`): by its block name."""
    last = key.rsplit(".", 1)[-1]
    return last == "visual_projection" or key == "visual.proj" or key.endswith(".visual.proj")


def _squeeze(stacked: torch.Tensor, groups: int) -> torch.Tensor:
    return stacked[0] if groups == 1 else stacked


def _explicit_attention(module: nn.MultiheadAttention, original: Callable[..., Any]) -> Callable[..., Any]:
    """``module``'s forward for self-attention as explicit operations (what F.multi_head_attention_forward
    computes), its projections F.linear calls in the module's own layout; anything else runs ``original``."""

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not (query is key and key is value) or query.dim() != 3:
            return original(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        heads, width = module.num_heads, module.embed_dim
        qkv = F.linear(query, module.in_proj_weight, module.in_proj_bias)
        if not module.batch_first:
            qkv = qkv.transpose(0, 1)
        batch, length = qkv.shape[:2]
        q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        bias = _attention_bias(attn_mask, key_padding_mask, is_causal, batch, heads, length, scores)
        weights = (scores if bias is None else scores + bias).softmax(dim=-1)
        if module.training and module.dropout > 0:
            weights = F.dropout(weights, module.dropout)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        if not module.batch_first:
            out = out.transpose(0, 1)
        out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights

    return forward


def _attention_bias(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    is_causal: bool,
    batch: int,
    heads: int,
    length: int,
    scores: torch.Tensor,
) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks as one additive bias: boolean True (and -inf) masks a key out."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(mask, float("-inf"))
        return mask.to(scores.dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
    bias = None
    if attn_mask is not None:
        bias = additive(attn_mask)
        if bias.dim() == 3:
            bias = bias.reshape(batch, heads, length, length)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).reshape(batch, 1, 1, length)
        bias = pad if bias is None else bias + pad
    return bias


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PLAIN_BATCH_NORM_FORWARDS = {
    nn.BatchNorm1d.forward,
    nn.BatchNorm2d.forward,
    nn.BatchNorm3d.forward,
    nn.SyncBatchNorm.forward,
}


def _plain_batch_norm(module: nn.Module) -> bool:
    # A subclass with its own forward (timm's BatchNormAct2d adds an activation) returns something else
    # than x_hat * weight + bias, and the diagonal derived from the output gradient would be wrong.
    return type(module).forward in _PLAIN_BATCH_NORM_FORWARDS


def _conv_padding(name: str, module: nn.Conv2d, size: tuple[int, ...], out: tuple[int, ...]) -> tuple[list[int], str]:
    """F.pad's (left, right, top, bottom) and mode that reproduce the padding ``module`` applies to its input."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation

    def positions(pads: list[tuple[int, int]]) -> tuple[int, ...]:
        return tuple(
            (n + lo + hi - d * (k - 1) - 1) // s + 1
            for n, (lo, hi), k, s, d in zip(size, pads, kernel, stride, dilation, strict=True)
        )

    if module.padding == "valid":
        declared = [(0, 0), (0, 0)]
    elif module.padding == "same":
        # As F.conv2d and _ConvNd do: any odd unit of padding goes to the bottom/right.
        declared = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation, strict=True)]
    else:
        declared = [(int(p), int(p)) for p in module.padding]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.ZeroPad2d):
        # EfficientNet's Conv2dStaticSamePadding: fixed TF-style padding applied inside forward.
        left, right, top, bottom = static.padding
        declared = [(declared[0][0] + top, declared[0][1] + bottom), (declared[1][0] + left, declared[1][1] + right)]
    candidates = [declared]
    # Other subclasses that pad inside forward (timm's Conv2dSame, Conv2dDynamicSamePadding) pad as
    # TensorFlow's "same" does, for the size they are given.
    totals = [
        max((o - 1) * s + d * (k - 1) + 1 - n, 0)
        for n, o, k, s, d in zip(size, out, kernel, stride, dilation, strict=True)
    ]
    candidates.append([(t // 2, t - t // 2) for t in totals])
    for pads in candidates:
        if positions(pads) == tuple(out):
            return [pads[1][0], pads[1][1], pads[0][0], pads[0][1]], mode if pads is declared else "constant"
    raise TaskArithError(
        f"cannot tell the padding of Conv2d layer '{name}' ({type(module).__name__}): input "
        f"{tuple(size)} gives output {tuple(out)}, which neither its declared padding "
        f"{module.padding} nor TensorFlow-style 'same' padding explains"
    )


def _padded(name: str, module: nn.Conv2d, x: torch.Tensor, out: tuple[int, ...]) -> torch.Tensor:
    pad, mode = _conv_padding(name, module, tuple(x.shape[-2:]), out)
    return F.pad(x, pad, mode=mode) if any(pad) else x


def _mean_patches(name: str, module: nn.Conv2d, x: torch.Tensor, out: tuple[int, ...]) -> torch.Tensor:
    """(batch, in_channels * kh * kw): the mean over output positions of F.unfold's patches, in the order of
    ``weight.reshape(out, -1)``.

    Computed as one strided mean per kernel tap: F.unfold would materialize kh * kw copies of the input
    (hundreds of MB for an early 3x3 conv at 224 px and batch 32).
    """
    x = _padded(name, module, x, out)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    height, width = out
    taps = [
        x[:, :, i * dh : i * dh + (height - 1) * sh + 1 : sh, j * dw : j * dw + (width - 1) * sw + 1 : sw].mean(
            dim=(2, 3)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(taps, dim=2).reshape(x.shape[0], -1)


def _patch_gram(name: str, module: nn.Conv2d, x: torch.Tensor, out: tuple[int, ...], bias: bool) -> torch.Tensor:
    """(groups, k, k): sum over examples of the mean over output positions of patch patch^T (expand), with
    F.unfold on a few examples at a time (about 64 MB of patches)."""
    x = _padded(name, module, x, out)
    groups, positions = module.groups, math.prod(out)
    per_chunk = max(1, 2**24 // max(1, x.shape[1] * math.prod(module.kernel_size) * positions))
    total = None
    for start in range(0, x.shape[0], per_chunk):
        patches = F.unfold(
            x[start : start + per_chunk], module.kernel_size, dilation=module.dilation, stride=module.stride
        )
        patches = patches.reshape(patches.shape[0], groups, -1, positions)
        if bias:
            patches = torch.cat([patches, patches.new_ones(*patches.shape[:2], 1, positions)], dim=2)
        gram = torch.einsum("bgip,bgjp->gij", patches, patches) / positions
        total = gram if total is None else total + gram
    assert total is not None
    return total


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    # Dropout would make the curvature random; the pre-trained encoder is normally in eval mode already.
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _check_options(function: str, tokens: str, conv: str, norm_blocks: str) -> None:
    for option, value, allowed in (
        ("function", function, FUNCTIONS),
        ("tokens", tokens, TOKEN_RULES),
        ("conv", conv, CONV_RULES),
        ("norm_blocks", norm_blocks, NORM_BLOCKS),
    ):
        if value not in allowed:
            raise TaskArithError(f"K-FAC option {option}={value!r} is not one of {', '.join(allowed)}")


def factors_from_texts(
    pretrained: Pretrained,
    texts: Sequence[Any],
    *,
    task: str,
    batch_size: int = 32,
    seed: int = 0,
    mc_samples: int | None = 1,
    function: str = "normalized",
    tokens: str = "expand",
    conv: str = "reduce",
    norm_blocks: str = "full",
    progress: bool = False,
) -> KFACFactors:
    """Factors of the encoder's embeddings on ``texts`` (whatever ``pretrained.batches`` takes: sentences, or
    images for an image encoder), as the curvature of task ``task``; see the module docstring for the options.

    ``mc_samples``: random output directions per example (unbiased); ``None``: every output coordinate (exact).
    Warns when some of the encoder's parameters get no block (:func:`uncovered_parameters`).
    """
    _check_options(function, tokens, conv, norm_blocks)
    if not texts:
        raise TaskArithError(f"no inputs to compute K-FAC factors from (task {task!r})")
    if batch_size < 1:
        raise TaskArithError(f"batch_size must be >= 1, not {batch_size}")
    if mc_samples is not None and mc_samples < 1:
        raise TaskArithError(f"mc_samples must be >= 1 (or None for exact directions), not {mc_samples}")
    encoder = pretrained.encoder
    generator = torch.Generator().manual_seed(seed)
    collector = _Collector(encoder, tokens=tokens, conv=conv, norm_blocks=norm_blocks)
    batches = math.ceil(len(texts) / batch_size)
    try:
        with ExitStack() as stack:
            stack.enter_context(_eval_mode(encoder))
            stack.enter_context(torch.enable_grad())
            for _, batch in tqdm(
                pretrained.batches(list(texts), batch_size),
                total=batches,
                leave=False,
                desc="K-FAC factors",
                disable=not progress,
            ):
                with collector.forward(batch):
                    hidden = encoder(**batch).last_hidden_state
                pooled = mean_pool(hidden, batch["attention_mask"])
                if not collector.roots or not pooled.requires_grad:
                    raise TaskArithError("the encoder's output does not depend on any hooked layer")
                output = F.normalize(pooled, dim=-1) if function == "normalized" else pooled
                for direction in _directions(output, mc_samples, generator):
                    collector.weight = 1.0 if mc_samples is None else 1.0 / mc_samples
                    torch.autograd.grad(
                        (output * direction).sum(), collector.roots, retain_graph=True, allow_unused=True
                    )
                del hidden, pooled, output
    finally:
        collector.close()
        collector.roots = []
    # Pretrained.base_hash is cached; duck-typed stand-ins in tests may lack it.
    factors = KFACFactors(
        **collector.factors(len(texts)),
        examples={task: len(texts)},
        sampling={task: EXACT if mc_samples is None else f"mc:{mc_samples}"},
        base_hash=getattr(pretrained, "base_hash", ""),
        function=function,
        tokens=tokens,
        conv=conv,
        norm_blocks=norm_blocks,
    )
    missing = uncovered_parameters(encoder, factors)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        warnings.warn(
            f"K-FAC factors of {task!r} give no curvature to {len(missing)} of the encoder's parameters "
            f"({shown}): the kfac penalty does not restrain them",
            stacklevel=2,
        )
    return factors


def _directions(output: torch.Tensor, mc_samples: int | None, generator: torch.Generator) -> Iterator[torch.Tensor]:
    batch, dim = output.shape
    if mc_samples is None:
        for k in range(dim):
            direction = torch.zeros(batch, dim, device=output.device, dtype=output.dtype)
            direction[:, k] = 1.0
            yield direction
        return
    for _ in range(mc_samples):
        # Drawn on the CPU so a seed gives the same factors on any device.
        yield torch.randn(batch, dim, generator=generator).to(output.device, output.dtype)


def compute_kfac_factors(
    pretrained: Pretrained,
    task: Task,
    *,
    num_examples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "train",
    mc_samples: int | None = 1,
    function: str = "normalized",
    tokens: str = "expand",
    conv: str = "reduce",
    norm_blocks: str = "full",
    progress: bool = True,
) -> KFACFactors:
    """Factors of ``task`` from up to ``num_examples`` of its ``split`` inputs (a seeded subset), labels unused.

    The defaults are TAK's: 128 examples, one Monte-Carlo direction each, the normalized embedding,
    KFAC-expand over tokens, full LayerNorm/class-token blocks (conv layers: reduce, see the module docstring).
    """
    if num_examples < 1:
        raise TaskArithError(f"num_examples must be >= 1, not {num_examples}")
    texts = list(task.split(split).inputs)
    if len(texts) > num_examples:
        chosen = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:num_examples]
        texts = [texts[i] for i in sorted(chosen.tolist())]
    return factors_from_texts(
        pretrained,
        texts,
        task=task.name,
        batch_size=batch_size,
        seed=seed,
        mc_samples=mc_samples,
        function=function,
        tokens=tokens,
        conv=conv,
        norm_blocks=norm_blocks,
        progress=progress,
    )


# -------------------------------------------------------------------------------------------------
# Merging, compression and the penalty


def merge_factors(factors: Sequence[KFACFactors], *, rule: str = "sum") -> KFACFactors:
    """One set of factors for several tasks, of the size of one task's: TAK's Eq. 8 by default.

    ``rule="sum"``: G ~ (sum_t S_t) x (sum_t lambda_t A_t) with lambda_t = n_t / N (examples): output sides
    summed unweighted, input sides averaged. ``rule="average"``: both averaged with lambda_t (K-FAC of the
    pooled examples; the penalty is about 1/T of Eq. 8's). Either way, full and diagonal blocks are averaged
    with lambda_t (the exact curvature of the pooled examples, as mammoth pools ffT), and merging is
    associative: a merged file merges again as its tasks would. Refused: factors of other base models or
    recipes, a task twice (Eq. 8 would count it twice), inputs merged with the other rule, or compressed
    differently. Block-diagonal factors merge block by block; low-rank ones by concatenation (exact).
    """
    if rule not in MERGE_RULES:
        raise TaskArithError(f"K-FAC merge rule {rule!r} is not one of {', '.join(MERGE_RULES)}")
    factors = list(factors)
    if not factors:
        raise TaskArithError("merge_factors needs at least one set of K-FAC factors")
    hashes = sorted({f.base_hash for f in factors})
    if len(hashes) > 1:
        raise TaskArithError(f"cannot merge K-FAC factors computed on different base models {hashes}")
    if len(factors) == 1:
        return factors[0]
    for option in ("function", "tokens", "conv", "norm_blocks", "compression"):
        values = sorted({getattr(f, option) for f in factors})
        if len(values) > 1:
            raise TaskArithError(
                f"cannot merge K-FAC factors made with different {option} {values}: recompute (or "
                f"compress) them the same way"
            )
    other = sorted({f.merge for f in factors} - {"none", rule})
    if other:
        raise TaskArithError(
            f"cannot merge with rule {rule!r} factors already merged with rule {other[0]!r}; "
            f"merge their tasks' files with one rule"
        )
    seen: set[str] = set()
    for f in factors:
        twice = seen & set(f.tasks)
        if twice:
            raise TaskArithError(f"task {sorted(twice)[0]!r} is in more than one of the K-FAC factor sets to merge")
        seen |= set(f.tasks)
    layers = set(factors[0].A)
    for f in factors[1:]:
        if set(f.A) != layers:
            raise TaskArithError(
                f"K-FAC factors of tasks {f.tasks} cover other layers than those of "
                f"{factors[0].tasks}; were they computed on the same encoder?"
            )
    total = sum(f.num_examples for f in factors)
    weights = [f.num_examples / total for f in factors]
    output_weights = [1.0] * len(factors) if rule == "sum" else weights

    def merged(table: str, name: str, by: list[float]) -> Factor:
        return _weighted_sum(
            [(w, getattr(f, table)[name]) for w, f in zip(by, factors, strict=True) if name in getattr(f, table)], name
        )

    A = {layer: merged("A", layer, weights) for layer in sorted(layers)}
    S = {layer: merged("S", layer, output_weights) for layer in sorted(layers)}
    gram = {name: merged("gram", name, weights) for name in sorted({n for f in factors for n in f.gram})}
    diag: Tensors = {}
    rows: Tensors = {}
    for name in sorted({name for f in factors for name in f.diag}):
        if any(name in f.rows for f in factors):
            rows[name], diag[name] = _merge_rows(factors, weights, name)
        else:
            diag[name] = merged("diag", name, weights)  # type: ignore[assignment]
    kinds = {k: v for f in factors for k, v in f.kinds.items()}
    layer_params = {k: v for f in factors for k, v in f.layers.items() if k in A}
    result = replace(
        factors[0],
        A=A,
        S=S,
        gram=gram,
        diag=diag,
        rows=rows,
        layers=layer_params,
        kinds=kinds,
        examples={t: n for f in factors for t, n in f.examples.items()},
        sampling={t: s for f in factors for t, s in f.sampling.items()},
        merge=rule,
        zero=(),
    )
    covered = result.covered_parameters()
    return replace(result, zero=tuple(sorted({p for f in factors for p in f.zero} - covered)))


def _merge_rows(factors: list[KFACFactors], weights: list[float], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of row-sparse diagonals; a row one task never touched counts as zero for it."""
    parts = [(w, f.rows[name], f.diag[name].float()) for w, f in zip(weights, factors, strict=True) if name in f.diag]
    union = torch.unique(torch.cat([index.cpu() for _, index, _ in parts]))
    values = torch.zeros(union.shape[0], *parts[0][2].shape[1:])
    for w, index, value in parts:
        values.index_add_(0, torch.searchsorted(union, index.cpu()), w * value.cpu())
    device = parts[0][2].device
    return union.to(device), values.to(device)


def compress_factors(factors: KFACFactors, method: str, *, blocks: int = 8, rank: int = 64) -> KFACFactors:
    """The factors with every A, S and full Gram block compressed (TAK's storage study); a grouped conv's
    stacked per-group factors (already small) and the diagonals stay as they are.

    ``method="block"``: only ``blocks`` diagonal blocks of each matrix are kept ("block-k": about 1/k of
    the storage; ``blocks=1`` changes nothing). ``method="eigen"``: its ``rank`` largest eigenpairs (negative
    eigenvalues, rounding noise of a positive semi-definite matrix, dropped; the full rank changes nothing but
    rounding). The result saves as an ordinary factor file with the compression in its metadata; compress
    once, from uncompressed factors (merging compressed ones is exact).
    """
    if method not in COMPRESSIONS:
        raise TaskArithError(f"K-FAC compression {method!r} is not one of {', '.join(COMPRESSIONS)}")
    if factors.compression != "none":
        raise TaskArithError(
            f"K-FAC factors of {list(factors.tasks)} are already compressed "
            f"({factors.compression}); compress the uncompressed factors"
        )
    size = blocks if method == "block" else rank
    if size < 1:
        raise TaskArithError(f"K-FAC compression needs {'blocks' if method == 'block' else 'rank'} >= 1, not {size}")

    def compress(matrix: Factor) -> Factor:
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            return matrix
        n = matrix.shape[0]
        if method == "block":
            width = math.ceil(n / blocks)
            count = math.ceil(n / width)
            if count == 1:
                return BlockDiagonal(matrix.unsqueeze(0).clone(), n)
            stacked = matrix.new_zeros(count, width, width)
            for i in range(count):
                lo, hi = i * width, min((i + 1) * width, n)
                stacked[i, : hi - lo, : hi - lo] = matrix[lo:hi, lo:hi]
            return BlockDiagonal(stacked, n)
        values, vectors = torch.linalg.eigh(matrix.double())
        keep = min(rank, n)
        return LowRank(values[-keep:].clamp_min(0).to(matrix.dtype), vectors[:, -keep:].to(matrix.dtype))

    return replace(
        factors,
        A={k: compress(v) for k, v in factors.A.items()},
        S={k: compress(v) for k, v in factors.S.items()},
        gram={k: compress(v) for k, v in factors.gram.items()},
        compression=f"{method}:{size}",
    )


def kfac_penalty(
    delta: Mapping[str, torch.Tensor], factors: KFACFactors, *, norm_scale: float = 10.0, projection_scale: float = 0.1
) -> torch.Tensor:
    """delta^T G delta with G the factors' block-diagonal Gauss-Newton approximation, scaled as TAK does.

    Per Linear or conv layer tr(S dW A dW^T) with dW = [d_weight | d_bias] (a conv kernel flattened to
    (out, in * kh * kw); a grouped conv summed over its groups; open_clip's proj transposed), per full block
    d^T F d, per diagonal sum(D * d^2); LayerNorm and class-token blocks times ``norm_scale``, the final
    projection times ``projection_scale`` (TAK's fisher_norm_scaler = 10 and fisher_ft_proj_scaler = 0.1;
    1 and 1 give the plain quadratic form). Parameters the factors do not cover contribute nothing.
    Differentiable in delta; on delta's device.
    """
    reference = next(iter(delta.values()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32

    def scale(key: str) -> float:
        kind = factors.kinds.get(key, "")
        return norm_scale if kind in _NORM_KINDS else projection_scale if kind == _PROJECTION_KIND else 1.0

    def cast(factor: Factor) -> Factor:
        return _convert(factor, lambda t: t.to(device, dtype))

    total = torch.zeros((), device=device, dtype=dtype)
    for layer, A in factors.A.items():
        weight_name, bias_name, transposed = factors.layers[layer]
        weight = delta.get(weight_name)
        bias = delta.get(bias_name) if bias_name else None
        if weight is None and bias is None:
            continue
        if weight is not None and transposed:
            weight = weight.T
        A, S = cast(A), cast(factors.S[layer])
        X = _augmented(weight_name, bias_name, weight, bias, _shape(A), _shape(S))
        if X.dim() == 3:  # stacked per-group factors: dense
            term = ((S @ X) * (X @ A)).sum()  # type: ignore[operator]
        else:
            # tr(S X A X^T) = <S X, X A> for symmetric S: two products, no Kronecker product.
            term = (_times(X.T, S).T * _times(X, A)).sum()
        total = total + scale(layer) * term
    for name, value in factors.gram.items():
        d = delta.get(name)
        if d is None:
            continue
        d = d.reshape(-1)
        if d.shape[0] != _size(value):
            raise TaskArithError(
                f"task vector entry '{name}' has {d.shape[0]} values; the K-FAC factors expect "
                f"{_size(value)} (factors computed on another architecture?)"
            )
        total = total + scale(name) * (_times(d, cast(value)) * d).sum()
    for name, value in factors.diag.items():
        d = delta.get(name)
        if d is None:
            continue
        if name in factors.rows:
            rows = factors.rows[name]
            # Checked before indexing so a table from another vocabulary fails with a message, not an IndexError.
            if d.shape[1:] != value.shape[1:] or (rows.numel() and int(rows.max()) >= d.shape[0]):
                raise TaskArithError(
                    f"task vector entry '{name}' has shape {tuple(d.shape)}; the K-FAC factors "
                    f"expect rows up to {int(rows.max()) if rows.numel() else 0} of width "
                    f"{tuple(value.shape[1:])} (factors computed on another architecture?)"
                )
            d = d[rows.to(d.device)]
        if d.shape != value.shape:
            raise TaskArithError(
                f"task vector entry '{name}' has shape {tuple(d.shape)}; the K-FAC factors expect "
                f"{tuple(value.shape)} (factors computed on another architecture?)"
            )
        total = total + scale(name) * (value.to(device, dtype) * d.pow(2)).sum()
    return total


def _shape(factor: Factor) -> tuple[int, ...]:
    return tuple(factor.shape) if isinstance(factor, torch.Tensor) else (factor.size, factor.size)


def _augmented(
    weight_name: str,
    bias_name: str | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shape_a: tuple[int, ...],
    shape_s: tuple[int, ...],
) -> torch.Tensor:
    """[d_weight | d_bias] laid out for factors of shapes ``shape_a`` and ``shape_s``: (out, size_a), or
    (groups, out / groups, size_a) for stacked per-group factors; missing parts are zero."""
    reference = weight if weight is not None else bias
    assert reference is not None
    size_a, out = shape_a[-1], shape_s[-1]
    lead = tuple(shape_s[:-2]) + (out,)  # (groups, out per group) or (out,)
    rows = math.prod(lead)
    if weight is not None:
        # A conv kernel (out, in / groups, kh, kw) flattens to the patch order of the A factor.
        flat = weight.reshape(weight.shape[0], -1) if weight.dim() > 2 else weight
        inputs = flat.shape[1] if flat.dim() == 2 else -1
        with_bias = size_a == inputs + 1
        if flat.dim() != 2 or flat.shape[0] != rows or size_a not in (inputs, inputs + 1):
            raise TaskArithError(
                f"task vector entry '{weight_name}' has shape {tuple(weight.shape)}; the K-FAC "
                f"factors expect {rows} rows (output channels) of {size_a - 1} or {size_a} "
                f"inputs{' per group' if len(lead) > 1 else ''} (another architecture?)"
            )
        weight = flat.reshape(*lead, inputs)
    else:
        inputs, with_bias = size_a - 1, True
        weight = reference.new_zeros(*lead, inputs)
    if bias is not None and (not with_bias or tuple(bias.shape) != (rows,)):
        raise TaskArithError(
            f"task vector entry '{bias_name}' has shape {tuple(bias.shape)}; the K-FAC factors "
            f"expect {'(' + str(rows) + ',)' if with_bias else 'no bias'}"
        )
    if not with_bias:
        return weight
    bias = bias if bias is not None else reference.new_zeros(rows)
    return torch.cat([weight, bias.reshape(*lead, 1)], dim=-1)
