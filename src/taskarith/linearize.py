"""The linearized model f_lin(x; theta0 + delta) = f(x; theta0) + J_theta0 f(x) . delta.

One forward-mode Jacobian-vector product (torch.func.jvp) gives both terms at about the cost of two
forward passes, without ever forming J. The pre-trained weights theta0 are referenced, never copied:
the only new memory is delta, the trainable difference (which is the task vector itself).

Here f is the encoder's token states; mean pooling is linear, so linearizing the token states or the
pooled embedding is the same thing, and the zero-shot head (normalisation and cosine) stays outside
the linearization, as in the tangent-space paper's CLIP setting.

Forward-mode AD has no rule for the fused attention kernels (SDPA's flash/memory-efficient kernels,
nn.MultiheadAttention's inference fast path). Every JVP therefore runs under :func:`jvp_safe_kernels`,
which routes SDPA to its math kernel and turns the MHA fast path off for the duration: Hugging Face
encoders with eager or SDPA attention, open_clip and timm models all linearize. ``load_pretrained`` still
loads Hugging Face encoders with eager attention by default, so the non-linear and linearized models
run literally the same operations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.modeling_outputs import BaseModelOutput

from taskarith.errors import TaskArithError

Params = dict[str, torch.Tensor]


# Attention implementations whose every kernel has a forward-mode rule once SDPA is held to its math kernel.
JVP_COMPATIBLE_ATTENTION = (None, "eager", "sdpa")


def _check_attention(encoder: nn.Module) -> None:
    config = getattr(encoder, "config", None)
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


def hidden_and_tangent(
    encoder: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x; theta0), J_theta0 f(x) . delta) for token states, by one JVP. Gradients flow into delta."""

    def token_states(params: Params) -> torch.Tensor:
        return functional_call(encoder, params, args=(), kwargs=dict(batch)).last_hidden_state

    primal = dict(theta0)
    tangent = {name: delta[name] if name in delta else torch.zeros_like(value) for name, value in primal.items()}
    with jvp_safe_kernels():
        hidden, tangent_hidden = jvp(token_states, (primal,), (tangent,))[:2]
    return hidden, tangent_hidden


def _slot(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "__")


class LinearizedEncoder(nn.Module):
    """An encoder-shaped module computing f_lin; its only trainable parameters are delta = theta - theta0.

    Drop-in where an encoder goes (it returns an object with ``last_hidden_state``), so zero-shot
    classifiers, evaluation and fine-tuning use it unchanged.
    """

    def __init__(
        self, encoder: nn.Module, delta: Mapping[str, torch.Tensor] | None = None, *, trainable: bool = False
    ) -> None:
        super().__init__()
        _check_attention(encoder)
        self.base = encoder.requires_grad_(False)
        self.names = [name for name, _ in encoder.named_parameters()]
        known = set(self.names)
        unknown = sorted(set(delta or {}) - known)
        if unknown:
            raise TaskArithError(f"the encoder has no parameters named {unknown[:5]} that the task vector changes")
        params = dict(encoder.named_parameters())
        self.delta = nn.ParameterDict(
            {
                _slot(name): nn.Parameter(
                    (
                        delta[name].to(params[name].device, params[name].dtype).clone()
                        if delta and name in delta
                        else torch.zeros_like(params[name])
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

    def hidden_and_tangent(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden_and_tangent(self.base, self.theta0(), self.deltas(), batch)

    def forward(self, **batch: torch.Tensor) -> BaseModelOutput:
        primal, tangent = self.hidden_and_tangent(**batch)
        return BaseModelOutput(last_hidden_state=primal + tangent)
