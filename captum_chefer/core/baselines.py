"""The attention baselines Chefer et al. compare against, as readers of ``(A, dA)`` blocks.

Shapes: ``B`` batch, ``H`` heads, ``N`` tokens, ``r`` query rows in one block. Every reader
reads the rows given by the row weights ``s`` ``(B, N)`` (one-hot at the token the prediction
is read from, or uniform for mean pooling), so a row is ``sᵀ M`` for a ``(N, N)`` map ``M``.

- :class:`RawAttentionReader`: ``sᵀ mean_h(A_L)``, the last layer's head-mean attention.
- :class:`AttentionGradCAMReader`: Chefer et al.'s (CVPR 2021) attention Grad-CAM on the last
  layer.
- :class:`RolloutReader`: Abnar & Zuidema's (ACL 2020) attention rollout,
  ``sᵀ Â_L … Â_start`` with ``Â_l = rownorm(fuse_h(A_l) + I)``.
- :class:`GradientRolloutReader`: the same rollout of ``mean_h(clamp(A_l ⊙ dA_l, 0))``.

The rollouts fold their row in last layer first, ``v ← v·Â_l``, in the order in which the
backward pass delivers the layers, so no ``(B, N, N)`` map is formed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from .readers import ReadSetup, check_last_first
from .rules import head_reduce
from .tokens import SelfRelevance, mask_read_tokens

HeadFusion = Literal["mean", "max", "min"]


def fuse_heads(probs: Tensor, head_fusion: HeadFusion = "mean") -> Tensor:
    """Reduce attention ``(B, H, r, N)`` over heads to ``(B, r, N)`` by mean, max or min.

    Example:
        >>> a = torch.tensor([[[[0.2, 0.8]], [[0.6, 0.4]]]])
        >>> fuse_heads(a, "max")
        tensor([[[0.6000, 0.8000]]])
    """
    probs = probs.float()
    if head_fusion == "mean":
        return probs.mean(1)
    if head_fusion == "max":
        return probs.amax(1)
    if head_fusion == "min":
        return probs.amin(1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', not {head_fusion!r}")


def rollout_step(fused: Tensor, rows: slice) -> Tensor:
    """Query ``rows`` of ``rownorm(M + I)`` from those rows of ``M`` ``(B, r, N)``.

    Abnar & Zuidema (ACL 2020), Sec. 3: the residual connection is modelled by adding the
    identity, and each row is normalised to sum to 1. A fully masked row becomes the identity's.

    Example:
        >>> rollout_step(torch.tensor([[[0.5, 0.5], [0.0, 0.0]]]), slice(0, 2))
        tensor([[[0.7500, 0.2500],
                 [0.0000, 1.0000]]])
    """
    n_key = fused.shape[-1]
    index = torch.arange(n_key, device=fused.device)
    eye = (index[rows, None] == index[None, :]).to(fused.dtype)
    augmented = fused + eye
    return augmented / augmented.sum(-1, keepdim=True)


def weighted_rows(weights: Tensor, rows: slice, block: Tensor) -> Tensor:
    """``Σ_i s[b, i]·block[b, …, i, :]`` over the query ``rows``: ``(B, r, N)`` → ``(B, N)``.

    ``block`` may carry a head dimension, ``(B, H, r, N)`` → ``(B, H, N)``.

    Example:
        >>> weighted_rows(torch.tensor([[0.0, 2.0]]), slice(0, 2), torch.eye(2)[None])
        tensor([[0., 2.]])
    """
    return torch.einsum("br,b...rn->b...n", weights[:, rows].float(), block.float())


class _BaselineReader:
    """What the baseline readers declare: one stream, a row without identity, no start layer."""

    start_layer = 0
    key_prefix_blocks: ClassVar[bool] = False
    identity_row: ClassVar[bool] = False
    multi_stream: ClassVar[bool] = False
    propagates_through_layers: ClassVar[bool] = True


class _LastLayerReader(_BaselineReader):
    """Reads the rows of the last attention layer; earlier layers are ignored."""

    propagates_through_layers: ClassVar[bool] = False  # token mixing elsewhere is not its claim

    def prepare(self, setup: ReadSetup) -> None:
        self._setup = setup
        self._last = setup.n_layers - 1

    def begin_layer(self, index: int, shape: tuple[int, ...]) -> None:
        pass

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index == self._last:
            self._add(rows, probs, grad_probs)

    def end_layer(self, index: int) -> None:
        pass

    def _add(self, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        raise NotImplementedError


class RawAttentionReader(_LastLayerReader):
    """Raw attention: the read rows of the last layer's head-mean attention ``mean_h(A_L)``.

    Example:
        >>> reader = RawAttentionReader()
        >>> reader.prepare(ReadSetup(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=bool), 1))
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]], [[[0.1, 0.9], [0.0, 1.0]]]])  # 2 heads
        >>> reader.add_block(0, slice(0, 2), a.transpose(0, 1), torch.zeros(1, 2, 2, 2))
        >>> reader.read("keep")
        tensor([[0.3000, 0.7000]])
    """

    def prepare(self, setup: ReadSetup) -> None:
        super().prepare(setup)
        self._row = torch.zeros_like(setup.row_weights, dtype=torch.float32)

    def _add(self, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        self._row = self._row + weighted_rows(self._setup.row_weights, rows, fuse_heads(probs))

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        return mask_read_tokens(self._row, self._setup.row_weights, self_relevance)


class AttentionGradCAMReader(_LastLayerReader):
    """Attention Grad-CAM (Chefer, Gur & Wolf, CVPR 2021, their baseline).

    On the last layer, each head's attention row ``a_h = sᵀA_h`` is weighted by the mean of
    its gradient row ``g_h = sᵀdA_h`` over the tokens the read rows attend after the prefix
    (the patches of a ViT; padding, which no row attends, is left out); then the head mean is
    clamped: ``clamp(mean_h(a_h · mean_p g_h[p]), min=0)``.

    Example:
        >>> reader = AttentionGradCAMReader()
        >>> reader.prepare(ReadSetup(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=bool), 1))
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
        >>> reader.add_block(0, slice(0, 2), a, torch.tensor([[[[1.0, 3.0], [9.0, 9.0]]]]))
        >>> reader.read("keep")
        tensor([[1., 1.]])
    """

    def prepare(self, setup: ReadSetup) -> None:
        super().prepare(setup)
        self._probs: Tensor | float = 0.0
        self._grads: Tensor | float = 0.0

    def _add(self, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        self._probs = self._probs + weighted_rows(self._setup.row_weights, rows, probs)
        self._grads = self._grads + weighted_rows(self._setup.row_weights, rows, grad_probs)

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        assert isinstance(self._probs, Tensor) and isinstance(self._grads, Tensor)
        setup = self._setup
        attended = self._probs.sum(1) > 0  # the tokens the read rows attend: not padding
        index = torch.arange(attended.shape[1], device=attended.device)
        positions = (attended & (index >= setup.num_prefix_tokens)).float().unsqueeze(1)
        weights = (self._grads * positions).sum(-1, keepdim=True)
        weights = weights / positions.sum(-1, keepdim=True).clamp_min(1.0)
        row = (self._probs * weights).mean(1).clamp(min=0)
        return mask_read_tokens(row, setup.row_weights, self_relevance)


class RolloutReader(_BaselineReader):
    """Attention rollout (Abnar & Zuidema, ACL 2020): ``sᵀ Â_L … Â_start``.

    ``Â_l = rownorm(fuse_h(A_l) + I)``; layers below ``start_layer`` are left out. The row is
    folded in last layer first, ``v ← v·Â_l``, as the backward pass delivers the layers.

    Args:
        start_layer: the first layer (forward order) in the product.
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.

    Example:
        >>> reader = RolloutReader()
        >>> reader.prepare(ReadSetup(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=bool), 2))
        >>> a = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])
        >>> for layer in (1, 0):
        ...     reader.begin_layer(layer, (1, 1, 2, 2))
        ...     reader.add_block(layer, slice(0, 2), a, torch.zeros_like(a))
        ...     reader.end_layer(layer)
        >>> reader.read("keep")
        tensor([[0.2500, 0.7500]])
    """

    def __init__(self, start_layer: int = 0, head_fusion: HeadFusion = "mean") -> None:
        self.start_layer = start_layer
        self.head_fusion = head_fusion

    def prepare(self, setup: ReadSetup) -> None:
        self._weights = setup.row_weights
        self._row = setup.row_weights.float()
        self._next: Tensor | None = None
        self._last_index: int | None = None

    def begin_layer(self, index: int, shape: tuple[int, ...]) -> None:
        self._last_index = check_last_first(self._last_index, index, "the rollout row")
        if index >= self.start_layer:
            self._next = torch.zeros_like(self._row)

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index >= self.start_layer:
            assert self._next is not None
            step = rollout_step(self._fuse(probs, grad_probs), rows)
            self._next += weighted_rows(self._row, rows, step)

    def end_layer(self, index: int) -> None:
        if index >= self.start_layer:
            assert self._next is not None
            self._row, self._next = self._next, None

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        return mask_read_tokens(self._row, self._weights, self_relevance)

    def _fuse(self, probs: Tensor, grad_probs: Tensor) -> Tensor:
        return fuse_heads(probs, self.head_fusion)


class GradientRolloutReader(RolloutReader):
    """Rollout of gradient-weighted attention: ``Â_l = rownorm(mean_h(clamp(A_l ⊙ dA_l)) + I)``.

    The clamp comes before the head mean, each row is normalised on its own (``keepdim``), and
    the layers are multiplied in their true order: the three bugs of a popular implementation
    (jacobgil/vit-explain's ``grad_rollout``) are avoided.

    Args:
        start_layer: the first layer (forward order) in the product.
    """

    def __init__(self, start_layer: int = 0) -> None:
        super().__init__(start_layer, "mean")

    def _fuse(self, probs: Tensor, grad_probs: Tensor) -> Tensor:
        return head_reduce(probs, grad_probs)
