"""Features, their ranking by attribution, and the perturbed copies built from that ranking.

Shared by every perturbation metric (perturbation curves, deletion/insertion, ERASER), so that
"which features are removed at fraction f" is decided in exactly one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

TensorOrTuple = Tensor | tuple[Tensor, ...]
BaselineType = int | float | Tensor | tuple[int | float | Tensor, ...]
Rounding = Literal["floor", "ceil"]


@dataclass(frozen=True)
class Baseline:
    """The replacement value of one input tensor.

    ``value`` broadcasts against the input; ``per_example`` marks a ``(B, ...)`` baseline whose
    rows must follow the examples when they are repeated.
    """

    value: Tensor
    per_example: bool

    def rows(self, example: Tensor) -> Tensor:
        return self.value[example] if self.per_example else self.value


@dataclass(frozen=True)
class FeatureRanking:
    """Where each input element falls in the removal order.

    Attributes:
        ranks: per input tensor, a LongTensor of the input's shape: the rank of the feature the
            element belongs to (0 = first to be perturbed). Excluded elements rank last.
        real: per input tensor, a bool tensor of the input's shape: False where the element is
            padding and must never be changed.
        n_features: ``(B,)`` the number of rankable features of each example (``n``).
    """

    ranks: tuple[Tensor, ...]
    real: tuple[Tensor, ...]
    n_features: Tensor

    def perturb(
        self, inputs: tuple[Tensor, ...], baselines: tuple[Baseline, ...], rows: PerturbedRows
    ) -> tuple[Tensor, ...]:
        """The perturbed copies of the inputs for a block of rows (the inputs stay untouched)."""
        return tuple(
            _perturb_one(x, rank, real, base, rows)
            for x, rank, real, base in zip(inputs, self.ranks, self.real, baselines, strict=True)
        )


@dataclass(frozen=True)
class PerturbedRows:
    """A block of rows of the (examples x steps) batch of perturbed inputs.

    Attributes:
        example: ``(R,)`` the example each row copies.
        count: ``(R,)`` how many top-ranked features the row selects.
        keep: ``(R,)`` True to keep the selected features and perturb the others (insertion,
            sufficiency); False to perturb the selected ones (deletion, comprehensiveness).
    """

    example: Tensor
    count: Tensor
    keep: Tensor


def _perturb_one(x: Tensor, rank: Tensor, real: Tensor, base: Baseline, rows: PerturbedRows):
    shape = (-1,) + (1,) * (x.dim() - 1)
    selected = rank[rows.example] < rows.count.view(shape)
    replace = (selected != rows.keep.view(shape)) & real[rows.example]
    return torch.where(replace, base.rows(rows.example), x[rows.example])


def as_tuple(value: object, name: str) -> tuple[Tensor, ...]:
    """``value`` as a non-empty tuple of tensors (Captum's "tuple in, tuple out" convention)."""
    items = value if isinstance(value, tuple) else (value,)
    if not items:
        raise ValueError(f"{name} is an empty tuple; pass at least one tensor.")
    for item in items:
        if not isinstance(item, Tensor):
            raise TypeError(
                f"{name} must be a tensor or a tuple of tensors, got {type(item).__name__}."
            )
    return items


def format_inputs(
    inputs: TensorOrTuple, attributions: TensorOrTuple
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Check that inputs and attributions match, and put the attributions on the inputs' device.

    Each attribution has the input's number of dimensions and, on each dimension, the input's
    size or 1 (a ``(B, 1, H, W)`` map ranks whole pixels of a ``(B, 3, H, W)`` image).
    """
    if isinstance(inputs, tuple) != isinstance(attributions, tuple):
        raise TypeError(
            "inputs and attributions must have the same structure: pass a tuple of attributions "
            "for a tuple of inputs, or one tensor for one tensor."
        )
    xs, attrs = as_tuple(inputs, "inputs"), as_tuple(attributions, "attributions")
    if len(xs) != len(attrs):
        raise ValueError(f"Got {len(xs)} input tensors but {len(attrs)} attribution tensors.")
    batch, device = xs[0].shape[0] if xs[0].dim() else 0, xs[0].device
    for i, (x, a) in enumerate(zip(xs, attrs, strict=True)):
        if x.dim() == 0 or x.shape[0] != batch or x.device != device:
            raise ValueError(
                f"inputs[{i}] has shape {tuple(x.shape)} on {x.device}; every input tensor needs "
                f"the batch dimension first ({batch} examples) and the device {device}."
            )
        if a.dim() != x.dim() or a.shape[0] != batch or not _fits(a.shape, x.shape):
            raise ValueError(
                f"attributions[{i}] has shape {tuple(a.shape)} but inputs[{i}] has shape "
                f"{tuple(x.shape)}; pass one attribution per input element (a dimension of size "
                "1 shares it, e.g. (B, 1, H, W) for a (B, 3, H, W) image)."
            )
    return xs, tuple(a.detach().to(device) for a in attrs)


def _fits(small: torch.Size, full: torch.Size) -> bool:
    return all(s in (1, f) for s, f in zip(small, full, strict=False))


def format_baselines(baselines: BaselineType, inputs: tuple[Tensor, ...]) -> tuple[Baseline, ...]:
    """One :class:`Baseline` per input tensor, cast to the input's dtype and device.

    A baseline is a number (e.g. a ``[MASK]`` token id), a tensor broadcastable to the input,
    or a ``(B, ...)`` tensor with one baseline per example.
    """
    if not isinstance(baselines, tuple):
        if isinstance(baselines, Tensor) and len(inputs) > 1:
            raise ValueError("For a tuple of inputs, pass a number or a tuple of baselines.")
        baselines = (baselines,) * len(inputs)
    if len(baselines) != len(inputs):
        raise ValueError(f"Got {len(baselines)} baselines for {len(inputs)} input tensors.")
    return tuple(_baseline(b, x, i) for i, (b, x) in enumerate(zip(baselines, inputs, strict=True)))


def _baseline(value: object, x: Tensor, i: int) -> Baseline:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"baselines[{i}] must be a number or a tensor, got {type(value).__name__}.")
    if isinstance(value, float) and not x.is_floating_point() and not value.is_integer():
        raise TypeError(
            f"baselines[{i}] = {value} cannot replace elements of the integer inputs[{i}]; pass "
            "an int such as the [MASK] or padding token id."
        )
    if isinstance(value, Tensor):
        tensor = value.to(device=x.device, dtype=x.dtype)
    else:  # a constant is made on the device: no upload from the host
        tensor = torch.full((), value, device=x.device, dtype=x.dtype)
    per_example = tensor.dim() == x.dim() and tensor.shape[0] == x.shape[0] > 1
    shape = tensor.shape[1:] if per_example else tensor.shape
    if tensor.dim() > x.dim() or not _fits(shape[::-1], x.shape[::-1]):
        raise ValueError(
            f"baselines[{i}] has shape {tuple(tensor.shape)}, which does not broadcast to "
            f"inputs[{i}] of shape {tuple(x.shape)}; pass a number, a tensor of shape "
            f"{tuple(x.shape[1:])}, or one of shape {tuple(x.shape)}."
        )
    return Baseline(tensor, per_example)


def rank_features(
    inputs: tuple[Tensor, ...],
    attributions: tuple[Tensor, ...],
    *,
    feature_mask: TensorOrTuple | None,
    attention_mask: Tensor | None,
    most_relevant_first: bool,
) -> FeatureRanking:
    """Rank the features of every example jointly across the input tensors.

    Features are the attribution elements, or the groups of ``feature_mask`` (ranked by their
    summed attribution). Padding (``attention_mask == 0``) is never ranked nor counted. Ties go
    to the lower index first: earlier tensor, then lower flat position, or lower group id.
    """
    real = _real_elements(inputs, attention_mask)
    real_flat = _flatten(real)
    if feature_mask is None:
        ids, scores = _element_features(inputs, attributions)
    else:
        ids, scores = _grouped_features(inputs, attributions, feature_mask, real_flat)
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("attributions contain NaN; fix the explanation before ranking by it.")
    valid = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    valid = valid.scatter_add_(1, ids, real_flat.to(torch.int32)) > 0
    order = _order(scores, valid, most_relevant_first)
    steps = torch.arange(order.shape[1], device=order.device).expand_as(order)
    feature_rank = torch.empty_like(order).scatter_(1, order, steps)
    ranks = _unflatten(feature_rank.gather(1, ids), inputs)
    return FeatureRanking(ranks, real, valid.sum(1))


def _order(scores: Tensor, valid: Tensor, most_relevant_first: bool) -> Tensor:
    """Feature indices sorted by (excluded last, score, index): two stable sorts."""
    by_score = torch.sort(scores, dim=1, descending=most_relevant_first, stable=True).indices
    excluded = (~valid).gather(1, by_score).to(torch.uint8)
    return by_score.gather(1, torch.sort(excluded, dim=1, stable=True).indices)


def _element_features(
    inputs: tuple[Tensor, ...], attributions: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    ids, scores, offset = [], [], 0
    for x, a in zip(inputs, attributions, strict=True):
        size = a[0].numel()
        local = torch.arange(offset, offset + size, device=x.device).view(1, *a.shape[1:])
        ids.append(torch.broadcast_to(local, x.shape).reshape(x.shape[0], -1))
        scores.append(a.reshape(a.shape[0], -1))
        offset += size
    return torch.cat(ids, 1), _float(torch.cat(scores, 1))


def _grouped_features(
    inputs: tuple[Tensor, ...],
    attributions: tuple[Tensor, ...],
    feature_mask: TensorOrTuple,
    real_flat: Tensor,
) -> tuple[Tensor, Tensor]:
    """Each element's group as a slot ``(B, M)`` and each slot's summed attribution ``(B, M)``.

    A row's groups take the slots ``0, 1, ...`` in the order of their ids (so ties between
    groups go to the lower id), found by sorting the row's ids: unlike ``torch.unique``, whose
    output size the host must read from the device, every size here is known beforehand. A row
    has at most ``M`` groups; the slots it does not use hold no element, so they are never
    valid and rank last.
    """
    masks = _format_feature_mask(feature_mask, inputs)
    flat_ids = _flatten(masks)
    sorted_ids, order = torch.sort(flat_ids, dim=1, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ids = torch.empty_like(order).scatter_(1, order, starts.cumsum(1) - 1)
    full = tuple(torch.broadcast_to(a, x.shape) for a, x in zip(attributions, inputs, strict=True))
    values = _float(_flatten(full)) * real_flat
    return ids, torch.zeros_like(values).scatter_add_(1, ids, values)


def _format_feature_mask(
    feature_mask: TensorOrTuple, inputs: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    masks = as_tuple(feature_mask, "feature_mask")
    if len(masks) != len(inputs):
        raise ValueError("Pass one feature_mask tensor per input tensor (a tuple for a tuple).")
    out = []
    for i, (m, x) in enumerate(zip(masks, inputs, strict=True)):
        if m.is_floating_point() or m.is_complex():
            raise TypeError(f"feature_mask[{i}] must hold integer feature ids, got {m.dtype}.")
        if m.dim() != x.dim() or m.shape[0] not in (1, x.shape[0]) or not _fits(m.shape, x.shape):
            raise ValueError(
                f"feature_mask[{i}] has shape {tuple(m.shape)} but inputs[{i}] has shape "
                f"{tuple(x.shape)}; it must broadcast to the input with a batch dimension of "
                "1 or B, as in Captum's FeatureAblation."
            )
        out.append(torch.broadcast_to(m.to(x.device), x.shape))
    return tuple(out)


def _real_elements(inputs: tuple[Tensor, ...], attention_mask: Tensor | None):
    if attention_mask is None:
        return tuple(torch.ones_like(x, dtype=torch.bool) for x in inputs)
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a (B, T) tensor: 1 at real tokens, 0 at padding.")
    real = attention_mask.to(inputs[0].device) != 0
    out = []
    for i, x in enumerate(inputs):
        if x.shape[:2] != real.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(real.shape)} but inputs[{i}] has shape "
                f"{tuple(x.shape)}; every input must start with the mask's (B, T) dimensions."
            )
        out.append(real.view(*real.shape, *(1,) * (x.dim() - 2)).expand(x.shape))
    return tuple(out)


def _flatten(tensors: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], 1)


def _unflatten(flat: Tensor, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    sizes = [x[0].numel() for x in inputs]
    return tuple(part.view(x.shape) for part, x in zip(flat.split(sizes, 1), inputs, strict=True))


def _float(t: Tensor) -> Tensor:
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def check_fractions(fractions: Sequence[float] | Tensor, *, allow_one: bool) -> list[float]:
    """The fractions as floats: non-empty, strictly increasing, in [0, 1) (or [0, 1])."""
    if isinstance(fractions, Tensor):
        fractions = fractions.detach().flatten().tolist()
    values = [float(f) for f in fractions]
    upper = "1]" if allow_one else "1)"
    if not values:
        raise ValueError(f"fractions is empty; pass increasing values in [0, {upper}.")
    if any(not (0.0 <= f <= 1.0) or (f == 1.0 and not allow_one) for f in values):
        raise ValueError(f"fractions must lie in [0, {upper}, got {values}.")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"fractions must be strictly increasing, got {values}; sort them.")
    return values


def feature_counts(n_features: Tensor, fractions: Sequence[float], rounding: Rounding) -> Tensor:
    """``(B, S)`` feature counts ``floor(f * n)`` or ``ceil(f * n)``, never more than ``n``.

    Each fraction is read as the nearest rational with a denominator up to 10**6 (0.29 is
    29/100), and the count is computed in integers, so ``floor(0.29 * 100)`` is 29 as written,
    not the 28 that float arithmetic gives.
    """
    ratios = [Fraction(f).limit_denominator(10**6) for f in fractions]
    up = 1 if rounding == "ceil" else 0
    counts = torch.stack(  # Python integers, not tensors: nothing is copied to the device
        [
            torch.div(
                n_features * r.numerator + up * (r.denominator - 1),
                r.denominator,
                rounding_mode="floor",
            )
            for r in ratios
        ],
        dim=1,
    )
    return torch.minimum(counts, n_features.unsqueeze(1))
