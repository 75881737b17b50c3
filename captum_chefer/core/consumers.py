"""Consumers: what a relevance rule does with each layer's ``(A, dA)`` blocks during backward.

The capture layer calls ``begin_layer``, ``add_block`` (once per block of query rows) and
``end_layer`` for every attention call, last layer first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import AttentionCall
from .rules import RowPropagation, head_reduce, propagate_matrix


class RowRelevance:
    """One row of ``R`` (ICCV 2021 eq. 6), folded in layer by layer as gradients arrive.

    Memory is ``O(B·N)`` for the state plus one block; no ``(B, N, N)`` map is kept.

    Args:
        start_layer: layers (forward order) below this index are left out, as in Chefer et
            al.'s ViT evaluations with ``start_layer=1``.
    """

    propagates_through_layers = True
    """The relevance is carried through every layer (token mixing outside attention is refused)."""

    accepts_key_prefix_blocks = True
    """Blocks of causal layers may stop at their last attendable key (half the work)."""

    def __init__(self, start_layer: int = 0) -> None:
        self.start_layer = start_layer
        self._propagation: RowPropagation | None = None
        self._last_index: int | None = None

    def set_start(self, start_rows: Tensor) -> None:
        """The rows to read, ``(B, N)``; must be set before the backward pass."""
        self._propagation = RowPropagation(start_rows)

    @property
    def added(self) -> Tensor:
        """What the layers added to the start rows, ``(B, N)``: the row minus the identity."""
        assert self._propagation is not None, "set_start() first"
        return self._propagation.added

    def begin_layer(self, index: int, call: AttentionCall | None, shape: tuple[int, ...]) -> None:
        if self._last_index is not None and index >= self._last_index:
            raise RuntimeError(
                "Attention layers reached the backward pass out of order, so one relevance row "
                "cannot be folded in as gradients arrive; pass mode='matrix'."
            )
        self._last_index = index
        if index >= self.start_layer:
            assert self._propagation is not None, "set_start() first"
            self._propagation.begin_layer()

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index >= self.start_layer:
            assert self._propagation is not None
            self._propagation.add_block(rows, head_reduce(probs, grad_probs))

    def end_layer(self, index: int) -> None:
        if index >= self.start_layer:
            assert self._propagation is not None
            self._propagation.end_layer()


class MatrixRelevance:
    """Every layer's ``Abar`` ``(B, N, N)``, kept so that the full ``R`` can be formed.

    Args:
        start_layer: layers (forward order) below this index are left out.
    """

    propagates_through_layers = True
    """The relevance is carried through every layer (token mixing outside attention is refused)."""

    def __init__(self, start_layer: int = 0) -> None:
        self.start_layer = start_layer
        self.abars: dict[int, Tensor] = {}
        self._shape: tuple[int, ...] = ()

    def begin_layer(self, index: int, call: AttentionCall | None, shape: tuple[int, ...]) -> None:
        self._shape = shape

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index < self.start_layer:
            return
        if index not in self.abars:
            batch, _, n_query, n_key = self._shape
            self.abars[index] = torch.zeros(batch, n_query, n_key, device=probs.device)
        self.abars[index][:, rows] = head_reduce(probs, grad_probs)

    def end_layer(self, index: int) -> None:
        pass

    def matrix(self, include_identity: bool = True) -> Tensor:
        """``R = (I + Abar_L)…(I + Abar_1)`` over the captured layers, ``(B, N, N)``."""
        if not self.abars:
            raise RuntimeError(
                "No attention layer at or above start_layer reached the backward pass."
            )
        layers = [self.abars[index] for index in sorted(self.abars)]
        return propagate_matrix(layers, include_identity)
