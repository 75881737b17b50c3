"""The Captum-facing attribution classes; the only part of the package that imports Captum."""

from ..families import StreamMap
from .base import AttentionAttribution
from .baselines import AttentionGradCAM, AttentionRollout, GradientRollout, RawAttention
from .chefer import CheferRelevance
from .dual_encoder import CheferDualEncoder
from .llm import CheferLLMAttribution
from .lrp import CPLRP, AttnLRP
from .multimodal import CheferCoAttention, CheferEncoderDecoder, CheferMultiModal
from .single_stream import CheferSingleStream

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
