"""The one attribution flow that every attention-reading class runs.

A class declares a reader (:class:`~captum_chefer.core.readers.Reader`), a stream map
(:class:`~captum_chefer.families.StreamMap`, one stream for single-sequence models) and a read
spec (:class:`ReadSpec`); :func:`explain` then

1. formats the inputs (Captum's tuple conventions);
2. traces one forward with attention captured (:func:`~captum_chefer.attr.trace.trace_attention`);
3. prepares the reader: checks the attention against the rules, sorts the calls into streams,
   finds the padding of every stream and the rows to read (:func:`prepare_reader`);
4. runs the backward, which feeds the reader;
5. reads one row per (read stream, input stream), with padding set to exactly 0;
6. maps each row onto its input (:mod:`~captum_chefer.core.mapping`) and formats the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core.mapping import (
    PatchPositions,
    prefix_tokens,
    segment_sizes,
    split_segments,
    tokens_to_input,
)
from ..core.readers import Edge, Reader, ReadSetup, StreamLayout, check_start_layer
from ..core.tokens import SelfRelevance, TokenIndex, check_something_left, row_weights
from ..families import StreamMap, recorded_patch_positions
from ._captum import TargetType, _format_output, _format_tensor_into_tuples, _is_tuple
from .checks import (
    check_attention,
    check_output,
    check_read_rows,
    check_self_relevance,
    check_streams,
)
from .inputs import check_inputs
from .trace import Trace, is_causal, real_keys, trace_attention

Output = Literal["input", "token"]


@dataclass(frozen=True)
class Read:
    """One row read: the row of ``R_{read_stream, stream}`` at ``token_index``.

    Attributes:
        read_stream: the stream whose token the prediction is read from (rows of ``R``).
        stream: the input's stream (columns of ``R``).
        token_index: which token of ``read_stream``: ``"auto"``, ``"mean"``, an int or a
            LongTensor ``(B,)`` (see :func:`~captum_chefer.core.tokens.row_weights`).
        causal: whether ``"auto"`` reads the last real token (True) or the first (False);
            None: as the read stream's first attention call.
    """

    read_stream: str
    stream: str
    token_index: TokenIndex = "auto"
    causal: bool | None = None


@dataclass(frozen=True)
class ReadSpec:
    """What to read and how to lay it on the inputs.

    Attributes:
        reads: one :class:`Read` per input, in the order of ``inputs``.
        self_relevance: the read tokens' identity share, where ``stream == read_stream``.
        output: ``"input"`` maps the rows onto the inputs; ``"token"`` returns them.
        num_prefix_tokens: tokens before an image's patch grid; inferred when None.
        patch_grid: ``(rows, cols)`` of an image's patches; inferred when None.
        joint: the inputs' tokens are laid end to end in one stream (ViLT, VisualBERT): the
            row is split back per input, by ``segments`` or by the inputs' shapes.
        segments: tokens of each input in the joint sequence.
        one_token_row: the single read's row is mapped onto every input, and returned alone
            ``(B, N)`` with ``output="token"`` (the one-stream classes).
    """

    reads: tuple[Read, ...]
    self_relevance: SelfRelevance = "subtract"
    output: Output = "input"
    num_prefix_tokens: int | None = None
    patch_grid: tuple[int, int] | None = None
    joint: bool = False
    segments: Sequence[int] | None = None
    one_token_row: bool = False


@dataclass(frozen=True)
class Subject:
    """What is explained.

    Attributes:
        name: the attribution class's name, for error messages.
        forward_func: the callable run on the inputs.
        model: the module whose attention is captured (None: whatever runs on this thread).
    """

    name: str
    forward_func: Callable[..., Any]
    model: nn.Module | None


@dataclass(frozen=True)
class Prepared:
    """What step 3 found: the real-token masks by stream, and each read as resolved."""

    real: dict[str, Tensor]
    reads: list[Read]
    weights: dict[str, Tensor]
    """The rows read, as weights ``(B, N)``, by read stream."""


@dataclass
class Explained:
    """What :func:`read_rows` produced: one row per read, the trace, and any patch positions."""

    rows: list[Tensor]
    trace: Trace
    positions: list[PatchPositions] = field(default_factory=list)


def explain(
    subject: Subject,
    reader: Reader,
    streams: StreamMap,
    spec: ReadSpec,
    inputs: Tensor | tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    block_bytes: int | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Run the flow (see the module) and return Captum-formatted relevance."""
    check_inputs(inputs, additional_forward_args, subject.model)
    is_inputs_tuple = _is_tuple(inputs)
    inputs_tuple = _format_tensor_into_tuples(inputs)
    spec = _one_read_per_input(subject.name, spec, len(inputs_tuple))
    explained = read_rows(
        subject,
        reader,
        streams,
        spec,
        inputs_tuple,
        target,
        additional_forward_args,
        block_bytes,
    )
    rows = explained.rows
    if spec.joint:
        sizes = segment_sizes([tensor.shape for tensor in inputs_tuple], rows[0].shape[1])
        rows = list(split_segments(rows[0], list(spec.segments) if spec.segments else sizes))
    if spec.output == "token":
        return rows[0] if spec.one_token_row else _format_output(is_inputs_tuple, tuple(rows))
    positions = explained.positions[-1] if explained.positions else None
    mapped = tuple(
        tokens_to_input(row, tensor.shape, spec.num_prefix_tokens, spec.patch_grid, positions).to(
            tensor.device
        )
        for row, tensor in zip(rows, inputs_tuple)
    )
    return _format_output(is_inputs_tuple, mapped)


