"""ERASER's comprehensiveness and sufficiency (AOPC over token bins).

Reference:
    DeYoung et al. "ERASER: A Benchmark to Evaluate Rationalized NLP Models", ACL 2020, Sec. 4
    (comprehensiveness, sufficiency and their area over the perturbation curve).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._features import BaselineType, TensorOrTuple, feature_counts
from ._forward import ScoreName, TargetType
from ._pipeline import perturbation_scores
from .results import MetricResult

#: ERASER's bins: the top 1, 5, 10, 20 and 50 % of the real tokens.
ERASER_BINS = (0.01, 0.05, 0.1, 0.2, 0.5)


def comprehensiveness(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    *,
    target: TargetType = None,
    additional_forward_args: Any = None,
    baselines: BaselineType = 0,
    bins: Sequence[float] = ERASER_BINS,
    feature_mask: TensorOrTuple | None = None,
    attention_mask: Tensor | None = None,
    score: ScoreName = "prob",
    max_examples_per_batch: int | None = None,
    show_progress: bool | None = None,
) -> MetricResult:
    """How much the target's probability drops when the top tokens are removed (higher is better).

    ``mean over q in bins of p(x) - p(x without its top-q tokens)``, where the removed tokens
    are set to the baseline (e.g. the ``[MASK]`` id). The top-q tokens are the
    ``k = ceil(q * n_real)`` highest-ranked real tokens: ``n_real`` counts the real tokens only
    (never the padded length). Ceil, not floor or round, so that every bin of a non-empty record
    touches at least one token (k >= 1: 1 % of 40 tokens is 1 token, 20 % of 7 tokens is 2);
    ERASER's scorer leaves the count to the model code. Ties go to the lower position. The
    arguments are those of :func:`~captum_chefer.metrics.perturbation_curve`;
    ``attention_mask`` marks the real tokens.

    Args:
        forward_func: The model, returning ``(B, C)`` logits.
        inputs: Token ids ``(B, T)`` (or embeddings ``(B, T, D)``, or a tuple of tensors).
        attributions: One relevance per token, the same structure and shape as ``inputs``.
        bins: The fractions ``q`` in ``(0, 1]``.
        score: ``"prob"`` (default, ERASER's probability) or another score of
            :func:`~captum_chefer.metrics.perturbation_curve`.

    Returns:
        :class:`MetricResult`: ``(B,)`` per-example values and their mean.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import comprehensiveness
        >>> weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
        >>> def model(x):
        ...     return x @ weight.T  # two classes
        >>> x = torch.ones(1, 4)
        >>> result = comprehensiveness(model, x, x * weight[1], target=1, bins=(0.25, 0.5))
        >>> p = torch.sigmoid(torch.tensor([10.0, 6.0, 3.0]))  # before, top 1 gone, top 2 gone
        >>> torch.allclose(result.mean, p[0] - (p[1] + p[2]) / 2)
        True
    """
    drops = _eraser_drops(
        forward_func,
        inputs,
        attributions,
        bins,
        keep=False,
        target=target,
        additional_forward_args=additional_forward_args,
        baselines=baselines,
        feature_mask=feature_mask,
        attention_mask=attention_mask,
        score=score,
        max_examples_per_batch=max_examples_per_batch,
        show_progress=show_progress,
    )
    return MetricResult(drops, drops.mean())


def sufficiency(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    *,
    target: TargetType = None,
    additional_forward_args: Any = None,
    baselines: BaselineType = 0,
    bins: Sequence[float] = ERASER_BINS,
    feature_mask: TensorOrTuple | None = None,
    attention_mask: Tensor | None = None,
    score: ScoreName = "prob",
    max_examples_per_batch: int | None = None,
    show_progress: bool | None = None,
) -> MetricResult:
    """How much the target's probability drops when only the top tokens are kept (lower is better).

    ``mean over q in bins of p(x) - p(x with only its top-q tokens)``: every other real token is
    set to the baseline, padding stays padding. The top-q tokens and their count
    ``k = ceil(q * n_real)`` are those of :func:`comprehensiveness`, which documents the
    arguments.

    Returns:
        :class:`MetricResult`: ``(B,)`` per-example values and their mean.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import sufficiency
        >>> weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
        >>> def model(x):
        ...     return x @ weight.T
        >>> x = torch.ones(1, 4)
        >>> result = sufficiency(model, x, x * weight[1], target=1, bins=(0.25, 0.5))
        >>> p = torch.sigmoid(torch.tensor([10.0, 4.0, 7.0]))  # all, top 1 only, top 2 only
        >>> torch.allclose(result.mean, p[0] - (p[1] + p[2]) / 2)
        True
    """
    drops = _eraser_drops(
        forward_func,
        inputs,
        attributions,
        bins,
        keep=True,
        target=target,
        additional_forward_args=additional_forward_args,
        baselines=baselines,
        feature_mask=feature_mask,
        attention_mask=attention_mask,
        score=score,
        max_examples_per_batch=max_examples_per_batch,
        show_progress=show_progress,
    )
    return MetricResult(drops, drops.mean())


def _eraser_drops(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    bins: Sequence[float],
    *,
    keep: bool,
    **options: Any,
) -> Tensor:
    """``(B,)`` mean over the bins of ``p(x) - p(perturbed x)``; step 0 is the unperturbed x."""
    values = _check_bins(bins)

    def plan(n_features: Tensor) -> tuple[Tensor, Tensor]:
        unperturbed = torch.zeros_like(n_features).unsqueeze(1)
        counts = torch.cat([unperturbed, feature_counts(n_features, values, "ceil")], 1)
        steps = torch.full((len(values) + 1,), keep, device=n_features.device)
        steps[:1].fill_(False)  # the unperturbed step (fill_: no scalar copied from the host)
        return counts, steps

    scores = perturbation_scores(
        forward_func,
        inputs,
        attributions,
        plan,
        most_relevant_first=True,
        description="sufficiency" if keep else "comprehensiveness",
        **options,
    )
    return (scores[:, :1] - scores[:, 1:]).mean(1)


def _check_bins(bins: Sequence[float]) -> list[float]:
    values = [float(q) for q in bins]
    if not values or any(not (0.0 < q <= 1.0) for q in values):
        raise ValueError(f"bins must be a non-empty sequence of fractions in (0, 1], got {values}.")
    return values
