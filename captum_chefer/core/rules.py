"""The relevance rules of Chefer, Gur & Wolf (ICCV 2021), as pure tensor math.

Shapes: ``B`` batch, ``H`` heads, ``N`` tokens. ``Abar`` is a head-reduced map ``(B, N, N)``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def head_reduce(probs: Tensor, grad_probs: Tensor) -> Tensor:
    """ICCV 2021 eq. 5: ``Abar = mean_h(clamp(dA ⊙ A, min=0))``. Clamp first, then average.

    Args:
        probs: post-softmax attention ``(B, H, Nq, Nk)``.
        grad_probs: its gradient ``(B, H, Nq, Nk)``.

    Returns:
        ``(B, Nq, Nk)`` in float32.

    Example:
        >>> a = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]]])
        >>> g = torch.tensor([[[[2.0, -2.0]], [[1.0, 3.0]]]])
        >>> head_reduce(a, g)
        tensor([[[1., 0.]]])
    """
    return (grad_probs.float() * probs.float()).clamp_(min=0).mean(1)


def propagate_matrix(abars: list[Tensor], include_identity: bool = True) -> Tensor:
    """ICCV 2021 eq. 6: ``R ← R + Abar_l·R`` for the layers in forward order, from ``R = I``.

    The part added to the identity, ``U = R − I``, is propagated on its own
    (``U ← U + Abar_l + Abar_l·U``) so that small relevance is not rounded against the 1s of ``I``.

    Args:
        abars: one ``(B, N, N)`` map per layer, in forward order.
        include_identity: return ``R``; when False, ``R − I``.

    Returns:
        ``(B, N, N)``; row ``c`` is the relevance of every token for token ``c``.

    Example:
        >>> a = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> propagate_matrix([a, a])
        tensor([[[1., 2.],
                 [0., 1.]]])
    """
    added = torch.zeros_like(abars[0], dtype=torch.float32)
    for abar in abars:
        added = added + abar.float() + torch.bmm(abar.float(), added)
    if not include_identity:
        return added
    return added + torch.eye(added.shape[-1], device=added.device)


class RowPropagation:
    """Row ``c`` of ``R`` without forming ``R``: ``e_cᵀ(I+Abar_L)…(I+Abar_1)``.

    Layers are folded last first, ``v ← v + v·Abar_l``, which is the order in which the
    backward pass produces their gradients. ``Abar_l`` can arrive in blocks of query rows, so
    no ``(B, N, N)`` map needs to exist. The start rows and what the layers add to them are
    kept apart, so that ``added`` keeps full precision next to the identity's 1s.

    Example:
        >>> a = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
        >>> prop = RowPropagation(torch.tensor([[1.0, 0.0]]))
        >>> for _ in range(2):
        ...     prop.open_layer()
        ...     prop.fold(slice(0, 2), a)
        ...     prop.close_layer()
        >>> prop.added
        tensor([[0., 2.]])
    """

    def __init__(self, start: Tensor) -> None:
        """Start from ``start`` ``(B, N)``: one-hot rows, or a mean over several rows."""
        self.start = start.float()
        self.added = torch.zeros_like(self.start)
        self._delta: Tensor | None = None

    def open_layer(self) -> None:
        """A layer's update starts; it is added to the row by :meth:`close_layer`."""
        self._delta = torch.zeros_like(self.added)

    def fold(self, rows: slice, abar_block: Tensor) -> None:
        """Fold query ``rows`` of ``Abar_l`` ``(B, r, w)`` into the pending update.

        A block narrower than ``N`` covers the first ``w`` keys; the rest of its rows are 0.
        """
        assert self._delta is not None, "open_layer() first"
        weights = (self.start[:, rows] + self.added[:, rows]).unsqueeze(1)
        width = abar_block.shape[-1]
        self._delta[:, :width] += torch.bmm(weights, abar_block.float()).squeeze(1)

    def fold_heads(self, rows: slice, weighted: Tensor) -> None:
        """:meth:`fold` for ``clamp(dA ⊙ A, 0)`` per head, ``(B, H, r, w)``.

        The mean over heads (eq. 5) is folded into the product with the row, which saves a
        pass over the block: the row's weights, divided by ``H``, are repeated once per head.
        """
        assert self._delta is not None, "open_layer() first"
        batch, heads, n_rows, width = weighted.shape
        weights = (self.start[:, rows] + self.added[:, rows]) / heads
        weights = weights.repeat(1, heads).unsqueeze(1)  # (B, 1, H·r), head-major as the block
        block = weighted.float().reshape(batch, heads * n_rows, width)
        self._delta[:, :width] += torch.bmm(weights, block).squeeze(1)

    def close_layer(self) -> None:
        assert self._delta is not None, "open_layer() first"
        self.added = self.added + self._delta
        self._delta = None

    def begin_layer(self) -> None:
        """Deprecated name of :meth:`open_layer` (it clashed with :class:`Reader`'s)."""
        _renamed("begin_layer", "open_layer")
        self.open_layer()

    def add_block(self, rows: slice, abar_block: Tensor) -> None:
        """Deprecated name of :meth:`fold`."""
        _renamed("add_block", "fold")
        self.fold(rows, abar_block)

    def end_layer(self) -> None:
        """Deprecated name of :meth:`close_layer`."""
        _renamed("end_layer", "close_layer")
        self.close_layer()


def _renamed(old: str, new: str) -> None:
    warnings.warn(
        f"RowPropagation.{old} is now RowPropagation.{new}: the Reader protocol's "
        "begin_layer / add_block / end_layer take other arguments",
        DeprecationWarning,
        stacklevel=3,
    )
