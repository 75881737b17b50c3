"""A plain replica of the relevance equations, independent of the package's engine.

Every helper here takes attention maps and gradients obtained by ordinary means (eager
attention, ``retain_grad``, a full ``backward``) in float64 and applies ICCV 2021 eq. 5-6
literally, on full matrices.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor


def relevance_matrix(attentions: list[Tensor], grads: list[Tensor], start_layer: int = 0) -> Tensor:
    """R = I, then R = R + mean_h(clamp(dA * A, 0)) @ R per layer in forward order."""
    batch, _, size, _ = attentions[0].shape
    relevance = torch.eye(size, dtype=torch.float64).repeat(batch, 1, 1)
    for layer, (attention, grad) in enumerate(zip(attentions, grads)):
        if layer < start_layer:
            continue
        abar = (grad.double() * attention.double()).clamp(min=0).mean(dim=1)
        relevance = relevance + abar @ relevance
    return relevance


def read_rows(relevance: Tensor, rows: Tensor, self_relevance: str = "subtract") -> Tensor:
    """Rows ``rows`` (weights (B, N)) of R, with the identity's share handled."""
    row = torch.einsum("bn,bnm->bm", rows.double(), relevance)
    if self_relevance == "subtract":
        return row - rows.double()
    if self_relevance == "zero":
        return row.masked_fill(rows > 0, 0.0)
    return row


def one_hot_rows(index: list[int], size: int) -> Tensor:
    return F.one_hot(torch.tensor(index), size).double()


def hf_eager_attentions(
    model, select, dtype: torch.dtype = torch.float64, **kwargs
) -> tuple[list[Tensor], list[Tensor]]:
    """An eager copy of a Hugging Face model in ``dtype`` (float64 by default); attentions and
    their grads via retain_grad."""
    reference = copy.deepcopy(model).to(dtype)
    reference.config._attn_implementation = "eager"
    for key, value in kwargs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            kwargs[key] = value.to(dtype)
    output = reference(**kwargs, output_attentions=True)
    attentions = list(output.attentions)
    for attention in attentions:
        attention.retain_grad()
    select(output).sum().backward()
    # Fully masked (left-padding) query rows are NaN in eager float64; they carry no attention.
    return (
        [a.detach().nan_to_num(0.0) for a in attentions],
        [a.grad.nan_to_num(0.0) for a in attentions],
    )


def hooked_attentions(model, forward, modules_with_probs) -> tuple[list[Tensor], list[Tensor]]:
    """Attentions from forward hooks on the modules that output the probabilities."""
    captured: list[Tensor] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, out: captured.append(out) or out.retain_grad())
        for module in modules_with_probs
    ]
    try:
        forward().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return [a.detach() for a in captured], [a.grad for a in captured]


def image_map(
    row: Tensor, prefix: int, grid: tuple[int, int], size: tuple[int, int], channels: int
) -> Tensor:
    """Patch relevance laid on its grid, bilinearly upsampled, repeated over channels."""
    patches = row[:, prefix:].reshape(row.shape[0], 1, *grid)
    image = F.interpolate(patches, size=size, mode="bilinear", align_corners=False)
    return image.repeat(1, channels, 1, 1)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    """Equal within ``rtol`` relative to the largest reference value."""
    expected = expected.to(actual.device, torch.float64)
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual.double() - expected).abs().max() / scale
    assert error <= rtol, f"relative error {error:.3g} > {rtol}"


def fuse_heads(attention: Tensor, head_fusion: str = "mean") -> Tensor:
    """Attention (B, H, N, N) reduced over heads by mean, max or min, in float64."""
    attention = attention.double()
    reduce = {"mean": attention.mean, "max": attention.amax, "min": attention.amin}[head_fusion]
    return reduce(dim=1)


def gradient_weighted(attention: Tensor, grad: Tensor) -> Tensor:
    """ICCV 2021 eq. 5: mean_h(clamp(dA * A, 0)), in float64."""
    return (grad.double() * attention.double()).clamp(min=0).mean(dim=1)


def rollout_matrix(maps: list[Tensor], start_layer: int = 0) -> Tensor:
    """Abnar & Zuidema: M_L' ... M_start' with M' = (M + I) / rowsum(M + I), forward order."""
    joint = None
    for layer, fused in enumerate(maps):
        if layer < start_layer:
            continue
        augmented = fused.double() + torch.eye(fused.shape[-1], dtype=torch.float64)
        augmented = augmented / augmented.sum(dim=-1, keepdim=True)
        joint = augmented if joint is None else augmented @ joint
    assert joint is not None
    return joint


def attention_gradcam_rows(attention: Tensor, grad: Tensor, rows: Tensor, positions: Tensor):
    """CVPR'21 attention Grad-CAM of the last layer at ``rows``: the read row of A weighted per
    head by its gradient's mean over ``positions`` (B, N) bool; head mean; clamp."""
    read = lambda t: torch.einsum("bn,bhnm->bhm", rows.double(), t.double())  # noqa: E731
    weights = (read(grad) * positions[:, None]).sum(-1, keepdim=True)
    weights = weights / positions.sum(-1)[:, None, None]
    return (read(attention) * weights).mean(dim=1).clamp(min=0)


def encoder_reference(model, x, target, padding_mask):
    """The TransformerEncoder's post-norm layers written out, keeping each softmax."""
    attentions = []
    h = x.double()
    for layer in copy.deepcopy(model).double().encoder.layers:
        mha = layer.self_attn
        q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (mha.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(padding_mask[:, None, None, :], float("-inf"))
        attn = scores.softmax(-1)
        attn.retain_grad()
        attentions.append(attn)
        out = mha.out_proj((attn @ v).transpose(1, 2).flatten(2))
        h = layer.norm1(h + out)
        h = layer.norm2(h + layer.linear2(F.relu(layer.linear1(h))))
    logits = F.linear(h[:, 0], model.head.weight.double(), model.head.bias.double())
    logits.gather(1, target[:, None]).sum().backward()
    return attentions, [a.grad for a in attentions]
