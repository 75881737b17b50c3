"""Which streams each attention call connects: the mechanism behind the family tables.

A multi-stream model's attention calls are told apart by the module that made them (see
:func:`~captum_chefer.capture.modules.module_scope`): a :class:`StreamMap` is an ordered list of
``(pattern, pairs)`` rules. An empty pattern matches every call, so a one-stream map needs no
module names at all. The first rule whose regular expression is found in the module's
qualified name gives the ``(query, key)`` modalities of the call; a module that the model calls
several times in a row (LXMERT's cross-attention, once per direction) takes the pairs in turn.
Calls made back to back by one module form one *step*: the rules compute all its updates from
the same old relevance maps (ICCV 2021, LXMERT's two cross directions).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..capture import CallRecord
from ..core.readers import Edge, StreamLayout

Pair = tuple[str, str]


@dataclass(frozen=True)
class StreamMap:
    """Module-name rules mapping each attention call to its ``(query, key)`` modalities.

    Args:
        rules: ``(pattern, pairs)`` in priority order. ``pattern`` is searched for in the
            calling module's qualified name; ``pairs`` lists the ``(query, key)`` modalities of
            its first, second, … call in a row.
        pooled_by: a stream whose prediction is pooled by the queries of another stream (an
            attention probe, SigLIP's vision head) is read from that stream when it is
            present: ``{"image": "probe"}``.

    Example:
        >>> streams = StreamMap(((r"decoder\\..*encoder_attn", (("decoder", "encoder"),)),
        ...                      (r"decoder\\.", (("decoder", "decoder"),)),
        ...                      (r"encoder\\.", (("encoder", "encoder"),))))
        >>> streams.pair("model.decoder.layers.0.encoder_attn", 0)
        ('decoder', 'encoder')
    """

    rules: tuple[tuple[str, tuple[Pair, ...]], ...]
    pooled_by: Mapping[str, str] = field(default_factory=dict)

    @property
    def needs_module_names(self) -> bool:
        """Whether a rule tells calls apart by their module (else no module scope is needed)."""
        return any(pattern for pattern, _ in self.rules)

    def pair(self, module: str | None, repeat: int) -> Pair:
        """The modalities of the ``repeat``-th call in a row made by ``module``."""
        for pattern, pairs in self.rules:
            if not pattern or (module is not None and re.search(pattern, module)):
                return pairs[repeat % len(pairs)]
        patterns = [pattern for pattern, _ in self.rules]
        raise ValueError(
            f"The attention call made by module {module!r} matches none of the stream rules "
            f"{patterns}; pass streams=StreamMap(...) with a rule for it."
        )

    def steps(self, records: Sequence[CallRecord]) -> list[list[Edge]]:
        """Group ``records`` (forward order) into steps of ``(index, query, key)``."""
        steps: list[list[Edge]] = []
        previous: str | None = None
        repeat = 0
        for record in records:
            repeat = repeat + 1 if record.module == previous and steps else 0
            query, key = self.pair(record.module, repeat)
            if repeat:
                steps[-1].append((record.index, query, key))
            else:
                steps.append([(record.index, query, key)])
            previous = record.module
        return steps

    def sizes(
        self, records: Sequence[CallRecord], steps: Sequence[Sequence[Edge]] | None = None
    ) -> dict[str, int]:
        """Tokens per stream, read off the calls' shapes ``(B, H, Nq, Nk)``."""
        sizes: dict[str, int] = {}
        for step in self.steps(records) if steps is None else steps:
            for index, query, key in step:
                for name, size in (
                    (query, records[index].shape[2]),
                    (key, records[index].shape[3]),
                ):
                    if sizes.setdefault(name, size) != size:
                        raise ValueError(
                            f"Modality {name!r} has {sizes[name]} tokens in one attention call "
                            f"and {size} in {records[index].module!r}; check the stream rules."
                        )
        return sizes

    def layout(self, records: Sequence[CallRecord], read: str) -> StreamLayout:
        """The :class:`~captum_chefer.core.readers.StreamLayout` of ``records``."""
        steps = tuple(tuple(step) for step in self.steps(records))
        return StreamLayout(self.sizes(records, steps), steps, read)
