"""Attention probabilities and their gradients, recomputed a block of query rows at a time.

A fused kernel (``scaled_dot_product_attention``) never stores the post-softmax attention
``A``. The relevance rule needs ``A`` and ``dA = d(out)/dA`` per head. For one head
``O = A·V``, so ``dA = dO·Vᵀ``, and ``A = softmax(Q·Kᵀ·scale + mask)`` can be recomputed from
``Q`` and ``K``. Doing this for ``block_rows`` query rows at a time keeps the memory at
``O(B·H·block_rows·N)`` instead of ``O(B·H·N·N)`` (Chefer et al., ICCV 2021, eq. 5 needs only
the element-wise product ``dA ⊙ A``).

The same loop also produces the gradients of ``Q``, ``K``, ``V`` (and of a float mask), so that
back-propagation continues to earlier layers exactly as the fused kernel's backward would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BlockConsumer = Callable[[slice, Tensor, Tensor], None]
"""Called as ``consumer(rows, probs, grad_probs)`` with ``(B, H, r, Nk)`` float32 blocks.

The blocks are reused once the call returns: a consumer reduces them, it does not keep them.
"""

DEFAULT_BLOCK_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}
"""Memory for one recomputed float32 block ``(B, H, rows, Nk)`` when none is given, by device
type: small blocks stay in a CPU's caches, large ones keep a GPU busy."""


@dataclass(frozen=True)
class AttentionCall:
    """The inputs of one attention call, in ``scaled_dot_product_attention``'s layout.

    Attributes:
        query: ``(B, H, Nq, D)``.
        key: ``(B, Hk, Nk, D)``; ``H`` is a multiple of ``Hk`` (grouped key/value heads).
        value: ``(B, Hk, Nk, Dv)``.
        mask: ``None``, a bool mask (True = attend) or an additive float mask, broadcastable
            to ``(B, H, Nq, Nk)``.
        is_causal: apply a top-left aligned causal mask on top of ``mask``.
        scale: the factor on ``Q·Kᵀ``.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    is_causal: bool
    scale: float

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Nq, Nk)``."""
        batch, heads, n_query, _ = self.query.shape
        return batch, heads, n_query, self.key.shape[-2]

    def allowed(self, rows: slice = slice(None), hard_only: bool = False) -> Tensor | None:
        """Bool ``(B|1, H|1, r, Nk)`` of attendable positions for ``rows``, or None if all are.

        An additive float mask counts as blocking where it is below -1000 (padding in every
        convention in use: -inf, the dtype's minimum, -10000), unless ``hard_only``.
        """
        n_query, n_key = self.query.shape[-2], self.key.shape[-2]
        allowed = None
        if self.mask is not None and (self.mask.dtype == torch.bool or not hard_only):
            block = _mask_rows(self.mask, rows)
            allowed = block if block.dtype == torch.bool else block > -1e3
        if self.is_causal:
            index = torch.arange(n_query, device=self.query.device)[rows]
            causal = index[:, None] >= torch.arange(n_key, device=self.query.device)[None, :]
            allowed = causal if allowed is None else allowed & causal
        return allowed


def _mask_rows(mask: Tensor, rows: slice) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask if mask.shape[-2] == 1 else mask[..., rows, :]


