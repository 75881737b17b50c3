"""The recorder: what every capture route hands its attention to while an attribution runs.

A route (SDPA interception, the Hugging Face switch, ``nn.MultiheadAttention``, the custom
protocol) turns each attention call into either

- an :class:`~captum_chefer.core.attention.AttentionCall` (``q, k, v, mask``), run through the
  model's own fused kernel forward and back-propagated by
  :func:`~captum_chefer.core.attention.attention_backward` a block of query rows at a time; or
- explicit probabilities ``A`` ``(B, H, Nq, Nk)``, passed through an identity whose backward
  sees ``dA``.

Either way the backward pass hands ``(A, dA)`` blocks to a
:class:`~captum_chefer.core.readers.Reader`, layer by layer, last layer first, and nothing else
about the model's gradients changes. A shared leaf, the *anchor*, is an input of every captured
call, so ``torch.autograd.grad(output, anchor)`` runs exactly the backward the relevance needs:
no parameter gradients, nothing below the first layer. A model split over several devices gets
one anchor per device, so no layer is cut off.

After the forward, :meth:`Recorder.keep_on_path` checks which calls the explained output
depends on (see :mod:`~captum_chefer.capture.graph`) and keeps only those, renumbered in
forward order: a call the output does not depend on has ``dA = 0`` and adds nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.attention import AttentionCall, attention_backward, block_rows_for
from ..core.readers import Reader
from .graph import Dependencies, dependencies


@dataclass
class CallRecord:
    """What the recorder keeps of one attention call during the forward pass."""

    index: int
    shape: tuple[int, int, int, int]
    call: AttentionCall | None = None
    probs: Tensor | None = None
    module: str | None = None
    """Qualified name of the innermost module running when the call was made; set only inside
    :func:`~captum_chefer.capture.modules.module_scope`."""
    node: Any = None
    """The autograd node of the captured output, for the dependency checks."""
    depends_on_captured: bool = True
    """Whether a captured call lies below this one (else no input gradient is needed)."""
    folded: bool = False
    """Explicit probabilities ``(B*H, 1, N, N)`` whose heads are folded into the batch."""
    superseded: bool = False
    """Replaced by a later record of the same attention (a sink softmax and its slice)."""

    def unfold_heads(self, batch: int) -> None:
        """Read folded ``(B*H, 1, N, N)`` probabilities as ``(B, H, N, N)`` (batch-major)."""
        if self.folded and self.shape[0] % batch == 0:
            self.shape = (batch, self.shape[0] // batch, *self.shape[2:])

    def attendable(self) -> Tensor | None:
        """Bool ``(B|1, H|1, Nq, Nk)`` of the (query, key) positions attended, or None when all
        are (the call's :meth:`~captum_chefer.core.attention.AttentionCall.attendable`)."""
        if self.call is not None:
            return self.call.attendable()
        assert self.probs is not None
        return self.probs.detach().reshape(self.shape) > 0


@dataclass
class Recorder:
    """Collects attention calls in forward order and feeds their backward to a reader."""

    reader: Reader | None = None
    block_bytes: int | None = None
    anchors: dict[torch.device, Tensor] = field(default_factory=dict)
    """One gradient leaf per device that attention ran on."""
    records: list[CallRecord] = field(default_factory=list)
    scope: list[str] = field(default_factory=list)
    """Names of the modules running now, outermost first (see ``module_scope``)."""
    dropout_active: bool = False
    """Whether the forward applied dropout (training mode): the relevance is then random."""
    unread: dict[int, str] = field(default_factory=dict)
    """Softmaxes that look like attention in a layout the capture cannot read, described."""
    _outputs: dict[int, Tensor] = field(default_factory=dict)
    _by_output: dict[int, CallRecord] = field(default_factory=dict)

    def anchor(self, device: torch.device) -> Tensor:
        """The gradient leaf of ``device``, made on first use."""
        if device not in self.anchors:
            self.anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self.anchors[device]

    def _new_record(self, shape: tuple[int, int, int, int]) -> CallRecord:
        record = CallRecord(len(self.records), shape, module=self.scope[-1] if self.scope else None)
        self.records.append(record)
        return record

    def _keep(self, record: CallRecord, output: Tensor) -> Tensor:
        record.node = output.grad_fn
        self._outputs[id(output)] = output
        self._by_output[id(output)] = record
        return output

    def supersede(self, output: Tensor) -> None:
        """Drop the record of the captured ``output``: a later record replaces it."""
        record = self._by_output[id(output)]
        record.superseded = True
        self.records.remove(record)
        for index, kept in enumerate(self.records):
            kept.index = index

    def is_captured(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is the output of a call already captured (no double capture)."""
        return self._outputs.get(id(tensor)) is tensor

    def keep_on_path(self, output: Tensor) -> Dependencies:
        """Keep only the calls ``output`` depends on, renumbered in forward order, and unfold
        folded heads against the explained batch ``output.shape[0]``.

        Returns the dependencies in the new numbering.
        """
        for record in self.records:
            record.unfold_heads(output.shape[0] if output.dim() else 1)
        found = dependencies(output, [record.node for record in self.records])
        renumber = {old: new for new, old in enumerate(found.on_path)}
        kept = [self.records[old] for old in found.on_path]
        for record in kept:
            record.depends_on_captured = bool(found.below[record.index])
            record.index = renumber[record.index]
        self.records[:] = kept
        self._outputs.clear()
        self._by_output.clear()
        below = {
            renumber[old]: frozenset(renumber[i] for i in calls if i in renumber)
            for old, calls in found.below.items()
        }
        return Dependencies(tuple(range(len(kept))), below)

    def attention(
        self,
        kernel: Callable[..., Tensor],
        call: AttentionCall,
        kernel_kwargs: dict[str, Any],
    ) -> Tensor:
        """Run ``kernel(q, k, v, attn_mask=mask, **kernel_kwargs)`` and capture it for backward."""
        record = self._new_record(call.shape)
        record.call = call
        output = _CapturedKernel.apply(
            self,
            record,
            kernel,
            kernel_kwargs,
            self.anchor(call.query.device),
            call.query,
            call.key,
            call.value,
            call.mask,
        )
        return self._keep(record, output)

    def probabilities(self, probs: Tensor, folded: bool = False) -> Tensor:
        """Pass explicit probabilities ``(B, H, Nq, Nk)`` through; their backward sees ``dA``.

        Probabilities that are already a captured output pass unchanged (a model that calls
        :func:`~captum_chefer.mark_attention` on a softmax the capture has already seen).
        """
        if self.is_captured(probs):
            return probs
        record = self._new_record(tuple(probs.shape))  # type: ignore[arg-type]
        record.probs = probs.detach()
        record.folded = folded
        output = _CapturedProbs.apply(self, record, self.anchor(probs.device), probs)
        return self._keep(record, output)

    def backward_call(self, record: CallRecord, call: AttentionCall, grad_output: Tensor):
        reader = self.reader
        if reader is not None:
            reader.begin_layer(record.index, record.shape)

        def feed(rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
            assert reader is not None
            reader.add_block(record.index, rows, probs, grad_probs)

        grads = attention_backward(
            call,
            grad_output,
            feed if reader is not None else None,
            block_rows_for(call, self.block_bytes),
            need_input_grads=record.depends_on_captured,
            key_prefix_blocks=reader is not None and reader.key_prefix_blocks,
        )
        if reader is not None:
            reader.end_layer(record.index)
        return grads

    def backward_probs(self, record: CallRecord, grad_probs: Tensor) -> None:
        if self.reader is None or record.superseded:
            return
        assert record.probs is not None
        probs, grad_probs = record.probs.reshape(record.shape), grad_probs.reshape(record.shape)
        self.reader.begin_layer(record.index, record.shape)
        # A copy: the reader may overwrite grad_probs, which autograd passes on below.
        grad_probs = grad_probs.to(torch.float32, copy=True)
        self.reader.add_block(record.index, slice(None), probs.float(), grad_probs)
        self.reader.end_layer(record.index)


class _CapturedKernel(torch.autograd.Function):
    """The model's own kernel forward; an exact block-wise backward that feeds a reader."""

    @staticmethod
    def forward(ctx, recorder, record, kernel, kwargs, anchor, query, key, value, mask):
        ctx.recorder, ctx.record = recorder, record
        with torch.no_grad():
            return kernel(query, key, value, attn_mask=mask, **kwargs)

    @staticmethod
    def backward(ctx, grad_output):
        record = ctx.record
        d_query, d_key, d_value, d_mask = ctx.recorder.backward_call(
            record, record.call, grad_output
        )
        record.call = None
        return None, None, None, None, None, d_query, d_key, d_value, d_mask


class _CapturedProbs(torch.autograd.Function):
    """Identity on attention probabilities whose backward hands ``(A, dA)`` to the reader."""

    @staticmethod
    def forward(ctx, recorder, record, anchor, probs):
        ctx.recorder, ctx.record = recorder, record
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad_probs):
        ctx.recorder.backward_probs(ctx.record, grad_probs)
        ctx.record.probs = None
        return None, None, None, grad_probs


_ACTIVE = threading.local()


def active_recorder() -> Recorder | None:
    """The recorder of the attribution running on this thread, if any."""
    return getattr(_ACTIVE, "recorder", None)


@contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Make ``recorder`` the one that capture routes on this thread report to."""
    previous = active_recorder()
    _ACTIVE.recorder = recorder
    try:
        yield recorder
    finally:
        _ACTIVE.recorder = previous
