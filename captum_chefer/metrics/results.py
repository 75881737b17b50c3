"""Result containers of the metrics: per-example values and their batch summaries."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class MetricResult(NamedTuple):
    """A metric per example and its mean over the batch.

    Attributes:
        per_example: ``(B,)`` one value per example.
        mean: 0-dim tensor, ``per_example.mean()``.
    """

    per_example: Tensor
    mean: Tensor


class SegmentationScores(NamedTuple):
    """Chefer et al.'s segmentation scores, per example, with the counts needed to pool them.

    Attributes:
        pixel_accuracy: ``(B,)`` the fraction of pixels whose thresholded label is right.
        miou: ``(B,)`` the IoU of background and foreground, averaged over the 2 classes.
        average_precision: ``(B,)`` the AP of the soft map (see ``segmentation_scores``).
        intersection: ``(B, 2)`` pixel counts per class (background, foreground).
        union: ``(B, 2)`` pixel counts per class.

    To pool several batches, concatenate the fields before reading the means:
    ``SegmentationScores(*map(torch.cat, zip(*batches)))``.
    """

    pixel_accuracy: Tensor
    miou: Tensor
    average_precision: Tensor
    intersection: Tensor
    union: Tensor

    @property
    def mean_pixel_accuracy(self) -> Tensor:
        """Correct pixels over all pixels of the batch (the paper's pixel accuracy)."""
        return self.pixel_accuracy.mean()

    @property
    def mean_iou(self) -> Tensor:
        """The paper's mIoU: per class, summed intersections over summed unions, then the mean
        over the 2 classes (pooled over pixels, not the mean of ``miou``)."""
        union = self.union.sum(0)
        iou = self.intersection.sum(0) / union.clamp(min=1)
        return iou.mean()

    @property
    def mean_average_precision(self) -> Tensor:
        """The mean of the per-example APs (the paper's mAP)."""
        return self.average_precision.mean()