def _one_read_per_input(name: str, spec: ReadSpec, n_inputs: int) -> ReadSpec:
    """The reads, one per input (a joint sequence has one read, split afterwards)."""
    if spec.one_token_row:
        return replace(spec, reads=spec.reads[:1] * n_inputs)
    if spec.joint:
        return replace(spec, reads=spec.reads[:1])
    if n_inputs > len(spec.reads):
        streams = tuple(read.stream for read in spec.reads)
        raise ValueError(
            f"{name} maps {len(spec.reads)} inputs {streams}, got {n_inputs}; pass "
            "input_streams=(...) with one stream per input."
        )
    return replace(spec, reads=spec.reads[:n_inputs])


def read_rows(
    subject: Subject,
    reader: Reader,
    streams: StreamMap,
    spec: ReadSpec,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    block_bytes: int | None = None,
) -> Explained:
    """Steps 2-5 of the flow: trace, prepare the reader, backward, one masked row per read."""
    check_output(spec.output)
    reads_all = any(
        read.read_stream == read.stream
        and isinstance(read.token_index, str)
        and read.token_index == "mean"
        for read in spec.reads
    )
    name = subject.name
    check_self_relevance(reader, spec.self_relevance, reads_all, name)
    prepared: list[Prepared] = []

    def prepare(trace: Trace) -> None:
        prepared.append(prepare_reader(name, trace, reader, streams, spec, inputs))

    with recorded_patch_positions(subject.model) as positions:
        trace = trace_attention(
            subject.forward_func,
            subject.model,
            inputs,
            target,
            additional_forward_args,
            reader,
            prepare,
            block_bytes,
            scope_modules=streams.needs_module_names,
        )
    real = prepared[0].real
    check_read_rows(name, trace.output_rows, prepared[0].reads, prepared[0].weights, real)
    rows = [
        reader.read(spec.self_relevance, read.stream, read.read_stream).masked_fill(
            ~real[read.stream], 0.0
        )
        for read in prepared[0].reads
    ]
    return Explained(rows, trace, positions)


