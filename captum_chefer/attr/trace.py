"""One forward with attention captured, one backward from the selected output.

Every attribution class in this package runs the model through :func:`trace_attention`; the
classes differ only in the consumer that receives each layer's ``(A, dA)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import CallRecord, Consumer, Recorder, capture_attention
from ._captum import TargetType, _run_forward, _select_targets

NOTHING_CAPTURED = (
    "No attention was captured while running the model. captum_chefer sees attention that "
    "goes through torch.nn.functional.scaled_dot_product_attention (Hugging Face at 'sdpa' or "
    "'eager', timm, nn.MultiheadAttention, nn.TransformerEncoder, custom code), and "
    "probabilities passed to captum_chefer.mark_attention(). {hint}"
)


@dataclass
class Trace:
    """What one traced forward produced.

    Attributes:
        output: the model's output, detached.
        target: the target that was explained (the argmax when none was given).
        records: the attention calls, in forward order.
        valid: bool ``(B, N)``, False at padding keys of the first attention layer.
        causal: whether the first attention layer is causal.
    """

    output: Tensor
    target: TargetType
    records: list[CallRecord]
    valid: Tensor
    causal: Tensor | bool


def trace_attention(
    forward_func: Callable[..., Any],
    model: nn.Module | None,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    consumer: Consumer | None,
    before_backward: Callable[[Trace], None] = lambda trace: None,
    block_bytes: int | None = None,
) -> Trace:
    """Run ``forward_func`` with attention captured, then back-propagate the selected output.

    The backward computes only what the consumer needs: gradients flow to a shared anchor
    leaf, never into parameters' ``.grad``, and stop at the first attention layer.
    """
    if model is not None and model.training:
        warnings.warn(
            "The model is in training mode: dropout makes the relevance random. Call "
            "model.eval() first; captum_chefer does not change the mode for you.",
            stacklevel=3,
        )
    recorder = Recorder(consumer, block_bytes)
    with torch.enable_grad(), capture_attention(model, recorder):
        output = _as_tensor(_run_forward(forward_func, inputs, None, additional_forward_args))
        if not recorder.records:
            raise RuntimeError(NOTHING_CAPTURED.format(hint=_hint(model)))
        target = _default_target(output, target)
        selected = _select_targets(output, target)
        trace = Trace(output.detach(), target, recorder.records, *_validity(recorder.records[0]))
        before_backward(trace)
        if not selected.requires_grad:
            raise RuntimeError(
                "The selected output does not depend on any captured attention; check that "
                "forward_func runs the model given as model=."
            )
        torch.autograd.grad(selected.sum(), recorder.anchor, allow_unused=True)
    return trace


def _as_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"forward_func returned {type(output).__name__}; it must return a tensor (or an object "
        "with .logits). Wrap the model, e.g. lambda ids, mask: model(ids, mask).pooler_output."
    )


def _default_target(output: Tensor, target: TargetType) -> TargetType:
    """Captum's conventions, plus: no target on a multi-class output explains the argmax."""
    if target is not None:
        return target
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        return None
    if output.dim() == 2:
        return output.argmax(1)
    raise ValueError(
        f"target=None is ambiguous for an output of shape {tuple(output.shape)}; pass target= "
        "(an int, a tuple, or one per example), or return one value per example."
    )


def _validity(record: CallRecord) -> tuple[Tensor, Tensor | bool]:
    """Padding keys and causality, read off the first attention layer's mask.

    Causality stays a tensor when it comes from a mask, so that no device sync is needed.
    """
    call = record.call
    if call is not None and call.mask is None:
        return key_validity(record), call.is_causal
    allowed = record.allowed()
    assert allowed is not None
    per_query = allowed.any(1)
    n_query, n_key = record.shape[2:]
    causal = torch.tensor(n_query == n_key, device=allowed.device) & ~per_query.triu(1).any()
    return key_validity(record), causal


def key_validity(record: CallRecord) -> Tensor:
    """Bool ``(B, Nk)``: False at keys no query of ``record`` attends (padding)."""
    batch, _, _, n_key = record.shape
    allowed = record.allowed()
    if allowed is None:
        assert record.call is not None
        return torch.ones(batch, n_key, dtype=torch.bool, device=record.call.query.device)
    while allowed.dim() < 4:  # a causal mask alone is (Nq, Nk)
        allowed = allowed.unsqueeze(0)
    return allowed.any(1).any(1).expand(batch, n_key)


def _hint(model: nn.Module | None) -> str:
    if model is None:
        return "forward_func is not an nn.Module: pass model= so that its attention can be found."
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if name is not None:
        return f"The Hugging Face model uses attn_implementation={name!r}; load it with 'sdpa'."
    return (
        "If the model uses flash-attn or another kernel, switch it to "
        "torch.nn.functional.scaled_dot_product_attention, or call mark_attention() on the "
        "softmax output in its attention code."
    )
