"""What an attribution reads: the rows of ``R`` that the explained output is computed from.

The rows are read off the backward, never guessed from a mask's format or a convention (the
first token, the last real token). When the backward reaches a stream's last attention call,
the query rows whose gradient is not zero are the tokens whose final states make the output:

- ``token_index="auto"``: one row per example is read as it is; several rows that the output
  weighs alike (a mean pooling, under any mask) are read as their mean; anything else (two
  heads, a flattening head, a learned pooling) is refused, naming AttnLRP. Whether the output
  weighs the rows alike is seen in the gradient of the tokens' final states: every autograd
  node between the stream's last call and the output is watched (a pre-hook), and one whose
  gradient has exactly those rows, all equal, settles it.
- ``token_index="mean"``: the mean of those rows.
- an int or a LongTensor ``(B,)``: the user's row, checked to be one the output depends on (it
  gets a gradient in some layer of its stream), else refused as padding.

Padding needs no mask either: a token that no row on the output's path attends to gets zero
attention in every layer the rule reads, hence exactly 0, whatever the mask's format.

The checks that must read a value on the device (a non-finite output, an example without a row,
rows weighed unequally, an index out of range or on padding, a map zeroed entirely) are kept as
bool tensors and read with one synchronisation after the backward (:meth:`ReadPlan.check`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..capture import CallRecord, Recorder
from ..core.readers import Reader, ReadSetup, StreamLayout, TowerReaders
from ..core.tokens import (
    TokenIndex,
    equal_rows,
    index_in_range,
    mean_of_rows,
    one_hot_rows,
    row_projections,
    rows_with_gradient,
)


@dataclass(frozen=True)
class Read:
    """One row read: the row of ``R_{read_stream, stream}`` at ``token_index``.

    Attributes:
        read_stream: the stream whose tokens the prediction is read from (rows of ``R``).
        stream: the input's stream (columns of ``R``).
        token_index: which rows of ``read_stream``: ``"auto"``, ``"mean"``, an int or a
            LongTensor ``(B,)`` (see the module).
    """

    read_stream: str
    stream: str
    token_index: TokenIndex = "auto"


@dataclass
class _Failure:
    """A check that failed for the examples where ``flags`` is True (bool ``(B,)``)."""

    kind: str
    stream: str
    flags: Tensor


@dataclass
class ReadPlan:
    """The rows of every read stream, resolved during the backward, and the checks on them.

    Args:
        name: the attribution class, for messages.
        reads: one :class:`Read` per input.
        layout: the streams the kept calls connect.
        reader: the class's reader, or :class:`~captum_chefer.core.readers.TowerReaders`.
        batch: examples in the explained output.
        prefix: tokens before an image's patch grid (for the readers that leave them out).
        describe: a stream's name in messages (a tower is named by its input).
    """

    name: str
    reads: Sequence[Read]
    layout: StreamLayout
    reader: Reader | TowerReaders
    batch: int
    prefix: int = 0
    describe: Callable[[str], str] = lambda stream: ""
    weights: dict[str, Tensor] = field(default_factory=dict)
    """The rows read ``(B, N)``, by read stream, once resolved."""
    _token_index: dict[str, TokenIndex] = field(default_factory=dict)
    _query_stream: dict[int, str] = field(default_factory=dict)
    _last_call: dict[str, int] = field(default_factory=dict)
    _candidates: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    _output_rows: dict[str, Tensor] = field(default_factory=dict)
    _live: dict[str, Tensor] = field(default_factory=dict)
    _failures: list[_Failure] = field(default_factory=list)

    def __post_init__(self) -> None:
        for read in self.reads:
            known = self._token_index.setdefault(read.read_stream, read.token_index)
            if not _same_index(known, read.token_index):
                raise ValueError(
                    f"{self.name}: two inputs are read from different tokens of the stream "
                    f"{read.read_stream!r}, which one backward cannot give; explain them in "
                    "separate calls."
                )
        if isinstance(self.reader, TowerReaders):  # every tower's reader needs its rows
            first = self.reads[0].token_index
            for stream in self.layout.sizes:
                self._token_index.setdefault(stream, first)
        for step in self.layout.steps:
            for index, query, _key in step:
                self._query_stream[index] = query
                if query in self._token_index:
                    self._last_call[query] = max(index, self._last_call.get(query, -1))

    @property
    def read_streams(self) -> list[str]:
        """The streams whose rows are read, in the order of the reads."""
        return list(dict.fromkeys(read.read_stream for read in self.reads))

    def watch(self, recorder: Recorder) -> None:
        """Hook into the backward: the recorder's reader (towers wrapped) and call hook, and
        pre-hooks on the nodes above each ``"auto"`` stream's last call (see the module). The
        recorder removes them."""
        recorder.on_backward = self.on_backward
        recorder.reader = self.reader
        above: dict[Any, list[tuple[str, int]]] = {}
        for stream, index in self._last_call.items():
            if _is(self._token_index[stream], "auto"):
                size = self.layout.sizes[stream]
                for node in recorder.nodes_above(index):
                    above.setdefault(node, []).append((stream, size))
        for node, streams in above.items():
            recorder.hooks.append(node.register_prehook(self._candidate_hook(streams)))

    def _candidate_hook(self, streams: list[tuple[str, int]]) -> Callable[[Any], None]:
        def hook(grad_outputs: Any) -> None:
            for grad in grad_outputs:
                if not isinstance(grad, Tensor) or grad.dim() < 2 or grad.shape[0] != self.batch:
                    continue
                found = None
                for stream, size in streams:
                    if grad.shape[1] == size and stream not in self.weights:
                        found = found or row_projections(grad.detach())
                        self._candidates.setdefault(stream, []).append(found)

        return hook

    def on_backward(self, record: CallRecord, grad: Tensor) -> None:
        """A kept call's backward starts (see :data:`~captum_chefer.capture.BackwardHook`)."""
        stream = self._query_stream.get(record.index)
        if stream is None or stream not in self._token_index:
            return
        token_index = self._token_index[stream]
        if not isinstance(token_index, str):
            rows = rows_with_gradient(grad)
            live = self._live.get(stream)
            self._live[stream] = rows if live is None else live | rows.to(live.device)
        if record.index == self._last_call[stream] and stream not in self.weights:
            self._resolve(stream, token_index, grad)

    def _resolve(self, stream: str, token_index: TokenIndex, grad: Tensor) -> None:
        rows = rows_with_gradient(grad)
        size = rows.shape[1]
        if isinstance(token_index, str) and token_index in ("auto", "mean"):
            weights = mean_of_rows(rows)
            self._output_rows[stream] = rows
            self._fail("no_rows", stream, ~rows.any(1))
            if token_index == "auto":
                own = row_projections(grad.detach().transpose(1, 2))
                candidates = [*self._candidates.pop(stream, []), own]
                alike = torch.stack(
                    [equal_rows(rows, n.to(rows.device), p.to(rows.device)) for n, p in candidates]
                ).any(0)
                self._fail("pooling", stream, ~alike)
        elif isinstance(token_index, (int, Tensor)):
            in_range = index_in_range(token_index, self.batch, size)
            if isinstance(in_range, bool):
                self._fail("range", stream, torch.full_like(rows[:, 0], not in_range))
            else:
                self._fail("range", stream, ~in_range.to(rows.device))
            weights = one_hot_rows(token_index, self.batch, size, rows.device)
        else:
            raise ValueError(
                f"token_index={token_index!r} is not understood; use 'auto', 'mean', an int, "
                "or a LongTensor with one index per example."
            )
        self.weights[stream] = weights
        if not self.reader.multi_stream:
            self.reader.prepare(self._setup(weights, len(self._query_stream)))
        elif isinstance(self.reader, TowerReaders):
            tower = StreamLayout.single(size, self.reader.n_layers(stream), stream)
            self.reader.prepare(self._setup(weights, self.reader.n_layers(stream), tower))

    def _setup(
        self, weights: Tensor, n_layers: int, layout: StreamLayout | None = None
    ) -> ReadSetup:
        real = torch.ones_like(weights, dtype=torch.bool)
        return ReadSetup(weights, real, n_layers, self.prefix, layout)

    def _fail(self, kind: str, stream: str, flags: Tensor) -> None:
        if any(read.read_stream == stream for read in self.reads):
            self._failures.append(_Failure(kind, stream, flags))

    def finish(self) -> None:
        """After the backward: prepare a multi-stream reader with every stream's rows, and
        note the explicit rows that are padding."""
        missing = [stream for stream in self.read_streams if stream not in self.weights]
        if missing:
            raise RuntimeError(
                f"{self.name}: the backward never reached the last attention layer of "
                f"{missing}; the explained output does not depend on it."
            )
        for stream, live in self._live.items():
            weights = self.weights[stream]
            self._fail("padding", stream, (weights * live.to(weights.device)).sum(1) == 0)
        if self.reader.multi_stream and not isinstance(self.reader, TowerReaders):
            first, *more = self.read_streams
            setup = self._setup(self.weights[first], len(self._query_stream), self.layout)
            others = {stream: self.weights[stream] for stream in more}
            self.reader.prepare(
                ReadSetup(
                    setup.row_weights, setup.real, setup.n_layers, self.prefix, self.layout, others
                )
            )

    def check(
        self,
        finite: Tensor,
        zeroes_read_rows: bool = False,
        rows: Sequence[Tensor] = (),
        target: tuple[Tensor, Callable[[], Exception]] | None = None,
    ) -> None:
        """Raise for the first failed check, with one host synchronisation when none failed.

        Args:
            finite: bool ``(B,)``, whether each example's explained output is finite.
            zeroes_read_rows: ``self_relevance="zero"``: refuse where the rows read are every
                token of the stream, which would leave an all-zero map.
            rows: the rows read ``(B, N)``: a non-finite value (a model whose own backward is
                not finite there) is refused, naming the examples.
            target: whether each example's target index is in range, and the error naming
                the first that is not (a per-example target on an accelerator).
        """
        failures = [_Failure("nonfinite", "", ~finite)]
        if target is not None:
            failures.append(_Failure("target", "", ~target[0]))
        failures += self._failures
        failures += [
            _Failure("gradient", "", ~torch.isfinite(row).all(1).to(finite.device)) for row in rows
        ]
        if zeroes_read_rows:
            for read in self.reads:
                if read.stream == read.read_stream:
                    every = (self.weights[read.read_stream] > 0).all(1)
                    failures.append(_Failure("zeroed", read.read_stream, every))
        device = finite.device
        if not bool(torch.stack([f.flags.to(device) for f in failures]).any()):
            return
        for failure in failures:
            if bool(failure.flags.any()):
                if failure.kind == "target" and target is not None:
                    raise target[1]()
                error = IndexError if failure.kind == "range" else ValueError
                raise error(self._message(failure))

    def _message(self, failure: _Failure) -> str:
        examples = failure.flags.nonzero().flatten().tolist()
        first = examples[0]
        listed = examples if len(examples) <= 8 else f"{examples[:8]} and {len(examples) - 8} more"
        where = self.describe(failure.stream)
        token_index = self._token_index.get(failure.stream)
        if failure.kind == "nonfinite":
            return (
                f"{self.name}: the explained output is NaN or infinite for examples {listed}, so "
                "their gradients mean nothing. Check those examples' inputs (a NaN, an "
                "overflow) or leave them out of the batch; the other examples are fine."
            )
        if failure.kind == "gradient":
            return (
                f"{self.name}: the gradient of the explained output is NaN or infinite for "
                f"examples {listed}, though the output is finite: the model's own backward is "
                "not finite there (a root or power of exactly zero, as on padding states). "
                "Leave those examples out, pad on the other side, or explain them with "
                "captum_chefer.AttnLRP(model)."
            )
        if failure.kind == "no_rows":
            return (
                f"{self.name}: the explained output of examples {listed} gets no gradient "
                f"through the last attention layer{where}, so there is no row to read. Check "
                "the target, or explain them with a gradient method such as "
                "captum.attr.IntegratedGradients."
            )
        if failure.kind == "pooling":
            rows = self._output_rows[failure.stream][first]
            return (
                f"{self.name}: the explained output combines the final states of "
                f"{_tokens(rows)}{where} (example {first}) with different weights (two heads, a "
                "flattening head, a learned pooling), which the rule does not define. Pass "
                "token_index= one of those tokens, or use captum_chefer.AttnLRP(model), which "
                "goes through the head."
            )
        size = self.layout.sizes[failure.stream]
        if failure.kind == "range":
            return (
                f"{self.name}: token_index={token_index!r} is outside the {size} tokens the "
                f"model attends over{where}; pass an index in [-{size}, {size})."
            )
        if failure.kind == "padding":
            token = int(self.weights[failure.stream][first].argmax())
            return (
                f"{self.name}: token_index={token_index!r} reads token {token}{where} in "
                f"example {first}, which the explained output does not depend on (padding, or "
                "outside every attention window); read a token it depends on, e.g. "
                "token_index='auto'."
            )
        return (
            f"{self.name}: self_relevance='zero' zeroes the tokens read, and in examples "
            f"{listed} they are every token, so their map would be all zeros; pass "
            "self_relevance='keep' or 'subtract', or explain a longer input."
        )


def _same_index(a: TokenIndex, b: TokenIndex) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    return a == b


def _is(token_index: TokenIndex, name: str) -> bool:
    return isinstance(token_index, str) and token_index == name


def _tokens(row: Tensor) -> str:
    found = row.nonzero().flatten().tolist()
    return f"tokens {found}" if len(found) <= 8 else f"{len(found)} tokens"
