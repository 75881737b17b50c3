"""captum_chefer: Chefer et al.'s gradient-weighted attention relevance as a Captum attribution.

The Captum-facing classes are imported on first use, so that ``captum_chefer.core`` (pure
tensor math) and ``captum_chefer.metrics`` load without Captum.
"""

from __future__ import annotations

import importlib
from typing import Any

from .capture import mark_attention

__version__ = "0.1.0"

_ATTRIBUTIONS = (
    "AttentionGradCAM",
    "AttentionRollout",
    "CheferCoAttention",
    "CheferDualEncoder",
    "CheferEncoderDecoder",
    "CheferLLMAttribution",
    "CheferMultiModal",
    "CheferRelevance",
    "CheferSingleStream",
    "GradientRollout",
    "RawAttention",
)
_LAZY = {name: "captum_chefer.attr" for name in _ATTRIBUTIONS}

__all__ = [*_ATTRIBUTIONS, "mark_attention", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'captum_chefer' has no attribute {name!r}")
