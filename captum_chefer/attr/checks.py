"""The checks every attribution runs, in one place: options, the attention found, the streams.

When the rules rely on an assumption about the user's model, it is tested here at run time,
where it is cheap, and a failure names the cause and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..core.readers import Edge, Reader, StreamLayout
from ..core.tokens import SelfRelevance
from ..families import explainer_for
from .trace import Trace


def check_output(output: str) -> None:
    """``output`` must be ``"input"`` or ``"token"``."""
    if output not in ("input", "token"):
        raise ValueError(f"output must be 'input' or 'token', not {output!r}")


def check_token_index(token_index: object) -> None:
    """``token_index`` must be ``"auto"``, ``"mean"``, an int or an integer tensor.

    Example:
        >>> check_token_index("auto")
        >>> check_token_index(2.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: token_index=2.5 is not understood; ...
    """
    if isinstance(token_index, str) and token_index in ("auto", "mean"):
        return
    if isinstance(token_index, int) and not isinstance(token_index, bool):
        return
    if isinstance(token_index, Tensor) and not token_index.is_floating_point():
        return
    raise ValueError(
        f"token_index={token_index!r} is not understood; use 'auto', 'mean', an int, or a "
        "LongTensor with one index per example."
    )


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


def check_attention(
    trace: Trace, steps: Sequence[Sequence[Edge]], name: str, model: nn.Module | None = None
) -> None:
    """The calls must suit the rules. Where every call is self-attention within a stream (one
    sequence, towers, a dual encoder's two towers), each stream's calls must form one chain of
    ``(B, H, N, N)`` calls; otherwise one batch, and square self-attention within each stream.
    A refusal names the fix that applies to ``model``."""
    edges = [edge for step in steps for edge in step]
    if all(query == key for _, query, key in edges):
        for stream in dict.fromkeys(query for _, query, _ in edges):
            calls = [index for index, query, _ in edges if query == stream]
            check_self_attention(trace, name, calls, model)
        return
    shapes = [trace.records[index].shape for index, _, _ in edges]
    self_shapes = [trace.records[index].shape for index, q, k in edges if q == k]
    cause = _shape_cause(shapes, self_shapes, trace.batch, lengths=False)
    if cause:
        raise ValueError(
            f"{name}: the rules do not define this attention: {cause}. {fix_for(model)}"
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


def check_self_attention(
    trace: Trace, name: str, calls: Sequence[int] | None = None, model: nn.Module | None = None
) -> None:
    """Refuse, naming the cause and the fix, attention the self-attention rule does not define.

    The rule needs token-to-token self-attention over one sequence per explained example, in
    layers that form one chain: every call ``(B, H, N, N)`` with the output's batch ``B``, one
    ``N`` for all, and each layer computed from the one before. ``calls`` (all by default) are
    the calls of one stream or tower.
    """
    calls = list(range(len(trace.records))) if calls is None else list(calls)
    shapes = [trace.records[index].shape for index in calls]
    cause = _shape_cause(shapes, shapes, trace.batch, lengths=True)
    if cause:
        raise ValueError(
            f"{name}: the self-attention rule does not define this attention: {cause}. "
            f"{fix_for(model)}"
        )
    below = trace.dependencies.below
    breaks = [(a, b) for a, b in zip(calls, calls[1:]) if a not in below[b]]
    if breaks:
        after, layer = breaks[0]
        raise ValueError(
            f"{name}: attention layer {layer} does not depend on layer {after}, so the layers "
            "do not form the one chain the rule assumes (two maps side by side, as "
            f"DiffLlama's; an encoder and a decoder). {fix_for(model)}"
        )


def _shape_cause(
    shapes: Sequence[tuple[int, ...]],
    self_shapes: Sequence[tuple[int, ...]],
    batch: int,
    lengths: bool,
) -> str:
    """Why the calls' shapes ``(B, H, Nq, Nk)`` suit no rule (every reason found), or ``""``."""
    causes = []
    rows = sorted({shape[0] for shape in shapes} - {batch})
    if rows:
        causes.append(
            f"attention runs on {rows[0]} rows for {batch} examples (windowed attention, as "
            "Swin's, or heads folded into the batch), so its rows match no example"
        )
    square = sorted({(s[2], s[3]) for s in self_shapes if s[2] != s[3]})
    if square:
        causes.append(
            f"a call has {square[0][0]} queries over {square[0][1]} keys (class attention as "
            "CaiT's, a pooling probe as SigLIP's, cross-attention)"
        )
    sizes = sorted({shape[3] for shape in shapes})
    if lengths and len(sizes) > 1:
        causes.append(
            f"calls run over {sizes} tokens (channel attention as XCiT's, tokens merged between "
            "layers)"
        )
    return "; ".join(causes)


ATTNLRP_FIX = (
    "Explain it with captum_chefer.AttnLRP(model), which goes through every operation, or a "
    "gradient method such as captum.attr.IntegratedGradients."
)


def fix_for(model: nn.Module | None) -> str:
    """The fix a shape or chain refusal names: the class of the model's family, else
    ``CheferEncoderDecoder`` for an encoder-decoder, else AttnLRP.

    Example:
        >>> fix_for(None).startswith("Explain it with captum_chefer.AttnLRP")
        True
    """
    explainer = explainer_for(model)
    if explainer is not None:
        return f"Use captum_chefer.{explainer}, made for this family."
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return (
            "Use captum_chefer.CheferEncoderDecoder for its two streams; a decoder that attends "
            "over the encoder and itself in one call (T5Gemma 2) needs captum_chefer.AttnLRP."
        )
    return ATTNLRP_FIX
