"""The checks every attribution runs, in one place: options, the attention found, the streams.

When the rules rely on an assumption about the user's model, it is tested here at run time,
where it is cheap, and a failure names the cause and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.readers import Edge, Reader, StreamLayout
from ..core.tokens import SelfRelevance
from .trace import Trace


def check_output(output: str) -> None:
    """``output`` must be ``"input"`` or ``"token"``."""
    if output not in ("input", "token"):
        raise ValueError(f"output must be 'input' or 'token', not {output!r}")


def check_self_relevance(
    reader: Reader, self_relevance: SelfRelevance, reads_all_tokens: bool, name: str
) -> None:
    """The ``self_relevance`` values the reader's row supports, and no all-zero ``"mean"`` map.

    ``"subtract"`` needs a row of ``R = I + …`` (the reader's ``identity_row``).
    """
    choices = ("subtract", "zero", "keep") if reader.identity_row else ("zero", "keep")
    if self_relevance not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(
            f"self_relevance must be one of {listed} for {name}, not {self_relevance!r}"
        )
    if reads_all_tokens and self_relevance == "zero":
        raise ValueError(
            "self_relevance='zero' zeroes the read tokens, and with token_index='mean' every "
            "real token is read, so the map would be all zeros; pass self_relevance='keep'"
            + (" or 'subtract'." if reader.identity_row else ".")
        )


def check_attention(trace: Trace, steps: Sequence[Sequence[Edge]], name: str) -> None:
    """The calls must suit the rules. Where every call is self-attention within a stream (one
    sequence, towers, a dual encoder's two towers), each stream's calls must form one chain of
    ``(B, H, N, N)`` calls; otherwise one batch, and square self-attention within each stream."""
    edges = [edge for step in steps for edge in step]
    if all(query == key for _, query, key in edges):
        for stream in dict.fromkeys(query for _, query, _ in edges):
            calls = [index for index, query, _ in edges if query == stream]
            check_self_attention(trace, name, calls)
        return
    shapes = sorted({record.shape for record in trace.records})
    causes = []
    if any(shape[0] != trace.batch for shape in shapes):
        causes.append(WINDOWED.format(batch=trace.batch))
    self_calls = [trace.records[index].shape for index, q, k in edges if q == k]
    if any(shape[2] != shape[3] for shape in self_calls):
        causes.append(NOT_SQUARE)
    if causes:
        raise ValueError(
            f"{name}: the model's attention calls have shapes {shapes} (B, H, Nq, Nk), which the "
            f"rules do not define: {'; '.join(causes)}. {FIXES}"
        )


def check_streams(trace: Trace, layout: StreamLayout, needed: Sequence[str], name: str) -> None:
    """Every stream read must have attention calls."""
    missing = sorted(set(needed) - set(layout.sizes))
    if missing:
        found = {record.module for record in trace.records}
        raise ValueError(
            f"{name} found no attention call of the streams {missing} (the calls came from "
            f"the modules {sorted(str(m) for m in found)}); pass streams=StreamMap(...) with "
            "rules naming them, or use the class for this kind of model."
        )


def check_self_attention(trace: Trace, name: str, calls: Sequence[int] | None = None) -> None:
    """Refuse, naming the cause, attention the self-attention rule does not define.

    The rule needs token-to-token self-attention over one sequence per explained example, in
    layers that form one chain: every call ``(B, H, N, N)`` with the output's batch ``B``, one
    ``N`` for all, and each layer computed from the one before. ``calls`` (all by default) are
    the calls of one stream or tower.
    """
    calls = list(range(len(trace.records))) if calls is None else list(calls)
    shapes = sorted({trace.records[index].shape for index in calls})
    batch = trace.batch
    causes = [
        cause
        for cause, found in (
            (WINDOWED.format(batch=batch), any(shape[0] != batch for shape in shapes)),
            (NOT_SQUARE, any(shape[2] != shape[3] for shape in shapes)),
            (MANY_LENGTHS, len({shape[3] for shape in shapes}) > 1),
        )
        if found
    ]
    if causes:
        raise ValueError(
            f"{name}: the model's attention calls have shapes {shapes} (B, H, Nq, Nk), which the "
            f"self-attention rule does not define: {'; '.join(causes)}. {FIXES}"
        )
    below = trace.dependencies.below
    breaks = [(a, b) for a, b in zip(calls, calls[1:]) if a not in below[b]]
    if breaks:
        raise ValueError(NOT_A_CHAIN.format(name=name, after=breaks[0][0], layer=breaks[0][1]))


WINDOWED = (
    "the explained output has {batch} examples but attention runs on other batch sizes, so "
    "its rows cannot be matched to examples (windowed attention: Swin folds its windows into "
    "the batch; or heads folded into the batch, (B*H, N, D) calls)"
)
NOT_SQUARE = (
    "some calls have other queries than keys (class attention: CaiT; attention pooling with a "
    "learned probe: SigLIP's vision head; cross-attention)"
)
MANY_LENGTHS = (
    "calls attend over different numbers of tokens (channel attention: XCiT; tokens pooled or "
    "merged between layers: Funnel, pyramid ViTs)"
)
FIXES = (
    "For a CLIP or SigLIP model use CheferDualEncoder, for an encoder-decoder "
    "CheferEncoderDecoder (a decoder that attends over the encoder and itself in one call, as "
    "T5Gemma 2's merged attention, is not a two-stream model: use AttnLRP); otherwise explain "
    "the model with captum_chefer.AttnLRP(model), which goes through every operation, or a "
    "gradient method, e.g. captum.attr.IntegratedGradients or captum.attr.LayerGradCam."
)
NOT_A_CHAIN = (
    "{name}: attention layer {layer} does not depend on layer {after}, so the captured layers "
    "do not form the one chain the self-attention rule assumes. A layer may compute two "
    "attention maps side by side (differential attention: DiffLlama), which the rule does not "
    "define: explain it with a gradient method, e.g. captum.attr.IntegratedGradients. An "
    "encoder-decoder has two streams: use CheferEncoderDecoder (two towers: CheferDualEncoder "
    "or CheferMultiModal). A "
    "siamese forward such as cos(model(a), model(b)) runs the model twice: explain one branch "
    "at a time with the other detached, e.g. CheferRelevance(lambda a: cos(model(a), "
    "model(b).detach()), model).attribute(a)."
)
