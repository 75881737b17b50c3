"""The checks every attribution runs, in one place: options, the attention found, the streams.

When the rules rely on an assumption about the user's model, it is tested here at run time,
where it is cheap, and a failure names the cause and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

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
    """The calls must suit the rules: one chain of self-attention for a one-stream map; for
    several streams, one batch, and square self-attention within each stream."""
    if len({stream for step in steps for edge in step for stream in edge[1:]}) == 1:
        check_self_attention(trace, name)
        return
    shapes = sorted({record.shape for record in trace.records})
    causes = []
    if any(shape[0] != trace.batch for shape in shapes):
        causes.append(WINDOWED.format(batch=trace.batch))
    self_calls = [trace.records[index].shape for step in steps for index, q, k in step if q == k]
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


def check_self_attention(trace: Trace, name: str) -> None:
    """Refuse, naming the cause, attention the self-attention rule does not define.

    The rule needs token-to-token self-attention over one sequence per explained example, in
    layers that form one chain: every call ``(B, H, N, N)`` with the output's batch ``B``, one
    ``N`` for all, and each layer computed from the one before.
    """
    shapes = sorted({record.shape for record in trace.records})
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
    breaks = trace.dependencies.chain_breaks()
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


def check_read_rows(
    name: str,
    output_rows: Tensor | None,
    reads: Sequence[Any],
    weights: dict[str, Tensor],
    real: dict[str, Tensor],
) -> None:
    """Refuse a read of other rows than those the explained output is computed from.

    The rule reads the rows of ``R`` of the tokens whose final states make the output: the
    CLS token of a CLS-pooled classifier, the last token of a causal LM, every patch of a
    mean-pooled ViT. Which tokens those are is seen in the backward: the query rows of the
    last attention layer whose output gets a gradient. Where the rows read differ (a
    mean-pooled model read at its first token, an output selected at a padding position), the
    map would explain another output; the error names the ``token_index`` that reads the right
    rows, where one does. Checked for ``token_index="auto"``: an explicit one is the user's.
    """
    if output_rows is None or len(real) != 1:
        return
    for read in reads:
        auto = isinstance(read.token_index, str) and read.token_index == "auto"
        if not auto or read.read_stream != read.stream:
            continue  # an explicit token_index is the user's choice
        rows, mask = weights[read.read_stream] != 0, real[read.read_stream]
        if rows.shape != output_rows.shape:
            continue
        used = output_rows.to(rows.device)
        if bool(torch.equal(rows & mask, used & mask)) and not bool((used & ~mask).any()):
            continue
        raise ValueError(_wrong_rows(name, read.token_index, rows, used, mask))


def _tokens(row: Tensor) -> str:
    found = row.nonzero().flatten().tolist()
    return f"tokens {found}" if len(found) <= 8 else f"{len(found)} tokens"


def _wrong_rows(name: str, token_index: Any, rows: Tensor, used: Tensor, real: Tensor) -> str:
    example = int((rows != used).any(1).nonzero()[0])
    start = (
        f"{name}: the explained output is computed from the final states of "
        f"{_tokens(used[example])} (example {example}), but token_index={token_index!r} reads "
        f"the rows of {_tokens(rows[example])}; the map would explain another output."
    )
    counts = used.sum(1)
    if bool((used & ~real).any()):
        return start + (
            " The output is taken at a padding position: select it at the last real token "
            "(e.g. logits[torch.arange(B), mask.sum(1) - 1]), or pad on the left."
        )
    if bool((counts == 1).all()):
        index = used.int().argmax(1)
        fix = (
            str(int(index[0]))
            if bool((index == index[0]).all())
            else f"torch.tensor({index.tolist()})"
        )
        return start + f" Pass token_index={fix}."
    pooled = used & real
    first = pooled.int().argmax(1)
    contiguous = bool((pooled.sum(1) == real.sum(1) - first).all())
    if contiguous and bool((first == first[0]).all()):
        skip = int(first[0])
        option = "token_index='mean'" + (f", num_prefix_tokens={skip}" if skip else "")
        after = f" after the first {skip}" if skip else ""
        return start + (
            f" It uses every real token{after}: if the model mean-pools them (a mean-pooled "
            f"ViT or sentence encoder), pass {option} to read the mean of their rows; a head "
            "over all of them with weights of its own (a flatten) is not a pooling the rule "
            "defines: explain it with captum_chefer.AttnLRP(model), which goes through the head."
        )
    return start + (
        " The model combines several tokens' states (two heads, as a distilled DeiT's class "
        "and distillation tokens; or the CLS token and the mean of the patches), which the "
        "rule does not define from the rows alone: pass token_index= the one token to explain "
        "(e.g. token_index=0, the class token), or explain the whole output with "
        "captum_chefer.AttnLRP(model), which goes through the head."
    )
