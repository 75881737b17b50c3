"""A plain replica of the bi-modal and encoder-decoder rules (ICCV 2021 eq. 6-11).

Full matrices in float64, the identity kept inside ``R_xx``, written from the paper and
independent of ``captum_chefer.core.bimodal``. Attentions and their gradients come from eager
float64 copies of the models (``output_attentions=True`` or forward hooks, ``retain_grad``, one
ordinary ``backward``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def abar(attention: Tensor, grad: Tensor) -> Tensor:
    """Eq. 5: mean over heads of clamp(dA * A, 0)."""
    return (grad.double() * attention.double()).clamp(min=0).mean(dim=1)


def rownorm_residual(relevance: Tensor) -> Tensor:
    """Eq. 8-9: rownorm(R - I) + I, an all-zero row of R - I left at zero."""
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype)
    residual = relevance - eye
    sums = residual.sum(-1, keepdim=True)
    safe = torch.where(sums > 0, sums, torch.ones_like(sums))
    return torch.where(sums > 0, residual / safe, torch.zeros_like(residual)) + eye


class BimodalReference:
    """R_xx = I, R_xy = 0, then eq. 6-7 for self-attention and eq. 10-11 for cross-attention."""

    def __init__(self, sizes: dict[str, int], batch: int) -> None:
        self.sizes = sizes
        self.R = {
            (x, y): torch.eye(nx, dtype=torch.float64).repeat(batch, 1, 1)
            if x == y
            else torch.zeros(batch, nx, ny, dtype=torch.float64)
            for x, nx in sizes.items()
            for y, ny in sizes.items()
        }

    def self_attention(self, s: str, a: Tensor) -> None:
        for y in self.sizes:
            self.R[s, y] = self.R[s, y] + a @ self.R[s, y]

    def cross_attention(self, *edges: tuple[str, str, Tensor]) -> None:
        """All edges from the same old R's, then added together."""
        additions = []
        for s, q, a in edges:
            ss, qq = rownorm_residual(self.R[s, s]), rownorm_residual(self.R[q, q])
            additions.append(((s, q), ss.transpose(-1, -2) @ a @ qq))
            additions.append(((s, s), a @ self.R[q, s]))
        for key, addition in additions:
            self.R[key] = self.R[key] + addition


def eager_double(model: nn.Module) -> nn.Module:
    """A float64 copy of a Hugging Face model with every config switched to eager attention."""
    reference = copy.deepcopy(model).double()
    for module in reference.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "eager"
    return reference


def retained(attentions: Iterable[Tensor]) -> list[Tensor]:
    kept = list(attentions)
    for attention in kept:
        attention.retain_grad()
    return kept


def abars(attentions: list[Tensor]) -> list[Tensor]:
    """Eq. 5 of each attention after the backward pass (NaN of fully masked rows to 0).

    An attention the explained output does not depend on has no gradient: its Abar is 0.
    """
    return [
        abar(a.detach().nan_to_num(0.0), torch.zeros_like(a) if a.grad is None else a.grad)
        for a in attentions
    ]


def hooked_outputs(modules: Iterable[nn.Module], run: Callable[[], Tensor]) -> list[Tensor]:
    """Abar of the tensors the given modules output (the probabilities), in call order."""
    captured: list[Tensor] = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handles = [module.register_forward_hook(keep) for module in modules]
    try:
        run().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return abars(captured)


def encoder_decoder_rows(
    encoder: list[Tensor], decoder: list[Tensor], cross: list[Tensor], position: Tensor
) -> tuple[Tensor, Tensor]:
    """(R_qi row, R_qq row minus the identity) at the decoder ``position`` of each example."""
    batch, n_source = encoder[0].shape[0], encoder[0].shape[-1]
    reference = BimodalReference({"i": n_source, "q": decoder[0].shape[-1]}, batch)
    for a in encoder:
        reference.self_attention("i", a)
    for self_a, cross_a in zip(decoder, cross):
        reference.self_attention("q", self_a)
        reference.cross_attention(("q", "i", cross_a))
    rows = torch.arange(batch)
    source = reference.R["q", "i"][rows, position]
    prefix = reference.R["q", "q"][rows, position]
    prefix[rows, position] -= 1.0
    return source, prefix
