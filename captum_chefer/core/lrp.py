"""LRP rules for transformers as autograd functions; imports torch only.

Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers"
(ICML 2024, arXiv 2402.05602), and the CP-LRP variant of Ali et al., "XAI for Transformers:
Better Explanations through Conservative Propagation" (ICML 2022, arXiv 2202.07304).

Relevance is read as gradient × input: the relevance of a tensor ``t`` is ``t ⊙ g_t``. Each rule
below leaves the forward value exactly as the original operation computes it and replaces only
its backward, so that ``x ⊙ g_x`` at the operation's input is the relevance the rule assigns:

- **epsilon rule** (linear layers, AttnLRP Sec. 2, LRP-ε): ``R_i = Σ_j x_i W_ji R_j / (z_j + ε
  sign z_j)``, so the gradient at the output is scaled by ``z / (z + ε sign z)``;
- **identity rule** (element-wise activations and the normalisation of LayerNorm / RMSNorm,
  AttnLRP eq. 9 and Sec. 3.3): ``R_in = R_out``, i.e. ``g_x = g_y ⊙ y / x``; for LayerNorm the
  standard deviation is held constant, so the mean-centring stays an exact linear map;
- **uniform rule** (the two attention matmuls and gated products, AttnLRP eq. 7): a product of
  two input-dependent factors gives each half the relevance, i.e. each factor's gradient is
  halved;
- **softmax rule** (AttnLRP Prop. 3.1): ``R_in_i = x_i (R_out_i − s_i Σ_j R_out_j)``, which is
  plain gradient × input at the softmax's input; CP-LRP instead holds the attention
  probabilities constant, so no relevance reaches queries and keys.

On a fused kernel the attention rules are its own gradient, rescaled
(:func:`fused_attention_rule`); :func:`attention_rule` writes them out explicitly. Every rule's
backward runs with torch-function modes off, and saves with ``save_for_backward`` what it
needs, so activation checkpointing drops and recomputes it as it does the model's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function


class _IdentityRule(Function):
    """Forward: the given output ``y``; backward: ``g ⊙ y / x`` (0 where ``x == 0``, or where
    the ratio overflows).

    ``y`` and ``x`` are saved, not their ratio: ``x`` is saved anyway (a linear layer's output,
    which the epsilon rule keeps), so only ``y`` is new, and the ratio is formed in the
    backward, one activation at a time, in three passes (divide, zero the non-finite, scale).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(x, y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x, y = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            ratio = torch.div(y, x).nan_to_num_(0.0, 0.0, 0.0)  # x == 0: 0/0 or ±inf, read as 0
            return ratio.mul_(grad).to(x.dtype), None


def identity_rule(x: Tensor, y: Tensor) -> Tensor:
    """The identity rule (AttnLRP eq. 9) for an element-wise ``y = f(x)``: ``R_x = R_y``.

    Args:
        x: the input, any shape.
        y: ``f(x)``, same shape; its value is returned unchanged.

    Returns:
        ``y``, whose gradient reaches ``x`` as ``g ⊙ y / x``.

    Example:
        >>> x = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
        >>> y = identity_rule(x, torch.nn.functional.gelu(x))
        >>> (g,) = torch.autograd.grad(y.sum(), x)
        >>> torch.allclose(x * g, torch.nn.functional.gelu(x))
        True
    """
    return _IdentityRule.apply(x, y.detach())


def _own(view: Tensor) -> Tensor:
    """``view`` as a tensor of its own to autograd: F.linear on a 3-D input returns its 2-D
    product reshaped, a view; a copy only where the view does not cover its storage exactly."""
    base = view._base
    whole = (
        base is not None
        and view.is_contiguous()
        and view.numel() == base.numel()
        and view.storage_offset() == base.storage_offset()
    )
    return torch.ops.aten._unsafe_view(view, view.shape) if whole else view.clone()


class _ScaleGradient(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, share: float) -> Tensor:
        ctx.share = share
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        with torch._C.DisableTorchFunction():
            return grad * ctx.share, None


def uniform_rule(x: Tensor, share: float = 0.5) -> Tensor:
    """The uniform rule (AttnLRP eq. 7): ``x`` keeps ``share`` of a product's relevance.

    Apply it to both factors of a product of two input-dependent tensors (``share=0.5``).

    Args:
        x: one factor, any shape; its value is returned unchanged.
        share: the fraction of the gradient that reaches ``x``.

    Example:
        >>> a = torch.tensor([2.0], requires_grad=True)
        >>> b = torch.tensor([3.0], requires_grad=True)
        >>> out = uniform_rule(a) * uniform_rule(b)
        >>> ga, gb = torch.autograd.grad(out.sum(), (a, b))
        >>> (a * ga + b * gb).item() == out.item()  # the product's relevance, split in halves
        True
    """
    return _ScaleGradient.apply(x, share)


class _LayerNormRule(Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        shape: tuple[int, ...],
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
    ) -> Tensor:
        # the kernel F.layer_norm runs, which also gives 1 / std: nothing recomputed
        out, _, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(rstd, weight)
        ctx.dims = tuple(range(-len(shape), 0))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        rstd, weight = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            centred = grad.clone() if weight is None else grad * weight
            centred.sub_(centred.mean(ctx.dims, keepdim=True)).mul_(rstd)
            return centred.to(grad.dtype), None, None, None, None


def layer_norm_rule(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """LayerNorm with the identity rule on its normalisation (AttnLRP Sec. 3.3).

    The standard deviation is held constant; the centring ``x − mean(x)`` and the affine map
    stay linear, so with no bias the relevance per normalised vector is conserved.

    Args:
        x: ``(..., *normalized_shape)``.
        normalized_shape, weight, bias, eps: as for :func:`torch.nn.functional.layer_norm`.

    Returns:
        ``F.layer_norm(x, ...)``, bit for bit.

    Example:
        >>> x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        >>> y = layer_norm_rule(x, (4,))
        >>> (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        >>> torch.allclose((x * g).sum(-1), y.sum(-1))
        True
    """
    return _LayerNormRule.apply(x, tuple(normalized_shape), weight, bias, eps)


class _LinearRule(Function):
    """``F.linear`` forward; backward ``g ⊙ z / (z + ε sign z)`` times ``W``.

    ``z`` is saved with ``save_for_backward`` (activation checkpointing may drop and recompute
    it), not copied: F.linear's 3-D result is a view, handed on as a tensor of its own. The
    factor costs three element-wise passes in the backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, epsilon: float) -> Tensor:
        out = F.linear(x, weight, bias)
        if out._is_view():  # the model may change it in place, which a Function's view forbids
            out = _own(out)
        ctx.epsilon = epsilon
        ctx.save_for_backward(weight, out if epsilon > 0 else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        try:
            weight, out = ctx.saved_tensors
        except RuntimeError as error:
            if "modified by an inplace operation" not in str(error):
                raise
            raise RuntimeError(
                "The model changes a linear layer's output in place, but the epsilon rule needs "
                "its value z = Wx + b. Pass epsilon=0 (LRP-0: plain gradient x input at linear "
                "layers), which does not need it."
            ) from None
        with torch._C.DisableTorchFunction():
            if out is not None:  # g z / (z + ε sign z) = g − ε g / (|z| + ε): three passes
                grad = torch.addcdiv(grad, grad, out.abs().add_(ctx.epsilon), value=-ctx.epsilon)
            return grad @ weight.to(grad.dtype), None, None, None


def linear_rule(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, epsilon: float = 1e-6
) -> Tensor:
    """A linear layer with the epsilon rule: ``R_i = Σ_j x_i W_ji R_j / (z_j + ε sign z_j)``.

    With ``epsilon=0`` this is plain gradient × input (LRP-0); the bias keeps its share.

    Args:
        x: ``(..., in_features)``.
        weight: ``(out_features, in_features)``; bias: ``(out_features,)`` or None.
        epsilon: the stabiliser ε ≥ 0.

    Returns:
        ``F.linear(x, weight, bias)``, bit for bit.

    Example:
        >>> x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        >>> weight = torch.randn(2, 4, dtype=torch.float64)
        >>> y = linear_rule(x, weight, epsilon=0.0)
        >>> (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        >>> torch.allclose((x * g).sum(-1), y.sum(-1))
        True
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, not {epsilon}")
    return _LinearRule.apply(x, weight, bias, epsilon)


class _StraightThrough(Function):
    @staticmethod
    def forward(ctx: Any, value: Tensor, surrogate: Tensor) -> Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def straight_through(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward, the gradient of ``surrogate`` in the backward.

    Used to keep a fused kernel's output bit for bit while the rules run on its explicit form.

    Example:
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> out = straight_through(torch.tensor([7.0]), 3 * x)
        >>> out.item(), torch.autograd.grad(out.sum(), x)[0].item()
        (7.0, 3.0)
    """
    return _StraightThrough.apply(value.detach(), surrogate)


def fused_attention_rule(
    kernel: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    *,
    conservative: bool = False,
    **options: Any,
) -> Tensor:
    """The AttnLRP or CP-LRP rule on a fused attention kernel, at the cost of its gradient.

    The uniform rule on ``Q·Kᵀ`` and on ``A·V`` with the softmax rule (AttnLRP) is the kernel's
    ordinary gradient with the gradient into queries and keys scaled by 1/4 and into values
    (and an input-dependent float mask) by 1/2; CP-LRP holds the probabilities constant, which
    is the kernel with queries, keys and mask detached. So the kernel runs as the model calls
    it, forward and backward, and no ``(B, H, N, N)`` tensor is formed; the result equals
    :func:`attention_rule`.

    Args:
        kernel: ``torch.nn.functional.scaled_dot_product_attention`` (or a function with its
            signature).
        query, key, value, attn_mask: the kernel's inputs.
        conservative: CP-LRP instead of AttnLRP.
        options: the kernel's other keyword arguments (``is_causal``, ``scale``,
            ``enable_gqa``, ``dropout_p``).

    Example:
        >>> q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
        ...            for _ in range(3))
        >>> fused = fused_attention_rule(F.scaled_dot_product_attention, q, k, v, is_causal=True)
        >>> explicit = attention_rule(q, k, v, is_causal=True)
        >>> a = torch.autograd.grad(fused.sum(), (q, k, v))
        >>> b = torch.autograd.grad(explicit.sum(), (q, k, v))
        >>> all(torch.allclose(x, y) for x, y in zip(a, b))
        True
    """
    if conservative:
        query, key = query.detach(), key.detach()
    else:
        query, key, value = uniform_rule(query, 0.25), uniform_rule(key, 0.25), uniform_rule(value)
    if isinstance(attn_mask, Tensor) and attn_mask.requires_grad:
        attn_mask = attn_mask.detach() if conservative else uniform_rule(attn_mask)
    return kernel(query, key, value, attn_mask=attn_mask, **options)


def attention_rule(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    conservative: bool = False,
) -> Tensor:
    """Explicit ``softmax(Q·Kᵀ·scale + mask)·V`` with the AttnLRP or CP-LRP rules.

    AttnLRP: the uniform rule on both matmuls (queries and keys keep a quarter of the gradient,
    values a half) and the softmax rule (plain gradient). CP-LRP (``conservative=True``): the
    attention probabilities are constant, so the map is linear in ``V``.

    Args:
        query: ``(B, H, Nq, d)``; key, value: ``(B, Hkv, Nk, d)`` with ``H`` a multiple of
            ``Hkv`` (grouped heads are repeated).
        attn_mask: bool ``(…, Nq, Nk)`` (True = attend) or additive float, broadcastable.
        is_causal: a top-left aligned causal mask, as in
            :func:`torch.nn.functional.scaled_dot_product_attention`.
        scale: the score scale; ``d ** -0.5`` when None.
        conservative: CP-LRP instead of AttnLRP.

    Returns:
        ``(B, H, Nq, d)``, numerically close to the fused kernel's output.

    Example:
        >>> q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
        >>> out = attention_rule(q, k, v)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
    """
    if key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if conservative:
        query, key = query.detach(), key.detach()
    else:
        query, key, value = uniform_rule(query), uniform_rule(key), uniform_rule(value)
    scores = (
        query @ key.transpose(-2, -1) * (scale if scale is not None else query.shape[-1] ** -0.5)
    )
    scores = _masked(scores, attn_mask, is_causal)
    dtype = torch.promote_types(scores.dtype, torch.float32)
    probs = torch.softmax(scores.to(dtype), dim=-1).to(value.dtype)
    probs = probs.nan_to_num(0.0)  # rows with no key to attend
    probs = probs.detach() if conservative else uniform_rule(probs)
    return probs @ value


def _masked(scores: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
    n_query, n_key = scores.shape[-2:]
    if is_causal:
        allowed = torch.ones(n_query, n_key, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(~attn_mask, float("-inf"))
    return scores + attn_mask
