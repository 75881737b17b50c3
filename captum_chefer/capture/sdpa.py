"""Route: every call of ``torch.nn.functional.scaled_dot_product_attention``.

Hugging Face models at ``sdpa``, timm with ``fused_attn``, ``nn.MultiheadAttention`` (which
calls it when no weights are requested) and custom code all reach attention through this one
function. While an attribution runs, the module attribute is replaced by a wrapper that hands
each call to the active recorder; the model's own fused kernel still computes the forward. The
``nn.MultiheadAttention`` C++ fast path, which skips the Python code, is switched off for the
same span. Both are restored in ``finally``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.attention import AttentionCall, attention_probs
from .recorder import active_recorder


def _captured_sdpa(
    original,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    recorder = active_recorder()
    if recorder is None or query.dim() != 4:
        return original(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    call = AttentionCall(
        query,
        key,
        value,
        attn_mask,
        bool(is_causal),
        scale if scale is not None else query.shape[-1] ** -0.5,
    )
    if dropout_p > 0.0:
        return _explicit_attention(recorder, call, dropout_p)
    kwargs = {"is_causal": bool(is_causal), "scale": scale}
    if key.shape[1] != query.shape[1]:
        kwargs["enable_gqa"] = True
    return recorder.attention(original, call, kwargs)


def _explicit_attention(recorder, call: AttentionCall, dropout_p: float) -> Tensor:
    """Attention dropout is random: materialise ``A`` so that its backward sees the same draw."""
    warnings.warn(
        "Attention dropout is active (the model is in training mode), so the relevance is "
        "random. Call model.eval() first for a deterministic explanation.",
        stacklevel=4,
    )
    probs = recorder.probabilities(attention_probs(call).to(call.query.dtype))
    heads = call.query.shape[1]
    value = call.value.repeat_interleave(heads // call.value.shape[1], dim=1)
    return torch.matmul(F.dropout(probs, p=dropout_p, training=True), value)


@contextmanager
def sdpa_route(model: nn.Module | None) -> Iterator[None]:
    """Intercept ``scaled_dot_product_attention`` on this thread for the duration."""
    original = F.scaled_dot_product_attention
    fastpath = torch.backends.mha.get_fastpath_enabled()
    F.scaled_dot_product_attention = functools.partial(_captured_sdpa, original)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.backends.mha.set_fastpath_enabled(fastpath)
