"""The one attribution flow that every attention-reading class runs.

A class declares a reader (:class:`~captum_chefer.core.readers.Reader`), a stream map
(:class:`~captum_chefer.families.StreamMap`, one stream for single-sequence models) and a read
spec (:class:`ReadSpec`); :func:`explain` then

1. formats the inputs (Captum's tuple conventions); an empty batch gets empty maps;
2. traces one forward with attention captured (:func:`~captum_chefer.attr.trace.trace_attention`);
3. plans the reads (:func:`plan_reads`): checks the attention against the rules, sorts the calls
   into streams (one per tower where the layers form independent chains, each input read
   through the tower it feeds), and hooks into the backward (:mod:`~captum_chefer.attr.reads`);
4. runs the backward, which shows the rows each stream's output is computed from and feeds
   the reader;
5. reads one row per (read stream, input stream), after the checks that need the device (one
   synchronisation); padding is exactly 0 because no row on the output's path attends to it;
6. maps each row onto its input (:mod:`~captum_chefer.core.mapping`) and formats the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..capture import Recorder
from ..core.mapping import (
    PatchPositions,
    prefix_tokens,
    segment_sizes,
    split_segments,
    tokens_to_input,
)
from ..core.readers import Edge, Reader, StreamLayout, TowerReaders, check_start_layer
from ..core.tokens import SelfRelevance, TokenIndex
from ..families import StreamMap, recorded_patch_positions
from ._captum import TargetType, _format_output, _format_tensor_into_tuples, _is_tuple
from .checks import (
    check_attention,
    check_output,
    check_self_relevance,
    check_streams,
    check_token_index,
)
from .inputs import check_inputs
from .reads import Read, ReadPlan
from .trace import Trace, trace_attention

Output = Literal["input", "token"]


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
        one_token_row: the single read's row is mapped onto every input (each input's own,
            where the layers form independent towers), and returned alone ``(B, N)`` with
            ``output="token"`` when every input reads one tower (the one-stream classes).
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
    if empty_batch(inputs_tuple):
        return _format_output(is_inputs_tuple, empty_maps(inputs_tuple, spec.output))
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
        if spec.one_token_row and all(row is rows[0] for row in rows):
            return rows[0]
        return _format_output(is_inputs_tuple or len(rows) > 1, tuple(rows))
    positions = explained.positions[-1] if explained.positions else None
    mapped = tuple(
        tokens_to_input(row, tensor.shape, spec.num_prefix_tokens, spec.patch_grid, positions).to(
            tensor.device
        )
        for row, tensor in zip(rows, inputs_tuple)
    )
    return _format_output(is_inputs_tuple, mapped)


def empty_batch(inputs: tuple[Tensor, ...]) -> bool:
    """Whether an input has no example (``B = 0``)."""
    return any(tensor.dim() > 0 and tensor.shape[0] == 0 for tensor in inputs)


def empty_maps(inputs: tuple[Tensor, ...], output: str) -> tuple[Tensor, ...]:
    """The maps of an empty batch: zeros shaped like each input (``(0, T)`` for tokens)."""
    if output == "token":
        return tuple(torch.zeros(0, *tensor.shape[1:2], device=tensor.device) for tensor in inputs)
    return tuple(torch.zeros(tensor.shape, device=tensor.device) for tensor in inputs)


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
    """Steps 2-5 of the flow: trace, plan the reads, backward, one row per read."""
    check_output(spec.output)
    for entry in spec.reads:
        check_token_index(entry.token_index)
    name = subject.name
    reads_mean = any(_is(read.token_index, "mean") for read in spec.reads)
    check_self_relevance(reader, spec.self_relevance, reads_mean, name)
    plans: list[ReadPlan] = []

    def plan(trace: Trace, recorder: Recorder) -> None:
        plans.append(plan_reads(name, trace, reader, streams, spec, inputs, subject.model))
        plans[0].watch(recorder)

    with recorded_patch_positions(subject.model) as positions:
        trace = trace_attention(
            subject.forward_func,
            subject.model,
            inputs,
            target,
            additional_forward_args,
            reader,
            plan,
            block_bytes,
            scope_modules=streams.needs_module_names,
        )
    read = plans[0]
    read.finish()
    found: dict[tuple[str, str], Tensor] = {}
    for entry in read.reads:
        if (entry.stream, entry.read_stream) not in found:
            row = read.reader.read(spec.self_relevance, entry.stream, entry.read_stream)
            found[(entry.stream, entry.read_stream)] = row
    target = None
    if trace.target_valid is not None and trace.target_error is not None:
        target = (trace.target_valid, trace.target_error)
    read.check(trace.finite, spec.self_relevance == "zero", list(found.values()), target)
    rows = [found[(entry.stream, entry.read_stream)] for entry in read.reads]
    return Explained(rows, trace, positions)


def plan_reads(
    name: str,
    trace: Trace,
    reader: Reader,
    streams: StreamMap,
    spec: ReadSpec,
    inputs: tuple[Tensor, ...],
    model: nn.Module | None = None,
) -> ReadPlan:
    """Step 3: check the attention, lay out the streams (one per tower of independent layers
    for a one-stream map), and plan what each input reads."""
    records = trace.records
    steps = streams.steps(records)
    towers = _towers(trace, steps)
    if towers:
        steps = [[(index, towers[index], towers[index])] for index in range(len(records))]
    check_attention(trace, steps, name, model)
    resolved = [_pooled(read, streams, steps) for read in spec.reads]
    if towers:
        resolved = [_tower_read(name, read, i, trace, towers) for i, read in enumerate(resolved)]
    first = resolved[0]
    layout = StreamLayout(
        streams.sizes(records, steps), tuple(tuple(s) for s in steps), first.read_stream
    )
    needed = [stream for read in resolved for stream in (read.read_stream, read.stream)]
    check_streams(trace, layout, needed, name)
    if len(layout.sizes) > 1 and not reader.multi_stream and not towers:
        raise ValueError(
            f"{name}: the model's attention forms the streams {sorted(layout.sizes)}, but this "
            "method reads one stream; use CheferMultiModal for several streams."
        )
    used: Reader | TowerReaders = TowerReaders(reader, layout) if towers else reader
    counts = [used.n_layers(s) for s in layout.sizes] if isinstance(used, TowerReaders) else []
    check_start_layer(reader.start_layer, min(counts) if counts else len(records))
    shapes = [tensor.shape for tensor in inputs]
    prefix = prefix_tokens(
        layout.sizes[first.read_stream], shapes, spec.num_prefix_tokens, spec.patch_grid
    )
    return ReadPlan(
        name, resolved, layout, used, trace.batch, prefix, _describer(resolved, bool(towers))
    )


def _towers(trace: Trace, steps: Sequence[Sequence[Edge]]) -> dict[int, str]:
    """For a one-stream map over several independent chains of calls, each call's tower
    (``"tower0"``, ``"tower1"``, … in forward order); else empty."""
    if len({stream for step in steps for edge in step for stream in edge[1:]}) != 1:
        return {}
    components = trace.dependencies.components()
    if len(components) < 2:
        return {}
    return {index: f"tower{t}" for t, calls in enumerate(components) for index in calls}


def _tower_read(name: str, read: Read, position: int, trace: Trace, towers: dict[int, str]) -> Read:
    """The read of input ``position``: the tower its tokens feed."""
    fed = sorted({towers[r.index] for r in trace.records if position in r.fed_by})
    if len(fed) != 1:
        found = sorted(set(towers.values()))
        cause = (
            "reaches none of them" if not fed else f"feeds {len(fed)} of them ({', '.join(fed)})"
        )
        raise ValueError(
            f"{name}: the model's attention forms {len(found)} independent stacks of layers "
            f"(one per input feature, or a siamese forward), and input {position} {cause}, so "
            "no one stack explains it. Explain one branch at a time, with the others "
            "detached, e.g. lambda a: cos(model(a), model(b).detach())."
        )
    return Read(fed[0], fed[0], read.token_index)


def _describer(reads: Sequence[Read], towers: bool) -> Callable[[str], str]:
    """Names a stream in messages: a tower by the input it explains."""
    inputs = {read.read_stream: i for i, read in enumerate(reads)}

    def describe(stream: str) -> str:
        if towers:
            return f" of the layers input {inputs.get(stream, '?')} feeds"
        return f" of stream {stream!r}" if stream != "tokens" else ""

    return describe


def _pooled(read: Read, streams: StreamMap, steps: Sequence[Sequence[Edge]]) -> Read:
    """A read from a stream pooled by another stream's queries (an attention probe) is read
    from that stream, when the model has it."""
    probe = streams.pooled_by.get(read.read_stream)
    present = {edge[1] for step in steps for edge in step}
    if probe is None or probe not in present:
        return read
    return Read(probe, read.stream, "auto")


def _is(token_index: TokenIndex, name: str) -> bool:
    return isinstance(token_index, str) and token_index == name