def _expand_heads(tensor: Tensor, heads: int) -> Tensor:
    groups = heads // tensor.shape[1]
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _reduce_heads(grad: Tensor, heads: int) -> Tensor:
    batch, full_heads = grad.shape[:2]
    if full_heads == heads:
        return grad
    return grad.reshape(batch, heads, full_heads // heads, *grad.shape[2:]).sum(2)


def block_rows_for(call: AttentionCall, block_bytes: int | None = None) -> int:
    """Query rows per block so that one float32 ``(B, H, rows, Nk)`` block fits ``block_bytes``."""
    batch, heads, n_query, n_key = call.shape
    default = DEFAULT_BLOCK_BYTES.get(call.query.device.type, DEFAULT_BLOCK_BYTES["cuda"])
    budget = default if block_bytes is None else block_bytes
    rows = budget // max(1, 4 * batch * heads * n_key)
    return int(max(1, min(n_query, rows)))


def attention_probs(
    call: AttentionCall,
    rows: slice = slice(None),
    width: int | None = None,
    differentiable: bool = False,
) -> Tensor:
    """Post-softmax attention ``(B, H, r, w)`` in float32 for the query ``rows``.

    ``width`` keeps only the first ``w`` keys (all by default); the softmax is exact when every
    later key is masked, as for a causal block (see :func:`causal_width`). Fully masked rows give
    zeros rather than NaN. With ``differentiable`` the result can be back-propagated through
    (no step runs in place on a tensor autograd needs).
    """
    keys = slice(None, width)
    query = call.query[:, :, rows].float() * call.scale
    key = _expand_heads(call.key, call.query.shape[1])[:, :, keys].float()
    scores = torch.matmul(query, key.transpose(-1, -2))
    if call.mask is not None and call.mask.dtype != torch.bool:
        scores += _mask_rows(call.mask, rows)[..., keys]
    allowed = call.allowed(rows, hard_only=True)
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    scores.masked_fill_(~allowed[..., keys], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return probs.nan_to_num(0.0) if differentiable else probs.nan_to_num_(0.0)


def causal_width(call: AttentionCall, rows: slice) -> int | None:
    """Keys a block of a causal call can attend: ``[0, end)`` (top-left aligned); else None."""
    if not call.is_causal:
        return None
    return min(rows.stop, call.key.shape[-2])


def attention_backward(
    call: AttentionCall,
    grad_output: Tensor,
    consumer: BlockConsumer | None,
    block_rows: int,
    need_input_grads: bool = True,
    key_prefix_blocks: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Back-propagate through one attention call a block of query rows at a time.

    Each block's ``(probs, grad_probs)`` goes to ``consumer`` before it is freed. With
    ``key_prefix_blocks`` a causal call's blocks stop at the last key their rows can attend
    (``(B, H, r, w)``, ``w ≤ Nk``; the keys after ``w`` have zero attention), which halves the
    work; only consumers that accept such blocks ask for it.

    Args:
        call: the recorded inputs.
        grad_output: ``dO``, ``(B, H, Nq, Dv)``.
        consumer: receives ``(rows, A, dA)`` per block, each ``(B, H, r, Nk)`` float32.
        block_rows: query rows per block.
        need_input_grads: when False only the consumer runs; the returned grads are None.
        key_prefix_blocks: the consumer accepts blocks narrower than ``Nk`` (leading keys).

    Returns:
        ``(dQ, dK, dV, dmask)`` in the inputs' dtypes; ``dmask`` only for a float mask that
        requires grad.
    """
    dense = _dense(call)
    key, value, d_out = dense.key, dense.value, grad_output.float().contiguous()
    mask_grad = call.mask is not None and call.mask.dtype != torch.bool and call.mask.requires_grad
    d_query = torch.zeros_like(call.query, dtype=torch.float32) if need_input_grads else None
    d_key = torch.zeros_like(key) if need_input_grads else None
    d_value = torch.zeros_like(value) if need_input_grads else None
    d_scores_all = []
    for start in range(0, call.query.shape[-2], block_rows):
        rows = slice(start, start + block_rows)
        width = causal_width(call, rows) if key_prefix_blocks and not mask_grad else None
        keys = slice(None, width)
        probs = attention_probs(dense, rows, width)
        d_probs = torch.matmul(d_out[:, :, rows], value[:, :, keys].transpose(-1, -2))
        if consumer is not None:
            consumer(rows, probs, d_probs)
        if not need_input_grads:
            continue
        assert d_query is not None and d_key is not None and d_value is not None
        # dS = A ⊙ (dA − rowsum(dA ⊙ A)), formed in place in the product's memory.
        d_scores = d_probs.mul_(probs)
        d_scores.addcmul_(probs, d_scores.sum(-1, keepdim=True), value=-1.0)
        d_query[:, :, rows] = torch.matmul(d_scores, key[:, :, keys]) * call.scale
        d_key[:, :, keys] += torch.matmul(d_scores.transpose(-1, -2), dense.query[:, :, rows])
        d_value[:, :, keys] += torch.matmul(probs.transpose(-1, -2), d_out[:, :, rows])
        if mask_grad:
            d_scores_all.append(d_scores)
    if not need_input_grads:
        return None, None, None, None
    assert d_query is not None and d_key is not None and d_value is not None
    d_key = _reduce_heads(d_key * call.scale, call.key.shape[1])
    d_value = _reduce_heads(d_value, call.value.shape[1])
    d_mask = _sum_to(torch.cat(d_scores_all, dim=2), call.mask) if mask_grad else None
    return (
        d_query.to(call.query.dtype),
        d_key.to(call.key.dtype),
        d_value.to(call.value.dtype),
        d_mask,
    )


def _dense(call: AttentionCall) -> AttentionCall:
    """The call with float32, contiguous, head-expanded tensors, formed once per layer.

    Attention layouts are often transposed views; a block-wise matmul on one would copy the
    whole key or value for every block.
    """
    heads = call.query.shape[1]
    return AttentionCall(
        call.query.float().contiguous(),
        _expand_heads(call.key, heads).float().contiguous(),
        _expand_heads(call.value, heads).float().contiguous(),
        call.mask,
        call.is_causal,
        call.scale,
    )


def _sum_to(grad: Tensor, mask: Tensor | None) -> Tensor:
    assert mask is not None
    while grad.dim() > mask.dim():
        grad = grad.sum(0)
    for dim, size in enumerate(mask.shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad.to(mask.dtype)
