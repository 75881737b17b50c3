"""Localization of a relevance map against ground truth: pointing game, segmentation, token F1.

References:
    Zhang et al. "Top-down Neural Attention by Excitation Backprop", ECCV 2016 (pointing game).
    Chefer, Gur, Wolf. "Transformer Interpretability Beyond Attention Visualization", CVPR 2021,
    Sec. 4 (segmentation test on ImageNet-segmentation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .results import MetricResult, SegmentationScores


def pointing_game(attributions: Tensor, mask: Tensor) -> MetricResult:
    """Whether each map's maximum falls inside the ground-truth mask.

    The maximum is the first one in flat (row-major) order when several positions tie, so a
    constant map points at its first pixel rather than anywhere in the mask.

    Args:
        attributions: ``(B, H, W)``, or ``(B, C, H, W)`` which is summed over channels first.
            Any ``(B, ...)`` map works (e.g. ``(B, T)`` tokens) as long as the mask matches.
        mask: The map's shape after the channel sum, or with a singleton channel
            (``(B, 1, H, W)``); nonzero inside the object.

    Returns:
        :class:`MetricResult`: ``(B,)`` hits as floats (1.0 inside), and the hit rate.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import pointing_game
        >>> maps = torch.tensor([[[0.1, 0.9], [0.2, 0.3]], [[0.8, 0.1], [0.2, 0.3]]])
        >>> mask = torch.tensor([[[0, 1], [0, 0]], [[0, 1], [0, 0]]])
        >>> pointing_game(maps, mask).per_example.tolist()
        [1.0, 0.0]
    """
    relevance, truth = _map_and_mask(attributions, mask)
    peak = relevance.argmax(1, keepdim=True)
    hits = truth.gather(1, peak).squeeze(1).to(relevance.dtype)
    return MetricResult(hits, hits.mean())


def segmentation_scores(attributions: Tensor, mask: Tensor) -> SegmentationScores:
    """Chefer et al.'s segmentation test: pixel accuracy, mIoU and AP of a relevance map.

    Each map is min-max normalised to ``[0, 1]`` (a constant map becomes all zeros) and
    thresholded at its own mean: pixels strictly above the mean are foreground. Pixel accuracy
    and the IoU of the 2 classes (background, foreground) compare that binary map with the mask;
    the IoU of a class absent from both is 0, as in the paper's code. The average precision is
    that of the soft map as the paper computes it: the 2-class one-hot mask against
    ``(1 - map, map)``, pooled into one ranking of ``2 * H * W`` scores (see
    :func:`average_precision`). Upsample a patch-level map to the mask's size first, e.g.
    ``torch.nn.functional.interpolate(maps, size=mask.shape[-2:], mode="bilinear")``.

    Args:
        attributions: ``(B, H, W)``, or ``(B, C, H, W)`` which is summed over channels first.
        mask: ``(B, H, W)`` or ``(B, 1, H, W)``, nonzero on the object.

    Returns:
        :class:`SegmentationScores` with per-example values and the paper's pooled means
        (``mean_pixel_accuracy``, ``mean_iou``, ``mean_average_precision``).

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import segmentation_scores
        >>> maps = torch.tensor([[[0.0, 1.0], [0.2, 0.9]]])  # mean after min-max: 0.525
        >>> mask = torch.tensor([[[0, 1], [1, 1]]])
        >>> scores = segmentation_scores(maps, mask)
        >>> scores.pixel_accuracy.tolist()
        [0.75]
        >>> scores.intersection.tolist(), scores.union.tolist()  # (background, foreground)
        ([[1.0, 2.0]], [[2.0, 3.0]])
        >>> round(scores.miou.item(), 4)  # (1/2 + 2/3) / 2
        0.5833
    """
    relevance, truth = _map_and_mask(attributions, mask)
    low, high = relevance.aminmax(dim=1, keepdim=True)
    spread = high - low
    normalized = (relevance - low) / torch.where(spread > 0, spread, torch.ones_like(spread))
    foreground = normalized > normalized.mean(1, keepdim=True)
    accuracy = (foreground == truth).to(normalized.dtype).mean(1)
    predicted = torch.stack([~foreground, foreground], 1)
    actual = torch.stack([~truth, truth], 1)
    intersection = (predicted & actual).sum(2).to(normalized.dtype)
    union = (predicted | actual).sum(2).to(normalized.dtype)
    miou = (intersection / union.clamp(min=1)).mean(1)
    pooled_scores = torch.cat([1 - normalized, normalized], 1)
    ap = average_precision(pooled_scores, torch.cat([~truth, truth], 1))
    return SegmentationScores(accuracy, miou, ap, intersection, union)


def token_f1(attributions: Tensor, evidence: Tensor, candidates: Tensor | None = None):
    """F1 of the top-k tokens against known evidence tokens, with k the number of evidence tokens.

    For each example the ``k`` candidates with the highest attribution are predicted as evidence,
    ties going to the lower position. With exactly ``k`` predicted, precision, recall and F1 are
    all ``|top-k ∩ evidence| / k``; fewer candidates than ``k`` lower the recall. An example
    without evidence scores 0. Exclude [CLS]/[SEP]/padding through ``candidates``.

    Args:
        attributions: ``(B, T)`` one relevance per token (sum embeddings' attributions first).
        evidence: ``(B, T)`` bool or 0/1, the ground-truth tokens.
        candidates: ``(B, T)`` bool, the tokens that may be predicted (default: all); the
            evidence should lie inside it.

    Returns:
        :class:`MetricResult`: ``(B,)`` F1 per example and their mean.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import token_f1
        >>> relevance = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.2, 0.7, 0.1, 0.0]])
        >>> evidence = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])
        >>> candidates = torch.tensor([[False, True, True, True], [True, True, True, True]])
        >>> token_f1(relevance, evidence, candidates).per_example.tolist()
        [0.5, 1.0]
    """
    if attributions.dim() != 2 or attributions.shape != evidence.shape:
        raise ValueError(
            f"attributions {tuple(attributions.shape)} and evidence {tuple(evidence.shape)} must "
            "both be (B, T); sum embedding attributions over the hidden dimension first."
        )
    truth = evidence.to(attributions.device) != 0
    allowed = torch.ones_like(truth) if candidates is None else candidates.to(truth.device) != 0
    scores = attributions.detach().float().masked_fill(~allowed, float("-inf"))
    rank = torch.sort(scores, dim=1, descending=True, stable=True).indices.argsort(dim=1)
    k = truth.sum(1, keepdim=True)
    chosen = (rank < k) & allowed
    hits = (chosen & truth).sum(1).float()
    precision = hits / chosen.sum(1).clamp(min=1)
    recall = hits / k.squeeze(1).clamp(min=1)
    f1 = torch.where(hits > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    return MetricResult(f1, f1.mean())


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of each row, as scikit-learn's ``average_precision_score`` defines it.

    ``AP = sum_n (R_n - R_(n-1)) P_n`` over the distinct score thresholds, highest first: tied
    scores form one threshold. Equivalently, each positive contributes the precision at the end
    of its tie group, divided by the number of positives. A row without positives scores 0.

    Args:
        scores: ``(B, N)`` real-valued, higher means more likely positive.
        labels: ``(B, N)`` bool or 0/1.

    Returns:
        ``(B,)`` AP per row.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import average_precision
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
        >>> labels = torch.tensor([[1, 0, 1, 0]])
        >>> round(average_precision(scores, labels).item(), 4)  # (1/1 + 2/3) / 2
        0.8333
    """
    if scores.shape != labels.shape or scores.dim() != 2:
        raise ValueError(
            f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be (B, N)."
        )
    ranked, order = torch.sort(scores, dim=1, descending=True, stable=True)
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    hits = (labels.gather(1, order) != 0).to(dtype)
    precision = hits.cumsum(1) / torch.arange(1, hits.shape[1] + 1, device=hits.device)
    group_end = _tie_group_end(ranked)
    per_hit = hits * precision.gather(1, group_end)
    return per_hit.sum(1) / hits.sum(1).clamp(min=1)


