"""Route: custom attention that computes its softmax by hand.

A model opts in with one call on its post-softmax probabilities, before dropout::

    attn = torch.softmax(scores, dim=-1)
    attn = captum_chefer.mark_attention(attn)     # (B, H, Nq, Nk)
    out = attn @ v

Outside an attribution ``mark_attention`` returns its argument unchanged and costs nothing.
During one, the probabilities pass through an identity whose backward hands the
``(attention, gradient)`` pair of that layer to the relevance rule, in the spirit of PyHealth's
``CheferInterpretable`` interface but without storing maps or registering hooks on the model.
"""

from __future__ import annotations

from torch import Tensor

from .recorder import active_recorder


def mark_attention(probs: Tensor) -> Tensor:
    """Hand a layer's attention probabilities ``(B, H, Nq, Nk)`` to an active attribution.

    Args:
        probs: post-softmax attention, rows summing to 1 over the last dim.

    Returns:
        ``probs`` itself when no attribution runs; otherwise an identity view of it.

    Example:
        >>> import torch
        >>> p = torch.softmax(torch.randn(1, 2, 3, 3), -1)
        >>> mark_attention(p) is p
        True
    """
    recorder = active_recorder()
    if recorder is None:
        return probs
    if probs.dim() != 4:
        raise ValueError(
            "mark_attention expects probabilities shaped (B, H, Nq, Nk), got "
            f"{tuple(probs.shape)}; "
            "reshape the heads into their own dimension before calling it."
        )
    return recorder.probabilities(probs)
