"""Dataless interference regularization: Kronecker-factored curvature of other tasks' outputs.

The tau-Jp penalty E_{x~task j} ||J_theta0 f(x) . delta||^2 needs task j's inputs at every step. It is the
quadratic form delta^T G_j delta of the Gauss-Newton matrix G_j = E_x[J^T J] of task j's pooled
embeddings f (squared loss, identity output Hessian). Following Porrello et al. (arXiv 2602.17385,
"TAK"), whoever holds task j's data approximates G_j once, layer by layer, and ships only that:

* every ``nn.Linear`` gets a Kronecker product A (input side) x S (output side). Its weight is shared
  over tokens and f mean-pools the tokens, so we use K-FAC-reduce (Eschenhagen et al., NeurIPS 2023):
  the input is the mean of the layer's inputs over the sentence's real tokens (padding excluded), with
  a constant 1 appended when the layer has a bias, and the output side is the gradient summed over
  tokens. For a Linear layer followed directly by mean pooling this is exact.
* every ``nn.Conv2d`` is a Linear layer shared over spatial positions (Grosse & Martens 2016, "KFC"),
  treated the same way: the input is the mean over output positions of the input patches that
  ``F.unfold`` would extract (channels, then kernel rows and columns: the order of
  ``weight.reshape(out, -1)``), the output side is the gradient summed over positions. The padding is
  the module's own (``padding``/``padding_mode``), or TensorFlow-style "same" padding for subclasses
  that pad inside ``forward`` (EfficientNet's ``Conv2dStaticSamePadding``: its ``static_padding``).
  A grouped or depthwise conv (``groups > 1``) gets one A x S pair per group, stored stacked
  (groups x k x k and groups x out/groups x out/groups). Each output channel depends only on its own
  group's weights, so the exact curvature of a grouped conv followed by pooling is block diagonal
  over groups and this is exact there too, as for a Linear layer. Unlike an exact diagonal, which
  would cost no more to compute, it keeps the coupling between a channel's kernel taps (neighbouring
  pixels: strongly correlated). It costs groups * (k^2 [+ 1])^2 floats for a depthwise k x k conv:
  16 of EfficientNet-Lite0's 82 MiB of factors, against 0.7 MiB for a diagonal.
* ``nn.LayerNorm``, ``nn.BatchNorm1d/2d/3d`` (on their running statistics: the encoder runs in eval
  mode) and ``nn.Embedding`` parameters get the diagonal of G_j, from exact per-example gradients
  (summed over tokens or spatial positions). Embedding tables keep only the rows the task's inputs
  touched (every other row has zero curvature for the task), so the 30522 x 384 word table costs a
  few MB, not 47. A BatchNorm subclass that overrides ``forward`` (one that fuses an activation, say)
  is left out: its output is no longer the affine map the diagonal is derived for.
* anything else (bare ``nn.Parameter``s such as a ViT's class token, other conv dimensions) is not
  penalized.

The output side needs the rows of J. By default each example backpropagates ``mc_samples`` random
directions v ~ N(0, I) (E[v v^T] = I, so the outer products average to J^T J); ``mc_samples=None``
backpropagates every output coordinate instead, which is exact but costs ``hidden`` backward passes.

Merging factors of several tasks averages each factor (weights: examples), which is exactly K-FAC of
the pooled examples: one A and one S per layer however many tasks, as in the paper.

Files hold A/<layer> and S/<layer> (stacked over groups for a grouped conv), diag/<parameter> and
rows/<parameter>, as before conv layers were covered: older files load unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from taskarith.errors import TaskArithError
from taskarith.io import load_tensors, save_tensors
from taskarith.models.zero_shot import mean_pool

if TYPE_CHECKING:
    from taskarith.data import Task
    from taskarith.models import Pretrained

FORMAT = "taskarith.kfac/1"
VARIANT = "kfac-reduce"
EXACT = "exact"

_PREFIXES = ("A/", "S/", "diag/", "rows/")
_REQUIRED_METADATA = ("format", "tasks", "base_hash", "num_examples")

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class KFACFactors:
    """Per-layer curvature of some tasks' pooled embeddings at the pre-trained weights.

    ``A[layer]`` ((in + 1) x (in + 1) with a bias; in = in_channels * kh * kw for a conv) and ``S[layer]``
    (out x out) make the Kronecker block of each ``nn.Linear`` or ``nn.Conv2d``; a grouped conv has one
    block per group, stacked: A (groups x k x k), S (groups x out/groups x out/groups). ``diag[param]`` is
    the Gauss-Newton diagonal of a LayerNorm, BatchNorm or Embedding parameter, restricted to
    ``rows[param]`` (sorted row indices) for embedding tables.
    """

    A: dict[str, torch.Tensor]
    S: dict[str, torch.Tensor]
    tasks: tuple[str, ...]
    base_hash: str
    num_examples: int
    diag: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    directions: str = EXACT  # how J's rows were sampled: "exact", "mc:<samples per example>", or "mixed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if set(self.A) != set(self.S):
            raise TaskArithError(f"K-FAC factors need both A and S for every layer; unpaired: "
                                 f"{sorted(set(self.A) ^ set(self.S))[:5]}")
        for layer in self.A:
            a, s = self.A[layer], self.S[layer]
            stacked = a.dim() == s.dim() and a.dim() in (2, 3) and a.shape[:-2] == s.shape[:-2]
            if not stacked or a.shape[-1] != a.shape[-2] or s.shape[-1] != s.shape[-2]:
                raise TaskArithError(f"K-FAC factors of layer '{layer}' are neither square matrices nor stacks of "
                                     f"them, one per group (A {tuple(a.shape)}, S {tuple(s.shape)})")
        for name, index in self.rows.items():
            if name not in self.diag or index.dim() != 1 or self.diag[name].shape[0] != index.shape[0]:
                raise TaskArithError(f"K-FAC diagonal of '{name}' does not match its row index")
        if self.num_examples < 1:
            raise TaskArithError(f"K-FAC factors need at least one example, not {self.num_examples}")

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write one safetensors file (atomically) with the factors and what made them."""
        tensors: Tensors = {}
        for prefix, table in (("A/", self.A), ("S/", self.S), ("diag/", self.diag), ("rows/", self.rows)):
            tensors.update({prefix + name: value for name, value in table.items()})
        metadata = {
            "format": FORMAT,
            "variant": VARIANT,
            "tasks": json.dumps(list(self.tasks)),
            "base_hash": self.base_hash,
            "num_examples": str(self.num_examples),
            "directions": self.directions,
        }
        save_tensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> KFACFactors:
        """Read factors written by :meth:`save`; anything else is refused with the file named."""
        path = Path(path)
        tensors, metadata = load_tensors(path)
        if metadata.get("format") != FORMAT:
            found = metadata.get("format")
            raise TaskArithError(f"{path}: not a K-FAC factor file (format {found!r}, expected {FORMAT!r})")
        missing = [key for key in _REQUIRED_METADATA if key not in metadata]
        if missing:
            raise TaskArithError(f"{path}: K-FAC factor file lacks metadata {missing}")
        try:
            tasks = json.loads(metadata["tasks"])
            num_examples = int(metadata["num_examples"])
        except ValueError:
            raise TaskArithError(f"{path}: unreadable K-FAC metadata (tasks or num_examples)") from None
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise TaskArithError(f"{path}: K-FAC metadata 'tasks' must be a list of names")
        tables: dict[str, Tensors] = {prefix: {} for prefix in _PREFIXES}
        for key, value in tensors.items():
            prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
            if prefix is None:
                raise TaskArithError(f"{path}: unexpected tensor '{key}' in a K-FAC factor file")
            tables[prefix][key[len(prefix):]] = value
        if not tables["A/"] and not tables["diag/"]:
            raise TaskArithError(f"{path}: K-FAC factor file holds no factors")
        try:
            return cls(A=tables["A/"], S=tables["S/"], tasks=tuple(tasks), base_hash=metadata["base_hash"],
                       num_examples=num_examples, diag=tables["diag/"], rows=tables["rows/"],
                       directions=metadata.get("directions", EXACT))
        except TaskArithError as exc:
            raise TaskArithError(f"{path}: {exc}") from None

    # -- helpers -------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> KFACFactors:
        """The same factors on ``device`` (the penalty then costs no transfer per step)."""
        move: Callable[[Tensors], Tensors] = lambda table: {k: v.to(device) for k, v in table.items()}  # noqa: E731
        return replace(self, A=move(self.A), S=move(self.S), diag=move(self.diag), rows=move(self.rows))

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held per Kronecker-factored layer (A and S) and per diagonally treated parameter."""
        sizes = {layer: _nbytes(self.A[layer]) + _nbytes(self.S[layer]) for layer in self.A}
        for name, value in self.diag.items():
            sizes[name] = _nbytes(value) + (_nbytes(self.rows[name]) if name in self.rows else 0)
        return sizes

    def __repr__(self) -> str:
        total = sum(self.memory_bytes().values()) / 2**20
        return (f"KFACFactors(tasks={self.tasks!r}, layers={len(self.A)}, diagonal={len(self.diag)}, "
                f"examples={self.num_examples}, directions={self.directions!r}, {total:.1f} MiB)")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# -------------------------------------------------------------------------------------------------
# Computing factors


class _Collector:
    """Hooks that accumulate K-FAC-reduce factors and Gauss-Newton diagonals during forward/backward.

    The pre-trained weights never require grad. Instead the first hooked outputs on the path from the
    input (embedding lookups, or the first Linear/Conv2d layers of a model without embeddings, whose
    input is token states or pixels that need no grad) are replaced by detached copies that do ("roots");
    backpropagating to the roots reaches every hooked output and computes no weight gradient at all.
    """

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.roots: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.weight = 1.0  # of the current backward pass (1 / directions per example)
        self.sums: Tensors = {}
        self.fired: set[str] = set()
        self.kronecker: dict[str, nn.Module] = {}  # Linear and Conv2d layers
        self.diagonal: dict[str, nn.Module] = {}
        self.handles: list[Any] = []
        for name, module in encoder.named_modules():
            if isinstance(module, nn.Linear):
                self.kronecker[name] = module
                self.handles.append(module.register_forward_hook(self._linear_hook(name)))
            elif isinstance(module, nn.Conv2d):
                self.kronecker[name] = module
                self.handles.append(module.register_forward_hook(self._conv_hook(name)))
            elif isinstance(module, nn.LayerNorm) and module.weight is not None:
                self.diagonal[name] = module
                self.handles.append(module.register_forward_hook(self._layer_norm_hook(name)))
            elif isinstance(module, _BATCH_NORMS) and module.weight is not None and _plain_batch_norm(module):
                if module.running_mean is None or module.running_var is None:
                    self.close()
                    raise TaskArithError(f"BatchNorm layer '{name}' keeps no running statistics, so even in eval "
                                         f"mode it normalizes with batch statistics and couples the examples; "
                                         f"K-FAC needs per-example curvature (track_running_stats=True)")
                self.diagonal[name] = module
                self.handles.append(module.register_forward_hook(self._batch_norm_hook(name)))
            elif isinstance(module, nn.Embedding):
                self.diagonal[name] = module
                self.handles.append(module.register_forward_hook(self._embedding_hook(name)))
        if not self.kronecker and not self.diagonal:
            self.close()
            raise TaskArithError("K-FAC needs an encoder with at least one supported layer (Linear, Conv2d, "
                                 "LayerNorm, BatchNorm, Embedding); this one has none")

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _add(self, key: str, value: torch.Tensor) -> None:
        if key not in self.sums:
            self.sums[key] = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        self.sums[key].add_(value.to(torch.float64))

    def _track(self, output: torch.Tensor) -> torch.Tensor:
        if not output.requires_grad:
            root = output.detach().requires_grad_(True)
            self.roots.append(root)
            # The model gets a copy, not the leaf itself: an in-place activation right after the layer
            # (conv -> ReLU(inplace=True)) is an error on a leaf that requires grad.
            output = root.clone()
        return output

    def _batch_size(self) -> int:
        assert self.mask is not None
        return self.mask.shape[0]

    def _token_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the shared (token) dimensions; over real tokens only where the mask says which."""
        mask = self.mask
        batch = x.shape[0]
        if x.dim() == 3 and mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
            return mean_pool(x, mask)
        return x.reshape(batch, -1, x.shape[-1]).mean(dim=1)

    def _kronecker_hook(self, name: str, a: torch.Tensor, output: torch.Tensor,
                        output_side: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Accumulates A from ``a`` ((batch, in) or (batch, groups, in/groups)) now, and S from the
        gradient of ``output`` (reduced to ``a``'s layout by ``output_side``) during backward."""
        with torch.no_grad():
            if a.dim() == 2:
                self._add(f"A/{name}", a.T @ a)
            else:
                self._add(f"A/{name}", torch.einsum("bgi,bgj->gij", a, a))
        output = self._track(output)

        def on_grad(grad: torch.Tensor) -> None:
            with torch.no_grad():
                g = output_side(grad.detach().float())
                if g.dim() == 2:
                    self._add(f"S/{name}", (g.T @ g) * self.weight)
                else:
                    self._add(f"S/{name}", torch.einsum("bgi,bgj->gij", g, g) * self.weight)
            self.fired.add(name)

        output.register_hook(on_grad)
        return output

    def _linear_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                a = self._token_mean(inputs[0].detach().float())
                if module.bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            return self._kronecker_hook(name, a, output,
                                        lambda g: g.reshape(g.shape[0], -1, g.shape[-1]).sum(dim=1))

        return hook

    def _conv_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Conv2d, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            groups = module.groups

            def by_group(x: torch.Tensor) -> torch.Tensor:
                return x if groups == 1 else x.reshape(x.shape[0], groups, -1)

            with torch.no_grad():
                a = by_group(_mean_patches(name, module, inputs[0].detach().float(), tuple(output.shape[-2:])))
                if module.bias is not None:
                    a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            return self._kronecker_hook(name, a, output, lambda g: by_group(g.sum(dim=(-2, -1))))

        return hook

    def _layer_norm_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.LayerNorm, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            shape = tuple(module.normalized_shape)
            with torch.no_grad():
                normalized = F.layer_norm(inputs[0].detach().float(), shape, eps=module.eps)
            output = self._track(output)

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.detach().float()
                    batch = g.shape[0]
                    # Per-example gradients: out = x_hat * weight + bias, summed over tokens.
                    per_weight = (g * normalized).reshape(batch, -1, *shape).sum(dim=1)
                    self._add(f"diag/{name}.weight", per_weight.pow(2).sum(dim=0) * self.weight)
                    if module.bias is not None:
                        per_bias = g.reshape(batch, -1, *shape).sum(dim=1)
                        self._add(f"diag/{name}.bias", per_bias.pow(2).sum(dim=0) * self.weight)
                self.fired.add(name)

            output.register_hook(on_grad)
            return output

        return hook

    def _batch_norm_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0].detach().float()
            if x.dim() < 2 or x.shape[0] != self._batch_size():
                raise TaskArithError(f"BatchNorm layer '{name}' sees input of shape {tuple(x.shape)} for a batch of "
                                     f"{self._batch_size()}; per-example curvature needs the batch dimension first")
            assert module.running_mean is not None and module.running_var is not None
            channels = (1, -1) + (1,) * (x.dim() - 2)
            with torch.no_grad():
                # Eval mode: the running statistics, not the batch's, so each example is normalized on its own.
                mean = module.running_mean.float().view(channels)
                normalized = (x - mean) * torch.rsqrt(module.running_var.float().view(channels) + module.eps)
            output = self._track(output)
            positions = tuple(range(2, x.dim()))

            def on_grad(grad: torch.Tensor) -> None:
                with torch.no_grad():
                    g = grad.detach().float()
                    # Per-example gradients: out = x_hat * weight + bias per channel, summed over positions.
                    per_weight = (g * normalized).sum(dim=positions) if positions else g * normalized
                    self._add(f"diag/{name}.weight", per_weight.pow(2).sum(dim=0) * self.weight)
                    if module.bias is not None:
                        per_bias = g.sum(dim=positions) if positions else g
                        self._add(f"diag/{name}.bias", per_bias.pow(2).sum(dim=0) * self.weight)
                self.fired.add(name)

            output.register_hook(on_grad)
            return output

        return hook

    def _embedding_hook(self, name: str) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Embedding, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            ids = inputs[0]
            batch = self._batch_size()
            if output.shape[0] == 1 and batch > 1:
                # Position ids come as one broadcast row; per-example gradients need the batch dimension.
                output = output.expand(batch, *output.shape[1:])
                ids = ids.expand(batch, *ids.shape[1:])
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
                    key = f"diag/{name}.weight"
                    if key not in self.sums:
                        # float32: a float64 word table would double the 47 MB this already takes on MiniLM.
                        self.sums[key] = torch.zeros(module.num_embeddings, g.shape[1], device=g.device)
                    self.sums[key].index_add_(0, unique % module.num_embeddings, per_example.pow(2) * self.weight)
                self.fired.add(name)

            output.register_hook(on_grad)
            return output

        return hook

    def factors(self, count: int) -> tuple[Tensors, Tensors, Tensors, Tensors]:
        """Means over ``count`` examples, as float32 on the CPU; layers no gradient reached are dropped."""
        A, S, diag, rows = {}, {}, {}, {}
        for name in self.kronecker:
            if name in self.fired:
                A[name] = (self.sums[f"A/{name}"] / count).float().cpu()
                S[name] = (self.sums[f"S/{name}"] / count).float().cpu()
        for name, module in self.diagonal.items():
            if name not in self.fired:
                continue
            for suffix in ("weight", "bias"):
                key = f"{name}.{suffix}"
                if f"diag/{key}" not in self.sums:
                    continue
                value = (self.sums[f"diag/{key}"] / count).float().cpu()
                if isinstance(module, nn.Embedding):
                    touched = value.abs().sum(dim=1).nonzero().flatten()
                    rows[key], value = touched, value[touched]
                diag[key] = value
        return A, S, diag, rows


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PLAIN_BATCH_NORM_FORWARDS = {nn.BatchNorm1d.forward, nn.BatchNorm2d.forward, nn.BatchNorm3d.forward,
                              nn.SyncBatchNorm.forward}


def _plain_batch_norm(module: nn.Module) -> bool:
    # A subclass with its own forward (timm's BatchNormAct2d adds an activation) returns something else
    # than x_hat * weight + bias, and the diagonal derived from the output gradient would be wrong.
    return type(module).forward in _PLAIN_BATCH_NORM_FORWARDS


def _conv_padding(name: str, module: nn.Conv2d, size: tuple[int, ...], out: tuple[int, ...]) -> tuple[list[int], str]:
    """F.pad's (left, right, top, bottom) and mode that reproduce the padding ``module`` applies to its input."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation

    def positions(pads: list[tuple[int, int]]) -> tuple[int, ...]:
        return tuple((n + lo + hi - d * (k - 1) - 1) // s + 1
                     for n, (lo, hi), k, s, d in zip(size, pads, kernel, stride, dilation))

    if module.padding == "valid":
        declared = [(0, 0), (0, 0)]
    elif module.padding == "same":
        # As F.conv2d and _ConvNd do: any odd unit of padding goes to the bottom/right.
        declared = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        declared = [(int(p), int(p)) for p in module.padding]  # type: ignore[union-attr]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    static = getattr(module, "static_padding", None)
    if isinstance(static, nn.ZeroPad2d):
        # EfficientNet's Conv2dStaticSamePadding: fixed TF-style padding applied inside forward.
        left, right, top, bottom = static.padding
        declared = [(declared[0][0] + top, declared[0][1] + bottom), (declared[1][0] + left, declared[1][1] + right)]
    candidates = [declared]
    # Other subclasses that pad inside forward (timm's Conv2dSame, Conv2dDynamicSamePadding) pad as
    # TensorFlow's "same" does, for the size they are given.
    totals = [max((o - 1) * s + d * (k - 1) + 1 - n, 0) for n, o, k, s, d in zip(size, out, kernel, stride, dilation)]
    candidates.append([(t // 2, t - t // 2) for t in totals])
    for pads in candidates:
        if positions(pads) == tuple(out):
            return [pads[1][0], pads[1][1], pads[0][0], pads[0][1]], mode if pads is declared else "constant"
    raise TaskArithError(f"cannot tell the padding of Conv2d layer '{name}' ({type(module).__name__}): input "
                         f"{tuple(size)} gives output {tuple(out)}, which neither its declared padding "
                         f"{module.padding} nor TensorFlow-style 'same' padding explains")


def _mean_patches(name: str, module: nn.Conv2d, x: torch.Tensor, out: tuple[int, ...]) -> torch.Tensor:
    """(batch, in_channels * kh * kw): the mean over output positions of F.unfold's patches, in the order of
    ``weight.reshape(out, -1)``.

    Computed as one strided mean per kernel tap: F.unfold would materialize kh * kw copies of the input
    (hundreds of MB for an early 3x3 conv at 224 px and batch 32).
    """
    if x.dim() != 4:
        raise TaskArithError(f"Conv2d layer '{name}' got input of shape {tuple(x.shape)}; K-FAC expects "
                             f"(batch, channels, height, width)")
    pad, mode = _conv_padding(name, module, tuple(x.shape[-2:]), out)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    height, width = out
    taps = [x[:, :, i * dh : i * dh + (height - 1) * sh + 1 : sh, j * dw : j * dw + (width - 1) * sw + 1 : sw]
            .mean(dim=(2, 3)) for i in range(kh) for j in range(kw)]
    return torch.stack(taps, dim=2).reshape(x.shape[0], -1)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    # Dropout would make the curvature random; the pre-trained encoder is normally in eval mode already.
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def factors_from_texts(
    pretrained: Pretrained,
    texts: Sequence[Any],
    *,
    tasks: Sequence[str],
    batch_size: int = 32,
    seed: int = 0,
    mc_samples: int | None = 1,
    progress: bool = False,
) -> KFACFactors:
    """K-FAC-reduce factors (and norm/embedding diagonals) of the encoder's pooled embeddings on ``texts``
    (whatever ``pretrained.batches`` takes: sentences, or images for an image encoder).

    ``mc_samples``: random output directions per example (unbiased); ``None``: every output coordinate (exact).
    """
    if not texts:
        raise TaskArithError(f"no inputs to compute K-FAC factors from (tasks {list(tasks)})")
    if batch_size < 1:
        raise TaskArithError(f"batch_size must be >= 1, not {batch_size}")
    if mc_samples is not None and mc_samples < 1:
        raise TaskArithError(f"mc_samples must be >= 1 (or None for exact directions), not {mc_samples}")
    encoder = pretrained.encoder
    generator = torch.Generator().manual_seed(seed)
    collector = _Collector(encoder)
    batches = math.ceil(len(texts) / batch_size)
    try:
        with _eval_mode(encoder), torch.enable_grad():
            for _, batch in tqdm(pretrained.batches(list(texts), batch_size), total=batches, leave=False,
                                 desc="K-FAC factors", disable=not progress):
                collector.mask = batch["attention_mask"]
                collector.roots = []
                pooled = mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"])
                if not collector.roots or not pooled.requires_grad:
                    raise TaskArithError("the encoder's output does not depend on any hooked layer")
                for direction in _directions(pooled, mc_samples, generator):
                    collector.weight = 1.0 if mc_samples is None else 1.0 / mc_samples
                    torch.autograd.grad((pooled * direction).sum(), collector.roots, retain_graph=True,
                                        allow_unused=True)
                del pooled
    finally:
        collector.close()
        collector.roots = []
    A, S, diag, rows = collector.factors(len(texts))
    # Pretrained.base_hash is cached; duck-typed stand-ins in tests may lack it.
    base_hash = getattr(pretrained, "base_hash", "")
    return KFACFactors(A=A, S=S, tasks=tuple(tasks), base_hash=base_hash, num_examples=len(texts), diag=diag,
                       rows=rows, directions=EXACT if mc_samples is None else f"mc:{mc_samples}")


def _directions(pooled: torch.Tensor, mc_samples: int | None, generator: torch.Generator) -> Iterator[torch.Tensor]:
    batch, dim = pooled.shape
    if mc_samples is None:
        for k in range(dim):
            direction = torch.zeros(batch, dim, device=pooled.device, dtype=pooled.dtype)
            direction[:, k] = 1.0
            yield direction
        return
    for _ in range(mc_samples):
        # Drawn on the CPU so a seed gives the same factors on any device.
        yield torch.randn(batch, dim, generator=generator).to(pooled.device, pooled.dtype)


def compute_kfac_factors(
    pretrained: Pretrained,
    task: Task,
    *,
    num_examples: int = 512,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "train",
    mc_samples: int | None = 1,
    progress: bool = True,
) -> KFACFactors:
    """Factors of ``task`` from up to ``num_examples`` of its ``split`` inputs (a seeded subset), labels unused."""
    if num_examples < 1:
        raise TaskArithError(f"num_examples must be >= 1, not {num_examples}")
    texts = list(task.split(split).inputs)
    if len(texts) > num_examples:
        chosen = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:num_examples]
        texts = [texts[i] for i in sorted(chosen.tolist())]
    return factors_from_texts(pretrained, texts, tasks=(task.name,), batch_size=batch_size, seed=seed,
                              mc_samples=mc_samples, progress=progress)


# -------------------------------------------------------------------------------------------------
# Merging and the penalty


def merge_factors(factors: Sequence[KFACFactors]) -> KFACFactors:
    """One set of factors for several tasks: every factor averaged with weights proportional to examples.

    The result is K-FAC of the pooled examples (A = E[a a^T], S = E[g g^T] over all of them), so its size
    and the penalty's cost do not depend on the number of tasks, and merging is associative. The mixture's
    exact Kronecker sum sum_t w_t A_t x S_t is approximated by (sum_t w_t A_t) x (sum_t w_t S_t), as in
    Porrello et al.; the diagonals are averaged exactly.
    """
    factors = list(factors)
    if not factors:
        raise TaskArithError("merge_factors needs at least one set of K-FAC factors")
    hashes = sorted({f.base_hash for f in factors})
    if len(hashes) > 1:
        raise TaskArithError(f"cannot merge K-FAC factors computed on different base models {hashes}")
    if len(factors) == 1:
        return factors[0]
    layers = set(factors[0].A)
    for f in factors[1:]:
        if set(f.A) != layers:
            raise TaskArithError(f"K-FAC factors of tasks {f.tasks} cover other layers than those of "
                                 f"{factors[0].tasks}; were they computed on the same encoder?")
    total = sum(f.num_examples for f in factors)
    weights = [f.num_examples / total for f in factors]

    def average(tables: list[Tensors], name: str) -> torch.Tensor:
        shapes = {tuple(table[name].shape) for table in tables}
        if len(shapes) > 1:
            raise TaskArithError(f"K-FAC factors of '{name}' have different shapes {sorted(shapes)}")
        return sum(w * table[name].float() for w, table in zip(weights, tables))  # type: ignore[return-value]

    A = {layer: average([f.A for f in factors], layer) for layer in sorted(layers)}
    S = {layer: average([f.S for f in factors], layer) for layer in sorted(layers)}
    diag: Tensors = {}
    rows: Tensors = {}
    for name in sorted({name for f in factors for name in f.diag}):
        if any(name in f.rows for f in factors):
            rows[name], diag[name] = _merge_rows(factors, weights, name)
        else:
            present = [(w, f.diag[name].float()) for w, f in zip(weights, factors) if name in f.diag]
            diag[name] = sum(w * value for w, value in present)  # type: ignore[assignment]
    directions = {f.directions for f in factors}
    return KFACFactors(A=A, S=S, tasks=tuple(t for f in factors for t in f.tasks), base_hash=hashes[0],
                       num_examples=total, diag=diag, rows=rows,
                       directions=directions.pop() if len(directions) == 1 else "mixed")


def _merge_rows(factors: list[KFACFactors], weights: list[float], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of row-sparse diagonals; a row one task never touched counts as zero for it."""
    parts = [(w, f.rows[name], f.diag[name].float()) for w, f in zip(weights, factors) if name in f.diag]
    union = torch.unique(torch.cat([index.cpu() for _, index, _ in parts]))
    values = torch.zeros(union.shape[0], *parts[0][2].shape[1:])
    for w, index, value in parts:
        values.index_add_(0, torch.searchsorted(union, index.cpu()), w * value.cpu())
    device = parts[0][2].device
    return union.to(device), values.to(device)


def kfac_penalty(delta: Mapping[str, torch.Tensor], factors: KFACFactors) -> torch.Tensor:
    """delta^T G delta with G the factors' block-diagonal Gauss-Newton approximation: ~ E_x ||J f(x) . delta||^2.

    Per Linear or Conv2d layer tr(S dW A dW^T) with dW = [d_weight | d_bias] (a conv kernel flattened to
    (out, in * kh * kw); a grouped conv summed over its groups); per diagonal parameter sum(D * d^2).
    Parameters the factors do not cover contribute nothing. Differentiable in delta; on delta's device.
    """
    reference = next(iter(delta.values()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    total = torch.zeros((), device=device, dtype=dtype)
    for layer, A in factors.A.items():
        weight, bias = delta.get(f"{layer}.weight"), delta.get(f"{layer}.bias")
        if weight is None and bias is None:
            continue
        A = A.to(device, dtype)
        S = factors.S[layer].to(device, dtype)
        X = _augmented(layer, weight, bias, A.shape, S.shape)
        # tr(S X A X^T) = <S X, X A> for symmetric S: two matrix products (per group), no Kronecker product.
        total = total + ((S @ X) * (X @ A)).sum()
    for name, value in factors.diag.items():
        d = delta.get(name)
        if d is None:
            continue
        if name in factors.rows:
            rows = factors.rows[name]
            # Checked before indexing so a table from another vocabulary fails with a message, not an IndexError.
            if d.shape[1:] != value.shape[1:] or (rows.numel() and int(rows.max()) >= d.shape[0]):
                raise TaskArithError(f"task vector entry '{name}' has shape {tuple(d.shape)}; the K-FAC factors "
                                     f"expect rows up to {int(rows.max()) if rows.numel() else 0} of width "
                                     f"{tuple(value.shape[1:])} (factors computed on another architecture?)")
            d = d[rows.to(d.device)]
        if d.shape != value.shape:
            raise TaskArithError(f"task vector entry '{name}' has shape {tuple(d.shape)}; the K-FAC factors expect "
                                 f"{tuple(value.shape)} (factors computed on another architecture?)")
        total = total + (value.to(device, dtype) * d.pow(2)).sum()
    return total


def _augmented(layer: str, weight: torch.Tensor | None, bias: torch.Tensor | None, shape_a: torch.Size,
               shape_s: torch.Size) -> torch.Tensor:
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
            raise TaskArithError(f"task vector entry '{layer}.weight' has shape {tuple(weight.shape)}; the K-FAC "
                                 f"factors expect {rows} rows (output channels) of {size_a - 1} or {size_a} "
                                 f"inputs{' per group' if len(lead) > 1 else ''} (another architecture?)")
        weight = flat.reshape(*lead, inputs)
    else:
        inputs, with_bias = size_a - 1, True
        weight = reference.new_zeros(*lead, inputs)
    if bias is not None and (not with_bias or tuple(bias.shape) != (rows,)):
        raise TaskArithError(f"task vector entry '{layer}.bias' has shape {tuple(bias.shape)}; the K-FAC factors "
                             f"expect {'(' + str(rows) + ',)' if with_bias else 'no bias'}")
    if not with_bias:
        return weight
    bias = bias if bias is not None else reference.new_zeros(rows)
    return torch.cat([weight, bias.reshape(*lead, 1)], dim=-1)
