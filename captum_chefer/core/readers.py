"""Readers: a consumer together with how its relevance row is set up and read.

Every attribution class runs the same flow: before the backward pass its reader learns which
rows of the relevance matrix to read (:meth:`RowReader.prepare`); during it the reader receives
each layer's ``(A, dA)`` blocks, last layer first, as a consumer (``begin_layer``,
``add_block``, ``end_layer``); afterwards :meth:`RowReader.read` returns one relevance row
``(B, N)`` per example. The readers of Chefer et al.'s rule are here; the baselines' are in
:mod:`captum_chefer.core.baselines`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .attention import AttentionCall
from .consumers import MatrixRelevance, RowRelevance
from .tokens import SelfRelevance, apply_self_relevance


@dataclass(frozen=True)
class ReadSetup:
    """What a reader needs to know before the backward pass.

    Attributes:
        start: ``(B, N)`` weights of the rows read: one-hot, or uniform over the real tokens
            for ``token_index="mean"``.
        valid: bool ``(B, N)``, False at padding.
        n_layers: number of attention layers the forward pass called.
        num_prefix_tokens: tokens before the patch grid (CLS, distillation); 0 for text.
    """

    start: Tensor
    valid: Tensor
    n_layers: int
    num_prefix_tokens: int = 0


class RowReader(Protocol):
    """A consumer of ``(A, dA)`` blocks that yields one relevance row per example."""

    propagates_through_layers: bool
    """Whether the row is carried through every layer (False: it reads one layer)."""

    def prepare(self, setup: ReadSetup) -> None:
        """Called once after the forward pass, before any layer arrives."""

    def begin_layer(self, index: int, call: AttentionCall | None, shape: tuple[int, ...]) -> None:
        """Layer ``index`` (forward order) starts; ``shape`` is ``(B, H, Nq, Nk)``."""

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        """Query ``rows`` of layer ``index``: ``A`` and ``dA``, ``(B, H, r, Nk)`` float32."""

    def end_layer(self, index: int) -> None:
        """Layer ``index`` is complete."""

    def read(self, self_relevance: SelfRelevance) -> Tensor:
        """The relevance row ``(B, N)`` after the backward pass."""


def check_start_layer(start_layer: int, n_layers: int) -> None:
    """Fail loudly when ``start_layer`` would leave no layer to propagate through.

    Example:
        >>> check_start_layer(1, 4)
        >>> check_start_layer(4, 4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: start_layer=4 leaves none of the model's 4 attention layers; ...
    """
    if not 0 <= start_layer < n_layers:
        raise ValueError(
            f"start_layer={start_layer} leaves none of the model's {n_layers} attention layers; "
            f"pass 0 <= start_layer < {n_layers}."
        )


def mask_read_tokens(row: Tensor, start: Tensor, self_relevance: SelfRelevance) -> Tensor:
    """Handle the read tokens of a row that has no identity term (attention, rollout).

    ``"zero"`` sets the read tokens to 0, as the papers' code drops the CLS column;
    ``"keep"`` returns the row unchanged. ``"subtract"`` only exists for Chefer's
    ``R = I + …``, whose identity share is known exactly.

    Example:
        >>> mask_read_tokens(torch.tensor([[0.6, 0.4]]), torch.tensor([[1.0, 0.0]]), "zero")
        tensor([[0.0000, 0.4000]])
    """
    if self_relevance == "keep":
        return row
    if self_relevance == "zero":
        return row.masked_fill(start > 0, 0.0)
    raise ValueError(
        f"self_relevance={self_relevance!r} is not available here: 'subtract' removes the "
        "identity of Chefer's R = I + ..., which attention and rollout rows do not have; "
        "use 'zero' (the read token set to 0) or 'keep'."
    )


class CheferRowReader(RowRelevance):
    """Chefer's rule folded in as one row (ICCV 2021 eq. 6), see :class:`RowRelevance`.

    Example:
        >>> reader = CheferRowReader()
        >>> reader.prepare(ReadSetup(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=bool), 1))
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
        >>> reader.begin_layer(0, None, (1, 1, 2, 2))
        >>> reader.add_block(0, slice(0, 2), a, torch.ones_like(a))
        >>> reader.end_layer(0)
        >>> reader.read("subtract")
        tensor([[0.5000, 0.5000]])
    """

    def prepare(self, setup: ReadSetup) -> None:
        check_start_layer(self.start_layer, setup.n_layers)
        self._start = setup.start
        self.set_start(setup.start)

    def read(self, self_relevance: SelfRelevance) -> Tensor:
        return apply_self_relevance(self.added, self._start, self_relevance)


class CheferMatrixReader(MatrixRelevance):
    """Chefer's rule on full ``(B, N, N)`` matrices, then the start rows read off ``R − I``."""

    def prepare(self, setup: ReadSetup) -> None:
        check_start_layer(self.start_layer, setup.n_layers)
        self._start = setup.start

    def read(self, self_relevance: SelfRelevance) -> Tensor:
        added = torch.bmm(self._start.unsqueeze(1), self.matrix(include_identity=False))
        return apply_self_relevance(added.squeeze(1), self._start, self_relevance)
