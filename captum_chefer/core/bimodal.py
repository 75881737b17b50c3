"""The bi-modal and encoder-decoder rules of Chefer, Gur & Wolf (ICCV 2021, eq. 6-11).

Every stream ``x`` (text, image, decoder queries, …) keeps the map of its relevance to itself,
``R_xx``, initialised to ``I``, and every ordered pair ``(x, y)`` a map ``R_xy``, initialised to
``0``; ``R_xy`` is ``(B, N_x, N_y)``: row ``i`` says how much each token of ``y`` matters for
token ``i`` of ``x``. Each attention layer, with its head-reduced map ``Abar`` (eq. 5, see
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

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .readers import AbarStore, ReadSetup
from .tokens import SelfRelevance, apply_self_relevance


def normalized_map(added: Tensor) -> Tensor:
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
        >>> normalized_map(added)
        tensor([[[1.2500, 0.7500],
                 [0.0000, 1.0000]]])
    """
    sums = added.sum(-1, keepdim=True)
    normalized = added / torch.where(sums > 0, sums, torch.ones_like(sums))
    return normalized + torch.eye(added.shape[-1], device=added.device, dtype=added.dtype)


def normalize_self_relevance(added: Tensor) -> Tensor:
    """Deprecated name of :func:`normalized_map` (it is unrelated to ``self_relevance=``)."""
    warnings.warn(
        "normalize_self_relevance is deprecated; use normalized_map (eq. 8-9, the same "
        "function). The old name suggested the unrelated self_relevance= keyword.",
        DeprecationWarning,
        stacklevel=2,
    )
    return normalized_map(added)


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
    self_s = normalized_map(maps[(s, s)])
    self_q = normalized_map(maps[(q, q)])
    return {
        (s, q): self_s.transpose(-1, -2).bmm(abar).bmm(self_q),
        (s, s): torch.bmm(abar, maps[(q, s)]),
    }


class MultiStreamReader(AbarStore):
    """Reader of the multi-stream rules: every call's ``Abar`` kept, then eq. 6-11 in forward order.

    The rules of eq. 6-11 run in forward order, after the backward pass has delivered every
    layer (last first), so each call's ``(B, Nq, Nk)`` map is kept (:class:`AbarStore`); the
    :class:`StreamLayout` of :meth:`prepare` says which streams each call connects.

    Example:
        >>> from captum_chefer.core.readers import StreamLayout
        >>> layout = StreamLayout({"q": 1, "i": 2}, (((0, "i", "i"),), ((1, "q", "i"),)), "q")
        >>> reader = MultiStreamReader()
        >>> reader.prepare(ReadSetup(torch.ones(1, 1), torch.ones(1, 1, dtype=bool), 2, 0, layout))
        >>> a = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
        >>> reader.begin_layer(0, (1, 1, 2, 2))
        >>> reader.add_block(0, slice(0, 2), a, torch.ones_like(a))
        >>> reader.begin_layer(1, (1, 1, 1, 2))
        >>> reader.add_block(1, slice(0, 1), torch.full((1, 1, 1, 2), 0.5), torch.ones(1, 1, 1, 2))
        >>> reader.read("subtract", stream="i")
        tensor([[0.5000, 1.0000]])
    """

    identity_row: ClassVar[bool] = True
    multi_stream: ClassVar[bool] = True

    def prepare(self, setup: ReadSetup) -> None:
        if setup.layout is None:
            raise ValueError("MultiStreamReader needs the stream layout in its ReadSetup.")
        self._setup = setup
        self._layout = setup.layout
        self._state: MultiModalRelevance | None = None

    def relevance(self) -> MultiModalRelevance:
        """``R_xy`` of every pair of streams after the backward pass, formed once."""
        if self._state is None:
            real = self._setup.real
            batch, device = real.shape[0], real.device
            sizes = self._layout.sizes
            state = MultiModalRelevance(sizes, batch, device)
            for step in self._layout.steps:
                state.step(
                    [
                        AttentionEdge(
                            q, k, self.abar(index, (batch, 1, sizes[q], sizes[k]), device)
                        )
                        for index, q, k in step
                    ]
                )
            self._state = state
        return self._state

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        read_stream = read_stream or self._layout.read
        stream = stream or read_stream
        weights = self._setup.weights_for(read_stream)
        relevance = self.relevance().relevance(read_stream, stream, include_identity=False)
        row = torch.bmm(weights.unsqueeze(1).to(relevance), relevance).squeeze(1)
        if read_stream == stream:
            row = apply_self_relevance(row, weights.to(row), self_relevance)
        return row
