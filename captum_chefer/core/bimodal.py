"""The bi-modal and encoder-decoder rules of Chefer, Gur & Wolf (ICCV 2021, eq. 6-11).

Every modality ``x`` (text, image, decoder queries, …) keeps a self-relevance map ``R_xx``,
initialised to ``I``, and every ordered pair ``(x, y)`` a map ``R_xy``, initialised to ``0``;
``R_xy`` is ``(B, N_x, N_y)``: row ``i`` says how much each token of ``y`` matters for token
``i`` of ``x``. Each attention layer, with its head-reduced map ``Abar`` (eq. 5, see
:func:`~captum_chefer.core.rules.head_reduce`), updates them:

- self-attention within ``s`` (eq. 6-7): ``R_ss += Abar_ss·R_ss`` and ``R_sq += Abar_ss·R_sq``
  for every other modality ``q``;
- ``s`` attending to ``q`` (co- or cross-attention, eq. 10-11):
  ``R_sq += R̄_ssᵀ·Abar_sq·R̄_qq`` and ``R_ss += Abar_sq·R_qs``,

where ``R̄_xx = rownorm(R_xx − I) + I`` (eq. 8-9). Several updates that the model computes from
the same hidden states (LXMERT's two cross directions) form one *step*: each is computed from
the same old maps before any is added.

The self maps are stored as ``U_xx = R_xx − I`` so that small relevance is not rounded against
the identity's 1s, as in :func:`~captum_chefer.core.rules.propagate_matrix`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .rules import head_reduce


def normalize_self_relevance(added: Tensor) -> Tensor:
    """ICCV 2021 eq. 8-9: ``R̄ = rownorm(R − I) + I``, from ``added = R − I`` ``(B, N, N)``.

    Each row of ``R − I`` is divided by its sum. A row that attention never reached (a padding
    token, a layer-0 token, an all-zero row) sums to 0 and stays 0, so ``R̄`` is finite
    everywhere: Chefer et al.'s code produces NaN there in one model and patches it in another.

    Args:
        added: ``R − I``, non-negative, ``(B, N, N)``.

    Returns:
        ``R̄`` ``(B, N, N)``; each row is ``e_i`` plus a distribution or plus zeros.

    Example:
        >>> added = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
        >>> normalize_self_relevance(added)
        tensor([[[1.2500, 0.7500],
                 [0.0000, 1.0000]]])
    """
    sums = added.sum(-1, keepdim=True)
    normalized = added / torch.where(sums > 0, sums, torch.ones_like(sums))
    return normalized + torch.eye(added.shape[-1], device=added.device, dtype=added.dtype)


@dataclass(frozen=True)
class AttentionEdge:
    """One attention call, head-reduced: tokens of ``query`` attend to tokens of ``key``.

    Attributes:
        query: the modality whose tokens are the queries.
        key: the modality whose tokens are the keys; ``key == query`` is self-attention.
        abar: ``mean_h(clamp(dA ⊙ A, 0))``, ``(B, N_query, N_key)``.
    """

    query: str
    key: str
    abar: Tensor


class MultiModalRelevance:
    """The maps ``R_xy`` of every pair of modalities, updated by ICCV 2021 eq. 6-11.

    Args:
        sizes: tokens per modality, e.g. ``{"text": 7, "image": 50}``.
        batch: examples per batch.
        device: where the maps live.

    Example:
        >>> state = MultiModalRelevance({"q": 1, "i": 2}, batch=1)
        >>> state.step([AttentionEdge("i", "i", torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]))])
        >>> state.step([AttentionEdge("q", "i", torch.tensor([[[0.5, 0.5]]]))])
        >>> state.relevance("q", "i")
        tensor([[[0.5000, 1.0000]]])
    """

    def __init__(
        self, sizes: Mapping[str, int], batch: int, device: torch.device | str | None = None
    ) -> None:
        self.sizes = dict(sizes)
        self._maps = {
            (x, y): torch.zeros(batch, n_x, n_y, device=device)
            for x, n_x in self.sizes.items()
            for y, n_y in self.sizes.items()
        }

    def relevance(self, x: str, y: str, include_identity: bool = True) -> Tensor:
        """``R_xy`` ``(B, N_x, N_y)``; for ``x == y`` without ``I`` if not ``include_identity``."""
        relevance = self._maps[(x, y)]
        if x == y and include_identity:
            return relevance + torch.eye(relevance.shape[-1], device=relevance.device)
        return relevance

    def step(self, edges: Sequence[AttentionEdge]) -> None:
        """Apply the updates of ``edges``, each computed from the maps as they were before."""
        additions: dict[tuple[str, str], Tensor] = {}
        for edge in edges:
            for pair, addition in self._additions(edge).items():
                additions[pair] = additions[pair] + addition if pair in additions else addition
        for pair, addition in additions.items():
            self._maps[pair] = self._maps[pair] + addition

    def _additions(self, edge: AttentionEdge) -> dict[tuple[str, str], Tensor]:
        for name in (edge.query, edge.key):
            if name not in self.sizes:
                raise KeyError(f"Unknown modality {name!r}; the modalities are {list(self.sizes)}.")
        abar = edge.abar.float()
        if edge.query == edge.key:
            return self_attention_additions(edge.query, abar, self._maps)
        return cross_attention_additions(edge.query, edge.key, abar, self._maps)


def self_attention_additions(
    s: str, abar: Tensor, maps: Mapping[tuple[str, str], Tensor]
) -> dict[tuple[str, str], Tensor]:
    """ICCV 2021 eq. 6-7, self-attention within ``s``: ``Abar_ss·R_sy`` for every ``y``.

    ``maps`` holds ``R_xy`` for ``x ≠ y`` and ``R_xx − I`` on the diagonal; the addition to
    ``R_ss − I`` is ``Abar + Abar·(R_ss − I)``.

    Example:
        >>> maps = {("s", "s"): torch.zeros(1, 2, 2)}
        >>> self_attention_additions("s", torch.tensor([[[0.0, 1.0], [0.0, 0.0]]]), maps)
        {('s', 's'): tensor([[[0., 1.],
                 [0., 0.]]])}
    """
    additions = {}
    for (x, y), relevance in maps.items():
        if x != s:
            continue
        addition = torch.bmm(abar, relevance)
        additions[(x, y)] = abar + addition if y == s else addition
    return additions


def cross_attention_additions(
    s: str, q: str, abar: Tensor, maps: Mapping[tuple[str, str], Tensor]
) -> dict[tuple[str, str], Tensor]:
    """ICCV 2021 eq. 10-11, ``s`` attending to ``q``.

    ``R_sq += R̄_ssᵀ·Abar_sq·R̄_qq`` (eq. 10, with ``R̄`` from eq. 8-9) and
    ``R_ss += Abar_sq·R_qs`` (eq. 11). ``maps`` holds ``R_xx − I`` on the diagonal.

    Example:
        >>> maps = {(a, b): torch.zeros(1, 1, 1) for a in "sq" for b in "sq"}
        >>> additions = cross_attention_additions("s", "q", torch.ones(1, 1, 1), maps)
        >>> additions[("s", "q")], additions[("s", "s")]
        (tensor([[[1.]]]), tensor([[[0.]]]))
    """
    self_s = normalize_self_relevance(maps[(s, s)])
    self_q = normalize_self_relevance(maps[(q, q)])
    return {
        (s, q): self_s.transpose(-1, -2).bmm(abar).bmm(self_q),
        (s, s): torch.bmm(abar, maps[(q, s)]),
    }


class AbarCollector:
    """Consumer: every attention call's ``Abar`` (eq. 5), kept for the multi-modal rules.

    The rules of eq. 6-11 run in forward order, after the backward pass has delivered every
    layer (last first); so each call's ``(B, Nq, Nk)`` map is kept, filled a block of query rows
    at a time. A call whose output the explained score does not depend on never reaches the
    backward pass; :meth:`abar` gives zeros for it.

    Example:
        >>> collector = AbarCollector()
        >>> a = torch.tensor([[[[0.5, 0.5]]]])
        >>> collector.begin_layer(0, None, (1, 1, 1, 2))
        >>> collector.add_block(0, slice(0, 1), a, torch.tensor([[[[2.0, -2.0]]]]))
        >>> collector.end_layer(0)
        >>> collector.abar(0, (1, 1, 1, 2)), collector.abar(1, (1, 1, 1, 2))
        (tensor([[[1., 0.]]]), tensor([[[0., 0.]]]))
    """

    propagates_through_layers = True
    """The relevance is carried through every layer (token mixing outside attention is refused)."""

    def __init__(self) -> None:
        self.abars: dict[int, Tensor] = {}
        self._shapes: dict[int, tuple[int, ...]] = {}

    def begin_layer(self, index: int, call: object, shape: tuple[int, ...]) -> None:
        self._shapes[index] = shape

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index not in self.abars:
            batch, _, n_query, n_key = self._shapes[index]
            self.abars[index] = torch.zeros(batch, n_query, n_key, device=probs.device)
        self.abars[index][:, rows] = head_reduce(probs, grad_probs)

    def end_layer(self, index: int) -> None:
        pass

    def abar(
        self, index: int, shape: tuple[int, ...], device: torch.device | str | None = None
    ) -> Tensor:
        """Call ``index``'s ``Abar`` ``(B, Nq, Nk)``; zeros if it never reached the backward."""
        if index in self.abars:
            return self.abars[index]
        batch, _, n_query, n_key = shape
        return torch.zeros(batch, n_query, n_key, device=device)
