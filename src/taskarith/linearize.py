"""The linearized model f_lin(x; theta0 + delta) = f(x; theta0) + J_theta0 f(x) . delta, for any module.

One forward-mode Jacobian-vector product (torch.func.jvp) gives both terms at about the cost of two
forward passes, without ever forming J. The pre-trained weights theta0 are referenced, never copied:
the only new memory is delta, the trainable difference (which is the task vector itself).

:func:`linearized_call` works on any ``nn.Module`` whose output is a tensor or a nested structure of them
(a Hugging Face ``ModelOutput``, a tuple, a list, a dict): every floating-point tensor in the output is
linearized, everything else (integer tensors, None, numbers) is passed through from the pre-trained model.
:class:`Linearized` wraps it as a module whose only trainable parameters are delta, optionally for a
subset of the parameters (the others stay at theta0 and the JVP does not differentiate through them), so
any training loop can train it.

For the encoders taskarith classifies with, f is the token states; mean pooling is linear, so
linearizing the token states or the pooled embedding is the same thing, and the zero-shot head
(normalisation and cosine) stays outside the linearization, as in the tangent-space paper's CLIP setting.

Forward-mode AD has no rule for the fused attention kernels (SDPA's flash/memory-efficient kernels,
nn.MultiheadAttention's inference fast path). Every JVP therefore runs under :func:`jvp_safe_kernels`,
which routes SDPA to its math kernel and turns the MHA fast path off for the duration: Hugging Face
encoders with eager or SDPA attention, open_clip and timm models all linearize. ``load_pretrained`` still
loads Hugging Face encoders with eager attention by default, so the non-linear and linearized models
run literally the same operations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.utils import ModelOutput

from taskarith.errors import TaskArithError

Params = dict[str, torch.Tensor]


# Attention implementations whose every kernel has a forward-mode rule once SDPA is held to its math kernel.
JVP_COMPATIBLE_ATTENTION = (None, "eager", "sdpa")


def _check_attention(module: nn.Module) -> None:
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", "eager")
    if implementation not in JVP_COMPATIBLE_ATTENTION:
        raise TaskArithError(
            f"linearization needs eager or sdpa attention (forward-mode AD has no rule for "
            f"'{implementation}'); load the model with attn_implementation='eager'"
        )


@contextmanager
def jvp_safe_kernels() -> Iterator[None]:
    """Attention kernels that forward-mode AD can differentiate: SDPA's math kernel, no fused MHA fast path."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _flatten(output: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The leaves of a nested output, and how to rebuild the same structure from new leaves."""
    if isinstance(output, torch.Tensor) or output is None or isinstance(output, (int, float, bool, str)):
        return [output], lambda leaves: leaves[0]
    if isinstance(output, Mapping):
        keys = list(output.keys())
        parts = [_flatten(output[key]) for key in keys]
        mapping_kind: Any = type(output)
        is_model_output = isinstance(output, ModelOutput)

        def rebuild_mapping(leaves: list[Any]) -> Any:
            values, start = {}, 0
            for key, (items, rebuild) in zip(keys, parts, strict=True):
                values[key] = rebuild(leaves[start : start + len(items)])
                start += len(items)
            if mapping_kind is dict:
                return values
            # ModelOutput subclasses take their fields as keywords; other mappings (BatchEncoding) a dict.
            return mapping_kind(**values) if is_model_output else mapping_kind(values)

        return [leaf for items, _ in parts for leaf in items], rebuild_mapping
    if isinstance(output, (tuple, list)):
        parts = [_flatten(item) for item in output]
        sequence_kind: Any = type(output)

        def rebuild_sequence(leaves: list[Any]) -> Any:
            items, start = [], 0
            for part, rebuild in parts:
                items.append(rebuild(leaves[start : start + len(part)]))
                start += len(part)
            if hasattr(output, "_fields"):  # a namedtuple
                return sequence_kind(*items)
            return sequence_kind(items)

        return [leaf for items, _ in parts for leaf in items], rebuild_sequence
    raise TaskArithError(
        f"cannot linearize a module returning {type(output).__name__}: the output must be a tensor or a "
        "tuple, list, dict or ModelOutput of tensors (a decoder's key-value cache: call it with use_cache=False)"
    )


