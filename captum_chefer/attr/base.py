"""The attribution flow every class of this package shares.

Format the inputs, run one forward with attention captured and one backward from the selected
output (:func:`~captum_chefer.attr.trace.trace_attention`), hand each layer's ``(A, dA)`` to a
:class:`~captum_chefer.core.readers.RowReader`, read one relevance row per example, zero the
padding, and map the row onto each input. The classes differ only in their reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from ..core import ReadSetup, RowReader, infer_patch_layout, token_start_rows, tokens_to_input
from ..core.tokens import SelfRelevance, TokenIndex
from ._captum import (
    GradientAttribution,
    TargetType,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from .trace import Trace, trace_attention

Output = Literal["input", "token"]


class AttentionAttribution(GradientAttribution):
    """Base class: a Captum attribution read off captured attention and its gradient.

    Subclasses build a reader in ``attribute`` and return :meth:`_attribute`'s result.

    Args:
        forward_func: the model, or any callable returning a tensor (or an object with
            ``.logits``).
        model: the module whose attention is explained, when ``forward_func`` is not one.
    """

    self_relevance_choices: ClassVar[tuple[str, ...]] = ("zero", "keep")
    """The ``self_relevance`` values this method's row supports."""

    def __init__(self, forward_func: Callable[..., Any], model: nn.Module | None = None) -> None:
        forward_func = uncompiled(forward_func)
        super().__init__(forward_func)
        self.model = module_or_none(uncompiled(model) if model is not None else forward_func)

    def _attribute(
        self,
        reader: RowReader,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        *,
        token_index: TokenIndex,
        output: Output,
        self_relevance: SelfRelevance,
        block_bytes: int | None,
        num_prefix_tokens: int | None,
        patch_grid: tuple[int, int] | None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Trace the model once, feed ``reader``, and map its row onto the inputs."""
        self._check_options(token_index, output, self_relevance)
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = _format_tensor_into_tuples(inputs)

        def prepare(trace: Trace) -> None:
            check_self_attention(trace, type(self).__name__)
            start = token_start_rows(token_index, trace.valid, trace.causal)
            check_something_left(start, trace.valid, self_relevance)
            prefix = _prefix_tokens(trace, inputs_tuple, num_prefix_tokens, patch_grid)
            reader.prepare(ReadSetup(start, trace.valid, len(trace.records), prefix))

        trace = trace_attention(
            self.forward_func,
            self.model,
            inputs_tuple,
            target,
            additional_forward_args,
            reader,
            prepare,
            block_bytes,
        )
        row = reader.read(self_relevance).masked_fill(~trace.valid, 0.0)
        if output == "token":
            return row
        mapped = tuple(
            tokens_to_input(row, tensor.shape, num_prefix_tokens, patch_grid).to(tensor.device)
            for tensor in inputs_tuple
        )
        return _format_output(is_inputs_tuple, mapped)

    def _check_options(
        self, token_index: TokenIndex, output: Output, self_relevance: SelfRelevance
    ) -> None:
        name = type(self).__name__
        check_output(output)
        if self_relevance not in self.self_relevance_choices:
            choices = ", ".join(repr(choice) for choice in self.self_relevance_choices)
            raise ValueError(
                f"self_relevance must be one of {choices} for {name}, not {self_relevance!r}"
            )
        if isinstance(token_index, str) and token_index == "mean" and self_relevance == "zero":
            raise ValueError(
                "self_relevance='zero' zeroes the read tokens, and with token_index='mean' every "
                "real token is read, so the map would be all zeros; pass self_relevance='keep'"
                + (" or 'subtract'." if "subtract" in self.self_relevance_choices else ".")
            )

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False


def check_something_left(start: Tensor, valid: Tensor, self_relevance: SelfRelevance) -> None:
    """Refuse ``self_relevance="zero"`` where it would zero every real token of an example."""
    if self_relevance == "zero" and bool(((start > 0) | ~valid).all(1).any()):
        raise ValueError(
            "self_relevance='zero' zeroes the read token, and in some examples it is the only "
            "real token, so their map would be all zeros; pass self_relevance='keep' or "
            "'subtract', or explain a longer input."
        )


def check_output(output: str) -> None:
    """``output`` must be ``"input"`` or ``"token"``."""
    if output not in ("input", "token"):
        raise ValueError(f"output must be 'input' or 'token', not {output!r}")


def module_or_none(forward_func: Callable[..., Any]) -> nn.Module | None:
    """The module to capture: ``forward_func`` itself, or the owner of a bound method."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def uncompiled(forward_func: Callable[..., Any]) -> Callable[..., Any]:
    """The original module or function of a ``torch.compile``d one; others unchanged.

    A compiled graph runs its attention in generated code the capture cannot see, so the
    explanation runs the original, eager module: the same function, the same weights.
    """
    original = getattr(forward_func, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return original
    function = getattr(forward_func, "_torchdynamo_orig_callable", None)
    return function if callable(function) else forward_func


def check_self_attention(trace: Trace, name: str) -> None:
    """Refuse, naming the cause, attention the self-attention rule does not define.

    The rule needs token-to-token self-attention over one sequence per explained example, in
    layers that form one chain: every call ``(B, H, N, N)`` with the output's batch ``B``, one
    ``N`` for all, and each layer computed from the one before.
    """
    shapes = sorted({record.shape for record in trace.records})
    batch = trace.output.shape[0] if trace.output.dim() else 1
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
    "CheferEncoderDecoder; otherwise explain the model with a gradient method, e.g. "
    "captum.attr.IntegratedGradients or captum.attr.LayerGradCam."
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


def _prefix_tokens(
    trace: Trace,
    inputs: tuple[Tensor, ...],
    num_prefix_tokens: int | None,
    patch_grid: tuple[int, int] | None,
) -> int:
    """Tokens before the patch grid: as given, else inferred from an image input, else 0."""
    if num_prefix_tokens is not None:
        return num_prefix_tokens
    n_tokens = trace.records[0].shape[-1]
    for tensor in inputs:
        if tensor.dim() == 4:
            height, width = tensor.shape[-2:]
            try:
                return infer_patch_layout(n_tokens, height, width, None, patch_grid)[0]
            except ValueError:
                return 0
    return 0
