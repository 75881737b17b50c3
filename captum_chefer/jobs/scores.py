"""Per-example metric scores of one batch's attributions, from ``captum_chefer.metrics``.

Text: Chefer et al.'s positive/negative perturbation AUC (top-1 accuracy, tokens replaced by
the source's baseline id, [CLS]/[SEP]/padding never touched), RISE deletion/insertion
(probability), ERASER comprehensiveness/sufficiency, and the token F1 against evidence tokens
when the data has them. Images: the same curves over pixels, and the pointing game and the
segmentation scores when the data has object masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..metrics import (
    comprehensiveness,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
    pointing_game,
    segmentation_scores,
    sufficiency,
    token_f1,
)
from .data import Batch

CURVES = ("positive", "negative", "deletion", "insertion")
"""The curves kept per example (their fractions: ``CHEFER_FRACTIONS`` then ``RISE_FRACTIONS``)."""


def batch_scores(
    forward: Callable[..., Tensor],
    batch: Batch,
    relevance: Tensor,
    target: Tensor,
    baseline: int | float,
    chunk: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-example scores ``{metric: (B,)}`` and curves ``{curve: (B, S)}`` of one batch.

    Args:
        forward: the model, returning ``(B, C)`` logits.
        batch: the examples.
        relevance: ``(B, T)`` or ``(B, 1, H, W)``.
        target: ``(B,)`` the explained classes.
        baseline: the replacement of removed features.
        chunk: at most this many perturbed copies per forward.
    """
    options: dict[str, Any] = {
        "target": target,
        "baselines": baseline,
        "max_examples_per_batch": chunk,
        "show_progress": False,
    }
    if batch.kind == "text":
        assert batch.attention_mask is not None and batch.special is not None
        candidates = batch.attention_mask.bool() & ~batch.special
        options |= {
            "additional_forward_args": (batch.attention_mask,),
            "attention_mask": candidates.long(),
        }
    with torch.no_grad():
        curves = _curves(forward, batch.inputs, relevance, options)
        scores = {
            "positive_auc": perturbation_auc(curves["positive"]),
            "negative_auc": perturbation_auc(curves["negative"]),
            "deletion_auc": deletion_auc(curves["deletion"]),
            "insertion_auc": insertion_auc(curves["insertion"]),
        }
        if batch.kind == "text":
            scores |= _text_scores(forward, batch, relevance, options)
        elif batch.evidence is not None:
            scores |= _image_scores(batch, relevance)
    return {k: v.float() for k, v in scores.items()}, {k: v.float() for k, v in curves.items()}


def _curves(forward, inputs: Tensor, relevance: Tensor, options: dict) -> dict[str, Tensor]:
    return {
        "positive": perturbation_curve(
            forward, inputs, relevance, most_relevant_first=True, score="correct", **options
        ),
        "negative": perturbation_curve(
            forward, inputs, relevance, most_relevant_first=False, score="correct", **options
        ),
        "deletion": deletion_curve(forward, inputs, relevance, **options),
        "insertion": insertion_curve(forward, inputs, relevance, **options),
    }


def _text_scores(forward, batch: Batch, relevance: Tensor, options: dict) -> dict[str, Tensor]:
    scores = {
        "comprehensiveness": comprehensiveness(forward, batch.inputs, relevance, **options),
        "sufficiency": sufficiency(forward, batch.inputs, relevance, **options),
    }
    values = {name: result.per_example for name, result in scores.items()}
    if batch.evidence is not None:
        candidates = options["attention_mask"].bool()
        values["token_f1"] = token_f1(relevance, batch.evidence, candidates).per_example
    return values


def _image_scores(batch: Batch, relevance: Tensor) -> dict[str, Tensor]:
    maps, masks = relevance[:, 0], batch.evidence
    assert masks is not None
    segmentation = segmentation_scores(maps, masks)
    return {
        "pointing": pointing_game(maps, masks).per_example,
        "pixel_accuracy": segmentation.pixel_accuracy,
        "miou": segmentation.miou,
        "ap": segmentation.average_precision,
        "intersection_background": segmentation.intersection[:, 0],
        "intersection_object": segmentation.intersection[:, 1],
        "union_background": segmentation.union[:, 0],
        "union_object": segmentation.union[:, 1],
    }
