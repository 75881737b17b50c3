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
forward order: a call the output does not depend on has ``dA = 0`` and adds nothing. The same
pass finds the token-mixing operations outside attention (a convolution over the tokens, a
scan, an FFT, a recurrence) that the explained output depends on: :func:`check_token_mixing`
refuses a relevance that propagates through attention only where they would be left out.

The recorder keeps no tensor of a call beyond the call: the inputs its backward needs are saved
with ``ctx.save_for_backward``, so activation checkpointing drops and recomputes them as it does
the model's own. Non-reentrant checkpointing recomputes a block during the backward, with the
capture mode still active (:func:`backward`): the recomputation goes through the same autograd
functions, which saves the same tensors, and makes no new record. Reentrant checkpointing runs
the block without gradients in the forward and cannot be back-propagated by
``torch.autograd.grad``: calls made there are noted (:attr:`Recorder.reentrant`) and refused.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from ..core.attention import (
    AttentionCall,
    attention_backward,
    block_rows_for,
    empty_rows_flag,
)
from ..core.readers import Reader, TowerReaders
from .graph import (
    Dependencies,
    dependencies_and_masks,
    mixing_outside_attention,
    reached_past_scores,
    scores_below,
)


@dataclass
class MixingRecord:
    """An operation outside attention that mixes tokens, seen during the forward pass."""

    description: str
    """What it is, e.g. ``"conv1d with kernel (4,)"``."""
    owners: tuple[nn.Module, ...]
    """The modules whose forward was running when it was called, innermost first (see
    :func:`running_modules`); the message names the innermost one of the user's model."""
    node: Any
    """The autograd node of its output."""
    batch: int | None = None
    """The batch size of a convolution's input: with tokens folded into the batch (another
    size than the explained output's), it runs over a per-token axis and does not mix."""
    unread: bool = False
    """A softmax that looks like attention in a layout the capture cannot read (over another
    dimension than the last, or five dimensions), e.g. an attention-pooling head."""
    tokens_at: int | None = None
    """The size of the axis it mixes along, where that is token mixing only if the axis is the
    tokens' (a ``(B, N)`` softmax, a shift by padding or rolling): compared with the captured
    calls' token counts once they are known."""
    convolution: bool = False
    """A convolution (or ``unfold``): the one kind of mixing that may make the tokens (a patch,
    positional or stem convolution) when it lies below the first attention layer."""
    per_token: tuple[int, ...] = ()
    """For a product of two computed tensors: its batch sizes after the first, and last the
    size it sums over. A product over a feature axis, batched over the tokens, does not mix."""

    def mixes(self, batch: int | None, tokens: set[int]) -> bool:
        """Whether it mixes tokens, given the explained batch and the captured token counts.

        Example:
            >>> pooling = MixingRecord("softmax", (), None, batch=2, tokens_at=7)
            >>> pooling.mixes(2, {7}), pooling.mixes(2, {9})
            (True, False)
            >>> per_token = MixingRecord("matmul", (), None, batch=2, per_token=(7, 16))
            >>> per_token.mixes(2, {7}), per_token.mixes(2, {9})
            (False, True)
        """
        if self.batch is not None and self.batch != batch:
            return False
        if self.tokens_at is not None and self.tokens_at not in tokens:
            return False
        if self.per_token:
            *batched, summed = self.per_token
            if summed not in tokens and any(size in tokens for size in batched):
                return False
        return True


