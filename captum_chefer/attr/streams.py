"""Which modalities each attention call connects: a short declarative map per model family.

A multi-modal model's attention calls are told apart by the module that made them (see
:func:`~captum_chefer.capture.modules.module_scope`): a :class:`StreamMap` is an ordered list of
``(pattern, pairs)`` rules. The first rule whose regular expression is found in the module's
qualified name gives the ``(query, key)`` modalities of the call; a module that the model calls
several times in a row (LXMERT's cross-attention, once per direction) takes the pairs in turn.
Calls made back to back by one module form one *step*: the rules compute all its updates from
the same old relevance maps (ICCV 2021, LXMERT's two cross directions).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..capture import CallRecord

Pair = tuple[str, str]


@dataclass(frozen=True)
class StreamMap:
    """Module-name rules mapping each attention call to its ``(query, key)`` modalities.

    Args:
        rules: ``(pattern, pairs)`` in priority order. ``pattern`` is searched for in the
            calling module's qualified name; ``pairs`` lists the ``(query, key)`` modalities of
            its first, second, … call in a row.

    Example:
        >>> streams = StreamMap(((r"decoder\\..*encoder_attn", (("decoder", "encoder"),)),
        ...                      (r"decoder\\.", (("decoder", "decoder"),)),
        ...                      (r"encoder\\.", (("encoder", "encoder"),))))
        >>> streams.pair("model.decoder.layers.0.encoder_attn", 0)
        ('decoder', 'encoder')
    """

    rules: tuple[tuple[str, tuple[Pair, ...]], ...]

    def pair(self, module: str | None, repeat: int) -> Pair:
        """The modalities of the ``repeat``-th call in a row made by ``module``."""
        for pattern, pairs in self.rules:
            if module is not None and re.search(pattern, module):
                return pairs[repeat % len(pairs)]
        patterns = [pattern for pattern, _ in self.rules]
        raise ValueError(
            f"The attention call made by module {module!r} matches none of the stream rules "
            f"{patterns}; pass streams=StreamMap(...) with a rule for it."
        )

    def steps(self, records: Sequence[CallRecord]) -> list[list[tuple[int, str, str]]]:
        """Group ``records`` (forward order) into steps of ``(index, query, key)``."""
        steps: list[list[tuple[int, str, str]]] = []
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

    def sizes(self, records: Sequence[CallRecord]) -> dict[str, int]:
        """Tokens per modality, read off the calls' shapes ``(B, H, Nq, Nk)``."""
        sizes: dict[str, int] = {}
        for step in self.steps(records):
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


DUAL_ENCODER = StreamMap(
    (
        (r"(^|\.)vision_model\.head\b", (("probe", "image"),)),
        (r"(^|\.)vision_model\.", (("image", "image"),)),
        (r"(^|\.)text_model\.", (("text", "text"),)),
    )
)
"""CLIP, SigLIP and their kin: two towers; SigLIP's attention-pooling head is a query ``probe``."""

ENCODER_DECODER = StreamMap(
    (
        (
            r"(^|\.)decoder\..*"
            r"(encoder_attn|EncDecAttention|crossattention|cross_attn|multihead_attn)",
            (("decoder", "encoder"),),
        ),
        (r"(^|\.)decoder\.", (("decoder", "decoder"),)),
        (r"(^|\.)encoder\.", (("encoder", "encoder"),)),
    )
)
"""BART, T5, Marian, Pegasus, DETR, ``nn.Transformer``: encoder self-attention, decoder self- and
cross-attention."""

CO_ATTENTION = StreamMap(
    (
        (r"x_layers\.\d+\.visual_attention\b", (("text", "image"), ("image", "text"))),
        (r"(x_layers\.\d+\.lang_self_att|(^|\.)encoder\.layer\.\d+)\.", (("text", "text"),)),
        (r"(x_layers\.\d+\.visn_self_att|r_layers\.\d+)\.", (("image", "image"),)),
    )
)
"""LXMERT: language and vision self-attention, then cross layers (both directions, one step)."""

SINGLE_STREAM = StreamMap(((r"", (("joint", "joint"),)),))
"""ViLT, VisualBERT: self-attention over the joint text-and-image sequence."""
