"""Task vectors: tau = theta_finetuned - theta_pretrained, with algebra that reads like the math.

>>> tau_a = TaskVector.from_models(pre, finetuned_a)
>>> multi = pre + 0.5 * (tau_a + tau_b)      # a new model; `pre` is untouched
>>> forget = pre + (-tau_c)

A task vector remembers the content hash of the base it was built from and refuses to be applied to
any other base, because a delta only means something relative to the weights it was measured on.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from os import PathLike
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from taskarith import __version__
from taskarith.display import quoted
from taskarith.errors import TaskArithError
from taskarith.io import ensure_finite, floating_only, load_tensors, read_state_dict, save_tensors, state_hash

FORMAT = "taskarith.task_vector/1"
# The dtypes a task vector's deltas may have.
DELTA_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# What a regularized vector saved before taskarith recorded penalty forms was trained with.
LEGACY_PENALTY_FORMS = {
    "taujp": "taujp/1:mean_pooled(||J delta||_2^2), before taskarith 0.2 (today's taujp_sq with reg_sampling='pooled')",
    "kfac": "kfac, before taskarith 0.2: unrecorded form (the factor files in reg_factors say which: kfac/1, "
    "averaged K-FAC-reduce factors of the unnormalized embedding, or kfac/2, TAK's)",
}
MODES = ("standard", "linear")

if TYPE_CHECKING:
    from taskarith.adapters import LoraExport

Base = TypeVar("Base", nn.Module, dict)


def _check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], a_name: str, b_name: str) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise TaskArithError(
            f"{a_name} and {b_name} have different parameters: "
            f"only in {a_name}: {only_a[:5]}{'...' if len(only_a) > 5 else ''}; "
            f"only in {b_name}: {only_b[:5]}{'...' if len(only_b) > 5 else ''}"
        )
    for key in a:
        if a[key].shape != b[key].shape:
            raise TaskArithError(
                f"parameter '{key}' has shape {tuple(a[key].shape)} in {a_name} but {tuple(b[key].shape)} in {b_name}"
            )
        if a[key].dtype != b[key].dtype:
            raise TaskArithError(f"parameter '{key}' is {a[key].dtype} in {a_name} but {b[key].dtype} in {b_name}")


def _target_module(module: nn.Module, keys: Iterable[str]) -> nn.Module:
    """The module whose parameter names the task vector uses: the module itself, or its `.encoder`."""
    names = set(module.state_dict())
    keys = set(keys)
    if keys <= names:
        return module
    encoder = getattr(module, "encoder", None)
    if isinstance(encoder, nn.Module) and keys <= set(encoder.state_dict()):
        return encoder
    missing = sorted(keys - names)
    raise TaskArithError(f"the model has no parameters named {missing[:5]} that the task vector changes")


@dataclass(frozen=True, eq=False)
class TaskVector:
    """A difference of weights plus what is needed to use it correctly later."""

    deltas: dict[str, torch.Tensor]
    base_hash: str | None = None
    task: str | None = None
    mode: str = "standard"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TaskArithError(f"unknown fine-tuning mode '{self.mode}' (known: {', '.join(MODES)})")

    # construction ---------------------------------------------------------------------------------

    @classmethod
    def from_state_dicts(
        cls, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor], **meta: Any
    ) -> TaskVector:
        pre, ft = floating_only(pretrained), floating_only(finetuned)
        _check_same_keys(pre, ft, "the pre-trained weights", "the fine-tuned weights")
        # Task vectors live on the CPU: they are data to save, combine and compare, and they move to
        # the model's device only when applied.
        deltas = {k: (ft[k].detach() - pre[k].detach().to(ft[k].device)).cpu() for k in sorted(pre)}
        return cls(deltas=deltas, base_hash=state_hash(pre), **meta)

    @classmethod
    def from_models(cls, pretrained: nn.Module, finetuned: nn.Module, **meta: Any) -> TaskVector:
        return cls.from_state_dicts(pretrained.state_dict(), finetuned.state_dict(), **meta)

    @classmethod
    def from_checkpoints(cls, pretrained: str | PathLike, finetuned: str | PathLike, **meta: Any) -> TaskVector:
        """From two safetensors files or Hugging Face model folders (sharded or not)."""
        pre, ft = read_state_dict(pretrained), read_state_dict(finetuned)
        ensure_finite(pre, str(pretrained))
        ensure_finite(ft, str(finetuned))
        try:
            return cls.from_state_dicts(pre, ft, **meta)
        except TaskArithError as exc:
            raise TaskArithError(f"{pretrained} vs {finetuned}: {exc}") from None

    @classmethod
    def from_finetuned_checkpoint(cls, base: nn.Module, finetuned: str | PathLike, **meta: Any) -> TaskVector:
        """From a fine-tuned checkpoint made elsewhere (no training record) against a loaded base encoder.

        Task-specific models wrap the encoder under a prefix (``bert.``, ``roberta.``, ...) and add heads;
        the prefix is found by matching the base's parameter names, and everything else in the file (heads,
        buffers) takes no part.
        """
        state = read_state_dict(finetuned)
        ensure_finite(state, str(finetuned))
        names = {name for name, _ in base.named_parameters()}
        prefixes = [""] + sorted({key.split(".", 1)[0] + "." for key in state if "." in key})
        coverage = {p: len(names & {k[len(p) :] for k in state if k.startswith(p)}) for p in prefixes}
        prefix = max(prefixes, key=lambda p: coverage[p])
        aligned = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        missing = sorted(names - set(aligned))
        if missing:
            raise TaskArithError(
                f"{finetuned}: no weights for {len(missing)} parameters of the base encoder, e.g. {missing[:3]} "
                f"(best key prefix found: {prefix!r}); is it a fine-tuned copy of this base model?"
            )
        pre = {name: param for name, param in base.named_parameters()}
        try:
            return cls.from_state_dicts(pre, {name: aligned[name] for name in pre}, **meta)
        except TaskArithError as exc:
            raise TaskArithError(f"{finetuned}: {exc}") from None

    @classmethod
    def from_peft(
        cls,
        folder: str | PathLike,
        base: nn.Module,
        *,
        base_name: str | None = None,
        ignore_base_name: bool = False,
        task: str | None = None,
    ) -> TaskVector:
        """From a PEFT LoRA adapter folder trained on ``base``: scaling * B @ A per target module, keyed by
        ``base``'s parameter names (:func:`taskarith.adapters.read_lora_adapter` says what is checked)."""
        from taskarith.adapters import read_lora_adapter

        read = read_lora_adapter(folder, base, base_name=base_name, ignore_base_name=ignore_base_name, task=task)
        return cls(deltas=read.deltas, base_hash=read.base_hash, task=read.task, config=read.config)

    # persistence ----------------------------------------------------------------------------------

    def check_finite(self, destination: str | PathLike) -> None:
        """Refuse to write a vector holding NaN or Inf (what overflowing coefficients make) to ``destination``."""
        for name, delta in self.deltas.items():
            if delta.is_floating_point() and not torch.isfinite(delta).all():
                raise TaskArithError(
                    f"refusing to write {destination}: tensor '{name}' of task vector "
                    f"{self.task or '?'} is NaN or Inf (a coefficient too large for its dtype?)"
                )

    def save(self, path: str | PathLike) -> None:
        self.check_finite(path)
        metadata = {
            "format": FORMAT,
            "base_hash": self.base_hash or "",
            "task": self.task or "",
            "mode": self.mode,
            "config": json.dumps(self.config, sort_keys=True, default=str),
            "taskarith_version": __version__,
        }
        save_tensors(path, self.deltas, metadata)

    @classmethod
    def load(cls, path: str | PathLike) -> TaskVector:
        tensors, metadata = load_tensors(path)
        if metadata.get("format") != FORMAT:
            raise TaskArithError(
                f"{path}: not a taskarith task vector (metadata 'format' is {metadata.get('format')!r}, "
                f"expected {FORMAT!r}); build one with TaskVector.from_checkpoints"
            )
        try:
            config = json.loads(metadata.get("config") or "{}")
        # ValueError: also a number of over 4300 digits; RecursionError: arrays nested thousands deep.
        except (ValueError, RecursionError):
            raise TaskArithError(f"{path}: metadata 'config' is not valid JSON") from None
        for name, tensor in tensors.items():
            # Deltas of integer or complex tensors are not directions in weight space (a U16 "vector" composed
            # to norm 6.5e18), and float8 values mean nothing without the scales stored beside them.
            if tensor.dtype not in DELTA_DTYPES:
                raise TaskArithError(
                    f"{path}: tensor {quoted(name)} is {tensor.dtype}; a task vector holds "
                    "float16, bfloat16, float32 or float64 deltas"
                )
        ensure_finite(tensors, str(path))
        if isinstance(config, dict) and config.get("regularizer") and not config.get("penalty_form"):
            # Made before penalty forms were versioned: say what it was trained with, never pass it off as today's.
            config["penalty_form"] = LEGACY_PENALTY_FORMS.get(
                str(config["regularizer"]), "unknown (before taskarith 0.2)"
            )
        try:
            return cls(
                deltas=dict(sorted(tensors.items())),
                base_hash=metadata.get("base_hash") or None,
                task=metadata.get("task") or None,
                mode=metadata.get("mode", "standard"),
                config=config,
            )
        except TaskArithError as exc:
            raise TaskArithError(f"{path}: {exc}") from None

    def save_pretrained(
        self, folder: str | PathLike, *, accuracies: Mapping[str, float] | None = None, overwrite: bool = False
    ) -> None:
        """Write a shareable folder: ``task_vector.safetensors`` and a model card (:mod:`taskarith.hub`)."""
        from taskarith.hub import save_pretrained

        save_pretrained(self, folder, accuracies=accuracies, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, source: str | PathLike, **hub_options: Any) -> TaskVector:
        """A vector from a :meth:`save_pretrained` folder or a hub repository id, through the local cache
        (``revision``, ``cache_dir``, ``local_files_only``, ``token``: see :func:`taskarith.hub.vector_file`)."""
        from taskarith.hub import vector_file

        return cls.load(vector_file(source, **hub_options))

    def push_to_hub(self, repo_id: str, **hub_options: Any) -> str:
        """Upload the folder :meth:`save_pretrained` writes to the hub; returns the commit URL
        (``accuracies``, ``private``, ``token``, ``revision``, ``commit_message``: :func:`taskarith.hub.push_to_hub`)."""
        from taskarith.hub import push_to_hub

        return push_to_hub(self, repo_id, **hub_options)

    def save_peft(self, folder: str | PathLike, base: nn.Module, *, rank: int, **options: Any) -> LoraExport:
        """Write a rank-``rank`` LoRA adapter folder for ``base`` by truncated SVD; returns the reconstruction
        error (``base_model_name_or_path``, ``drop_non_matrix``, ``allow_linear``, ``overwrite``:
        :func:`taskarith.adapters.save_lora_adapter`)."""
        from taskarith.adapters import save_lora_adapter

        return save_lora_adapter(self, folder, base, rank=rank, **options)

    # algebra --------------------------------------------------------------------------------------

    def _combine_meta(self, other: TaskVector) -> dict[str, Any]:
        # Parameters first: a hash covers only the parameters a vector changes, so vectors of one base that
        # change different parameters (adapters on different modules) also have different hashes.
        _check_same_keys(
            self.deltas, other.deltas, f"task vector {self.task or '?'}", f"task vector {other.task or '?'}"
        )
        if self.base_hash and other.base_hash and self.base_hash != other.base_hash:
            raise TaskArithError(
                f"cannot combine task vectors of different base models: "
                f"{self.task or '?'} (base {self.base_hash}) and {other.task or '?'} (base {other.base_hash})"
            )
        if self.mode != other.mode:
            raise TaskArithError(
                f"cannot combine a {self.mode}-mode task vector ({self.task or '?'}) with a {other.mode}-mode one "
                f"({other.task or '?'}): they edit different functions"
            )
        return {"base_hash": self.base_hash or other.base_hash, "mode": self.mode}

    def __add__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        meta = self._combine_meta(other)
        deltas = {k: v + other.deltas[k] for k, v in self.deltas.items()}
        return TaskVector(deltas=deltas, task=f"{self.task}+{other.task}", **meta)

    def __radd__(self, other: Any) -> Any:
        if isinstance(other, (int, float)) and other == 0:  # lets sum([...]) start from 0
            return self
        if isinstance(other, (nn.Module, dict)):
            return self.apply_to(other)
        return NotImplemented

    def __neg__(self) -> TaskVector:
        return self.scale(-1.0, label=f"-{self.task}")

    def __sub__(self, other: object) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self + (-other)

    def __mul__(self, alpha: object) -> TaskVector:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            return NotImplemented
        return self.scale(float(alpha))

    __rmul__ = __mul__

    def __truediv__(self, divisor: object) -> TaskVector:
        if isinstance(divisor, bool) or not isinstance(divisor, (int, float)):
            return NotImplemented
        return self.scale(1.0 / float(divisor))

    def scale(self, alpha: float, label: str | None = None) -> TaskVector:
        if not math.isfinite(alpha):
            raise TaskArithError(f"scaling coefficient must be finite, got {alpha}")
        return replace(
            self, deltas={k: alpha * v for k, v in self.deltas.items()}, task=label or f"{alpha:g}*{self.task}"
        )

    # measurements ---------------------------------------------------------------------------------

    def dot(self, other: TaskVector) -> float:
        _check_same_keys(self.deltas, other.deltas, "the first task vector", "the second task vector")
        return float(sum((v.double() * other.deltas[k].double()).sum() for k, v in self.deltas.items()))

    def norm(self) -> float:
        return math.sqrt(self.dot(self))

    def allclose(self, other: TaskVector, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
        return set(self.deltas) == set(other.deltas) and all(
            torch.allclose(v, other.deltas[k], atol=atol, rtol=rtol) for k, v in self.deltas.items()
        )

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.deltas.values())

    # application ----------------------------------------------------------------------------------

    def check_base(self, base_state: Mapping[str, torch.Tensor]) -> None:
        """Refuse a base model other than the one this vector was measured on."""
        if self.base_hash is None:
            return
        actual = state_hash({k: base_state[k] for k in self.deltas})
        if actual != self.base_hash:
            raise TaskArithError(
                f"task vector {self.task or '?'} was built on base model {self.base_hash}, "
                f"but it is being applied to base model {actual}"
            )

    def with_mode(self, mode: str) -> TaskVector:
        """The same deltas read in another mode: ``tau.with_mode("linear")`` is post-hoc linearization."""
        return replace(self, mode=mode)

    def apply_to(self, base: Base, alpha: float = 1.0, *, check_base: bool = True) -> Base | nn.Module:
        """Return base + alpha * tau as a new state dict or a new module; the base is left untouched.

        A linear-mode vector edits the linearized model f_lin, not the weights: applied to a module it
        returns a :class:`~taskarith.linearize.LinearizedEncoder` sharing the base's weights.
        """
        if self.mode == "linear":
            if not isinstance(base, nn.Module):
                raise TaskArithError(
                    f"task vector {self.task or '?'} is linear-mode: it edits the linearized model, so apply it to a "
                    f"model, or read it as weights with tau.with_mode('standard')"
                )
            from taskarith.linearize import LinearizedEncoder

            target = _target_module(base, self.deltas)
            if check_base:
                self.check_base(target.state_dict())
            return LinearizedEncoder(target, {k: alpha * v for k, v in self.deltas.items()})
        if isinstance(base, dict):
            _check_same_keys(
                self.deltas, {k: base[k] for k in self.deltas if k in base}, "the task vector", "the base weights"
            )
            if check_base:
                self.check_base(base)
            edited = dict(base)
            for key, delta in self.deltas.items():
                edited[key] = base[key] + alpha * delta.to(base[key].device, base[key].dtype)
            return edited  # type: ignore[return-value]  # Base is dict on this branch; mypy checks it as Module too
        if isinstance(base, nn.Module):
            edited_module = copy.deepcopy(base)
            target = _target_module(edited_module, self.deltas)
            state = target.state_dict()
            _check_same_keys(self.deltas, {k: state[k] for k in self.deltas}, "the task vector", "the model")
            if check_base:
                self.check_base(state)
            with torch.no_grad():
                for key, delta in self.deltas.items():
                    state[key].add_(alpha * delta.to(state[key].device, state[key].dtype))
            return edited_module
        raise TaskArithError(f"cannot apply a task vector to a {type(base).__name__}; pass a model or a state dict")


