"""Route: ``nn.MultiheadAttention`` called with ``need_weights=True`` (its default).

With weights requested, ``nn.MultiheadAttention`` computes the softmax by hand, and the weights
it returns are averaged over heads, so their gradient is not the one the rule needs. For the
duration of the call each instance's ``forward`` is wrapped: it runs with
``need_weights=False``, which goes through SDPA and so through the SDPA route, and the weights
the caller asked for are recomputed from the same query and key. The instance attributes are
restored in ``finally``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..core.attention import attention_probs
from .recorder import active_recorder

_MISSING = object()


def _forward_with_weights(module: nn.MultiheadAttention, *args, **kwargs):
    recorder = active_recorder()
    names = (
        "query",
        "key",
        "value",
        "key_padding_mask",
        "need_weights",
        "attn_mask",
        "average_attn_weights",
        "is_causal",
    )
    bound = dict(zip(names, args, strict=False)) | kwargs
    need_weights = bound.pop("need_weights", True)
    average = bound.pop("average_attn_weights", True)
    output, _ = type(module).forward(module, need_weights=False, **bound)
    if not need_weights or recorder is None or not recorder.records:
        return output, None
    record = recorder.records[-1]
    assert record.call is not None
    weights = attention_probs(record.call).to(output.dtype)
    if average:
        weights = weights.mean(1)
    if bound["query"].dim() == 2:
        weights = weights.squeeze(0)
    return output, weights


@contextmanager
def multihead_route(model: nn.Module | None) -> Iterator[None]:
    """Wrap each ``nn.MultiheadAttention`` in ``model`` for the duration, then restore."""
    modules = [
        m
        for m in (model.modules() if model is not None else ())
        if isinstance(m, nn.MultiheadAttention)
    ]
    saved = [(module, module.__dict__.get("forward", _MISSING)) for module in modules]
    try:
        for module in modules:
            module.forward = functools.partial(_forward_with_weights, module)  # type: ignore[method-assign]
        yield
    finally:
        for module, forward in saved:
            if forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward  # type: ignore[method-assign]
