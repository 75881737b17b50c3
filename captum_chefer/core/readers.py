"""The reader protocol: what every relevance rule does with each layer's ``(A, dA)`` blocks.

Every attribution class runs the same flow (see :mod:`captum_chefer.attr.engine`): the reader
learns which rows of ``R`` to read and which streams the attention calls connect
(:meth:`Reader.prepare`) as soon as the backward has shown which rows the output is computed
from: a one-stream reader when its stream's last layer arrives, before any of its blocks; a
multi-stream reader after the backward. During the backward the reader receives each layer's
blocks, last layer first (``begin_layer``, ``add_block`` once per block of query rows,
``end_layer``); afterwards :meth:`Reader.read` returns one relevance row ``(B, N)`` per
example and stream. :class:`TowerReaders` runs a one-stream reader on each of several
independent chains of layers (towers).
What a reader can do is declared in the protocol's attributes, never probed.

Chefer et al.'s self-attention readers are here; the baselines' are in
:mod:`captum_chefer.core.baselines` and the multi-stream reader of eq. 6-11 in
:mod:`captum_chefer.core.bimodal`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from .rules import RowPropagation, head_reduce, propagate_matrix
from .tokens import SelfRelevance, apply_self_relevance

Edge = tuple[int, str, str]
"""``(call index, query stream, key stream)``: one attention call, by the streams it connects."""


@dataclass(frozen=True)
class StreamLayout:
    """Which streams the captured attention calls connect (ICCV 2021 eq. 6-11).

    Attributes:
        sizes: tokens per stream, e.g. ``{"text": 7, "image": 50}``.
        steps: the calls in forward order, grouped into steps of :data:`Edge`; the updates of
            one step are computed from the same old maps (LXMERT's two cross directions).
        read: the stream whose token the prediction is read from.
    """

    sizes: Mapping[str, int]
    steps: tuple[tuple[Edge, ...], ...]
    read: str

    @classmethod
    def single(cls, n_tokens: int, n_layers: int, name: str = "tokens") -> StreamLayout:
        """One stream of ``n_tokens`` attending to itself in ``n_layers`` calls.

        Example:
            >>> StreamLayout.single(5, 2).steps
            (((0, 'tokens', 'tokens'),), ((1, 'tokens', 'tokens'),))
        """
        steps = tuple(((index, name, name),) for index in range(n_layers))
        return cls({name: n_tokens}, steps, name)


@dataclass(frozen=True)
class ReadSetup:
    """What a reader needs to know before the backward pass.

    Attributes:
        row_weights: ``(B, N)`` weights of the rows of ``R`` read, over the read stream's
            tokens: one-hot, or uniform over the rows the output is computed from.
        real: bool ``(B, N)`` over the read stream. The engine passes all True: padding gets 0
            from the attention itself (no row on the output's path attends to it), so no
            reader needs a mask.
        n_layers: number of attention calls the explained output depends on.
        num_prefix_tokens: tokens before the patch grid (CLS, distillation); 0 for text.
        layout: the streams the calls connect; None for one stream.
        more_row_weights: the row weights of further read streams, by name (a dual encoder
            reads each tower at its own token).
    """

    row_weights: Tensor
    real: Tensor
    n_layers: int
    num_prefix_tokens: int = 0
    layout: StreamLayout | None = None
    more_row_weights: Mapping[str, Tensor] = field(default_factory=dict)

    def weights_for(self, stream: str | None) -> Tensor:
        """The row weights of read ``stream`` (the layout's read stream when None)."""
        if stream is None or self.layout is None or stream == self.layout.read:
            return self.row_weights
        return self.more_row_weights[stream]

    @property
    def start(self) -> Tensor:
        """Deprecated name of :attr:`row_weights`."""
        warnings.warn("ReadSetup.start is now row_weights", DeprecationWarning, stacklevel=2)
        return self.row_weights

    @property
    def valid(self) -> Tensor:
        """Deprecated name of :attr:`real`."""
        warnings.warn("ReadSetup.valid is now real", DeprecationWarning, stacklevel=2)
        return self.real


class Reader(Protocol):
    """Receives each layer's ``(A, dA)`` blocks during backward and yields relevance rows.

    The capabilities are attributes, read by the engine and the recorder:

    Attributes:
        start_layer: layers (forward order) below this index are left out; the engine checks
            ``0 <= start_layer < n_layers``.
        key_prefix_blocks: the reader accepts blocks of causal layers that stop at their last
            attendable key, ``(B, H, r, w)`` with ``w ≤ Nk`` (the rest is 0): half the work.
        identity_row: the row read is ``R = I + …``, so ``self_relevance="subtract"`` (remove
            exactly the identity's share) is defined.
        multi_stream: the reader follows several streams (:class:`StreamLayout`); otherwise
            every call must be self-attention over one sequence.
        propagates_through_layers: the row is carried through every layer (Chefer's rule,
            rollout), so token mixing outside attention would be missing from it and is
            refused; False for readers of one layer (raw attention, attention Grad-CAM).
    """

    start_layer: int
    key_prefix_blocks: ClassVar[bool]
    identity_row: ClassVar[bool]
    multi_stream: ClassVar[bool]
    propagates_through_layers: ClassVar[bool]

    def prepare(self, setup: ReadSetup) -> None:
        """Called once, before any block of the read stream arrives (see the module)."""

    def begin_layer(self, index: int, shape: tuple[int, ...]) -> None:
        """Layer ``index`` (forward order) starts; ``shape`` is ``(B, H, Nq, Nk)``."""

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        """Query ``rows`` of layer ``index``: ``A`` and ``dA``, ``(B, H, r, Nk)`` float32.

        Both are scratch once the call returns: a reader may overwrite ``grad_probs`` (the
        row reader forms ``dA ⊙ A`` there) and keeps neither.
        """

    def end_layer(self, index: int) -> None:
        """Layer ``index`` is complete."""

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        """The row of ``R_{read_stream, stream}`` ``(B, N_stream)`` after the backward pass.

        Both streams default to the read stream; a one-stream reader has no other.
        ``self_relevance`` applies where ``stream == read_stream``.
        """


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


def check_last_first(previous: int | None, index: int, what: str) -> int:
    """Refuse layers that reach the backward pass out of order; returns ``index``."""
    if previous is not None and index >= previous:
        raise RuntimeError(
            f"Attention layers reached the backward pass out of order, so {what} cannot be "
            "folded in last layer first; this model's layers do not form a chain."
        )
    return index


class TowerReaders:
    """A one-stream reader on each of several independent chains of attention layers (towers:
    one transformer per input feature, a siamese forward), each with its own rows.

    Layers keep their indexes in the whole forward; each tower's reader sees them renumbered
    ``0 … L_t − 1`` in its own tower, so ``start_layer`` counts within each tower. A tower's
    reader is prepared with a setup whose ``layout.read`` names the tower.

    Args:
        reader: an unprepared one-stream reader; each tower gets a copy.
        layout: the towers, one stream each, every call self-attention within its stream.

    Example:
        >>> layout = StreamLayout({"a": 2, "b": 2}, (((0, "a", "a"),), ((1, "b", "b"),)), "a")
        >>> towers = TowerReaders(CheferRowReader(), layout)
        >>> towers.n_layers("b")
        1
    """

    multi_stream: ClassVar[bool] = True

    def __init__(self, reader: Reader, layout: StreamLayout) -> None:
        self.start_layer = reader.start_layer
        self.key_prefix_blocks = reader.key_prefix_blocks
        self.identity_row = reader.identity_row
        self.propagates_through_layers = reader.propagates_through_layers
        self._readers = {stream: copy.deepcopy(reader) for stream in layout.sizes}
        self._local: dict[int, tuple[str, int]] = {}
        counts = dict.fromkeys(layout.sizes, 0)
        for step in layout.steps:
            for index, query, _key in step:
                self._local[index] = (query, counts[query])
                counts[query] += 1
        self._counts = counts

    def n_layers(self, stream: str) -> int:
        """The number of layers of tower ``stream``."""
        return self._counts[stream]

    def prepare(self, setup: ReadSetup) -> None:
        assert setup.layout is not None, "a tower's setup names it in layout.read"
        self._readers[setup.layout.read].prepare(setup)

    def begin_layer(self, index: int, shape: tuple[int, ...]) -> None:
        stream, local = self._local[index]
        self._readers[stream].begin_layer(local, shape)

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        stream, local = self._local[index]
        self._readers[stream].add_block(local, rows, probs, grad_probs)

    def end_layer(self, index: int) -> None:
        stream, local = self._local[index]
        self._readers[stream].end_layer(local)

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        assert stream is not None, "name the tower to read"
        return self._readers[stream].read(self_relevance)


class AbarStore:
    """Every layer's ``Abar`` (eq. 5, ``(B, Nq, Nk)``), kept for rules that run in forward order.

    A call the explained output does not depend on never reaches the backward pass;
    :meth:`abar` gives zeros for it.

    Args:
        start_layer: layers (forward order) below this index are not kept.

    Example:
        >>> store = AbarStore()
        >>> a = torch.tensor([[[[0.5, 0.5]]]])
        >>> store.begin_layer(0, (1, 1, 1, 2))
        >>> store.add_block(0, slice(0, 1), a, torch.tensor([[[[2.0, -2.0]]]]))
        >>> store.abar(0, (1, 1, 1, 2)), store.abar(1, (1, 1, 1, 2))
        (tensor([[[1., 0.]]]), tensor([[[0., 0.]]]))
    """

    key_prefix_blocks: ClassVar[bool] = False
    propagates_through_layers: ClassVar[bool] = True

    def __init__(self, start_layer: int = 0) -> None:
        self.start_layer = start_layer
        self.abars: dict[int, Tensor] = {}
        self._shapes: dict[int, tuple[int, ...]] = {}

    def begin_layer(self, index: int, shape: tuple[int, ...]) -> None:
        self._shapes[index] = shape

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index < self.start_layer:
            return
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


class CheferRowReader:
    """Chefer's rule folded in as one row (ICCV 2021 eq. 6), as the gradients arrive.

    Memory is ``O(B·N)`` for the state plus one block; no ``(B, N, N)`` map is kept (see
    :class:`~captum_chefer.core.rules.RowPropagation`).

    Args:
        start_layer: layers (forward order) below this index are left out, as in Chefer et
            al.'s ViT evaluations with ``start_layer=1``.

    Example:
        >>> reader = CheferRowReader()
        >>> reader.prepare(ReadSetup(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=bool), 1))
        >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
        >>> reader.begin_layer(0, (1, 1, 2, 2))
        >>> reader.add_block(0, slice(0, 2), a, torch.ones_like(a))
        >>> reader.end_layer(0)
        >>> reader.read("subtract")
        tensor([[0.5000, 0.5000]])
    """

    key_prefix_blocks: ClassVar[bool] = True
    identity_row: ClassVar[bool] = True
    multi_stream: ClassVar[bool] = False
    propagates_through_layers: ClassVar[bool] = True

    def __init__(self, start_layer: int = 0) -> None:
        self.start_layer = start_layer
        self._propagation: RowPropagation | None = None
        self._last_index: int | None = None

    def prepare(self, setup: ReadSetup) -> None:
        self._weights = setup.row_weights
        self._propagation = RowPropagation(setup.row_weights)
        self._last_index = None

    @property
    def added(self) -> Tensor:
        """What the layers added to the rows read, ``(B, N)``: the row minus the identity."""
        assert self._propagation is not None, "prepare() first"
        return self._propagation.added

    def begin_layer(self, index: int, shape: tuple[int, ...]) -> None:
        self._last_index = check_last_first(self._last_index, index, "one relevance row")
        if index >= self.start_layer:
            assert self._propagation is not None, "prepare() first"
            self._propagation.open_layer()

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        if index >= self.start_layer:
            assert self._propagation is not None
            # Eq. 5 before the mean over heads, formed in dA's memory (scratch, see Reader).
            weighted = grad_probs.mul_(probs).clamp_(min=0)
            self._propagation.fold_heads(rows, weighted)

    def end_layer(self, index: int) -> None:
        if index >= self.start_layer:
            assert self._propagation is not None
            self._propagation.close_layer()

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        return apply_self_relevance(self.added, self._weights, self_relevance)


class CheferMatrixReader(AbarStore):
    """Chefer's rule on full ``(B, N, N)`` matrices, then the rows read off ``R − I``.

    Args:
        start_layer: layers (forward order) below this index are left out.
    """

    identity_row: ClassVar[bool] = True
    multi_stream: ClassVar[bool] = False

    def prepare(self, setup: ReadSetup) -> None:
        self._weights = setup.row_weights

    def matrix(self, include_identity: bool = True) -> Tensor:
        """``R = (I + Abar_L)…(I + Abar_1)`` over the captured layers, ``(B, N, N)``."""
        if not self.abars:
            raise RuntimeError(
                "No attention layer at or above start_layer reached the backward pass."
            )
        layers = [self.abars[index] for index in sorted(self.abars)]
        return propagate_matrix(layers, include_identity)

    def read(
        self,
        self_relevance: SelfRelevance,
        stream: str | None = None,
        read_stream: str | None = None,
    ) -> Tensor:
        added = torch.bmm(self._weights.unsqueeze(1), self.matrix(include_identity=False))
        return apply_self_relevance(added.squeeze(1), self._weights, self_relevance)