def _tie_group_end(ranked: Tensor) -> Tensor:
    """For each position of a descending row, the last position holding the same score."""
    length = ranked.shape[1]
    last = torch.ones_like(ranked, dtype=torch.bool)
    last[:, :-1] = ranked[:, :-1] != ranked[:, 1:]
    position = torch.arange(length, device=ranked.device).expand_as(ranked)
    candidate = torch.where(last, position, torch.full_like(position, length))
    return candidate.flip(1).cummin(1).values.flip(1)


def _map_and_mask(attributions: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, N)`` float relevance and ``(B, N)`` bool mask, after the checks."""
    if not isinstance(attributions, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("attributions and mask must be tensors.")
    relevance = attributions.detach()
    if relevance.dim() == 4:
        relevance = relevance.sum(1)
    truth = mask.to(relevance.device)
    if truth.dim() == relevance.dim() + 1 and truth.shape[1] == 1:
        truth = truth.squeeze(1)
    if relevance.dim() < 2 or truth.shape != relevance.shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but the map has shape {tuple(relevance.shape)} "
            "(after summing channels); pass a (B, H, W) or (B, 1, H, W) mask of the same size, "
            "upsampling the map with torch.nn.functional.interpolate if needed."
        )
    if not relevance.is_floating_point():
        relevance = relevance.to(torch.get_default_dtype())
    batch = relevance.shape[0]
    return relevance.reshape(batch, -1), truth.reshape(batch, -1) != 0
