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

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BlockFeed = Callable[[slice, Tensor, Tensor], None]
"""Called as ``feed(rows, probs, grad_probs)`` with ``(B, H, r, Nk)`` float32 blocks: the
recorder binds a :class:`~captum_chefer.core.readers.Reader`'s ``add_block`` to its layer.

Both blocks are scratch once the call returns: ``grad_probs`` may be overwritten, and neither
may be kept.
"""

DEFAULT_BLOCK_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}
"""Memory for one recomputed float32 block ``(B, H, rows, Nk)`` when none is given, by device
type. On a CPU every operation on a block is split across threads that meet at a barrier, so
each block costs a wait whenever another process holds a core, while a block larger than the
caches costs memory traffic: of 4 to 64 MiB, 16 MiB was the fastest for MiniLM-512 and for a
causal Llama at 4096 tokens on a quiet 2-core CPU, and stayed near the best under load, where
4 MiB was 2-3x slower (``benchmarks/ratios.py``). Large blocks keep a GPU busy. Each call
keeps three buffers of this size while it runs."""


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

    def attendable(self, rows: slice = slice(None), hard_only: bool = False) -> Tensor | None:
        """Bool ``(B|1, H|1, r, Nk)`` of attendable positions for ``rows``, or None if all are.

        An additive float mask counts as blocking where it is below -1000 (padding in every
        convention in use: -inf, the dtype's minimum, -10000), unless ``hard_only``.
        """
        n_query, n_key = self.query.shape[-2], self.key.shape[-2]
        attendable = None
        if self.mask is not None and (self.mask.dtype == torch.bool or not hard_only):
            block = _mask_rows(self.mask, rows)
            attendable = block if block.dtype == torch.bool else block > -1e3
        if self.is_causal:
            index = torch.arange(n_query, device=self.query.device)[rows]
            causal = index[:, None] >= torch.arange(n_key, device=self.query.device)[None, :]
            attendable = causal if attendable is None else attendable & causal
        return attendable

    def allowed(self, rows: slice = slice(None), hard_only: bool = False) -> Tensor | None:
        """Deprecated name of :meth:`attendable`."""
        warnings.warn(
            "AttentionCall.allowed is now AttentionCall.attendable", DeprecationWarning, 2
        )
        return self.attendable(rows, hard_only)


def _as_4d(mask: Tensor) -> Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _mask_rows(mask: Tensor, rows: slice) -> Tensor:
    mask = _as_4d(mask)
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
    query = call.query[:, :, rows].float() * call.scale
    key = _expand_heads(call.key, call.query.shape[1])[:, :, :width].float()
    scores = torch.matmul(query, key.transpose(-1, -2))
    mask_scores(scores, call, rows)
    probs = torch.softmax(scores, dim=-1)
    if not may_have_empty_rows(call):
        return probs
    return probs.nan_to_num(0.0) if differentiable else probs.nan_to_num_(0.0)


def mask_scores(
    scores: Tensor, call: AttentionCall, rows: slice, blocked: Tensor | None = None
) -> None:
    """Apply ``call``'s masks in place to the scores ``(B, H, r, w)`` of the query ``rows``.

    A float mask is added; where a bool mask or the causal mask blocks, the score becomes
    ``-inf``. ``blocked`` is the bool mask already inverted (the engine forms it once per call).
    """
    width = scores.shape[-1]
    if call.mask is not None and call.mask.dtype == torch.bool:
        block = _mask_rows(blocked if blocked is not None else call.mask, rows)[..., :width]
        scores.masked_fill_(block if blocked is not None else block.logical_not(), float("-inf"))
    elif call.mask is not None:
        scores += _mask_rows(call.mask, rows)[..., :width]
    if call.is_causal:
        index = torch.arange(call.query.shape[-2], device=scores.device)[rows]
        future = index[:, None] < torch.arange(width, device=scores.device)[None, :]
        scores.masked_fill_(future, float("-inf"))


def may_have_empty_rows(call: AttentionCall) -> bool:
    """Whether some query row may be masked at every key (its softmax is then NaN, read as 0).

    :func:`empty_rows_flag` as a Python bool: it reads the mask only on the CPU, where a read
    costs nothing; elsewhere a masked call is answered True without a host sync.
    """
    return bool(empty_rows_flag(call))


