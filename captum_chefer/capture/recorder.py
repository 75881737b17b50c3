"""The recorder: what every capture route hands its attention to while an attribution runs.

A route (SDPA interception, the Hugging Face switch, ``nn.MultiheadAttention``, the custom
protocol) turns each attention call into either

- an :class:`~captum_chefer.core.attention.AttentionCall` (``q, k, v, mask``), run through the
  model's own fused kernel forward and back-propagated by
  :func:`~captum_chefer.core.attention.attention_backward` a block of query rows at a time; or
- explicit probabilities ``A`` ``(B, H, Nq, Nk)``, passed through an identity whose backward
  sees ``dA``.

Either way the backward pass hands ``(A, dA)`` blocks to a :class:`Consumer`, layer by layer,
last layer first, and nothing else about the model's gradients changes. A shared leaf, the
*anchor*, is an input of every captured call, so ``torch.autograd.grad(output, anchor)`` runs
exactly the backward the relevance needs: no parameter gradients, nothing below the first layer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ..core.attention import AttentionCall, attention_backward, block_rows_for


class Consumer(Protocol):
    """Receives each layer's ``(A, dA)`` during the backward pass, last layer first."""

    def begin_layer(self, index: int, call: AttentionCall | None, shape: tuple[int, ...]) -> None:
        """Layer ``index`` (forward order) starts; ``shape`` is ``(B, H, Nq, Nk)``."""

    def add_block(self, index: int, rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
        """Query ``rows`` of layer ``index``: ``A`` and ``dA``, ``(B, H, r, Nk)`` float32."""

    def end_layer(self, index: int) -> None:
        """Layer ``index`` is complete."""


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

    def allowed(self) -> Tensor | None:
        """Bool ``(B|1, H|1, Nq, Nk)`` of attended positions, or None when all are."""
        if self.call is not None:
            return self.call.allowed()
        assert self.probs is not None
        return self.probs.detach() > 0


@dataclass
class Recorder:
    """Collects attention calls in forward order and feeds their backward to a consumer."""

    consumer: Consumer | None = None
    block_bytes: int | None = None
    anchor: Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    records: list[CallRecord] = field(default_factory=list)
    scope: list[str] = field(default_factory=list)
    """Names of the modules running now, outermost first (see ``module_scope``)."""

    def _new_record(self, shape: tuple[int, int, int, int], device: torch.device) -> CallRecord:
        if self.anchor.device != device:
            self.anchor = torch.zeros((), device=device, requires_grad=True)
        record = CallRecord(len(self.records), shape, module=self.scope[-1] if self.scope else None)
        self.records.append(record)
        return record

    def attention(
        self,
        kernel: Callable[..., Tensor],
        call: AttentionCall,
        kernel_kwargs: dict[str, Any],
    ) -> Tensor:
        """Run ``kernel(q, k, v, attn_mask=mask, **kernel_kwargs)`` and capture it for backward."""
        record = self._new_record(call.shape, call.query.device)
        record.call = call
        return _CapturedKernel.apply(
            self,
            record,
            kernel,
            kernel_kwargs,
            self.anchor,
            call.query,
            call.key,
            call.value,
            call.mask,
        )

    def probabilities(self, probs: Tensor) -> Tensor:
        """Pass explicit probabilities ``(B, H, Nq, Nk)`` through; their backward sees ``dA``."""
        record = self._new_record(tuple(probs.shape), probs.device)  # type: ignore[arg-type]
        record.probs = probs.detach()
        return _CapturedProbs.apply(self, record, self.anchor, probs)

    def backward_call(self, record: CallRecord, call: AttentionCall, grad_output: Tensor):
        consumer = self.consumer
        if consumer is not None:
            consumer.begin_layer(record.index, call, record.shape)

        def feed(rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
            assert consumer is not None
            consumer.add_block(record.index, rows, probs, grad_probs)

        grads = attention_backward(
            call,
            grad_output,
            feed if consumer is not None else None,
            block_rows_for(call, self.block_bytes),
            need_input_grads=record.index > 0,
            key_prefix_blocks=getattr(consumer, "accepts_key_prefix_blocks", False),
        )
        if consumer is not None:
            consumer.end_layer(record.index)
        return grads

    def backward_probs(self, record: CallRecord, grad_probs: Tensor) -> None:
        if self.consumer is None:
            return
        assert record.probs is not None
        self.consumer.begin_layer(record.index, None, record.shape)
        self.consumer.add_block(record.index, slice(None), record.probs.float(), grad_probs.float())
        self.consumer.end_layer(record.index)


class _CapturedKernel(torch.autograd.Function):
    """The model's own kernel forward; an exact block-wise backward that feeds a consumer."""

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
    """Identity on attention probabilities whose backward hands ``(A, dA)`` to the consumer."""

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
