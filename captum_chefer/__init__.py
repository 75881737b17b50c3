"""captum_chefer: Chefer et al.'s gradient-weighted attention relevance as a Captum attribution.

The Captum-facing classes are imported on first use, so that ``captum_chefer.core`` (pure
tensor math) and ``captum_chefer.metrics`` load without Captum.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .capture import mark_attention

if TYPE_CHECKING:  # type checkers see the classes; at run time __getattr__ imports them
    from .attr import (
        CPLRP,
        AttentionGradCAM,
        AttentionRollout,
        AttnLRP,
        CheferCoAttention,
        CheferDualEncoder,
        CheferEncoderDecoder,
        CheferLLMAttribution,
        CheferMultiModal,
        CheferRelevance,
        CheferSingleStream,
        GradientRollout,
        RawAttention,
    )

__version__ = "0.1.0"
"""The package version; setup.cfg reads it from here (the only place it is written)."""

__all__ = [
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
    "__version__",
    "mark_attention",
]

_LAZY = {name: "captum_chefer.attr" for name in __all__ if name[0].isupper()}
"""Names imported on first access, and the module each comes from."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'captum_chefer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