def empty_rows_flag(call: AttentionCall) -> Tensor | bool:
    """Whether a query row may be masked at every key, with no host sync on an accelerator.

    A fully masked row's softmax is NaN, which the block loop reads as 0 with one elementwise
    pass (``nan_to_num_``, the identity on every other row, so the result is the same bit for
    bit whichever answer is given). Without a mask no row is empty (a top-left causal row always
    sees key 0): False. A causal call with a mask: True. Otherwise the answer is in the mask's
    data. On the CPU, where reading a value costs nothing, it is a 0-dim bool tensor, exact, so
    that calls without such a row skip the pass (about a tenth of the block loop's time for a
    padded bidirectional call). On any other device it is True: reading the mask would stall
    the stream once per call (a host synchronisation), while the pass is one cheap kernel per
    block.

    Example:
        >>> q = torch.zeros(1, 1, 2, 4)
        >>> mask = torch.tensor([[True, False], [False, False]])
        >>> empty_rows_flag(AttentionCall(q, q, q, mask, False, 0.5))
        tensor(True)
        >>> empty_rows_flag(AttentionCall(q.to("meta"), q, q, mask.to("meta"), False, 0.5))
        True
    """
    mask = call.mask
    if mask is None:
        return False
    if call.is_causal or mask.device.type != "cpu":
        return True
    if mask.dtype == torch.bool:
        return ~mask.any(-1).all()
    return torch.isneginf(mask).all(-1).any()


def causal_width(call: AttentionCall, rows: slice) -> int | None:
    """Keys a block of a causal call can attend: ``[0, end)`` (top-left aligned); else None."""
    if not call.is_causal:
        return None
    return min(rows.stop, call.key.shape[-2])


