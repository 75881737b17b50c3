"""The Captum-facing attribution classes; the only part of the package that imports Captum."""

from .base import AttentionAttribution
from .baselines import AttentionGradCAM, AttentionRollout, GradientRollout, RawAttention
from .chefer import CheferRelevance
from .llm import CheferLLMAttribution
from .lrp import CPLRP, AttnLRP
from .multimodal import (
    CheferCoAttention,
    CheferDualEncoder,
    CheferEncoderDecoder,
    CheferMultiModal,
    CheferSingleStream,
)
from .streams import StreamMap

__all__ = [
    "AttentionAttribution",
    "AttentionGradCAM",
    "AttentionRollout",
    "AttnLRP",
    "CPLRP",
    "CheferCoAttention",
    "CheferDualEncoder",
    "CheferEncoderDecoder",
    "CheferLLMAttribution",
    "CheferMultiModal",
    "CheferRelevance",
    "CheferSingleStream",
    "GradientRollout",
    "RawAttention",
    "StreamMap",
]
