"""Evaluation metrics for attributions: perturbation curves, ERASER, and localization.

Everything here works on tensors and a forward callable only; it imports torch (and tqdm for
the optional progress bar), never Captum, transformers or timm.

- :func:`perturbation_curve`, :func:`perturbation_auc`: Chefer et al.'s positive/negative
  perturbation test (CVPR 2021, Sec. 4).
- :func:`deletion_curve`, :func:`insertion_curve`, :func:`deletion_auc`, :func:`insertion_auc`:
  RISE (Petsiuk et al., BMVC 2018).
- :func:`comprehensiveness`, :func:`sufficiency`: ERASER (DeYoung et al., ACL 2020).
- :func:`pointing_game`, :func:`segmentation_scores`, :func:`average_precision`: localization
  against a ground-truth mask; :func:`token_f1`: the top-k tokens against known evidence tokens.
"""

from .eraser import ERASER_BINS, comprehensiveness, sufficiency
from .localization import average_precision, pointing_game, segmentation_scores, token_f1
from .perturbation import (
    CHEFER_FRACTIONS,
    RISE_FRACTIONS,
    deletion_auc,
    deletion_curve,
    insertion_auc,
    insertion_curve,
    perturbation_auc,
    perturbation_curve,
)
from .results import MetricResult, SegmentationScores

__all__ = [
    "CHEFER_FRACTIONS",
    "ERASER_BINS",
    "RISE_FRACTIONS",
    "MetricResult",
    "SegmentationScores",
    "average_precision",
    "comprehensiveness",
    "deletion_auc",
    "deletion_curve",
    "insertion_auc",
    "insertion_curve",
    "perturbation_auc",
    "perturbation_curve",
    "pointing_game",
    "segmentation_scores",
    "sufficiency",
    "token_f1",
]