@dataclass
class CallRecord:
    """What the recorder keeps of one attention call during the forward pass (no tensors)."""

    index: int
    shape: tuple[int, int, int, int]
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
    explicit: bool = False
    """Explicit probabilities (a softmax the model wrote), not a fused kernel call."""
    owners: tuple[nn.Module, ...] = ()
    """The modules whose forward was running when the call was made, innermost first."""
    fed_by: frozenset[int] = frozenset()
    """After :meth:`Recorder.keep_on_path`: the indexes of the explained inputs the call's
    inputs depend on (see :meth:`Recorder.track_inputs`)."""
    empty_rows: Tensor | bool = False
    """Whether a query row of a kernel call may be masked at every key: a 0-dim bool tensor
    from the forward, read with every call's in one sync by :meth:`Recorder.read_flags`."""

    def unfold_heads(self, batch: int) -> None:
        """Read folded ``(B*H, 1, N, N)`` probabilities as ``(B, H, N, N)`` (batch-major)."""
        if self.folded and self.shape[0] % batch == 0:
            self.shape = (batch, self.shape[0] // batch, *self.shape[2:])


BackwardHook = Callable[[CallRecord, Tensor], None]
"""Called as ``hook(record, grad)`` when a kept call's backward starts, before its blocks reach
the reader: ``grad`` is ``dO`` ``(B, H, Nq, Dv)`` of a kernel call or ``dA`` ``(B, H, Nq, Nk)`` of
explicit probabilities (the engine reads the rows the output depends on from it)."""


@dataclass
class Recorder:
    """Collects attention calls in forward order and feeds their backward to a reader.

    Args:
        reader: receives each kept call's ``(A, dA)`` blocks during the backward.
        block_bytes: memory for one recomputed block (see
            :func:`~captum_chefer.core.attention.block_rows_for`).
        model: only calls made in this module or its submodules are captured (None: every
            call on this thread).
    """

    reader: Reader | TowerReaders | None = None
    block_bytes: int | None = None
    model: nn.Module | None = None
    anchors: dict[torch.device, Tensor] = field(default_factory=dict)
    """One gradient leaf per device that attention ran on."""
    records: list[CallRecord] = field(default_factory=list)
    scope: list[str] = field(default_factory=list)
    """Names of the modules running now, outermost first (see ``module_scope``)."""
    dropout_active: bool = False
    """Whether the forward applied dropout (training mode): the relevance is then random."""
    mixing: list[MixingRecord] = field(default_factory=list)
    """Operations that mix tokens outside attention, in forward order."""
    mixing_on_path: list[tuple[MixingRecord, bool]] = field(default_factory=list)
    """After :meth:`keep_on_path`: those the output depends on, each with whether it lies below
    a first attention layer (it then takes part in making the tokens)."""
    batch: int | None = None
    """After :meth:`keep_on_path`: the explained batch size."""
    root: nn.Module | None = None
    """The outermost module running when the first call or mixing operation was seen: where
    the layer stacks are looked for when the attribution was given no model."""
    in_backward: bool = False
    """Set by :func:`backward`: calls seen now are a checkpointed block's recomputation."""
    device: torch.device | None = None
    """The explained output's device, where the reader's rows live; the blocks of layers on
    other devices are moved there."""
    on_backward: BackwardHook | None = None
    """Called when a kept call's backward starts (see :data:`BackwardHook`)."""
    reentrant: list[str] = field(default_factory=list)
    """Modules whose attention ran without gradients inside reentrant activation checkpointing
    (``use_reentrant=True``): those layers cannot be read."""
    hooks: list[Any] = field(default_factory=list)
    """Handles of hooks registered on autograd nodes for this attribution; :meth:`release`
    removes them."""
    last: AttentionCall | Tensor | None = None
    """The inputs (or probabilities) of the latest call, while the forward runs, for the
    weights that ``nn.MultiheadAttention`` returns."""
    _model_modules: set[int] | None = None
    _outputs: weakref.WeakValueDictionary[int, Tensor] = field(
        default_factory=weakref.WeakValueDictionary
    )
    _by_output: dict[int, CallRecord] = field(default_factory=dict)
    _made: list[CallRecord] = field(default_factory=list)
    """Every record made, kept or not: :meth:`release` clears them all."""
    _nodes: set[Any] = field(default_factory=set)
    """The autograd nodes of the captured outputs, as they are captured."""
    _inputs: weakref.WeakValueDictionary[int, Tensor] = field(
        default_factory=weakref.WeakValueDictionary
    )
    _input_index: dict[int, frozenset[int]] = field(default_factory=dict)
    _input_nodes: list[tuple[Any, frozenset[int]]] = field(default_factory=list)
    """Autograd nodes made from the explained inputs, with the inputs' indexes."""
    _below_masks: dict[Any, int] = field(default_factory=dict)
    """After :meth:`keep_on_path`: for every graph node, the calls below it (a bit mask over
    the calls' indexes before renumbering, :attr:`_kept`)."""
    _kept: tuple[int, ...] = ()

    def anchor(self, device: torch.device) -> Tensor:
        """The gradient leaf of ``device``, made on first use."""
        if device not in self.anchors:
            self.anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self.anchors[device]

    def captures(self) -> tuple[nn.Module, ...] | None:
        """The modules running now, or None where a call made now is not the model's (made in
        no module of :attr:`model`): it runs as it is, in the forward and in a recomputation
        alike."""
        owners = running_modules()
        if self.model is None:
            return owners
        if self._model_modules is None:
            self._model_modules = {id(module) for module in self.model.modules()}
        inside = self._model_modules
        return owners if any(id(owner) in inside for owner in owners) else None

    def _new_record(
        self, shape: tuple[int, int, int, int], owners: tuple[nn.Module, ...], probe: Tensor
    ) -> CallRecord:
        record = CallRecord(len(self.records), shape, module=self.scope[-1] if self.scope else None)
        record.owners = owners
        if not probe.requires_grad and not torch.is_grad_enabled() and in_reentrant_checkpoint():
            name, kind = where(owners, self._names())
            self.reentrant.append(f"{name} ({kind})" if name else kind or "the forward")
        self._see_root()
        self.records.append(record)
        self._made.append(record)
        return record

    def _names(self) -> dict[int, str]:
        model = self.model if self.model is not None else outermost_module()
        return {id(module): name for name, module in model.named_modules()} if model else {}

    def note_mixing(
        self,
        description: str,
        output: Tensor,
        batch: int | None,
        unread: bool = False,
        tokens_at: int | None = None,
        per_token: tuple[int, ...] = (),
        convolution: bool = False,
    ) -> None:
        """Note an operation outside attention that mixes tokens, whose output is ``output``
        (the fields are :class:`MixingRecord`'s)."""
        if self.in_backward:
            return
        record = MixingRecord(
            description,
            running_modules(),
            output.grad_fn,
            batch,
            unread,
            tokens_at,
            convolution,
            per_token,
        )
        self.mixing.append(record)
        self._see_root()

    def track_inputs(self, inputs: tuple[Tensor, ...]) -> None:
        """Follow which autograd nodes are made from ``inputs`` (by position) in the forward.

        Tensors computed from a tracked tensor without gradients (a view, a cast, a mask of the
        ids) are tracked in turn; the first operations that make a tensor with gradients from
        one (an embedding lookup, a patch convolution, an addition to a position embedding) are
        noted with the inputs' indexes (see :meth:`note_derived`).
        """
        for index, tensor in enumerate(inputs):
            if isinstance(tensor, Tensor):
                self._track(tensor, frozenset({index}))

    def _track(self, tensor: Tensor, indexes: frozenset[int]) -> None:
        known = (
            self._input_index.get(id(tensor)) if self._inputs.get(id(tensor)) is tensor else None
        )
        self._inputs[id(tensor)] = tensor
        self._input_index[id(tensor)] = indexes | known if known else indexes

    def note_derived(self, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        """Propagate input tracking from the tensor arguments of one operation to its result."""
        if not self._inputs or self.in_backward:
            return
        found: frozenset[int] = frozenset()
        for arg in (*args, *kwargs.values()):
            for tensor in arg if isinstance(arg, (list, tuple)) else (arg,):
                if isinstance(tensor, Tensor) and self._inputs.get(id(tensor)) is tensor:
                    found |= self._input_index[id(tensor)]
        if not found:
            return
        for output in result if isinstance(result, (list, tuple)) else (result,):
            if not isinstance(output, Tensor):
                continue
            if output.grad_fn is not None:
                self._input_nodes.append((output.grad_fn, found))
            else:
                self._track(output, found)

    def _see_root(self) -> None:
        if self.root is None:
            self.root = outermost_module()

    def release(self) -> None:
        """Drop every reference into the autograd graph: the nodes, the captured inputs and
        probabilities, the mixing operations' nodes.

        Each captured node's context refers to this recorder, so a reference from here back
        to a node is a cycle through C++ that Python's garbage collector cannot see: the graph
        below the first attention layer (which the backward never runs) and everything it
        saved would stay alive after the attribution. Called once the backward has run, or
        the attribution has failed.
        """
        for record in self._made:
            record.node = None
            record.owners = ()
        for op in (*self.mixing, *(op for op, _ in self.mixing_on_path)):
            op.node = None
            op.owners = ()
        self._outputs.clear()
        self._by_output.clear()
        self._nodes.clear()
        self._inputs.clear()
        self._input_index.clear()
        self._input_nodes.clear()
        self._below_masks.clear()
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        self.last = None
        self.on_backward = None

    def captured_nodes(self) -> set[Any]:
        """The autograd nodes of the calls captured so far."""
        return self._nodes

    def _keep(self, record: CallRecord, output: Tensor) -> Tensor:
        record.node = output.grad_fn
        self._nodes.add(output.grad_fn)
        self._outputs[id(output)] = output
        self._by_output[id(output)] = record
        return output

    def supersede(self, output: Tensor) -> None:
        """Drop the record of the captured ``output``: a later record replaces it."""
        record = self._by_output.get(id(output))
        if record is None:  # not recorded: outside the model, or recomputed in the backward
            return
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

        Also notes, for each kept call, the explained inputs it depends on (``fed_by``), and
        for every graph node the kept calls below it (:meth:`nodes_above`). Returns the
        dependencies in the new numbering.
        """
        self.last = None
        self.batch = output.shape[0] if output.dim() else 1
        for record in self.records:
            record.unfold_heads(self.batch)
        n_calls, n_mixing = len(self.records), len(self.mixing)
        tags = [node for node, _ in self._input_nodes]
        nodes = [record.node for record in self.records] + [op.node for op in self.mixing] + tags
        every, masks = dependencies_and_masks(output, nodes)
        outside = mixing_outside_attention(every, n_calls)
        mixing = [i for i in every.on_path if n_calls <= i < n_calls + n_mixing]
        if mixing:  # only what moves content from token to token, not what shapes the scores
            content: dict[Any, tuple[int, ...]] = {
                r.node: () if r.explicit else _CONTENT_INPUTS for r in self.records
            }
            reached = reached_past_scores(output, content)
            read_out = _read_out(output)
            products = {op.node for op in self.mixing if op.per_token}
            probs = [r.node for r in self.records if r.explicit and r.node is not None]
            reached -= scores_below(probs, products) if products and probs else set()
            mixing = [
                i
                for i in mixing
                if nodes[i] in reached
                and not (self.mixing[i - n_calls].tokens_at and nodes[i] in read_out)
            ]
        self.mixing_on_path = [(self.mixing[i - n_calls], i not in outside) for i in mixing]
        self.mixing.clear()
        calls = tuple(i for i in every.on_path if i < n_calls)
        renumber = {old: new for new, old in enumerate(calls)}
        kept = [self.records[old] for old in calls]
        first_tag = n_calls + n_mixing
        for record in kept:
            under = every.below[record.index]
            record.depends_on_captured = any(j < n_calls for j in under)
            record.fed_by = frozenset(
                index
                for j in under
                if j >= first_tag
                for index in self._input_nodes[j - first_tag][1]
            )
            record.index = renumber[record.index]
        self.records[:] = kept
        self._outputs.clear()
        self._by_output.clear()
        self._below_masks, self._kept = masks, calls
        below = {
            renumber[old]: frozenset(renumber[j] for j in every.below[old] if j in renumber)
            for old in calls
        }
        return Dependencies(tuple(range(len(kept))), below)

    def read_flags(self) -> None:
        """Read every kept call's ``empty_rows`` flag from the device, in one sync (none where
        every flag is known without data)."""
        pending = [(r, r.empty_rows) for r in self.records if isinstance(r.empty_rows, Tensor)]
        if pending:
            device = pending[0][1].device
            values = torch.stack([flag.to(device) for _, flag in pending]).cpu().tolist()
            for (record, _), value in zip(pending, values):
                record.empty_rows = bool(value)

    def nodes_above(self, index: int) -> list[Any]:
        """The autograd nodes that kept call ``index`` lies below (after :meth:`keep_on_path`):
        what the model computes from that call's output on the way to the explained output."""
        old = self._kept[index]
        return [node for node, mask in self._below_masks.items() if mask >> old & 1]

    def attention(
        self,
        kernel: Callable[..., Tensor],
        call: AttentionCall,
        kernel_kwargs: dict[str, Any],
    ) -> Tensor:
        """Run ``kernel(q, k, v, attn_mask=mask, **kernel_kwargs)`` and capture it for backward.

        A call outside :attr:`model` runs the kernel as it is; one recomputed during the
        backward goes through the same autograd function without a record.
        """
        owners = self.captures()
        if owners is None:
            return kernel(call.query, call.key, call.value, attn_mask=call.mask, **kernel_kwargs)
        record = None if self.in_backward else self._new_record(call.shape, owners, call.query)
        if record is not None:
            record.empty_rows = empty_rows_flag(call)
        self.last = call
        output = _CapturedKernel.apply(
            self,
            record,
            (kernel, kernel_kwargs, call.is_causal, call.scale),
            self.anchor(call.query.device),
            call.query,
            call.key,
            call.value,
            call.mask,
        )
        return self._keep(record, output) if record is not None else output

    def probabilities(self, probs: Tensor, folded: bool = False) -> Tensor:
        """Pass explicit probabilities ``(B, H, Nq, Nk)`` through; their backward sees ``dA``.

        Probabilities that are already a captured output pass unchanged (a model that calls
        :func:`~captum_chefer.mark_attention` on a softmax the capture has already seen).
        """
        if self.is_captured(probs):
            return probs
        owners = self.captures()
        if owners is None:
            return probs
        record = None
        if not self.in_backward:
            record = self._new_record(tuple(probs.shape), owners, probs)  # type: ignore[arg-type]
            record.folded = folded
            record.explicit = True
        self.last = probs
        output = _CapturedProbs.apply(self, record, self.anchor(probs.device), probs)
        return self._keep(record, output) if record is not None else output

    def _on_reader_device(self, probs: Tensor, grad_probs: Tensor) -> tuple[Tensor, Tensor]:
        """A block moved to the device of the explained output, where the reader's rows live
        (a model split across devices runs some layers elsewhere)."""
        device = self.device
        if device is None or probs.device == device:
            return probs, grad_probs
        return probs.to(device), grad_probs.to(device)

    def backward_call(self, record: CallRecord | None, call: AttentionCall, grad_output: Tensor):
        """The input gradients of one kernel call; its blocks go to the reader if it is kept."""
        reader = self.reader if record is not None and not record.superseded else None
        if record is not None and self.on_backward is not None:
            self.on_backward(record, grad_output)
        if reader is not None:
            assert record is not None
            reader.begin_layer(record.index, record.shape)

        def feed(rows: slice, probs: Tensor, grad_probs: Tensor) -> None:
            assert reader is not None and record is not None
            probs, grad_probs = self._on_reader_device(probs, grad_probs)
            reader.add_block(record.index, rows, probs, grad_probs)

        grads = attention_backward(
            call,
            grad_output,
            feed if reader is not None else None,
            block_rows_for(call, self.block_bytes),
            need_input_grads=record is None or record.depends_on_captured,
            key_prefix_blocks=reader is not None and reader.key_prefix_blocks,
            maybe_empty_rows=None if record is None else bool(record.empty_rows),
        )
        if reader is not None:
            assert record is not None
            reader.end_layer(record.index)
        return grads

    def backward_probs(self, record: CallRecord | None, probs: Tensor, grad_probs: Tensor) -> None:
        """Hand explicit probabilities and their gradient to the reader, if the call is kept."""
        if record is None or record.superseded:
            return
        probs, grad_probs = probs.reshape(record.shape), grad_probs.reshape(record.shape)
        if self.on_backward is not None:
            self.on_backward(record, grad_probs)
        if self.reader is None:
            return
        self.reader.begin_layer(record.index, record.shape)
        # A copy: the reader may overwrite grad_probs, which autograd passes on below.
        grad_probs = grad_probs.to(torch.float32, copy=True)
        # A row masked at every key is NaN after the softmax; the model zeroes or ignores it
        # (CPM-Ant fills it with 0 after the softmax): it attends to nothing.
        probs = probs.float().nan_to_num(0.0)
        probs, grad_probs = self._on_reader_device(probs, grad_probs)
        self.reader.add_block(record.index, slice(None), probs, grad_probs)
        self.reader.end_layer(record.index)


_CONTENT_INPUTS = (3,)
"""The value among the tensor inputs of :class:`_CapturedKernel` (anchor, query, key, value)."""


class _CapturedKernel(torch.autograd.Function):
    """The model's own kernel forward; an exact block-wise backward that feeds a reader.

    The query, key, value and mask are saved with ``save_for_backward`` (activation
    checkpointing may drop and recompute them); the backward runs with torch-function modes
    off, so that its own softmax and products are never taken for the model's.
    """

    @staticmethod
    def forward(ctx, recorder, record, options, anchor, query, key, value, mask):
        kernel, kwargs, is_causal, scale = options
        ctx.recorder, ctx.record, ctx.options = recorder, record, (is_causal, scale)
        ctx.save_for_backward(query, key, value, mask)
        with torch.no_grad():
            return kernel(query, key, value, attn_mask=mask, **kwargs)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, mask = ctx.saved_tensors
        call = AttentionCall(query, key, value, mask, *ctx.options)
        with torch._C.DisableTorchFunction():
            grads = ctx.recorder.backward_call(ctx.record, call, grad_output)
        return (None, None, None, None, *grads)


class _CapturedProbs(torch.autograd.Function):
    """Identity on attention probabilities whose backward hands ``(A, dA)`` to the reader."""

    @staticmethod
    def forward(ctx, recorder, record, anchor, probs):
        ctx.recorder, ctx.record = recorder, record
        ctx.save_for_backward(probs)
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            ctx.recorder.backward_probs(ctx.record, probs.detach(), grad_probs)
        return None, None, None, grad_probs


def backward(recorder: Recorder, outputs: Tensor, inputs: list[Tensor]) -> None:
    """``torch.autograd.grad(outputs, inputs)`` with the capture mode active on this thread.

    Called from inside the capture block. ``torch.autograd.grad`` itself would be dispatched
    through the mode, which turns itself off while it handles a call, so the engine is run
    directly: a block that non-reentrant activation checkpointing recomputes during the
    backward then runs through the same capture route as in the forward (the same autograd
    functions, so the same saved tensors), and the autograd engine carries the mode to its
    worker threads. No ``.grad`` is written.
    """
    recorder.in_backward = True
    try:
        gradients(outputs, inputs)
    finally:
        recorder.in_backward = False


def gradients(output: Tensor, inputs: list[Tensor]) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, allow_unused=True)``, run by the autograd engine
    directly, so that a torch-function mode active on this thread stays active during the
    backward (``torch.autograd.grad`` is itself dispatched through the mode, which turns itself
    off while it handles a call). ``.grad`` is never written.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> gradients((x * x).sum(), [x])
        (tensor([2., 4.]),)
    """
    return Variable._execution_engine.run_backward(
        (output,), (torch.ones_like(output),), False, False, tuple(inputs), True, False
    )


def in_reentrant_checkpoint() -> bool:
    """Whether the caller runs inside ``torch.utils.checkpoint``'s reentrant forward."""
    code = _REENTRANT_FORWARD
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _reentrant_forward() -> Any:
    try:
        from torch.utils.checkpoint import CheckpointFunction
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    return CheckpointFunction.forward.__code__


