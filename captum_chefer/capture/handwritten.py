"""Route: Hugging Face models whose attention softmax is written by hand (ViLT, LXMERT, …).

Some transformers 5 models never go through the attention registry: their attention module
computes ``softmax(Q·Kᵀ/√d + mask)`` itself and passes the probabilities to its own
``nn.Dropout`` before the product with ``V``. For the duration of the call a forward pre-hook on
that dropout module hands the probabilities to :func:`mark_attention`, the protocol route, so
their backward sees ``dA``. The map below is declarative: an attention module class name and the
attribute holding its dropout. The hooks are removed in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .protocol import mark_attention

PROBABILITY_DROPOUT: dict[str, str] = {
    "ViltSelfAttention": "dropout",
    "LxmertAttention": "dropout",
    "VisualBertSelfAttention": "dropout",
}
"""Attention module class name → its child module that receives the probabilities first."""


def _mark_probabilities(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (mark_attention(args[0]), *args[1:])


def probability_modules(model: nn.Module) -> list[nn.Module]:
    """The children of ``model``'s hand-written attention modules that receive the softmax."""
    found = []
    for module in model.modules():
        child = getattr(module, PROBABILITY_DROPOUT.get(type(module).__name__, ""), None)
        if isinstance(child, nn.Module):
            found.append(child)
    return found


@contextmanager
def handwritten_route(model: nn.Module | None) -> Iterator[None]:
    """Mark the probabilities of hand-written Hugging Face attention for the duration."""
    handles: list[RemovableHandle] = []
    try:
        for module in probability_modules(model) if model is not None else []:
            handles.append(module.register_forward_pre_hook(_mark_probabilities))
        yield
    finally:
        for handle in handles:
            handle.remove()
