"""An independent reference of the AttnLRP / CP-LRP rules: explicit relevance messages.

No gradient is used. A small pre-norm encoder with explicit modules (``nn.Linear``,
``nn.LayerNorm``, softmax attention, ``nn.GELU``) is run forward, keeping every activation,
and the relevance of the explained logit is passed back layer by layer with each rule written
as its equation (Achtibat et al. 2024; Ali et al. 2022):

- linear: ``R_i = Σ_j x_i W_ji R_j / (z_j + ε sign z_j)``;
- residual sum ``y = a + b``: ``R_a = a R / y``, ``R_b = b R / y``;
- LayerNorm (std constant): the linear map ``M_ij = (δ_ij − 1/N) w_j / std``, then LRP-0;
- GELU: ``R_in = R_out``;
- ``O = A·V`` and ``S = Q·Kᵀ·scale``: contributions ``c_ikj = A_ik V_kj`` share ``R_ij`` in
  proportion, half to each factor (CP-LRP: all of it to ``V``);
- softmax (AttnLRP Prop. 3.1): ``R_in_i = x_i (R_i − s_i Σ_j R_j)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(ln1(x))``, ``out = h + mlp(ln2(h))``."""

    def __init__(self, dim: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, size, _ = x.shape
        qkv = self.qkv(self.ln1(x)).reshape(batch, size, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(x)
        if self.sdpa:
            mixed = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
            mixed = probs @ v
        h = x + self.proj(mixed.transpose(1, 2).flatten(2))
        return h + self.fc2(self.act(self.fc1(self.ln2(h))))


class TinyEncoder(nn.Module):
    """Embeddings ``(B, N, D)`` → blocks → LayerNorm → class logits from token 0."""

    def __init__(
        self, dim: int = 8, heads: int = 2, layers: int = 2, classes: int = 3, sdpa: bool = False
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(dim, heads, sdpa) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)
        for module in self.modules():  # non-trivial affine norms
            if isinstance(module, nn.LayerNorm):
                nn.init.normal_(module.weight, 1.0, 0.3)
                nn.init.normal_(module.bias, 0.0, 0.3)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _sign(z: Tensor) -> Tensor:
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def linear_relevance(x: Tensor, layer: nn.Linear, relevance: Tensor, eps: float) -> Tensor:
    """``R_i = Σ_j x_i W_ji R_j / (z_j + ε sign z_j)`` via explicit contributions."""
    contributions = x.unsqueeze(-2) * layer.weight  # (..., out, in)
    z = x @ layer.weight.T + layer.bias
    share = relevance / (z + eps * _sign(z)) if eps > 0 else relevance / z
    return (contributions * share.unsqueeze(-1)).sum(-2)


def sum_relevance(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    y = a + b
    return a * relevance / y, b * relevance / y


def layer_norm_relevance(x: Tensor, norm: nn.LayerNorm, relevance: Tensor) -> Tensor:
    n = x.shape[-1]
    std = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()  # (..., 1)
    centring = torch.eye(n, dtype=x.dtype) - 1.0 / n  # (in, out)
    matrix = centring * norm.weight / std.unsqueeze(-1)  # (..., in, out)
    contributions = x.unsqueeze(-1) * matrix
    y = contributions.sum(-2) + norm.bias
    return (contributions * (relevance / y).unsqueeze(-2)).sum(-1)


def product_relevance(
    a: Tensor, b: Tensor, relevance: Tensor, share_a: float
) -> tuple[Tensor, Tensor]:
    """``O = a @ b``: ``c_ikj = a_ik b_kj`` take ``R_ij`` in proportion; ``a`` keeps ``share_a``."""
    contributions = a.unsqueeze(-1) * b.unsqueeze(-3)  # (..., i, k, j)
    out = contributions.sum(-2, keepdim=True)
    shares = contributions * relevance.unsqueeze(-2) / out
    return share_a * shares.sum(-1), (1 - share_a) * shares.sum(-3)


def softmax_relevance(x: Tensor, s: Tensor, relevance: Tensor) -> Tensor:
    """AttnLRP Prop. 3.1: ``R_in_i = x_i (R_i − s_i Σ_j R_j)``."""
    return x * (relevance - s * relevance.sum(-1, keepdim=True))


def block_relevance(
    block: Block, x: Tensor, relevance: Tensor, rule: str, eps: float, lost: list[float]
) -> Tensor:
    """Relevance at a block's input from the relevance at its output (one example)."""
    q, k, v = block.split(x)
    scale = 1 / math.sqrt(q.shape[-1])
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores, -1)
    mixed = (probs @ v).transpose(1, 2).flatten(2)
    h = x + block.proj(mixed)
    hidden = block.fc1(block.ln2(h))
    r_h, r_mlp = sum_relevance(h, block.fc2(block.act(hidden)), relevance)
    r_hidden = linear_relevance(block.act(hidden), block.fc2, r_mlp, eps)  # GELU: identity
    r_ln2 = linear_relevance(block.ln2(h), block.fc1, r_hidden, eps)
    r_h = r_h + layer_norm_relevance(h, block.ln2, r_ln2)
    r_x, r_attn = sum_relevance(x, h - x, r_h)
    r_mixed = linear_relevance(mixed, block.proj, r_attn, eps)
    r_mixed = r_mixed.unflatten(-1, (block.heads, -1)).transpose(1, 2)
    r_probs, r_v = product_relevance(probs, v, r_mixed, 0.0 if rule == "cplrp" else 0.5)
    r_q = r_k = torch.zeros_like(q)
    if rule == "attnlrp":
        r_scores = softmax_relevance(scores, probs, r_probs)
        lost.append(float(r_probs.sum() - r_scores.sum()))
        r_q, r_kt = product_relevance(q * scale, k.transpose(-1, -2), r_scores, 0.5)
        r_k = r_kt.transpose(-1, -2)
    r_qkv = torch.stack((r_q, r_k, r_v)).permute(1, 3, 0, 2, 4).flatten(2)
    return r_x + layer_norm_relevance(
        x, block.ln1, linear_relevance(block.ln1(x), block.qkv, r_qkv, eps)
    )


def reference_relevance(
    model: TinyEncoder, x: Tensor, target: int, rule: str, eps: float
) -> tuple[Tensor, list[float]]:
    """Relevance ``(B, N, D)`` at the input embeddings, and the relevance each softmax lost."""
    with torch.no_grad():
        inputs = [x]
        for block in model.blocks:
            inputs.append(block(inputs[-1]))
        final = inputs[-1]
        logits = model.head(model.norm(final)[:, 0])
        relevance = torch.zeros_like(logits)
        relevance[:, target] = logits[:, target]
        r_cls = linear_relevance(model.norm(final)[:, 0], model.head, relevance, eps)
        r_norm = torch.zeros_like(final)
        r_norm[:, 0] = r_cls
        relevance = layer_norm_relevance(final, model.norm, r_norm)
        lost: list[float] = []
        for block, block_input in zip(reversed(model.blocks), reversed(inputs[:-1])):
            relevance = block_relevance(block, block_input, relevance, rule, eps, lost)
    return relevance, lost


def explicit_sdpa(state, func, args, kwargs):
    """The route before the fused rules, as a reference: every SDPA call on carried tensors
    decomposed into an explicit ``softmax(QKᵀ)V`` with the rules (``attention_rule``), its value
    the kernel's. Counted in ``state.attention_calls``."""
    from captum_chefer.core.lrp import attention_rule, straight_through

    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args)) | kwargs
    if not any(state.carried(bound[name]) for name in ("query", "key", "value")):
        return func(*args, **kwargs)
    state.attention_calls += 1
    with torch.no_grad():
        value = func(*args, **kwargs)
    surrogate = attention_rule(
        bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
        bool(bound.get("is_causal", False)), bound.get("scale"),
        conservative=state.variant == "cplrp",
    )  # fmt: skip
    return straight_through(value, surrogate)


@contextlib.contextmanager
def explicit_attention() -> Iterator[list[int]]:
    """AttnLRP / CP-LRP through :func:`explicit_sdpa` inside the block; yields a list that
    receives the number of SDPA calls decomposed."""
    from captum_chefer.capture import lrp

    decomposed = [0]

    def counting(state, func, args, kwargs):
        before = state.attention_calls
        out = explicit_sdpa(state, func, args, kwargs)
        decomposed[0] += state.attention_calls - before
        return out

    original = lrp.HANDLERS[F.scaled_dot_product_attention]
    lrp.HANDLERS[F.scaled_dot_product_attention] = counting
    try:
        yield decomposed
    finally:
        lrp.HANDLERS[F.scaled_dot_product_attention] = original