_REENTRANT_FORWARD = _reentrant_forward()


def running_modules() -> tuple[nn.Module, ...]:
    """The modules whose ``forward`` (or ``__call__``) is on the caller's stack, innermost first.

    Read off the Python frames (a ``self`` that is a module), so nothing is hooked on the
    model; a few microseconds per call. All of them are kept, not only the innermost: a
    library may run an op inside a module of its own that is not part of the user's model (the
    ``kernels`` package wraps a function as a ``Func`` module, transformers' hub-kernel fallback
    runs a convolution there), and the messages name the innermost module of the user's model
    (:func:`where`).
    """
    found: list[nn.Module] = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and (not found or owner is not found[-1]):
                found.append(owner)
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(found)


def where(owners: tuple[nn.Module, ...], names: dict[int, str]) -> tuple[str | None, str]:
    """The qualified name and class of the innermost of ``owners`` that ``names`` (the user's
    model's modules by id) holds; else no name and the innermost module's class.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> names = {id(module): name for name, module in model.named_modules()}
        >>> where((nn.ReLU(), model[0], model), names)
        ('0', 'Linear')
    """
    for owner in owners:
        name = names.get(id(owner))
        if name is not None:
            return name, type(owner).__name__
    return None, type(owners[0]).__name__ if owners else ""


