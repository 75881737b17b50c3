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
    backward,
    capture_attention,
    check_token_mixing,
    module_scope,
    warn_if_training,
)
from ..core.readers import Reader
from ._captum import TargetType, _run_forward, _select_targets
from .inputs import check_target, not_a_tensor, target_range_error

NOTHING_CAPTURED = (
    "No attention was captured while running the model: captum_chefer sees "
    "scaled_dot_product_attention and softmaxes over (B, H, Nq, Nk) tensors on this thread. "
    "{hint}"
)

NOT_ON_PATH = (
    "The selected output does not depend on any captured attention call; check that "
    "forward_func runs the model, and that its output is not detached from it."
)


REENTRANT = (
    "Reentrant activation checkpointing (use_reentrant=True) ran the attention of {modules} "
    "without gradients, and torch.autograd.grad cannot go back through it. Switch to "
    "non-reentrant checkpointing, which gives the same map as none: "
    "model.activation_checkpointing_enable(activation_checkpointing_kwargs={{'use_reentrant': "
    "False}}) for Hugging Face (gradient_checkpointing_enable in older releases), "
    "use_reentrant=False in torch.utils.checkpoint."
)


@dataclass
class Trace:
    """What one traced forward produced.

    Attributes:
        output: the model's output, detached.
        target: the target that was explained (the argmax when none was given).
        records: the attention calls the explained output depends on, in forward order.
        dependencies: which of those calls each call's inputs depend on.
        finite: bool ``(B,)``, whether each example's explained output is finite.
        target_valid: bool ``(B,)`` for a per-example target tensor on an accelerator: whether
            each index is in range (read with the other checks); None where it was checked.
        target_error: the error naming the first index out of range.
    """

    output: Tensor
    target: TargetType
    records: list[CallRecord]
    dependencies: Dependencies
    finite: Tensor
    target_valid: Tensor | None = None
    target_error: Callable[[], Exception] | None = None

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
    before_backward: Callable[[Trace, Recorder], None] = lambda trace, recorder: None,
    block_bytes: int | None = None,
    scope_modules: bool = False,
) -> Trace:
    """Run ``forward_func`` with attention captured, then back-propagate the selected output.

    ``before_backward`` sees the :class:`Trace` and the recorder first (the engine plans what
    to read there, and hooks into the backward). The backward computes only what the reader
    needs: gradients flow to a shared anchor leaf per device, never into parameters' ``.grad``,
    and stop at the first attention layer. It runs with the capture still active, so a block
    that activation checkpointing recomputes goes through the same route. Calls the selected
    output does not depend on are dropped (they add nothing); with ``scope_modules`` every call
    is tagged with the module that made it. Only calls made inside ``model`` are captured.
    """
    check_context(inputs, additional_forward_args)
    recorder = Recorder(reader, block_bytes, model)
    try:
        with torch.enable_grad(), ExitStack() as stack:
            if scope_modules:
                stack.enter_context(module_scope(model, recorder))
            stack.enter_context(capture_attention(model, recorder))
            recorder.track_inputs(inputs)
            output = as_tensor(_run_forward(forward_func, inputs, None, additional_forward_args))
            warn_if_training(model, recorder, stacklevel=4)
            if recorder.reentrant:
                modules = ", ".join(dict.fromkeys(recorder.reentrant[:3]))
                raise RuntimeError(REENTRANT.format(modules=modules))
            if not recorder.records:
                check_token_mixing(recorder, model)  # names softmaxes it could not read, if any
                raise RuntimeError(NOTHING_CAPTURED.format(hint=_hint(model)))
            user_target = target
            target_valid = check_target(output, target)
            target = default_target(output, safe_target(output, target, target_valid))
            selected = select_one_per_example(output, target)
            if not selected.requires_grad:
                raise RuntimeError(NOT_ON_PATH)
            dependencies = recorder.keep_on_path(selected)
            if not recorder.records:
                raise RuntimeError(NOT_ON_PATH)
            finite = torch.isfinite(selected.detach()).reshape(-1)
            recorder.device = selected.device
            trace = Trace(output.detach(), target, recorder.records, dependencies, finite)
            if target_valid is not None:  # an index out of range: refused with the checks
                trace.target_valid, given = target_valid, user_target
                trace.target_error = lambda: target_range_error(output, given)
            before_backward(trace, recorder)
            check_token_mixing(recorder, model)
            recorder.read_flags()
            backward(recorder, selected.sum(), list(recorder.anchors.values()))
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


def safe_target(output: Tensor, target: TargetType, valid: Tensor | None) -> TargetType:
    """A per-example target tensor whose range is checked later (on an accelerator, with the
    call's other checks): indexes kept inside the output while the forward selects, so that a
    bad one is refused by name instead of failing the device; other targets as they are."""
    if valid is None or not isinstance(target, Tensor):
        return target
    return torch.where(valid, target, 0)


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


def _hint(model: nn.Module | None) -> str:
    return (
        "For attention in another kernel (flash-attn, xformers), switch the model to SDPA or "
        "pass its probabilities to captum_chefer.mark_attention(); for a model without "
        "attention use a gradient method, e.g. captum.attr.LayerIntegratedGradients on its "
        "embedding layer."
    )
