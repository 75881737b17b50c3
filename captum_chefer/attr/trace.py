"""One forward with attention captured, one backward from the selected output.

The engine (:mod:`~captum_chefer.attr.engine`) runs the model through :func:`trace_attention`;
what each class does with each layer's ``(A, dA)`` is its reader's business. The output and
target handling here is shared with the LRP classes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import (
    CallRecord,
    Dependencies,
    Recorder,
    capture_attention,
    check_token_mixing,
    module_scope,
    warn_if_training,
)
from ..core.readers import Reader
from ._captum import TargetType, _run_forward, _select_targets
from .inputs import check_target, not_a_tensor

NOTHING_CAPTURED = (
    "No attention was captured while running the model. captum_chefer sees attention computed "
    "on this thread through torch.nn.functional.scaled_dot_product_attention or a softmax over "
    "the last dimension of a (B, H, Nq, Nk) tensor (Hugging Face at 'sdpa' or 'eager', timm, "
    "nn.MultiheadAttention, custom code), and probabilities passed to "
    "captum_chefer.mark_attention(). {hint}"
)

NOT_ON_PATH = (
    "The selected output does not depend on any captured attention call; check that "
    "forward_func runs the model, and that its output is not detached from it."
)


@dataclass
class Trace:
    """What one traced forward produced.

    Attributes:
        output: the model's output, detached.
        target: the target that was explained (the argmax when none was given).
        records: the attention calls the explained output depends on, in forward order.
        dependencies: which of those calls each call's inputs depend on.
    """

    output: Tensor
    target: TargetType
    records: list[CallRecord]
    dependencies: Dependencies
    output_rows: Tensor | None = None
    """After the backward: bool ``(B, Nq)``, the rows of the last call the output depends on."""

    @property
    def batch(self) -> int:
        """Examples in the explained output."""
        return self.output.shape[0] if self.output.dim() else 1


def trace_attention(
    forward_func: Callable[..., Any],
    model: nn.Module | None,
    inputs: tuple[Tensor, ...],
    target: TargetType,
    additional_forward_args: Any,
    reader: Reader | None,
    before_backward: Callable[[Trace], None] = lambda trace: None,
    block_bytes: int | None = None,
    scope_modules: bool = False,
) -> Trace:
    """Run ``forward_func`` with attention captured, then back-propagate the selected output.

    ``before_backward`` sees the :class:`Trace` first (the engine prepares the reader there).
    The backward computes only what the reader needs: gradients flow to a shared anchor
    leaf per device, never into parameters' ``.grad``, and stop at the first attention layer.
    Calls the selected output does not depend on are dropped (they add nothing); with
    ``scope_modules`` every call is tagged with the module that made it.
    """
    check_context(inputs, additional_forward_args)
    recorder = Recorder(reader, block_bytes)
    try:
        with torch.enable_grad():
            with ExitStack() as stack:
                if scope_modules:
                    stack.enter_context(module_scope(model, recorder))
                stack.enter_context(capture_attention(model, recorder))
                output = as_tensor(
                    _run_forward(forward_func, inputs, None, additional_forward_args)
                )
            warn_if_training(model, recorder, stacklevel=4)
            if not recorder.records:
                check_token_mixing(recorder, model)  # names softmaxes it could not read, if any
                raise RuntimeError(NOTHING_CAPTURED.format(hint=_hint(model)))
            target = default_target(output, target)
            selected = select_one_per_example(output, target)
            if not selected.requires_grad:
                raise RuntimeError(NOT_ON_PATH)
            dependencies = recorder.keep_on_path(selected)
            if not recorder.records:
                raise RuntimeError(NOT_ON_PATH)
            records = recorder.records
            trace = Trace(output.detach(), target, records, dependencies)
            before_backward(trace)
            check_token_mixing(recorder, model)
            anchors = list(recorder.anchors.values())
            torch.autograd.grad(selected.sum(), anchors, allow_unused=True)
            if all(makes_tokens for _, makes_tokens in recorder.mixing_on_path):
                trace.output_rows = recorder.output_rows  # else mixing after attention moves them
    finally:
        recorder.release()  # no cycle through the graph keeps it alive
    return trace


def check_context(inputs: tuple[Tensor, ...], additional_forward_args: Any) -> None:
    """Fail clearly where no gradient can be computed: ``torch.inference_mode``."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "attribute() was called inside torch.inference_mode(), where no gradient can be "
            "computed. Call it outside inference_mode (torch.no_grad() is fine: the "
            "attribution enables gradients for its own forward)."
        )
    extra = (
        additional_forward_args
        if isinstance(additional_forward_args, tuple)
        else (additional_forward_args,)
    )
    for tensor in (*inputs, *extra):
        if isinstance(tensor, Tensor) and tensor.is_inference():
            raise RuntimeError(
                "An input was created under torch.inference_mode(), so autograd cannot use it. "
                "Pass a copy made outside inference_mode: tensor.clone()."
            )


def select_one_per_example(output: Tensor, target: TargetType) -> Tensor:
    """Captum's target selection, checked to give one value per example.

    Example:
        >>> select_one_per_example(torch.arange(6.0).view(2, 3), 1)
        tensor([1., 4.])
    """
    check_target(output, target)
    selected = _select_targets(output, target)
    if selected.numel() != output.shape[0]:
        raise ValueError(
            f"target={target!r} selects a {tuple(selected.shape)} tensor from the output of "
            f"shape {tuple(output.shape)}, not one value per example. Pass a target that picks "
            "one value, e.g. a tuple target=(i, j) for output[:, i, j], or make forward_func "
            "return one score per class."
        )
    return selected


def as_tensor(output: Any) -> Tensor:
    """The output as a tensor: itself, or its ``.logits``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise not_a_tensor(output)


def default_target(output: Tensor, target: TargetType) -> TargetType:
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


def is_causal(record: CallRecord) -> Tensor | bool:
    """Whether the call is causal, read off its mask where it has one.

    Causality stays a tensor when it comes from a mask, so that no device sync is needed.
    """
    call = record.call
    if call is not None and call.mask is None:
        return call.is_causal
    attendable = record.attendable()
    assert attendable is not None
    per_query = attendable.any(1)
    n_query, n_key = record.shape[2:]
    square = torch.tensor(n_query == n_key, device=attendable.device)
    return square & ~per_query.triu(1).any()


def real_keys(record: CallRecord) -> Tensor:
    """Bool ``(B, Nk)``: False at keys no query of ``record`` attends (padding)."""
    batch, _, _, n_key = record.shape
    attendable = record.attendable()
    if attendable is None:
        assert record.call is not None
        return torch.ones(batch, n_key, dtype=torch.bool, device=record.call.query.device)
    while attendable.dim() < 4:  # a causal mask alone is (Nq, Nk)
        attendable = attendable.unsqueeze(0)
    return attendable.any(1).any(1).expand(batch, n_key)


def _hint(model: nn.Module | None) -> str:
    return (
        "If the model computes attention in another kernel (flash-attn, xformers, a compiled or "
        "scripted module), switch it to torch.nn.functional.scaled_dot_product_attention, or "
        "call captum_chefer.mark_attention() on the softmax output in its attention code. A "
        "model without attention (a CNN, a state-space model) has no attention to explain: use "
        "a gradient method, e.g. captum.attr.LayerIntegratedGradients on its embedding layer "
        "(or IntegratedGradients on the pixels), with use_cache=False where the model updates "
        "a cache in place (RWKV)."
    )