def _without_cache(module: nn.Module, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The call's keywords, with use_cache=False for modules that take it and were not told otherwise: a
    decoder's key-value cache is an object of the forward pass, not an output to linearize."""
    call = dict(kwargs or {})
    if "use_cache" not in call and "use_cache" in inspect.signature(module.forward).parameters:
        call["use_cache"] = False
    return call


def _linearized_leaves(
    module: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
) -> tuple[list[Any], list[Any], Callable[[list[Any]], Any]]:
    """The output's leaves at theta0, their tangents (None where not floating point) and the rebuild."""
    kwargs = _without_cache(module, kwargs)
    fixed = {name: value for name, value in theta0.items() if name not in delta}
    moving = {name: theta0[name] for name in delta}
    structure: list[Callable[[list[Any]], Any]] = []
    kinds: list[str] = []
    constants: list[Any] = []

    def floating_outputs(params: Params) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        output = functional_call(module, {**fixed, **params}, args=tuple(args), kwargs=dict(kwargs or {}))
        leaves, rebuild = _flatten(output)
        structure.append(rebuild)
        kinds.extend(
            "float" if _is_float(leaf) else "tensor" if isinstance(leaf, torch.Tensor) else "constant"
            for leaf in leaves
        )
        # Plain values (None, numbers) carry no tensor for the transform to unwrap: they are kept aside.
        constants.extend(leaf for leaf in leaves if not isinstance(leaf, torch.Tensor))
        floats = tuple(leaf for leaf in leaves if _is_float(leaf))
        others = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and not _is_float(leaf))
        return floats, others

    tangent_in = {name: delta[name] for name in moving}
    with jvp_safe_kernels():
        primal_floats, tangent_floats, others = jvp(  # type: ignore[misc]  # with has_aux it returns three
            floating_outputs, (moving,), (tangent_in,), has_aux=True
        )
    sources = {"float": iter(primal_floats), "tensor": iter(others), "constant": iter(constants)}
    tangents = iter(tangent_floats)
    primal_leaves = [next(sources[kind]) for kind in kinds]
    tangent_leaves = [next(tangents) if kind == "float" else None for kind in kinds]
    return primal_leaves, tangent_leaves, structure[0]


def linearized_call(
    module: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(f(x; theta0), J_theta0 f(x) . delta), each in the structure of the module's own output, by one JVP.

    ``delta`` may name a subset of ``theta0``: the other parameters stay at theta0 and the JVP does not
    differentiate through them. Gradients flow into delta. In the tangent, leaves that are not floating-point
    tensors are None (a ``ModelOutput`` leaves such fields out). Modules taking ``use_cache`` are called
    with ``use_cache=False`` unless told otherwise.
    """
    primal, tangent, rebuild = _linearized_leaves(module, theta0, delta, args, kwargs)
    return rebuild(primal), rebuild(tangent)


def linearized_output(
    module: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """f_lin(x) = f(x; theta0) + J_theta0 f(x) . delta in the structure of the module's own output."""
    primal, tangent, rebuild = _linearized_leaves(module, theta0, delta, args, kwargs)
    return rebuild([p if t is None else p + t for p, t in zip(primal, tangent, strict=True)])


def hidden_and_tangent(
    encoder: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x; theta0), J_theta0 f(x) . delta) for an encoder's token states (``last_hidden_state``), by one JVP."""
    primal, tangent = linearized_call(encoder, theta0, delta, kwargs=batch)
    return primal.last_hidden_state, tangent.last_hidden_state


def _slot(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "__")


class Linearized(nn.Module):
    """Any module's f_lin; its only trainable parameters are delta = theta - theta0.

    ``Linearized(model)(*args, **kwargs)`` returns what ``model(*args, **kwargs)`` returns, each
    floating-point tensor replaced by its linearization at the module's current weights theta0 (which are
    frozen and referenced, not copied). ``params`` names the parameters delta covers (default: all); the
    others stay at theta0, and the JVP costs less the fewer it covers. ``trainable=True`` lets an optimizer
    train delta: ``torch.optim.AdamW(Linearized(model, trainable=True).parameters())``.
    """

    def __init__(
        self,
        module: nn.Module,
        delta: Mapping[str, torch.Tensor] | None = None,
        *,
        trainable: bool = False,
        params: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        _check_attention(module)
        self.base = module.requires_grad_(False)
        every = dict(module.named_parameters())
        chosen = list(every) if params is None else list(params)
        unknown = sorted(set(chosen) - set(every))
        if unknown:
            raise TaskArithError(f"the model has no parameters named {unknown[:5]} to linearize")
        self.names = chosen
        outside = sorted(set(delta or {}) - set(chosen))
        if outside:
            raise TaskArithError(
                f"the model has no linearized parameters named {outside[:5]} that the task vector changes"
            )
        self.delta = nn.ParameterDict(
            {
                _slot(name): nn.Parameter(
                    (
                        delta[name].to(every[name].device, every[name].dtype).clone()
                        if delta and name in delta
                        else torch.zeros_like(every[name])
                    ),
                    requires_grad=trainable,
                )
                for name in self.names
            }
        )

    def deltas(self) -> dict[str, torch.Tensor]:
        return {name: self.delta[_slot(name)] for name in self.names}

    def theta0(self) -> dict[str, torch.Tensor]:
        return dict(self.base.named_parameters())

    def outputs_and_tangents(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """(f(x; theta0), J f(x) . delta) in the structure of the module's output."""
        return linearized_call(self.base, self.theta0(), self.deltas(), args, kwargs)

    def hidden_and_tangent(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        primal, tangent = self.outputs_and_tangents(**batch)
        return primal.last_hidden_state, tangent.last_hidden_state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return linearized_output(self.base, self.theta0(), self.deltas(), args, kwargs)

    # A checkpoint of the linearized model is delta: theta0 belongs to the base model, which whoever saves
    # the checkpoint has already (and whose tied weights safetensors would refuse to store twice).
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        return self.delta.state_dict(destination=destination, prefix=prefix + "delta.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        own = {key[len("delta.") :]: value for key, value in state_dict.items() if key.startswith("delta.")}
        return self.delta.load_state_dict(own, strict=strict, assign=assign)


# The name under which the encoder-shaped linearized model was first published; it is the same module.
LinearizedEncoder = Linearized