def prepare_reader(
    name: str,
    trace: Trace,
    reader: Reader,
    streams: StreamMap,
    spec: ReadSpec,
    inputs: tuple[Tensor, ...],
) -> Prepared:
    """Step 3: check the attention, lay out the streams, find the rows, prepare the reader."""
    records = trace.records
    steps = streams.steps(records)
    check_attention(trace, steps, name)
    resolved = [_pooled(read, streams, steps) for read in spec.reads]
    first = resolved[0]
    layout = streams.layout(records, first.read_stream)
    needed = [stream for read in resolved for stream in (read.read_stream, read.stream)]
    check_streams(trace, layout, needed, name)
    if len(layout.sizes) > 1 and not reader.multi_stream:
        raise ValueError(
            f"{name}: the model's attention forms the streams {sorted(layout.sizes)}, but this "
            "method reads one stream; use CheferMultiModal for several streams."
        )
    check_start_layer(reader.start_layer, len(records))
    real = _real_tokens(trace, layout)
    shapes = [tensor.shape for tensor in inputs]
    prefix = prefix_tokens(
        layout.sizes[first.read_stream], shapes, spec.num_prefix_tokens, spec.patch_grid
    )
    weights = _row_weights(trace, layout, resolved, real, spec.self_relevance, prefix)
    more = {stream: rows for stream, rows in weights.items() if stream != first.read_stream}
    setup = ReadSetup(
        weights[first.read_stream], real[first.read_stream], len(records), prefix, layout, more
    )
    reader.prepare(setup)
    return Prepared(real, resolved, weights)


def _row_weights(
    trace: Trace,
    layout: StreamLayout,
    reads: Sequence[Read],
    real: dict[str, Tensor],
    self_relevance: SelfRelevance,
    prefix: int = 0,
) -> dict[str, Tensor]:
    """The rows read, by read stream; every read of one stream must read the same rows.

    ``token_index="mean"`` over patch tokens leaves the ``prefix`` tokens before the grid
    (CLS, registers) out, as mean-pooled vision transformers do.
    """
    weights: dict[str, Tensor] = {}
    for read in reads:
        causal = read.causal if read.causal is not None else _read_causality(trace, layout, read)
        pooled = real[read.read_stream]
        if isinstance(read.token_index, str) and read.token_index == "mean" and prefix > 0:
            pooled = pooled.clone()
            pooled[:, :prefix] = False
        rows = row_weights(read.token_index, pooled, causal)
        if read.read_stream in weights and not torch.equal(weights[read.read_stream], rows):
            raise ValueError(
                f"Two inputs are read from different tokens of the stream {read.read_stream!r}, "
                "which one backward pass cannot give; explain them in separate calls."
            )
        weights[read.read_stream] = rows
        if read.read_stream == read.stream:
            check_something_left(rows, real[read.stream], self_relevance)
    return weights


def _pooled(read: Read, streams: StreamMap, steps: Sequence[Sequence[Edge]]) -> Read:
    """A read from a stream pooled by another stream's queries (an attention probe) is read
    from that stream, uniformly over its tokens, when the model has it."""
    probe = streams.pooled_by.get(read.read_stream)
    present = {edge[1] for step in steps for edge in step}
    if probe is None or probe not in present:
        return read
    return Read(probe, read.stream, "mean", read.causal)


def _real_tokens(trace: Trace, layout: StreamLayout) -> dict[str, Tensor]:
    """Padding per stream, read off the key mask of the first call attending to it."""
    records = trace.records
    several = len(layout.sizes) > 1
    device = trace.output.device
    real: dict[str, Tensor] = {}
    for step in layout.steps:
        for index, _query, key in step:
            if key not in real:
                keys = real_keys(records[index])
                real[key] = keys.to(device) if several else keys
    for name, size in layout.sizes.items():
        if name not in real:
            real[name] = torch.ones(trace.batch, size, dtype=torch.bool, device=device)
    return real


def _read_causality(trace: Trace, layout: StreamLayout, read: Read) -> Tensor | bool:
    """Whether the read stream's first self-attention call is causal."""
    for step in layout.steps:
        for index, query, key in step:
            if query == key == read.read_stream:
                return is_causal(trace.records[index])
    return False