def attention_backward(
    call: AttentionCall,
    grad_output: Tensor,
    consumer: BlockFeed | None,
    block_rows: int,
    need_input_grads: bool = True,
    key_prefix_blocks: bool = False,
    maybe_empty_rows: bool | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Back-propagate through one attention call a block of query rows at a time.

    Each block's ``(probs, grad_probs)`` goes to ``consumer`` before it is freed. With
    ``key_prefix_blocks`` a causal call's blocks stop at the last key their rows can attend
    (``(B, H, r, w)``, ``w ≤ Nk``; the keys after ``w`` have zero attention), which halves the
    work; only consumers that accept such blocks ask for it.

    Every block is computed in the same three buffers, so the loop allocates nothing of block
    size; the gradients of ``K`` and ``V`` are accumulated inside the products
    (``baddbmm_``) and the softmax backward is torch's fused kernel. This keeps the number of
    operations per block, and so the synchronisation between threads, small.

    Args:
        call: the recorded inputs.
        grad_output: ``dO``, ``(B, H, Nq, Dv)``.
        consumer: receives ``(rows, A, dA)`` per block, each ``(B, H, r, Nk)`` float32; it may
            overwrite ``dA`` (scratch once the call returns) but must not keep either.
        block_rows: query rows per block.
        need_input_grads: when False only the consumer runs; the returned grads are None.
        key_prefix_blocks: the consumer accepts blocks narrower than ``Nk`` (leading keys).
        maybe_empty_rows: whether a query row may be masked at every key, when the caller
            has read it already (:func:`empty_rows_flag`); None decides it here
            (:func:`may_have_empty_rows`: no host sync off the CPU).

    Returns:
        ``(dQ, dK, dV, dmask)`` in the inputs' dtypes; ``dmask`` only for a float mask that
        requires grad.
    """
    with torch.no_grad():
        return _attention_backward(
            call,
            grad_output,
            consumer,
            block_rows,
            need_input_grads,
            key_prefix_blocks,
            may_have_empty_rows(call) if maybe_empty_rows is None else maybe_empty_rows,
        )


def _attention_backward(
    call: AttentionCall,
    grad_output: Tensor,
    consumer: BlockFeed | None,
    block_rows: int,
    need_input_grads: bool,
    key_prefix_blocks: bool,
    maybe_empty_rows: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    loop = _BlockLoop(call, grad_output, block_rows, need_input_grads, maybe_empty_rows)
    mask_grad = call.mask is not None and call.mask.dtype != torch.bool and call.mask.requires_grad
    d_scores_all = []
    for start in range(0, loop.n_query, block_rows):
        rows = slice(start, min(start + block_rows, loop.n_query))
        width = causal_width(call, rows) if key_prefix_blocks and not mask_grad else None
        probs, d_probs, d_scores = loop.block(rows, width or loop.n_key)
        if consumer is not None:
            consumer(rows, probs, d_probs)
        if d_scores is not None:
            loop.accumulate(rows, probs, d_scores)
            if mask_grad:
                d_scores_all.append(d_scores.clone())
    if not need_input_grads:
        return None, None, None, None
    d_query, d_key, d_value = loop.input_grads()
    d_mask = _sum_to(torch.cat(d_scores_all, dim=2), call.mask) if mask_grad else None
    return d_query, d_key, d_value, d_mask


class _BlockLoop:
    """The state of :func:`attention_backward` for one call: inputs, buffers, gradients.

    Inputs are float32, contiguous and head-expanded, formed once per call (attention layouts
    are often transposed views, and a block-wise product on one would copy the whole key or
    value for every block), and viewed as ``(B·H, N, D)`` for batched products. ``Q`` is
    scaled once, so ``dK = dSᵀ·(Q·scale)`` needs no further scaling.
    """

    def __init__(
        self,
        call: AttentionCall,
        grad_output: Tensor,
        block_rows: int,
        need_input_grads: bool,
        maybe_empty_rows: bool,
    ) -> None:
        self.call = call
        batch, heads, self.n_query, self.n_key = call.shape
        self.batch, self.heads = batch, heads
        flat = batch * heads
        self.query = (call.query.float() * call.scale).reshape(flat, self.n_query, -1)
        self.key = _expand_heads(call.key, heads).float().reshape(flat, self.n_key, -1)
        self.value = _expand_heads(call.value, heads).float().reshape(flat, self.n_key, -1)
        self.d_out = grad_output.float().reshape(flat, self.n_query, -1)
        mask = call.mask  # a bool mask is inverted once per call
        bool_mask = mask is not None and mask.dtype == torch.bool
        self.blocked = _as_4d(mask).logical_not() if mask is not None and bool_mask else None
        self.maybe_empty_rows = maybe_empty_rows
        size = flat * min(block_rows, self.n_query) * self.n_key
        device = call.query.device
        self.scores, self.probs, self.d_probs = (torch.empty(size, device=device) for _ in range(3))
        self.need_input_grads = need_input_grads
        if need_input_grads:
            self.d_query = torch.zeros_like(self.query)
            self.d_key = torch.zeros_like(self.key)
            self.d_value = torch.zeros_like(self.value)

    def block(self, rows: slice, width: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """``A``, ``dA`` and (when input grads are needed) ``dS``, each ``(B, H, r, w)``."""
        n_rows = rows.stop - rows.start
        shape4, shape3 = (self.batch, self.heads, n_rows, width), (-1, n_rows, width)
        count = self.batch * self.heads * n_rows * width
        scores = self.scores[:count].view(shape3)
        torch.bmm(self.query[:, rows], self.key[:, :width].transpose(1, 2), out=scores)
        scores4 = scores.view(shape4)
        mask_scores(scores4, self.call, rows, self.blocked)
        probs = self.probs[:count].view(shape4)
        torch.softmax(scores4, dim=-1, out=probs)
        if self.maybe_empty_rows:
            probs.nan_to_num_(0.0)
        d_probs = self.d_probs[:count].view(shape3)
        torch.bmm(self.d_out[:, rows], self.value[:, :width].transpose(1, 2), out=d_probs)
        d_probs4 = d_probs.view(shape4)
        if not self.need_input_grads:
            return probs, d_probs4, None
        # dS = A ⊙ (dA − rowsum(dA ⊙ A)), torch's fused softmax backward, into the scores' memory.
        torch.ops.aten._softmax_backward_data.out(
            d_probs4, probs, -1, torch.float32, grad_input=scores4
        )
        return probs, d_probs4, scores4

    def accumulate(self, rows: slice, probs: Tensor, d_scores: Tensor) -> None:
        """Add one block's share to ``dQ``, ``dK`` and ``dV``."""
        width = probs.shape[-1]
        d_scores3 = d_scores.reshape(-1, *d_scores.shape[2:])
        probs3 = probs.reshape(-1, *probs.shape[2:])
        self.d_query[:, rows].baddbmm_(d_scores3, self.key[:, :width])
        self.d_key[:, :width].baddbmm_(d_scores3.transpose(1, 2), self.query[:, rows])
        self.d_value[:, :width].baddbmm_(probs3.transpose(1, 2), self.d_out[:, rows])

    def input_grads(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(dQ, dK, dV)`` in the inputs' shapes and dtypes, heads summed back to ``Hk``."""
        call, shape = self.call, (self.batch, self.heads, -1, self.key.shape[-1])
        d_query = self.d_query.mul_(call.scale).view(shape)
        d_key = _reduce_heads(self.d_key.view(shape), call.key.shape[1])
        d_value = _reduce_heads(
            self.d_value.view(self.batch, self.heads, -1, self.value.shape[-1]),
            call.value.shape[1],
        )
        return (
            d_query.to(call.query.dtype),
            d_key.to(call.key.dtype),
            d_value.to(call.value.dtype),
        )


def _sum_to(grad: Tensor, mask: Tensor | None) -> Tensor:
    assert mask is not None
    while grad.dim() > mask.dim():
        grad = grad.sum(0)
    for dim, size in enumerate(mask.shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad.to(mask.dtype)