def _read_out(output: Tensor, hops: int = 3) -> set[Any]:
    """The nodes just below ``output`` along single-input steps: where the explained value is
    selected from a softmax over the classes, that softmax is not one over the tokens, even
    with as many classes as tokens."""
    found: set[Any] = set()
    node = output.grad_fn
    for _ in range(hops):
        children = [child for child, _ in node.next_functions if child is not None] if node else []
        if len(children) != 1:
            break
        node = children[0]
        found.add(node)
    return found


def outermost_module() -> nn.Module | None:
    """The outermost module whose ``forward`` (or ``__call__``) is on the caller's stack."""
    found = None
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                found = owner
        frame = frame.f_back  # type: ignore[assignment]
    return found


def check_token_mixing(recorder: Recorder, model: nn.Module | None) -> None:
    """Refuse, naming the operation, where the explained output depends on tokens being mixed
    outside attention and the relevance would be carried through attention only; and, where no
    attention was captured, name the softmaxes that could not be read as attention.

    Chefer's rule (and rollout) propagate relevance through the attention maps and the
    identity of the residual: a convolution over the tokens, a scan (Mamba, gated delta-net
    linear attention), an FFT or a recurrence between or after the attention layers would be
    silently left out of the map. Not refused:

    - a convolution that makes the tokens: it lies below a first attention layer and outside
      the model's layer stack (an ``nn.ModuleList`` holding attention), as ViT's patch
      convolution, Whisper's convolution stem and wav2vec2's positional convolution do. The
      rule explains the tokens that enter the first layer, and these operations define them.
      Other mixing there (a scan, linear attention, a shift) is a layer, and is refused;
    - mixing that only shapes the attention scores (a convolution on the keys): it changes
      ``A``, which the rule reads as it is;
    - a kernel of size 1, or a convolution over a per-token axis with the tokens folded into
      the batch;
    - a reader that reads one layer only (``propagates_through_layers`` False: raw
      attention, attention Grad-CAM), whose map makes no claim about the other layers.
    """
    model = model if model is not None else recorder.root
    names = {id(module): name for name, module in model.named_modules()} if model else {}
    softmaxes = [op for op in recorder.mixing if op.unread and op.tokens_at is None]
    if not recorder.records and softmaxes:
        raise ValueError(NOTHING_READ.format(ops=_describe(softmaxes, names)))
    reader = recorder.reader
    if not recorder.mixing_on_path or (reader and not reader.propagates_through_layers):
        return
    stacks = _attention_stacks(model, recorder.records, names)
    tokens = {size for record in recorder.records for size in record.shape[2:]}
    found = [
        op
        for op, makes_tokens in recorder.mixing_on_path
        if op.mixes(recorder.batch, tokens) and not (makes_tokens and _stem(op, names, stacks))
    ]
    if found:
        hint = UNREAD if any(op.unread for op in found) else ""
        layer = "" if _has_embedding(model) else NO_EMBEDDING
        raise ValueError(TOKEN_MIXING.format(ops=_describe(found, names), layer=layer, unread=hint))


