"""Perturbation curves: Chefer et al.'s positive/negative perturbation test and RISE's
deletion/insertion, with their areas under the curve.

References:
    Chefer, Gur, Wolf. "Transformer Interpretability Beyond Attention Visualization", CVPR 2021,
    Sec. 4 (perturbation tests). Petsiuk, Das, Saenko. "RISE: Randomized Input Sampling for
    Explanation of Black-box Models", BMVC 2018, Sec. 4.1 (deletion and insertion).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ._features import BaselineType, TensorOrTuple, check_fractions, feature_counts
from ._forward import ScoreName, TargetType
from ._pipeline import perturbation_scores

#: Chefer et al.'s steps: the unperturbed input, then 10 %, ..., 90 % of the features removed.
CHEFER_FRACTIONS = tuple(i / 10 for i in range(10))
#: RISE-style steps from nothing to everything, 0 %, 10 %, ..., 100 %.
RISE_FRACTIONS = tuple(i / 10 for i in range(11))

Reduction = Literal["none", "mean"]


def perturbation_curve(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    *,
    target: TargetType = None,
    additional_forward_args: Any = None,
    baselines: BaselineType = 0,
    fractions: Sequence[float] | Tensor = CHEFER_FRACTIONS,
    most_relevant_first: bool = True,
    feature_mask: TensorOrTuple | None = None,
    score: ScoreName = "prob",
    max_examples_per_batch: int | None = None,
    attention_mask: Tensor | None = None,
    show_progress: bool | None = None,
) -> Tensor:
    """The target's score as more and more features are replaced by the baseline.

    For each example and each fraction ``f``, the ``floor(f * n)`` features ranked highest by
    attribution (lowest with ``most_relevant_first=False``) are set to the baseline, where ``n``
    is the example's number of features. Positive perturbation (most relevant first) should make
    the score fall fast; negative perturbation (least relevant first) should keep it high
    (Chefer et al., CVPR 2021, Sec. 4).

    Features are the attribution's elements, or the groups of ``feature_mask`` (one id, one
    feature, ranked by summed attribution, as in Captum's ``FeatureAblation``). For a tuple of
    inputs the features of all tensors are ranked jointly, in one order per example, and the
    fraction counts features across all tensors. Ties go to the lower index first: the earlier
    tensor, then the lower flat position (or the lower group id).

    All fractions of all examples run as one batch of perturbed copies, in chunks of at most
    ``max_examples_per_batch`` rows, under ``torch.no_grad()``; put the model in eval mode first.
    The forward is called as ``forward_func(*perturbed_inputs, *additional_forward_args)``.

    Args:
        forward_func: The model or any callable returning ``(B, C)`` scores (or ``(B,)``/
            ``(B, 1)`` with ``score='logit'``; other shapes with a tuple target).
        inputs: A tensor ``(B, ...)`` or a tuple of them, e.g. token ids ``(B, T)``, embeddings
            ``(B, T, D)`` or images ``(B, 3, H, W)``.
        attributions: The same structure as ``inputs``; each tensor has the input's shape, or
            size 1 on dimensions it shares (``(B, 1, H, W)`` ranks whole pixels).
        target: Captum's target: an int, a tuple of ints, a ``(B,)`` tensor, or a list of ints
            or tuples per example. None: the argmax class of the unperturbed output for
            ``(B, C)`` outputs, the output itself when it has one value per example.
        additional_forward_args: Passed after the perturbed inputs (a non-tuple is one
            argument). Tensors whose first dimension is ``B`` are repeated with their example;
            anything else is passed unchanged.
        baselines: The replacement: a number (0 for pixels, the ``[MASK]`` or padding id for
            token ids), a tensor broadcastable to the input, or a ``(B, ...)`` tensor; a tuple
            for tuple inputs. It is cast to the input's dtype.
        fractions: Strictly increasing values in ``[0, 1)``.
        most_relevant_first: True for positive perturbation, False for negative.
        feature_mask: Integer feature ids broadcastable to the inputs, batch dimension 1 or B
            (a tuple for tuple inputs; equal ids in different tensors form one feature).
        score: ``"prob"`` (softmax over the last dimension), ``"logit"``, or ``"correct"``
            (1.0 where the argmax is the target, i.e. top-1 accuracy).
        max_examples_per_batch: At most this many perturbed copies per forward (None: all).
        attention_mask: ``(B, T)``, 1 at real tokens, 0 at padding. It marks which positions
            of every input (whose first dimensions are ``(B, T)``) may be ranked and changed:
            padding is never perturbed and is not counted in ``n``, so ``floor(f * n_real)``
            tokens are replaced. It is *not* passed to the model: if the model needs it, pass
            it in ``additional_forward_args`` too. Zeroing special tokens ([CLS], [SEP]) here
            keeps them intact.
        show_progress: A tqdm bar over the forward chunks. None (default) shows it only when
            there is more than one chunk and stderr is a terminal.

    Returns:
        ``(B, S)`` the score of each example at each fraction, on the inputs' device.

    Raises:
        ValueError: On mismatched shapes, bad fractions, an unknown score, or an output the
            target cannot index; the message names the fix.
        TypeError: On arguments of the wrong type (e.g. a float baseline for token ids).

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import perturbation_curve
        >>> weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> def model(x):
        ...     return x @ weight.T  # (B, 1): one logit per example
        >>> x = torch.ones(1, 4)
        >>> relevance = x * weight  # gradient x input of a linear model
        >>> fractions = (0.0, 0.25, 0.5, 0.75)
        >>> perturbation_curve(model, x, relevance, fractions=fractions, score="logit").tolist()
        [[10.0, 6.0, 3.0, 1.0]]
        >>> perturbation_curve(
        ...     model, x, relevance, fractions=fractions, score="logit", most_relevant_first=False
        ... ).tolist()
        [[10.0, 9.0, 7.0, 4.0]]
    """
    values = check_fractions(fractions, allow_one=False)
    return perturbation_scores(
        forward_func,
        inputs,
        attributions,
        _floor_plan(values, keep=False),
        target=target,
        additional_forward_args=additional_forward_args,
        baselines=baselines,
        feature_mask=feature_mask,
        attention_mask=attention_mask,
        most_relevant_first=most_relevant_first,
        score=score,
        max_examples_per_batch=max_examples_per_batch,
        show_progress=show_progress,
        description="perturbation",
    )


def deletion_curve(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    *,
    target: TargetType = None,
    additional_forward_args: Any = None,
    baselines: BaselineType = 0,
    fractions: Sequence[float] | Tensor = RISE_FRACTIONS,
    feature_mask: TensorOrTuple | None = None,
    score: ScoreName = "prob",
    max_examples_per_batch: int | None = None,
    attention_mask: Tensor | None = None,
    show_progress: bool | None = None,
) -> Tensor:
    """RISE deletion: the score as the most relevant features are removed, up to all of them.

    The same as :func:`perturbation_curve` with ``most_relevant_first=True``, except that the
    fractions may reach 1.0 (every feature replaced). Lower area is better (Petsiuk et al.,
    BMVC 2018). Arguments are those of :func:`perturbation_curve`.

    Returns:
        ``(B, S)`` the score at each fraction, on the inputs' device.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import deletion_curve
        >>> weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> def model(x):
        ...     return x @ weight.T
        >>> x = torch.ones(1, 4)
        >>> deletion_curve(model, x, x * weight, fractions=(0.0, 0.5, 1.0), score="logit").tolist()
        [[10.0, 3.0, 0.0]]
    """
    values = check_fractions(fractions, allow_one=True)
    return perturbation_scores(
        forward_func,
        inputs,
        attributions,
        _floor_plan(values, keep=False),
        target=target,
        additional_forward_args=additional_forward_args,
        baselines=baselines,
        feature_mask=feature_mask,
        attention_mask=attention_mask,
        most_relevant_first=True,
        score=score,
        max_examples_per_batch=max_examples_per_batch,
        show_progress=show_progress,
        description="deletion",
    )


def insertion_curve(
    forward_func: Callable[..., Any],
    inputs: TensorOrTuple,
    attributions: TensorOrTuple,
    *,
    target: TargetType = None,
    additional_forward_args: Any = None,
    baselines: BaselineType = 0,
    fractions: Sequence[float] | Tensor = RISE_FRACTIONS,
    feature_mask: TensorOrTuple | None = None,
    score: ScoreName = "prob",
    max_examples_per_batch: int | None = None,
    attention_mask: Tensor | None = None,
    show_progress: bool | None = None,
) -> Tensor:
    """RISE insertion: start from the baseline and put back the most relevant features first.

    At fraction ``f`` the ``floor(f * n)`` most relevant features hold their input values and
    every other feature holds the baseline (padding stays as it is). Higher area is better
    (Petsiuk et al., BMVC 2018). Arguments are those of :func:`perturbation_curve`.

    Returns:
        ``(B, S)`` the score at each fraction, on the inputs' device.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import insertion_curve
        >>> weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
        >>> def model(x):
        ...     return x @ weight.T
        >>> x = torch.ones(1, 4)
        >>> insertion_curve(model, x, x * weight, fractions=(0.0, 0.5, 1.0), score="logit").tolist()
        [[0.0, 7.0, 10.0]]
    """
    values = check_fractions(fractions, allow_one=True)
    return perturbation_scores(
        forward_func,
        inputs,
        attributions,
        _floor_plan(values, keep=True),
        target=target,
        additional_forward_args=additional_forward_args,
        baselines=baselines,
        feature_mask=feature_mask,
        attention_mask=attention_mask,
        most_relevant_first=True,
        score=score,
        max_examples_per_batch=max_examples_per_batch,
        show_progress=show_progress,
        description="insertion",
    )


def _floor_plan(fractions: list[float], keep: bool) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def plan(n_features: Tensor) -> tuple[Tensor, Tensor]:
        steps = torch.full((len(fractions),), keep, dtype=torch.bool, device=n_features.device)
        return feature_counts(n_features, fractions, "floor"), steps

    return plan


def perturbation_auc(
    curve: Tensor,
    fractions: Sequence[float] | Tensor = CHEFER_FRACTIONS,
    *,
    reduction: Reduction = "none",
) -> Tensor:
    """Chefer et al.'s area under a perturbation curve: trapezoid over the fractions, x 100.

    The grid must start at 0.0, the unperturbed score, as in the paper's x = 0, 0.1, ..., 0.9;
    with ``score='correct'`` a model that stays right throughout scores 90. The area is linear in
    the curve, so the mean of per-example areas equals the area of the mean curve (the paper's
    number). Positive perturbation: lower is better; negative: higher is better.

    Args:
        curve: ``(..., S)``, e.g. ``(B, S)`` from :func:`perturbation_curve`.
        fractions: The ``S`` fractions the curve was measured at.
        reduction: ``"none"`` (default) keeps one area per curve, ``"mean"`` averages them.

    Returns:
        ``curve.shape[:-1]`` areas, or a 0-dim tensor with ``reduction="mean"``.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import perturbation_auc
        >>> curve = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.5, 0.5]])
        >>> perturbation_auc(curve, (0.0, 0.25, 0.5)).tolist()
        [37.5, 31.25]
        >>> perturbation_auc(curve, (0.0, 0.25, 0.5), reduction="mean").item()
        34.375
    """
    grid = _grid(curve, fractions, allow_one=False)
    if grid[0] != 0:
        raise ValueError("fractions must start at 0.0 so that the unperturbed score is included.")
    return _reduce(_trapezoid(curve, grid) * 100, reduction)


def deletion_auc(
    curve: Tensor,
    fractions: Sequence[float] | Tensor = RISE_FRACTIONS,
    *,
    reduction: Reduction = "none",
) -> Tensor:
    """RISE's normalised area under a deletion curve (lower is better).

    The trapezoid area divided by the width of the grid, ``fractions[-1] - fractions[0]``: on
    the usual [0, 1] grid it is the plain area, and a constant curve ``c`` scores ``c`` on any
    grid, so the value stays on the score's scale (a probability for ``score='prob'``).

    Args:
        curve: ``(..., S)`` from :func:`deletion_curve`.
        fractions: The ``S >= 2`` fractions the curve was measured at.
        reduction: ``"none"`` (default) or ``"mean"``.

    Returns:
        ``curve.shape[:-1]`` areas, or a 0-dim tensor with ``reduction="mean"``.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import deletion_auc
        >>> deletion_auc(torch.tensor([1.0, 0.5, 0.0]), (0.0, 0.5, 1.0)).item()
        0.5
    """
    return _normalized_area(curve, fractions, reduction)


def insertion_auc(
    curve: Tensor,
    fractions: Sequence[float] | Tensor = RISE_FRACTIONS,
    *,
    reduction: Reduction = "none",
) -> Tensor:
    """RISE's normalised area under an insertion curve (higher is better).

    Normalised as in :func:`deletion_auc`: trapezoid area over ``fractions[-1] - fractions[0]``.

    Args:
        curve: ``(..., S)`` from :func:`insertion_curve`.
        fractions: The ``S >= 2`` fractions the curve was measured at.
        reduction: ``"none"`` (default) or ``"mean"``.

    Returns:
        ``curve.shape[:-1]`` areas, or a 0-dim tensor with ``reduction="mean"``.

    Example:
        >>> import torch
        >>> from captum_chefer.metrics import insertion_auc
        >>> insertion_auc(torch.tensor([[0.0, 1.0, 1.0]]), (0.0, 0.5, 1.0)).tolist()
        [0.75]
    """
    return _normalized_area(curve, fractions, reduction)


def _normalized_area(curve: Tensor, fractions: Sequence[float] | Tensor, reduction: str):
    grid = _grid(curve, fractions, allow_one=True)
    if len(grid) < 2:
        raise ValueError("A normalised area needs at least two fractions.")
    return _reduce(_trapezoid(curve, grid) / (grid[-1] - grid[0]), reduction)


def _trapezoid(curve: Tensor, grid: list[float]) -> Tensor:
    """The trapezoid area of ``curve`` ``(..., S)`` over the points ``grid``, with the grid's
    spacings as Python numbers (so nothing is copied to the curve's device)."""
    values = _as_float(curve)
    area = torch.zeros_like(values[..., 0])
    for i, (left, right) in enumerate(zip(grid, grid[1:])):
        area = area + (values[..., i] + values[..., i + 1]) * ((right - left) / 2)
    return area


def _grid(curve: Tensor, fractions: Sequence[float] | Tensor, allow_one: bool) -> list[float]:
    if not isinstance(curve, Tensor) or curve.dim() == 0:
        raise TypeError("curve must be a tensor of shape (..., S).")
    values = check_fractions(fractions, allow_one=allow_one)
    if curve.shape[-1] != len(values):
        raise ValueError(
            f"curve has {curve.shape[-1]} points but {len(values)} fractions were given; pass "
            "the fractions the curve was computed with."
        )
    return values


def _as_float(t: Tensor) -> Tensor:
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}.")