def combine(vectors: Sequence[TaskVector], alphas: Sequence[float] | float = 1.0) -> TaskVector:
    """sum_t alpha_t * tau_t, with one coefficient per vector or one for all."""
    if not vectors:
        raise TaskArithError("no task vectors to combine")
    coefficients = [float(alphas)] * len(vectors) if isinstance(alphas, (int, float)) else [float(a) for a in alphas]
    if len(coefficients) != len(vectors):
        raise TaskArithError(f"{len(vectors)} task vectors but {len(coefficients)} coefficients")
    return sum((a * tau for a, tau in zip(coefficients, vectors, strict=True)), start=0)  # type: ignore[return-value]


def align(vectors: Sequence[TaskVector], base: nn.Module | Mapping[str, torch.Tensor]) -> list[TaskVector]:
    """``vectors`` over the union of the parameters they change, zero where one leaves a parameter alone.

    Each vector is first checked against ``base``; all then carry the hash of ``base`` over that union, so
    vectors of one base that change different parameters (LoRA adapters on different modules) can be
    combined and merged.
    """
    if not vectors:
        raise TaskArithError("no task vectors to align")
    state = base.state_dict() if isinstance(base, nn.Module) else dict(base)
    keys = sorted(set().union(*(vector.deltas for vector in vectors)))
    missing = [key for key in keys if key not in state]
    if missing:
        raise TaskArithError(f"the base model has no parameter {quoted(missing[0])} ({len(missing)} missing)")
    for vector in vectors:
        vector.check_base(state)
    base_hash = state_hash({key: state[key] for key in keys})

    def padded(vector: TaskVector) -> dict[str, torch.Tensor]:
        zero = {key: torch.zeros(state[key].shape, dtype=state[key].dtype) for key in keys if key not in vector.deltas}
        return {key: vector.deltas[key] if key in vector.deltas else zero[key] for key in keys}

    return [replace(vector, deltas=padded(vector), base_hash=base_hash) for vector in vectors]


def cosine_similarity_matrix(vectors: Sequence[TaskVector]) -> torch.Tensor:
    """Pairwise cosine similarity of flattened task vectors (as in the task-arithmetic paper's analysis)."""
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = vectors[i].dot(vectors[j])
    norms = gram.diagonal().sqrt().clamp_min(1e-30)
    return gram / norms[:, None] / norms[None, :]