def _stem(op: MixingRecord, names: dict[int, str], stacks: list[str]) -> bool:
    """A convolution below the first attention layer, outside the model's layer stacks."""
    return op.convolution and not _inside(where(op.owners, names)[0], stacks)


TOKEN_MIXING = (
    "token mixing outside attention ({ops}): Chefer's rule and rollout carry relevance through "
    "attention only and would leave it out. Explain the model with "
    "captum_chefer.AttnLRP(model) (or CPLRP), which goes through every operation{layer}, or "
    "captum.attr.LayerIntegratedGradients on its embedding layer.{unread}"
)
NO_EMBEDDING = " (layer= its token layer)"
NOTHING_READ = (
    "No attention could be read: the model's softmaxes are in layouts captum_chefer cannot "
    "read as attention ({ops}). If one is self-attention, pass its probabilities as (B, H, N, "
    "N) to captum_chefer.mark_attention(); otherwise explain the model with "
    "captum_chefer.AttnLRP(model), which goes through every operation."
)
UNREAD = (
    " A softmax over another dimension than the last (an attention-pooling head) is not read "
    "as attention; self-attention in another layout can be passed to "
    "captum_chefer.mark_attention() as (B, H, N, N)."
)


def _has_embedding(model: nn.Module | None) -> bool:
    """Whether AttnLRP finds the token layer itself (``get_input_embeddings``)."""
    find = getattr(model, "get_input_embeddings", None)
    try:
        return callable(find) and find() is not None
    except NotImplementedError:
        return False


def _attention_stacks(
    model: nn.Module | None, records: list[CallRecord], names: dict[int, str]
) -> list[str]:
    """Names of the ``nn.ModuleList``s of ``model`` that hold a captured attention call."""
    if model is None:
        return []
    owners = {where(record.owners, names)[0] for record in records} - {None}
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    return [name for name in lists if any(_inside(owner, [name]) for owner in owners)]


def _inside(name: str | None, containers: list[str]) -> bool:
    if name is None:
        return False
    return any(not container or name.startswith(container + ".") for container in containers)


def _describe(found: list[MixingRecord], names: dict[int, str]) -> str:
    """The operations by module, in forward order, e.g. ``conv1d with kernel (4,), cumsum in
    model.layers.0.mamba (MambaMixer)``; the first two modules, in at most about 160 characters."""
    by_module: dict[str, list[str]] = {}
    for op in found:
        name, kind = where(op.owners, names)
        place = f"{name} ({kind})" if name else kind or "the forward"
        by_module.setdefault(place, [])
        if op.description not in by_module[place]:
            by_module[place].append(op.description)
    parts = [f"{', '.join(ops)} in {place}" for place, ops in by_module.items()]
    more = f"; and {len(parts) - 2} more modules" if len(parts) > 2 else ""
    text = "; ".join(parts[:2])
    return (text if len(text) <= 160 else text[:157] + "...") + more


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
